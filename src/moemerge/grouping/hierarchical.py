"""Agglomerative hierarchical clustering with scipy, cut at exactly r clusters.

scipy gets both cases right that the public HC-SMoE code got wrong: complete linkage merges the
two clusters whose farthest members are closest, and ward works on Euclidean distances with the
Lance-Williams update for squared ones.
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import cut_tree, linkage

from moemerge.errors import MoemergeError
from moemerge.registry import check_choice

LINKAGES = ("single", "complete", "average", "ward")
DISTANCES = ("euclidean", "cosine")


def check_linkage(method: str, distance: str = "euclidean") -> None:
    """Raise MoemergeError unless ``method`` and ``distance`` are supported together."""
    check_choice("linkage", method, LINKAGES)
    check_choice("distance", distance, DISTANCES)
    if method == "ward" and distance != "euclidean":
        raise MoemergeError("ward linkage is defined for Euclidean distance only; use --distance euclidean")


def hierarchical_labels(
    features: np.ndarray, r: int, method: str = "average", distance: str = "euclidean"
) -> np.ndarray:
    """Cluster labels [n] (values 0..r-1) of ``features`` [n, d].

    ``method`` is the linkage: single (closest pair of members), complete (farthest pair of
    members, merging the two clusters for which that is smallest), average (mean pairwise) or
    ward (least increase of within-cluster squared Euclidean distance). ``distance``: euclidean
    or cosine.
    """
    check_linkage(method, distance)
    n = len(features)
    if not 1 <= r <= n:
        raise ValueError(f"cannot make {r} clusters of {n} experts")
    if r == n:
        return np.arange(n)
    if r == 1:
        return np.zeros(n, dtype=int)
    tree = linkage(np.asarray(features, dtype=np.float64), method=method, metric=distance)
    labels = cut_tree(tree, n_clusters=r).ravel()
    assert len(set(labels.tolist())) == r, "scipy cut_tree did not return r clusters"
    return labels
