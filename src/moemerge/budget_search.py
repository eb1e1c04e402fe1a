"""``--budget search``: per-layer expert counts under the global budget, chosen by a proxy on calibration tokens.

EvoESAP (arXiv 2603.06003) searches per-layer counts with an evolutionary algorithm, scoring each candidate by a
teacher-forced proxy. Here the proxy is e_l(c): the mean over layer l's sampled calibration inputs (the original
model's hidden states, so teacher-forced) of ||y_c(x) - y(x)||^2, y the original MoE block's output and y_c the
block reduced to c experts by the run's own method, merge, router rows, refit and router mode. The total
sum_l e_l(c_l) is additive over layers, so its minimum under sum_l c_l = L r (each c_l from top-k to n) is found
exactly by dynamic programming instead of searched.

Cost: every MoE layer is reduced once for each count from top-k to n - 1 and run on its sampled inputs (up to
8192 tokens), with a copy of its MoE block in memory; the proxy ignores how one layer's error changes the next
layer's inputs.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from moemerge.adapters import MoELayerView
from moemerge.errors import MoemergeError
from moemerge.options import ReduceOptions
from moemerge.routing.grouped import install_grouped_routers
from moemerge.statistics import LayerStatistics

SEARCH_IN_REDUCE_ONLY = (
    "--budget search reduces every layer at every expert count while the layer is loaded, which moemerge reduce "
    "does; use reduce for it, or another --budget here"
)


@torch.no_grad()
def layer_errors(view: MoELayerView, stats: LayerStatistics, family, config, options: ReduceOptions) -> torch.Tensor:
    """[n - top_k + 1] float64: e(c) for c = top_k .. n (e(n) = 0; inf for a count the method cannot make) of one
    MoE layer, its block left unchanged."""
    from moemerge.pipeline import merge_layer, plan_groups

    top_k, n = family.routing_rule(config).top_k, view.num_experts
    x = stats.router_inputs
    if x is None:
        raise ValueError("--budget search needs the router_inputs statistic")
    down = view.block.experts.down_proj  # the block's inputs come in the experts' dtype
    x = x.to(device=down.device, dtype=down.dtype)[None]
    original = view.block(x).double()
    errors = torch.zeros(n - top_k + 1, dtype=torch.float64)
    uniform = options.replace(budget="uniform")
    for count in range(top_k, n):
        try:
            groups = plan_groups({view.layer: stats}, family, config, count, uniform)[view.layer]
        except MoemergeError:  # a count the method cannot make (ream: groups too small to hold every expert)
            errors[count - top_k] = torch.inf
            continue
        trial = MoELayerView(view.layer, copy.deepcopy(view.block), view.routing)
        router = merge_layer(trial, groups, stats, *options.merging, options.align, options.refit, options.router)
        if options.router == "grouped":
            install_grouped_routers([trial], {view.layer: router}, {view.layer: groups}, top_k)
        errors[count - top_k] = (trial.block(x).double() - original).square().sum(-1).mean()
    return errors


def searched_budgets(errors: dict[int, torch.Tensor], r: int, floor: int) -> dict[int, int]:
    """Experts per layer minimising sum_l errors[l][c_l - floor] with sum_l c_l = r x layers (exact dynamic
    programming; ties go to the first allocation found, smaller counts for later layers first)."""
    layers = sorted(errors)
    curves = [errors[layer].double().numpy() for layer in layers]
    total = r * len(layers) - floor * len(layers)  # slots above the floor to hand out
    best = np.zeros(total + 1)
    best[1:] = np.inf
    choices = []
    for curve in curves:
        extra = len(curve) - 1
        new, pick = np.full(total + 1, np.inf), np.zeros(total + 1, dtype=np.int64)
        for give in range(min(extra, total) + 1):
            candidate = np.full(total + 1, np.inf)
            candidate[give:] = best[: total + 1 - give] + curve[give]
            better = candidate < new
            new[better], pick[better] = candidate[better], give
        best = new
        choices.append(pick)
    kept, left = {}, total
    for layer, pick in zip(reversed(layers), reversed(choices), strict=True):
        give = int(pick[left])
        kept[layer], left = floor + give, left - give
    return dict(sorted(kept.items()))
