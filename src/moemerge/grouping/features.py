"""What experts are compared by (``--metric``): one feature vector per expert, from the statistics.

- ``expert-output``: o_j, the mean output over all calibration tokens (HC-SMoE's choice) [n, H];
- ``router-logits``: expert j's router logit on every calibration token [n, T];
- ``weight``: the flattened gate, up and down weights [n, 3IH], represented exactly (same
  pairwise Euclidean distances and cosines) by an n-dimensional embedding of their Gram matrix,
  so that no n x 3IH copy is ever made.
"""

from __future__ import annotations

import numpy as np

from moemerge.registry import names, register, resolve
from moemerge.statistics import LayerStatistics


def expert_features(stats: LayerStatistics, metric: str) -> np.ndarray:
    """[n, d] float64 features of every expert of the layer under ``metric``."""
    return resolve("metric", metric)(stats)


@register("metric", "expert-output")
def _mean_outputs(stats: LayerStatistics) -> np.ndarray:
    return stats.mean_output.double().numpy()


@register("metric", "router-logits", needs=("router_logit_features",))
def _router_logits(stats: LayerStatistics) -> np.ndarray:
    if stats.router_logit_features is None:
        raise ValueError("router-logits features need the router_logit_features statistic")
    return stats.router_logit_features.double().numpy()


@register("metric", "weight", needs=("weight_gram",))
def _weight_embedding(stats: LayerStatistics) -> np.ndarray:
    if stats.weight_gram is None:
        raise ValueError("weight features need the weight_gram statistic")
    eigenvalues, vectors = np.linalg.eigh(stats.weight_gram.double().numpy())
    return vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))


METRICS = tuple(names("metric"))
