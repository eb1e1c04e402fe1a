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
    """(tiny model, its adapter, statistics with router inputs (and the novices of grouped pruning) of two sequences
    of ``length`` tokens)."""
    model = tiny_model(family)
    adapter = ADAPTERS[family]
    gen = torch.Generator().manual_seed(3)
    sequences = [torch.randint(0, 97, (length,), generator=gen) for _ in range(2)]
    needs = {"router_inputs", "routed_mean_output"}
    stats = collect_statistics(model, adapter.moe_layers(model), sequences, needs, progress=False)
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
    """[t, r] float64 routing weight the block's own router gives each of its r experts (0 where not chosen; the
    ids from r up, which grouped routing gives novices, are left out)."""
    with torch.no_grad():
        _, weights, ids = block.gate(x)
    out = torch.zeros(len(x), max(r, int(ids.max()) + 1), dtype=torch.float64)
    return out.scatter_add_(1, ids, weights.double())[:, :r]


def ridge_lstsq(z: torch.Tensor, target: torch.Tensor, factor: float) -> torch.Tensor:
    """[H, I] argmin_D ||target - z D^T||^2 + lam ||D||^2 by lstsq on the stacked system [z; sqrt(lam) 1], with
    lam = factor x trace(z^T z) / min(m, I) (the mean eigenvalue of the smaller Gram matrix)."""
    m, width = z.shape
    root = (factor * z.square().sum() / min(m, width)).sqrt()
    eye = torch.eye(width, dtype=torch.float64)
    zeros = torch.zeros(width, target.shape[1], dtype=torch.float64)
    return torch.linalg.lstsq(torch.cat([z, root * eye]), torch.cat([target, zeros])).solution.T


def ridge_oracle(z: torch.Tensor, residual: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """[H, I] the refit down projection: ``start`` plus the ridge update whose factor (or no update) has the least
    error on held-out tokens summed over the two folds (first half / second half of the tokens), each update
    solved by :func:`ridge_lstsq`."""
    target = residual - z @ start.T
    m = len(z)
    if m < refit.MIN_TOKENS:
        return start
    half = m // 2
    candidates = [*refit.RIDGE_GRID, None]
    errors = []
    for factor in candidates:
        error = 0.0
        for fit, held in ((slice(0, half), slice(half, m)), (slice(half, m), slice(0, half))):
            update = torch.zeros_like(start) if factor is None else ridge_lstsq(z[fit], target[fit], factor)
            error += (target[held] - z[held] @ update.T).square().sum().item()
        errors.append(error)
    best = min(range(len(candidates)), key=lambda i: (errors[i], -i))
    return start if candidates[best] is None else start + ridge_lstsq(z, target, candidates[best])


@pytest.mark.parametrize("method,router", [("hc-smoe", "reduce"), ("hc-smoe", "grouped"), ("reap", "grouped")])
@pytest.mark.parametrize("length", [12, 80], ids=["dual", "primal"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_solves_its_ridge_problem_against_the_blocks_own_outputs(family, length, method, router):
    """Each reduced expert, in the sweep's order (most used first), holds the ridge least-squares solution, by
    lstsq with the ridge chosen again by two-fold cross-validation, of matching the original block's output
    on its tokens, given the others as they stood when its turn came (those before it refit, those after it
    merged; their contribution taken from the block's own forward with this expert's down projection zeroed),
    regularised toward its merged weights; and the refit lowers the squared error of the layer output on the
    sampled tokens in every layer where an expert updates (in one layer at least), and leaves it where none does. ``length`` 12 leaves some expert fewer tokens than its width (the dual solve), 80 more (the
    primal). reap with grouped routing leaves the dropped experts' tokens to their novices, which the block's own
    forward includes."""
    model, adapter, stats = calibrated(family, length)
    groups = plan_groups(stats, adapter, model.config, R, method=method, router=router)
    merged = reduced(model, adapter, stats, groups, router, "none")
    fitted = reduced(model, adapter, stats, groups, router, "down")
    solves, updated = set(), set()
    for before, after, view in zip(
        adapter.moe_layers(model), adapter.moe_layers(fitted), adapter.moe_layers(merged), strict=True
    ):
        x = stats[view.layer].router_inputs
        target = block_output(before.block, x)
        weights = routed(after.block, x, R)
        used = (weights > 0).sum(dim=0)
        order = sorted(range(R), key=lambda c: (-int(used[c]), c))
        state = copy.deepcopy(after.block)  # experts refit so far, the rest merged
        with torch.no_grad():
            state.experts.down_proj.copy_(view.block.experts.down_proj)
        gate, up, _ = after.expert_weights()
        for c in order:
            start = view.block.experts.down_proj[c].double()
            got = after.block.experts.down_proj[c].double()
            rows = weights[:, c].nonzero().squeeze(1)
            if not len(rows):
                assert torch.equal(got, start)
                continue
            solves.add("dual" if len(rows) < start.shape[1] else "primal")
            with torch.no_grad():
                state.experts.down_proj[c] = 0
            residual = (target - block_output(state, x))[rows]  # [m, H]
            h = after.block.experts.act_fn(x[rows] @ gate[c].T) * (x[rows] @ up[c].T)
            z = weights[rows, c, None] * h.double()  # [m, I]
            assert torch.allclose(got, ridge_oracle(z, residual, start), rtol=1e-4, atol=1e-5), (family, c)
            with torch.no_grad():
                state.experts.down_proj[c] = after.block.experts.down_proj[c]

        error_merged = (target - block_output(view.block, x)).square().sum()
        error_fitted = (target - block_output(after.block, x)).square().sum()
        if method == "reap" and torch.equal(after.block.experts.down_proj, view.block.experts.down_proj):
            assert error_fitted == error_merged  # every expert chose no update (pruning leaves little to fix)
        else:
            assert error_fitted < error_merged, (family, view.layer, error_fitted, error_merged)
            updated.add(view.layer)
    assert "dual" in solves if length == 12 else solves == {"primal"}
    assert updated, "no layer's refit changed anything"


def test_few_tokens_or_pure_noise_leave_the_merged_weights_alone():
    """Cross-validation, not a fixed ridge: under MIN_TOKENS tokens, or a residual that is pure noise (50 tokens,
    200 neurons: m < I, where any small ridge interpolates), gives no update at all, while a residual that is a
    linear function of the activations is absorbed almost whole."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(refit.MIN_TOKENS - 1, 200, generator=gen, dtype=torch.float64)
    assert not refit.ridge_solve(z, torch.randn(len(z), 16, generator=gen, dtype=torch.float64)).any()
    z = torch.randn(50, 200, generator=gen, dtype=torch.float64)
    assert not refit.ridge_solve(z, torch.randn(50, 16, generator=gen, dtype=torch.float64)).any()
    signal = z @ torch.randn(200, 16, generator=gen, dtype=torch.float64)
    assert (signal - z @ refit.ridge_solve(z, signal).T).norm() < 0.05 * signal.norm()


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
