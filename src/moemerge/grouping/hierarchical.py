"""Agglomerative hierarchical clustering with scipy, cut at exactly r clusters."""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import cut_tree, linkage

from moemerge.errors import MoemergeError

LINKAGES = ("single", "complete", "average")


def check_linkage(method: str) -> None:
    """Raise MoemergeError unless ``method`` is a supported linkage."""
    if method not in LINKAGES:
        raise MoemergeError(f"unknown linkage {method!r}; choose one of: {', '.join(LINKAGES)}")


def hierarchical_labels(features: np.ndarray, r: int, method: str = "average") -> np.ndarray:
    """Cluster labels [n] (values 0..r-1) of ``features`` [n, d] under Euclidean distance.

    ``method`` is the linkage: single (closest pair of members), complete (farthest pair of
    members, merging the two clusters for which that is smallest) or average (mean pairwise).
    """
    check_linkage(method)
    n = len(features)
    if not 1 <= r <= n:
        raise ValueError(f"cannot make {r} clusters of {n} experts")
    if r == n:
        return np.arange(n)
    if r == 1:
        return np.zeros(n, dtype=int)
    tree = linkage(np.asarray(features, dtype=np.float64), method=method, metric="euclidean")
    labels = cut_tree(tree, n_clusters=r).ravel()
    assert len(set(labels.tolist())) == r, "scipy cut_tree did not return r clusters"
    return labels
