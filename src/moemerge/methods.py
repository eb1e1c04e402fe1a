"""Reduction methods: a layer's statistics and a target count in, groups of expert ids out.

Every method is registered under its ``--method`` name. A group of several experts is merged
into one; a one-member group keeps that expert (pruning methods return only the kept ones).
"""

from __future__ import annotations

from moemerge.grouping import hierarchical_labels, labels_to_groups
from moemerge.registry import register
from moemerge.statistics import LayerStatistics


@register("method", "hc-smoe")
def hc_smoe(stats: LayerStatistics, experts: list[int], r: int, *, linkage: str = "average") -> list[list[int]]:
    """HC-SMoE: hierarchical clustering of the experts' mean outputs o_j (Euclidean), exactly r groups.

    experts: the expert ids to group (all of the layer's, or one routing block of them).
    """
    features = stats.mean_output[experts].double().numpy()
    return labels_to_groups(hierarchical_labels(features, r, linkage), ids=experts)
