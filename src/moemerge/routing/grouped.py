"""The paper's routing: keep the n-way router, send a token routed to any member to its group's expert.

With a pruning method, an expert in no group was dropped; grouped routing then gives its tokens a *novice*
(MoNE, Zhang et al. 2025): the dropped expert's mean output over the calibration tokens routed to it, a constant
[H] scaled by the token's routing weight for that expert.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from moemerge.adapters.base import MoELayerView, set_router_rows, tensor_at


class KeptRouter(NamedTuple):
    """What grouped routing keeps of one MoE layer: the original router's weight [n, H] and selection bias [n]
    or None, and the novices [m, H] (mean routed outputs of the m experts in no group, in id order) or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    novices: torch.Tensor | None = None


def dropped_experts(groups: list[list[int]], n: int) -> list[int]:
    """The experts of 0..n-1 in no group (those a pruning method dropped), ascending."""
    members = {e for group in groups for e in group}
    return [e for e in range(n) if e not in members]


def expert_map(groups: list[list[int]], n: int, novices: bool = False) -> torch.Tensor:
    """[n] int64: the merged expert of each original expert; with ``novices``, an expert in no group maps to
    r + t, t its place among :func:`dropped_experts` (the novice's row)."""
    mapping = torch.full((n,), -1, dtype=torch.int64)
    for g, members in enumerate(groups):
        mapping[members] = g
    dropped = dropped_experts(groups, n)
    if dropped and not novices:
        raise ValueError("grouped routing needs every expert in a group, or a novice for each expert in none")
    mapping[dropped] = len(groups) + torch.arange(len(dropped))
    return mapping


class GroupedRouter(nn.Module):
    """Wraps a transformers router module (n rows); maps its top-k expert ids through ``expert_map``.

    Two selected members of one group both land on the merged expert, which then receives the
    sum of their routing weights: exactly the paper's semantics. Ids at or above r (novices) are
    answered by the layer's :class:`Novices`.
    """

    def __init__(self, router: nn.Module, expert_map: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.router = router
        self.register_buffer("expert_map", expert_map.to(next(router.parameters()).device))
        self.register_buffer("bias", bias)  # the original selection bias [n] of a block that keeps it (MiniMax-M2)

    def forward(self, hidden_states: torch.Tensor, *block_bias):
        """The original router's (logits, weights, ids) with ids mapped; the block's own selection bias (the
        reduced one), where it hands one, is replaced by the original's."""
        extra = block_bias if self.bias is None else (self.bias,)
        logits, weights, indices = self.router(hidden_states, *extra)
        return logits, weights, self.expert_map[indices]


class Novices(nn.Module):
    """The novices of one MoE layer with r experts: constants [m, H] that answer the expert ids r..r+m-1 a
    :class:`GroupedRouter` gives.

    Hooked on the block's experts module, whose forward every supported family calls as
    ``experts(hidden [t, H], ids [t, k], weights [t, k])``: before it, each novice slot's weight x constant is
    summed per token and the slot is sent to expert 0 with weight 0; after it, that sum is added to the output.
    A novice slot so still costs one expert evaluation, as in the unpruned model: transformers' experts
    implementations skip an out-of-range id only under expert parallelism.
    """

    def __init__(self, constants: torch.Tensor, first: int):
        super().__init__()
        self.register_buffer("constants", constants)
        self.first = first
        self._pending: torch.Tensor | None = None
        self._hooks = []

    def attach(self, experts: nn.Module) -> None:
        """Hook onto ``experts`` (the block's experts module) and become its submodule ``novices``."""
        experts.novices = self
        self._hooks = [experts.register_forward_pre_hook(self._before), experts.register_forward_hook(self._after)]

    @staticmethod
    def detach(experts: nn.Module) -> None:
        """Take the novices (if any) off ``experts`` again."""
        novices = experts._modules.pop("novices", None)
        for hook in getattr(novices, "_hooks", ()):
            hook.remove()

    def _before(self, module, args):
        hidden, ids, weights, *rest = args
        novice = ids >= self.first
        slot_weights = weights.masked_fill(~novice, 0).to(self.constants.dtype)
        per_novice = slot_weights.new_zeros(len(ids), len(self.constants))  # [t, m]
        per_novice.scatter_add_(1, (ids - self.first).clamp(min=0), slot_weights)
        self._pending = per_novice @ self.constants
        return (hidden, ids.masked_fill(novice, 0), weights.masked_fill(novice, 0), *rest)

    def _after(self, module, args, output):
        pending, self._pending = self._pending, None
        return output + pending.to(output.dtype)


def install_grouped_routers(
    layers: list[MoELayerView],
    routers: dict[int, KeptRouter],
    groups: dict[int, list[list[int]]],
    top_k: int,
) -> None:
    """Put a :class:`GroupedRouter` on every MoE layer of a reduced model, and its :class:`Novices` on a layer
    whose kept router has them.

    layers: the model's ``MoELayerView`` list; routers: per decoder layer, the :class:`KeptRouter`;
    groups: per decoder layer, the groups.
    """
    for view in layers:
        kept = KeptRouter(*routers[view.layer])
        layer_groups = groups[view.layer]
        original = copy.deepcopy(view.router)
        set_router_rows(original, kept.weight, kept.bias, top_k=top_k, paths=view.paths)
        novices = kept.novices is not None
        bias = kept.bias if view.block_bias is not None else None  # else it is in the router, set above
        view.router = GroupedRouter(original, expert_map(layer_groups, len(kept.weight), novices), bias)
        if novices:
            rows = tensor_at(original, view.paths[0])
            Novices(kept.novices.to(rows), len(layer_groups)).attach(view.block.experts)


@contextmanager
def grouped_routing(view: MoELayerView, kept: KeptRouter, groups: list[list[int]], top_k: int) -> Iterator[None]:
    """Inside, ``view``'s block routes as it will once a ``--router grouped`` output is loaded; after, its gate
    and experts are as before."""
    gate = view.router
    install_grouped_routers([view], {view.layer: kept}, {view.layer: groups}, top_k)
    try:
        yield
    finally:
        view.router = gate
        Novices.detach(view.block.experts)
