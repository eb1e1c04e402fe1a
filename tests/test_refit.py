"""``--refit down``: the closed-form refit of the reduced experts' down projections (moemerge.merging.refit).

Oracles are the MoE blocks' own forward (transformers' routing, experts and shared experts) and a ridge problem
solved by ``torch.linalg.lstsq`` on the stacked system, not the normal equations the code solves.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, tiny_model

import moemerge.merging.refit as refit
from moemerge import apply_groups, plan_groups
from moemerge.adapters import FAMILIES as ADAPTERS
from moemerge.routing.grouped import install_grouped_routers
from moemerge.statistics import collect_statistics

R = 4


def calibrated(family: str, length: int):
    """(tiny model, its adapter, statistics with router inputs of two sequences of ``length`` tokens)."""
    model = tiny_model(family)
    adapter = ADAPTERS[family]
    gen = torch.Generator().manual_seed(3)
    sequences = [torch.randint(0, 97, (length,), generator=gen) for _ in range(2)]
    stats = collect_statistics(model, adapter.moe_layers(model), sequences, {"router_inputs"}, progress=False)
    return model, adapter, stats


def reduced(model, adapter, stats, groups, router: str, fit: str):
    """A reduced copy of ``model`` to ``groups``, its router mode installed."""
    model = copy.deepcopy(model)
    originals = apply_groups(model, adapter, stats, groups, router_rows_rule="lse", refit=fit, router=router)
    if router == "grouped":
        install_grouped_routers(adapter.moe_layers(model), originals, groups, model.config.num_experts_per_tok)
    return model


def block_output(block, x: torch.Tensor) -> torch.Tensor:
    """[t, H] float64 output of an MoE block (shared experts included) on hidden states x [t, H]."""
    with torch.no_grad():
        return block(x[None]).reshape(len(x), -1).double()


def routed(block, x: torch.Tensor, r: int) -> torch.Tensor:
    """[t, r] float64 routing weight the block's own router gives each of its r experts (0 where not chosen)."""
    with torch.no_grad():
        _, weights, ids = block.gate(x)
    return torch.zeros(len(x), r, dtype=torch.float64).scatter_add_(1, ids, weights.double())


@pytest.mark.parametrize("router", ["reduce", "grouped"])
@pytest.mark.parametrize("length", [12, 80], ids=["dual", "primal"])
@pytest.mark.parametrize("family", FAMILIES)
def test_last_refit_expert_solves_its_ridge_problem_against_the_blocks_own_outputs(family, length, router):
    """The expert refit last (the least used of those any token reaches) holds the ridge least-squares solution, by lstsq, of matching the
    original block's output on its tokens, given the other reduced experts as they end (their contribution taken
    from the reduced block's forward with this expert's down projection zeroed), regularised toward its merged
    weights; and the refit lowers the squared error of the layer output on the sampled tokens. ``length`` 12
    leaves each expert fewer tokens than its width (the dual solve), 80 more (the primal)."""
    model, adapter, stats = calibrated(family, length)
    groups = plan_groups(stats, adapter, model.config, R, router=router)
    merged = reduced(model, adapter, stats, groups, router, "none")
    fitted = reduced(model, adapter, stats, groups, router, "down")
    widths = set()
    for before, after, view in zip(
        adapter.moe_layers(model), adapter.moe_layers(fitted), adapter.moe_layers(merged), strict=True
    ):
        x = stats[view.layer].router_inputs
        target = block_output(before.block, x)
        weights = routed(after.block, x, R)
        used = (weights > 0).sum(dim=0)
        last = max((c for c in range(R) if used[c]), key=lambda c: (-int(used[c]), c))  # unused ones stay
        rows = weights[:, last].nonzero().squeeze(1)
        widths.add(len(rows) < after.block.experts.down_proj.shape[2])
        without = copy.deepcopy(after.block)
        with torch.no_grad():
            without.experts.down_proj[last] = 0
        residual = (target - block_output(without, x))[rows]  # [m, H]
        gate, up, _ = after.expert_weights()
        h = after.act_fn(x[rows] @ gate[last].T) * (x[rows] @ up[last].T)
        z = weights[rows, last, None] * h.double()  # [m, I]
        start = view.block.experts.down_proj[last].double()  # its merged weights
        root = (refit.RIDGE * z.square().sum() / z.shape[1]).sqrt()
        eye = torch.eye(z.shape[1], dtype=torch.float64)
        solution = torch.linalg.lstsq(torch.cat([z, root * eye]), torch.cat([residual, root * start.T])).solution
        got = after.block.experts.down_proj[last].double()
        assert torch.allclose(got, solution.T, rtol=1e-4, atol=1e-5), (family, view.layer)

        error_merged = (target - block_output(view.block, x)).square().sum()
        error_fitted = (target - block_output(after.block, x)).square().sum()
        assert error_fitted < error_merged, (family, view.layer, error_fitted, error_merged)
    assert widths == {length == 12}


@pytest.mark.parametrize("family", FAMILIES)
def test_refit_with_every_expert_kept_changes_no_logit(family):
    """r = n: the reduced layer is the original, the residual is zero, and the refit leaves the logits."""
    model, adapter, stats = calibrated(family, 40)
    n = adapter.num_experts(model.config)
    groups = plan_groups(stats, adapter, model.config, n)
    fitted = reduced(model, adapter, stats, groups, "reduce", "down")
    ids = torch.arange(30)[None] % 97
    with torch.no_grad():
        assert torch.allclose(fitted(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
