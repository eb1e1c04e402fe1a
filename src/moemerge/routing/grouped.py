"""The paper's routing: keep the n-way router, send a token routed to any member to its group's expert."""

from __future__ import annotations

import copy

import torch
from torch import nn

from moemerge.adapters.base import MoELayerView, set_router_rows


def expert_map(groups: list[list[int]], n: int) -> torch.Tensor:
    """[n] int64: the merged expert of each original expert."""
    mapping = torch.full((n,), -1, dtype=torch.int64)
    for g, members in enumerate(groups):
        mapping[members] = g
    if (mapping < 0).any():
        raise ValueError("grouped routing needs every expert in a group")
    return mapping


class GroupedRouter(nn.Module):
    """Wraps a transformers router module (n rows); maps its top-k expert ids through ``expert_map``.

    Two selected members of one group both land on the merged expert, which then receives the
    sum of their routing weights: exactly the paper's semantics.
    """

    def __init__(self, router: nn.Module, expert_map: torch.Tensor):
        super().__init__()
        self.router = router
        self.register_buffer("expert_map", expert_map.to(router.weight.device))

    def forward(self, hidden_states: torch.Tensor):
        logits, weights, indices = self.router(hidden_states)
        return logits, weights, self.expert_map[indices]


def install_grouped_routers(
    layers: list[MoELayerView],
    routers: dict[int, tuple[torch.Tensor, torch.Tensor | None]],
    groups: dict[int, list[list[int]]],
    top_k: int,
) -> None:
    """Put a :class:`GroupedRouter` on every MoE layer of a reduced model.

    layers: the model's ``MoELayerView`` list; routers: per decoder layer, the original router
    weight [n, H] and selection bias [n] (or None); groups: per decoder layer, the groups.
    """
    for view in layers:
        weight, bias = routers[view.layer]
        original = copy.deepcopy(view.block.gate)
        set_router_rows(original, weight, bias, top_k=top_k)
        view.block.gate = GroupedRouter(original, expert_map(groups[view.layer], len(weight)))
