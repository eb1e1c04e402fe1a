"""Reduction methods: a layer's statistics and a target count in, groups of expert ids out.

Every method is registered under its ``--method`` name and called as
``method(stats, experts, r, options)``, where ``experts`` are the expert ids to reduce (all of
the layer's, or one DeepSeek routing block) to ``r``. A group of several experts is merged into
one; pruning methods return only the kept experts, each as a one-member group.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch

from moemerge.defaults import OPRUNE_BUDGET
from moemerge.grouping import (
    SoftGroups,
    expert_features,
    fcm_memberships,
    hierarchical_labels,
    kmeans_labels,
    labels_to_groups,
    single_shot_labels,
)
from moemerge.registry import register, resolve
from moemerge.statistics import LayerStatistics

# Methods that keep whole experts: with them, --router reduce already routes exactly as the pruned model.
PRUNING_METHODS = ("f-prune", "s-prune", "reap", "o-prune")
# Methods that need every expert's output on sampled tokens (collect_statistics(output_sample=...)).
NEEDS_EXPERT_OUTPUTS = ("o-prune",)


@dataclass(frozen=True)
class MethodOptions:
    """Options of the methods; each reads the ones it needs.

    metric / distance / cluster / linkage / kmeans_init: how hc-smoe compares and clusters experts
        (defaults: the paper's expert outputs, Euclidean, hierarchical, average linkage).
    oprune_budget: O-prune searches all subsets when there are at most this many, else this many
        random subsets.
    seed: seed of O-prune's random subsets and of k-means.
    """

    metric: str = "expert-output"
    distance: str = "euclidean"
    cluster: str = "hierarchical"
    linkage: str = "average"
    kmeans_init: str = "first"
    oprune_budget: int = OPRUNE_BUDGET
    seed: int = 0


# Methods that are hc-smoe with other options: the name fixes them, whatever else was asked.
M_SMOE_GROUPING = {"metric": "router-logits", "distance": "cosine", "cluster": "single-shot"}
PRESETS = {"m-smoe": M_SMOE_GROUPING, "mc-smoe": M_SMOE_GROUPING}
# Methods whose merged experts are then compressed to low-rank plus sparse (merging.low_rank).
COMPRESSING_METHODS = ("mc-smoe",)


def method_options(method: str, options: MethodOptions) -> MethodOptions:
    """The options ``method`` runs with: ``options`` with the method's preset applied."""
    return replace(options, **PRESETS.get(method, {}))


@register("cluster", "hierarchical")
def _hierarchical(features: np.ndarray, counts: np.ndarray, r: int, options: MethodOptions) -> np.ndarray:
    return hierarchical_labels(features, r, options.linkage, options.distance)


@register("cluster", "kmeans")
def _kmeans(features: np.ndarray, counts: np.ndarray, r: int, options: MethodOptions) -> np.ndarray:
    return kmeans_labels(features, r, options.kmeans_init, options.distance, options.seed)


@register("cluster", "single-shot")
def _single_shot(features: np.ndarray, counts: np.ndarray, r: int, options: MethodOptions) -> np.ndarray:
    return single_shot_labels(features, counts, r, options.distance)


@register("cluster", "fcm")
def _fcm(features: np.ndarray, counts: np.ndarray, r: int, options: MethodOptions) -> np.ndarray:
    return fcm_memberships(features, r, options.distance, options.seed)


@register("method", "hc-smoe")
def hc_smoe(stats: LayerStatistics, experts: list[int], r: int, options: MethodOptions) -> list[list[int]]:
    """HC-SMoE: cluster the experts by ``options.metric`` features (default: mean outputs o_j) into exactly r
    groups with ``options.cluster`` (default: hierarchical, average linkage, Euclidean).

    A cluster function returns labels [n], or memberships [n, r] (fuzzy c-means), which give
    :class:`SoftGroups`.
    """
    features = expert_features(stats, options.metric)[experts]
    assignment = resolve("cluster", options.cluster)(features, stats.counts[experts].numpy(), r, options)
    if assignment.ndim == 2:
        return SoftGroups.from_matrix(assignment, experts)
    return labels_to_groups(assignment, ids=experts)


@register("method", "m-smoe")
def m_smoe(stats: LayerStatistics, experts: list[int], r: int, options: MethodOptions) -> list[list[int]]:
    """M-SMoE (Li et al. 2024) without its fine-tuning: the r most frequently selected experts are dominant, and
    every other expert joins the dominant whose router logits over all calibration tokens are most similar
    (cosine). The merge is ``--merge`` (frequency by default, as M-SMoE); MC-SMoE's compression is not applied."""
    return hc_smoe(stats, experts, r, method_options("m-smoe", options))


def keep_highest(score: torch.Tensor, experts: list[int], r: int) -> list[list[int]]:
    """One-member groups of the r experts with the highest ``score`` [n] (ties: the lower id)."""
    kept = sorted(experts, key=lambda j: (-float(score[j]), j))[:r]
    return [[j] for j in sorted(kept)]


@register("method", "f-prune")
def f_prune(stats: LayerStatistics, experts: list[int], r: int, options: MethodOptions) -> list[list[int]]:
    """F-prune: keep the r experts most often selected in the router's top-k."""
    return keep_highest(stats.counts, experts, r)


@register("method", "s-prune")
def s_prune(stats: LayerStatistics, experts: list[int], r: int, options: MethodOptions) -> list[list[int]]:
    """S-prune: keep the r experts with the largest router probability (sigmoid score for DeepSeek-V3)
    summed over all calibration tokens, whether or not they were selected."""
    return keep_highest(stats.prob_sum, experts, r)


@register("method", "reap")
def reap(stats: LayerStatistics, experts: list[int], r: int, options: MethodOptions) -> list[list[int]]:
    """REAP (Cerebras 2025): keep the r experts of highest saliency, the mean over the tokens routed to j
    of g_j(x) ||E_j(x)||_2 with g the renormalised top-k weight; an expert never routed to scores 0."""
    return keep_highest(stats.reap, experts, r)


@register("method", "o-prune")
def o_prune(stats: LayerStatistics, experts: list[int], r: int, options: MethodOptions) -> list[list[int]]:
    """O-prune (Lu et al. 2024): keep the set S of r experts minimising sum_x ||MoE(x) - MoE_S(x)||^2 over the
    sampled calibration tokens, where MoE_S masks the other experts' logits to -inf before routing.

    All C(len(experts), r) subsets are tried when that is at most ``options.oprune_budget``, else that many
    random subsets (seeded), as the paper did for Qwen. With DeepSeek's routing blocks each block is searched
    on its own, the experts outside it kept. Ties go to the subset found first.
    """
    if stats.expert_outputs is None or stats.router_logits is None:
        raise ValueError("o-prune needs collect_statistics(..., output_sample > 0)")
    outputs, logits = stats.expert_outputs.double(), stats.router_logits
    rows = torch.arange(len(logits))[:, None]

    def moe(keep: torch.Tensor) -> torch.Tensor:
        weights, ids = stats.routing.route(logits, stats.selection_bias, keep)
        return torch.einsum("tk,tkh->th", weights.double(), outputs[rows, ids])

    full = moe(torch.ones(logits.shape[1], dtype=torch.bool))
    if math.comb(len(experts), r) <= options.oprune_budget:
        candidates = itertools.combinations(experts, r)
    else:
        rng = random.Random(options.seed)
        candidates = (sorted(rng.sample(experts, r)) for _ in range(options.oprune_budget))
    best, best_error = None, math.inf
    for subset in candidates:
        keep = torch.ones(logits.shape[1], dtype=torch.bool)
        keep[[j for j in experts if j not in subset]] = False
        error = float(((full - moe(keep)) ** 2).sum())
        if error < best_error:
            best, best_error = subset, error
    return [[j] for j in sorted(best)]


@register("method", "mc-smoe")
def mc_smoe(stats: LayerStatistics, experts: list[int], r: int, options: MethodOptions) -> list[list[int]]:
    """MC-SMoE (Li et al. 2024) without its distillation: M-SMoE's groups; the pipeline then compresses every
    merged expert to low-rank plus sparse (``--rank``, ``--sparsity``)."""
    return hc_smoe(stats, experts, r, method_options("mc-smoe", options))
