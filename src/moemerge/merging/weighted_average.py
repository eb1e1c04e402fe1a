"""Merge each group into one expert by a weighted average of its members' weights.

HC-SMoE's default weights a member by its frequency f_i (how many calibration tokens picked
it in their top-k), normalised within the group; the same weights serve gate, up and down.
"""

from __future__ import annotations

import torch

from moemerge.registry import register, resolve
from moemerge.statistics import LayerStatistics


@register("merge", "frequency")
def frequency_weights(stats: LayerStatistics, group: list[int]) -> torch.Tensor:
    """[m] f_i / sum f over the group; a group no calibration token used is averaged plainly."""
    counts = stats.counts[group].double()
    return counts / counts.sum() if counts.sum() > 0 else average_weights(stats, group)


@register("merge", "average")
def average_weights(stats: LayerStatistics, group: list[int]) -> torch.Tensor:
    """[m] 1/m for every member."""
    return torch.full((len(group),), 1.0 / len(group), dtype=torch.float64)


def member_weights(merge: str, stats: LayerStatistics, groups: list[list[int]]) -> list[torch.Tensor]:
    """The merge weights of every group's members, by the merge rule named ``merge``."""
    rule = resolve("merge", merge)
    return [rule(stats, g) for g in groups]


def merge_experts(
    weights: tuple[torch.Tensor, ...], groups: list[list[int]], member_weights: list[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Weighted average of each group's members, for every tensor in ``weights``.

    weights: per-expert tensors with the expert on dim 0, e.g. (gate [n, I, H], up [n, I, H],
    down [n, H, I]). Returns the same tensors with r = len(groups) on dim 0, in the input dtype.
    Sums run in float64, one member at a time, so that merging copies of one expert returns
    that expert bit for bit.
    """
    merged = []
    for w in weights:
        rows = []
        for group, alphas in zip(groups, member_weights, strict=True):
            acc = torch.zeros(w.shape[1:], dtype=torch.float64, device=w.device)
            for expert, alpha in zip(group, alphas.tolist(), strict=True):
                acc += alpha * w[expert].double()
            rows.append(acc.to(w.dtype))
        merged.append(torch.stack(rows))
    return tuple(merged)
