"""Single-shot grouping (M-SMoE, Li et al. 2024): the r most used experts lead, the others join the nearest."""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist


def single_shot_labels(features: np.ndarray, counts: np.ndarray, r: int, distance: str = "euclidean") -> np.ndarray:
    """Cluster labels [n] (values 0..r-1): the r experts with the highest ``counts`` [n] are dominant (ties: the
    lower position), label k going to the k-th dominant in position order; every other expert takes the label of
    the dominant nearest to it under ``distance`` on ``features`` [n, d] (ties: the first dominant)."""
    n = len(features)
    dominant = sorted(sorted(range(n), key=lambda j: (-counts[j], j))[:r])
    nearest = cdist(np.asarray(features, dtype=np.float64), np.asarray(features, dtype=np.float64)[dominant], distance)
    labels = nearest.argmin(axis=1)
    labels[dominant] = np.arange(r)
    return labels
