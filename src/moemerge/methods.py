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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from moemerge.grouping import (
    SoftGroups,
    check_capacity,
    expert_features,
    fcm_memberships,
    hierarchical_labels,
    kmeans_labels,
    labels_to_groups,
    pseudo_groups,
    ream_similarity,
    single_shot_labels,
)
from moemerge.registry import register, resolve
from moemerge.statistics import LayerStatistics

if TYPE_CHECKING:
    from moemerge.options import ReduceOptions


@dataclass(frozen=True)
class Method:
    """A registered ``--method``: called as ``method(stats, experts, r, options)`` -> groups.

    prunes: it keeps whole experts (one-member groups of the kept ones); --router reduce routes exactly as the
        pruned model, and --router grouped gives each dropped expert's tokens its novice (:mod:`moemerge.routing.grouped`).
    preset: options its name fixes, whatever else was asked (:meth:`ReduceOptions.effective`).
    compresses: its merged experts are then compressed to low-rank plus sparse (:mod:`moemerge.merging.low_rank`).
    sequential: ``reduce`` collects each layer's statistics from the already-reduced layers (as ``--sequential``).
    clusters: it groups with ``--cluster`` (so ``--cluster fcm`` makes soft groups).
    check: (routing blocks [(expert ids, groups)], options) -> None, raising MoemergeError for a count the method
        cannot make; run before any work.
    router: the router mode it needs (None: either).
    """

    choose: Callable[[LayerStatistics, list[int], int, ReduceOptions], list[list[int]]]
    prunes: bool = False
    preset: Mapping[str, str] = field(default_factory=dict)
    compresses: bool = False
    sequential: bool = False
    clusters: bool = False
    check: Callable[[list[tuple[list[int], int]], ReduceOptions], None] | None = None
    router: str | None = None

    def __call__(self, stats: LayerStatistics, experts: list[int], r: int, options: ReduceOptions):
        return self.choose(stats, experts, r, options)


def method(name: str, needs: tuple[str, ...] = (), **declared) -> Callable:
    """Decorator: register a function as the :class:`Method` ``name`` (``needs``: the optional statistics it reads,
    as :func:`moemerge.registry.register`; ``declared``: the Method's other fields)."""

    def add(choose: Callable) -> Callable:
        register("method", name, needs)(Method(choose, **declared))
        return choose

    return add


# M-SMoE's grouping: what the names m-smoe and mc-smoe fix
M_SMOE_GROUPING = {"metric": "router-logits", "distance": "cosine", "cluster": "single-shot"}


@register("cluster", "hierarchical")
def _hierarchical(features: np.ndarray, counts: np.ndarray, r: int, options: ReduceOptions) -> np.ndarray:
    return hierarchical_labels(features, r, options.linkage, options.distance)


@register("cluster", "kmeans")
def _kmeans(features: np.ndarray, counts: np.ndarray, r: int, options: ReduceOptions) -> np.ndarray:
    return kmeans_labels(features, r, options.kmeans_init, options.distance, options.seed)


@register("cluster", "single-shot")
def _single_shot(features: np.ndarray, counts: np.ndarray, r: int, options: ReduceOptions) -> np.ndarray:
    return single_shot_labels(features, counts, r, options.distance)


@register("cluster", "fcm")
def _fcm(features: np.ndarray, counts: np.ndarray, r: int, options: ReduceOptions) -> np.ndarray:
    return fcm_memberships(features, r, options.distance, options.seed)


@method("hc-smoe", clusters=True)
def hc_smoe(stats: LayerStatistics, experts: list[int], r: int, options: ReduceOptions) -> list[list[int]]:
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


# Sub-MoE's clustering, and the merge its joint SVD reduces to when no rank is cut (see sub_moe)
SUB_MOE_GROUPING = {
    "metric": "expert-output",
    "distance": "cosine",
    "cluster": "kmeans",
    "kmeans_init": "k-means++",
    "merge": "frequency",
}


@method("sub-moe", preset=SUB_MOE_GROUPING, clusters=True)
def sub_moe(stats: LayerStatistics, experts: list[int], r: int, options: ReduceOptions) -> list[list[int]]:
    """Sub-MoE (Li et al. 2025, "Efficient Mixture-of-Expert LLMs Compression via Subspace Expert Merging") for
    the expert count alone: k-means (k-means++, seeded) on the cosine of the experts' mean outputs, then each
    group's weights merged by its joint SVD: W_i = U S V_i^T for the members' matrices side by side
    ([W_1 ... W_m] = U S [V_1 ... V_m]^T), merged as U S (sum_i f_i V_i)^T with f_i the members' shares of the
    group's routed tokens. Without a rank cut that is sum_i f_i W_i exactly: the frequency-weighted average,
    which is what runs (``tests/test_grouping_options.py`` checks the identity against numpy's SVD). The paper's
    second stage, cutting U's rank, is low-rank compression of the merged experts, as ``mc-smoe``'s, and is not
    part of this method."""
    return hc_smoe(stats, experts, r, options)


@method("m-smoe", preset=M_SMOE_GROUPING, clusters=True)
def m_smoe(stats: LayerStatistics, experts: list[int], r: int, options: ReduceOptions) -> list[list[int]]:
    """M-SMoE (Li et al. 2024) without its fine-tuning: the r most frequently selected experts are dominant, and
    every other expert joins the dominant whose router logits over all calibration tokens are most similar
    (cosine): hc-smoe with the preset M_SMOE_GROUPING. The merge is ``--merge`` (frequency by default, as M-SMoE);
    MC-SMoE's compression is not applied."""
    return hc_smoe(stats, experts, r, options)


def required(stats: LayerStatistics, name: str) -> torch.Tensor:
    """The optional statistic ``name`` of ``stats``; ValueError if the calibration did not collect it."""
    value = getattr(stats, name)
    if value is None:
        raise ValueError(f"this method needs the {name} statistic, which the calibration did not collect")
    return value


def keep_highest(score: torch.Tensor, experts: list[int], r: int) -> list[list[int]]:
    """One-member groups of the r experts with the highest ``score`` [n] (ties: the lower id)."""
    kept = sorted(experts, key=lambda j: (-float(score[j]), j))[:r]
    return [[j] for j in sorted(kept)]


@method("f-prune", prunes=True)
def f_prune(stats: LayerStatistics, experts: list[int], r: int, options: ReduceOptions) -> list[list[int]]:
    """F-prune: keep the r experts most often selected in the router's top-k."""
    return keep_highest(stats.counts, experts, r)


@method("s-prune", prunes=True)
def s_prune(stats: LayerStatistics, experts: list[int], r: int, options: ReduceOptions) -> list[list[int]]:
    """S-prune: keep the r experts with the largest router probability (sigmoid score for DeepSeek-V3)
    summed over all calibration tokens, whether or not they were selected."""
    return keep_highest(stats.prob_sum, experts, r)


@method("reap", prunes=True)
def reap(stats: LayerStatistics, experts: list[int], r: int, options: ReduceOptions) -> list[list[int]]:
    """REAP (Cerebras 2025): keep the r experts of highest saliency, the mean over the tokens routed to j
    of g_j(x) ||E_j(x)||_2 with g the renormalised top-k weight; an expert never routed to scores 0."""
    return keep_highest(stats.reap, experts, r)


@method("man", needs=("activation_norm",), prunes=True)
def man(stats: LayerStatistics, experts: list[int], r: int, options: ReduceOptions) -> list[list[int]]:
    """MAN (Liu et al. 2026, "How to Score Experts for One-Shot MoE Expert Pruning"): keep the r experts of
    largest mean activation norm, the mean over the tokens routed to j of ||E_j(x)||_2, without gate weight."""
    return keep_highest(required(stats, "activation_norm"), experts, r)


@method("msan", needs=("activation_sq_norm",), prunes=True)
def msan(stats: LayerStatistics, experts: list[int], r: int, options: ReduceOptions) -> list[list[int]]:
    """MSAN (same paper): keep the r experts of largest mean over routed tokens of ||E_j(x)||_2^2."""
    return keep_highest(required(stats, "activation_sq_norm"), experts, r)


@method(
    "mone", needs=("routed_mean_output", "activation_sq_norm", "routing_weight_mean"), prunes=True, router="grouped"
)
def mone(stats: LayerStatistics, experts: list[int], r: int, options: ReduceOptions) -> list[list[int]]:
    """MoNE (Zhang et al. 2025, "Replacing Redundant Experts with Lightweight Novices"; code zxgx/mode-pd, its
    ``fusion`` ranking per layer): keep the r experts of largest ||std of E_j(x)||_2 over the tokens routed to j
    (the square root of mean ||E_j||^2 - ||mean E_j||^2) times j's mean top-k routing weight over all tokens; the
    dropped experts become novices, their mean routed outputs, which needs ``--router grouped``."""
    mean = required(stats, "routed_mean_output").double()
    variance = required(stats, "activation_sq_norm") - mean.square().sum(-1)
    return keep_highest(variance.clamp(min=0).sqrt() * required(stats, "routing_weight_mean"), experts, r)


@method("o-prune", needs=("expert_outputs", "router_logits"), prunes=True)
def o_prune(stats: LayerStatistics, experts: list[int], r: int, options: ReduceOptions) -> list[list[int]]:
    """O-prune (Lu et al. 2024): keep the set S of r experts minimising sum_x ||MoE(x) - MoE_S(x)||^2 over the
    sampled calibration tokens, where MoE_S masks the other experts' logits to -inf before routing.

    All C(len(experts), r) subsets are tried when that is at most ``options.oprune_budget``, else that many
    random subsets (seeded), as the paper did for Qwen. With DeepSeek's routing blocks each block is searched
    on its own, the experts outside it kept. Ties go to the subset found first.
    """
    outputs, logits = required(stats, "expert_outputs").double(), required(stats, "router_logits")
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


def _ream_capacity(blocks: list[tuple[list[int], int]], options: ReduceOptions) -> None:
    for ids, share in blocks:
        check_capacity(len(ids), share, options.ream_group_size)


@method(
    "ream",
    needs=("gated_mean_output", "router_logit_features"),
    preset={"merge": "saliency", "router_rows": "saliency"},
    sequential=True,
    check=_ream_capacity,
)
def ream(stats: LayerStatistics, experts: list[int], r: int, options: ReduceOptions) -> list[list[int]]:
    """REAM (Samsung SAIL Montreal 2026): the r experts of highest REAP saliency lead the groups, each taking its
    most similar unassigned experts up to ``options.ream_group_size`` (:mod:`moemerge.grouping.ream`); the preset
    merges by saliency with Hungarian neuron alignment (merge ``saliency``) and keeps each centre's router row
    (router rows ``saliency``); ``reduce`` runs it layer-sequentially, as the paper."""
    similarity = ream_similarity(required(stats, "gated_mean_output"), required(stats, "router_logit_features"))
    return pseudo_groups(stats.reap, similarity, experts, r, options.ream_group_size)


@method("mc-smoe", preset=M_SMOE_GROUPING, compresses=True, clusters=True)
def mc_smoe(stats: LayerStatistics, experts: list[int], r: int, options: ReduceOptions) -> list[list[int]]:
    """MC-SMoE (Li et al. 2024) without its distillation: M-SMoE's groups; the pipeline then compresses every
    merged expert to low-rank plus sparse (``--rank``, ``--sparsity``)."""
    return hc_smoe(stats, experts, r, options)
