"""Per-layer expert budgets: how many experts each MoE layer keeps (HC-SMoE paper, appendix B.1).

``uniform``: r in every layer. ``frequency``: rank every expert of every layer by its
activation frequency, keep the global top L * r, and give each layer as many experts (clusters)
as it has kept, never fewer than top-k: each layer first keeps its top-k experts, then the
remaining slots go to the most frequent of the other experts, wherever they are. The average
stays r. ``probability`` does the same by summed router probability (S-prune's score), which
makes ``--method s-prune`` global S-prune as ``frequency`` makes F-prune global. ``search`` minimises a
per-layer output-error proxy over all allocations (:mod:`moemerge.budget_search`).
"""

from __future__ import annotations

import torch

BUDGETS = ("uniform", "frequency", "probability", "search")


def layer_budgets(scores: dict[int, torch.Tensor], r: int, floor: int) -> dict[int, int]:
    """Experts kept per layer: ``scores`` per layer [n] (comparable across layers), average ``r``, each
    layer at least ``floor`` (<= r). Ties go to the earlier layer, then the lower expert id."""
    ranked = []
    kept = {}
    for layer, score in scores.items():
        order = sorted(range(len(score)), key=lambda j: (-float(score[j]), j))
        kept[layer] = floor
        ranked += [(-float(score[j]), layer, j) for j in order[floor:]]
    for _, layer, _ in sorted(ranked)[: r * len(scores) - floor * len(scores)]:
        kept[layer] += 1
    return kept
