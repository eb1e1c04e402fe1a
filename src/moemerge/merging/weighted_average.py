"""Merge each group into one expert by a weighted average of its members' weights.

HC-SMoE's default weights a member by its frequency f_i (how many calibration tokens picked
it in their top-k), normalised within the group; the same weights serve gate, up and down.
Every ``--merge`` rule is a :class:`MergeRule`: member weights, and optionally a matching of
member neurons into merged neurons (fix-dom, ZipIt: :mod:`moemerge.merging.neuron_matching`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moemerge.grouping import SoftGroups
from moemerge.registry import register, resolve
from moemerge.statistics import LayerStatistics


@dataclass(frozen=True)
class MergeRule:
    """What ``--merge NAME`` does to a group.

    weights: (stats, group) -> [m] member weights summing to 1.
    match: None (neuron a of every member goes into merged neuron a), or a function of the members'
        intermediate activations [t, I] each (dominant member first) and their weights [m], returning
        units [m, I]: the merged neuron each member neuron goes into.
    all_tokens: match on every sampled calibration token (default: the tokens the router sent to the group).
    """

    weights: Callable[[LayerStatistics, list[int]], torch.Tensor]
    match: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor] | None = None
    all_tokens: bool = False


def frequency_weights(stats: LayerStatistics, group: list[int]) -> torch.Tensor:
    """[m] f_i / sum f over the group; a group no calibration token used is averaged plainly."""
    counts = stats.counts[group].double()
    return counts / counts.sum() if counts.sum() > 0 else average_weights(stats, group)


def average_weights(stats: LayerStatistics, group: list[int]) -> torch.Tensor:
    """[m] 1/m for every member."""
    return torch.full((len(group),), 1.0 / len(group), dtype=torch.float64)


register("merge", "frequency")(MergeRule(frequency_weights))
register("merge", "average")(MergeRule(average_weights))


def member_weights(merge: str, stats: LayerStatistics, groups: list[list[int]]) -> list[torch.Tensor]:
    """The merge weights [m] of every group's members, by the merge rule named ``merge`` (for
    :class:`SoftGroups`, times the memberships and normalised again)."""
    rule = resolve("merge", merge)
    weights = [rule.weights(stats, g) for g in groups]
    if isinstance(groups, SoftGroups):  # a member counts by its merge weight times its membership
        weights = [w * u / (w * u).sum() for w, u in zip(weights, groups.memberships, strict=True)]
    return weights


def merge_experts(
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    groups: list[list[int]],
    member_weights: list[torch.Tensor],
    units: list[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert per group: (gate [r, I, H], up [r, I, H], down [r, H, I]) from the layer's ``weights``
    (gate/up [n, I, H], down [n, H, I]), in the input dtype.

    With member weights a_i and ``units`` (per group [m, I] or None for the identity), merged neuron u
    has the a-weighted mean of the gate and up rows of the member neurons put into u, and the a-weighted
    *sum* of their down columns: if those neurons fire alike, the merged expert's output is
    sum_i a_i E_i(x), and two neurons of one member folded together keep their joint output. With
    the identity this is the plain weighted average of the members. Sums run in float64, one member
    at a time, so that merging copies of one expert returns that expert bit for bit.
    """
    gate, up, down = weights
    size = gate.shape[1]
    units = units or [None] * len(groups)
    # each merged expert is written (rounded to the input dtype) straight into its row: no list to stack
    merged = tuple(torch.empty((len(groups), *w.shape[1:]), dtype=w.dtype, device=w.device) for w in weights)
    for g, (group, alphas, unit) in enumerate(zip(groups, member_weights, units, strict=True)):
        if unit is None and len(group) == 1 and alphas.tolist() == [1.0]:  # 1.0 * w in float64 is w: skip the sums
            for out, w in zip(merged, weights, strict=True):
                out[g] = w[group[0]]
            continue
        acc = [torch.zeros(w.shape[1:], dtype=torch.float64, device=w.device) for w in (gate, up, down)]
        mass = torch.zeros(size, dtype=torch.float64, device=gate.device)
        for m, (expert, alpha) in enumerate(zip(group, alphas.tolist(), strict=True)):
            parts = [w[expert].to(torch.float64).mul_(alpha) for w in (gate, up, down)]  # alpha * w, one buffer each
            if unit is None:  # identity units: the plain weighted sum
                for total, part in zip(acc, parts, strict=True):
                    total += part
                continue
            into = unit[m].to(gate.device)
            for total, part, dim in zip(acc, parts, (0, 0, 1), strict=True):
                total.index_add_(dim, into, part)
            mass.index_add_(0, into, torch.full((size,), alpha, dtype=torch.float64, device=gate.device))
        if unit is not None:  # identity units have mass sum(a) = 1: no division, so copies merge bit for bit
            acc[0] /= mass[:, None]
            acc[1] /= mass[:, None]
        for out, a in zip(merged, acc, strict=True):
            out[g] = a
    return merged
