"""How well-separated a grouping of experts is, on the original model's expert features.

Silhouette (scikit-learn, Euclidean and cosine) and the Dunn index (smallest distance between
members of two different groups over the largest distance within a group; scikit-learn has no
Dunn index, so scipy's ``cdist`` computes it). Both are undefined for fewer than 2 or for as
many groups as experts (and Dunn when every group has one member): reported as None.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist, pdist


def cluster_quality(features: np.ndarray, labels: np.ndarray) -> dict:
    """{"silhouette_euclidean", "silhouette_cosine", "dunn"} of ``labels`` [n] on ``features`` [n, d]."""
    from sklearn.metrics import silhouette_score  # here, not above: scikit-learn adds 1-2 s to every command's start

    x, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    clusters = np.unique(labels)
    defined = 2 <= len(clusters) <= len(x) - 1
    result = {
        "silhouette_euclidean": float(silhouette_score(x, labels, metric="euclidean")) if defined else None,
        "silhouette_cosine": float(silhouette_score(x, labels, metric="cosine")) if defined else None,
        "dunn": None,
    }
    members = [x[labels == c] for c in clusters]
    diameter = max((pdist(m).max() for m in members if len(m) > 1), default=0.0)
    if len(clusters) >= 2 and diameter > 0:
        separation = min(cdist(a, b).min() for i, a in enumerate(members) for b in members[i + 1 :])
        result["dunn"] = float(separation / diameter)
    return result


def group_labels(groups: list[list[int]], n: int, memberships: list[list[float]] | None = None) -> np.ndarray | None:
    """Labels [n] from a layer's groups in ``moemerge.json``; fuzzy groups by largest membership; None when some
    expert is in no group (pruning), where a clustering score means nothing."""
    labels = np.full(n, -1)
    if memberships is not None:
        shares = np.zeros((n, len(groups)))
        for g, (members, u) in enumerate(zip(groups, memberships, strict=True)):
            shares[members, g] = u
        return shares.argmax(axis=1)
    for g, members in enumerate(groups):
        labels[members] = g
    return None if (labels < 0).any() else labels
