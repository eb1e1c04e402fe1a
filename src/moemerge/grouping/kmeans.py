"""k-means clustering of expert features with scikit-learn (one run, seeded: deterministic)."""

from __future__ import annotations

import numpy as np

from moemerge.registry import check_choice

KMEANS_INITS = ("first", "random", "k-means++")


def kmeans_labels(
    features: np.ndarray, r: int, init: str = "first", distance: str = "euclidean", seed: int = 0
) -> np.ndarray:
    """Cluster labels [n] (values 0..r-1) of ``features`` [n, d] by k-means.

    init: ``first`` (the first r experts are the initial centres, as the HC-SMoE paper's "fixed"
    k-means), ``random`` (r experts drawn with ``seed``) or ``k-means++`` (seeded). Cosine
    distance clusters the L2-normalised features (spherical k-means, approximately).
    scikit-learn relocates a cluster that empties, so there are always r clusters.
    """
    check_choice("k-means init", init, KMEANS_INITS)
    x = np.asarray(features, dtype=np.float64)
    if distance == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    if r == len(x):
        return np.arange(len(x))
    from sklearn.cluster import KMeans  # here, not above: scikit-learn adds 1-2 s to every command's start

    start = x[:r] if init == "first" else init
    model = KMeans(n_clusters=r, init=start, n_init=1, random_state=seed).fit(x)
    return model.labels_
