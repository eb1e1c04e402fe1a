"""End-to-end invariants of HC-SMoE on tiny models of every family, each checked against an oracle written here.

The oracles re-derive everything from plain torch ops in float64: the routing rule of each family, the expert
function E_j(x) = down_j @ (silu(gate_j @ x) * (up_j @ x)), the frequency-weighted merge and the grouped-routing
forward. scipy's fcluster is the clustering oracle.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, VOCAB, layer_stats, tiny_model
from scipy.cluster.hierarchy import fcluster, linkage

from moemerge import apply_groups, plan_groups
from moemerge.adapters import FAMILIES as ADAPTERS
from moemerge.routing.grouped import install_grouped_routers
from moemerge.statistics import collect_statistics

N, TOP_K = 8, 2
# groups that respect DeepSeek's two routing blocks [0..3] and [4..7] (2 per block), with a triple and a singleton
HAND_GROUPS = [[0, 2, 3], [1], [4, 7], [5, 6]]


# ----------------------------------------------------------------------------------------------------------------
# oracles


def calibration(seed: int = 1, num: int = 2, length: int = 24) -> list[torch.Tensor]:
    """Random token sequences (1-D) used as calibration data."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=g) for _ in range(num)]


def random_ids(seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 12), generator=g)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def adapter(model):
    return ADAPTERS[model.config.model_type]


def stats_and_inputs(model, router_sample: int = 0, seqs=None):
    """collect_statistics, plus the MoE block inputs [T, H] (float64) captured by a forward pre-hook of our own."""
    layers = adapter(model).moe_layers(model)
    captured: dict[int, list[torch.Tensor]] = {v.layer: [] for v in layers}

    def capture(layer):
        def hook(module, args):
            captured[layer].append(args[0].reshape(-1, args[0].shape[-1]).double())

        return hook

    handles = [v.block.register_forward_pre_hook(capture(v.layer)) for v in layers]
    try:
        stats = collect_statistics(
            model,
            layers,
            seqs or calibration(),
            {"router_inputs"} if router_sample else (),
            router_sample=router_sample,
            progress=False,
        )
    finally:
        for h in handles:
            h.remove()
    return stats, {layer: torch.cat(xs) for layer, xs in captured.items()}


def oracle_route(config, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Top-k expert ids [T, k] and routing weights [T, k] (float64), re-implemented from each family's routing rule."""
    logits = x.double() @ weight.double().T
    k = config.num_experts_per_tok
    if config.model_type == "deepseek_v3":
        # sigmoid scores; selection adds the bias; only the best topk_group blocks (by the sum of their 2 best) compete
        scores = torch.sigmoid(logits)
        choice = scores + bias.double()
        size = weight.shape[0] // config.n_group
        block_scores = choice.view(len(x), config.n_group, size).topk(2, dim=-1).values.sum(-1)
        best_blocks = block_scores.topk(config.topk_group, dim=-1).indices
        allowed = torch.zeros_like(block_scores, dtype=torch.bool).scatter_(1, best_blocks, True)
        allowed = allowed.repeat_interleave(size, dim=1)
        ids = choice.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices
        weights = scores.gather(1, ids)
        if config.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * config.routed_scaling_factor
    probs = torch.softmax(logits, dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    if config.model_type == "mixtral" or config.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights


def expert_out(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """E(x) = down @ (silu(gate @ x) * (up @ x)) for one expert, float64; gate_up is [2I, H] with the gate rows first."""
    gate_up, down, x = gate_up.double(), down.double(), x.double()
    inter = down.shape[1]
    gate, up = gate_up[:inter], gate_up[inter:]
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def mlp_out(mlp, x: torch.Tensor) -> torch.Tensor:
    """A dense gate/up/down MLP (the shared experts) in float64, from its weights."""
    g, u, d = (m.weight.double() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    return (F.silu(x @ g.T) * (x @ u.T)) @ d.T


def oracle_counts(config, x, weight, bias) -> torch.Tensor:
    ids, _ = oracle_route(config, x, weight, bias)
    return torch.bincount(ids.reshape(-1), minlength=weight.shape[0])


def oracle_alphas(counts: torch.Tensor, group: list[int], rule: str) -> torch.Tensor:
    """Merge weights of a group: counts_i / sum (plain 1/m for 'average' or when no token used the group)."""
    c = counts[group].double()
    if rule == "average" or c.sum() == 0:
        return torch.full((len(group),), 1.0 / len(group), dtype=torch.float64)
    return c / c.sum()


def oracle_merge(tensor: torch.Tensor, groups, alphas) -> torch.Tensor:
    """[r, ...] sum_i a_i W_i per group, in float64."""
    return torch.stack(
        [
            (a.view(-1, *[1] * (tensor.dim() - 1)) * tensor[g].double()).sum(0)
            for g, a in zip(groups, alphas, strict=True)
        ]
    )


def snapshot(view):
    """Copies of one layer's original tensors: (gate_up [n, 2I, H], down [n, H, I], router [n, H], bias or None)."""
    bias = view.selection_bias
    return (
        view.block.experts.gate_up_proj.detach().clone(),
        view.block.experts.down_proj.detach().clone(),
        view.router_weight.detach().clone(),
        None if bias is None else bias.detach().clone(),
    )


def partition(groups) -> set[frozenset[int]]:
    return {frozenset(g) for g in groups}


# ----------------------------------------------------------------------------------------------------------------
# identities


def test_grouped_routing_with_all_experts_kept_is_bit_identical(family):
    """r = n with grouped routing (every group a singleton, expert map the identity) reproduces the logits exactly."""
    model = tiny_model(family)
    ids = random_ids()
    before = logits_of(model, ids)
    fam = adapter(model)
    stats = collect_statistics(model, fam.moe_layers(model), calibration(), progress=False)
    groups = plan_groups(stats, fam, model.config, N, router="grouped")
    assert all(g == [[j] for j in range(N)] for g in groups.values())
    originals = apply_groups(model, fam, stats, groups)
    install_grouped_routers(fam.moe_layers(model), originals, groups, TOP_K)
    assert torch.equal(logits_of(model, ids), before)


def test_reduce_mode_with_all_experts_kept_is_bit_identical(family):
    """r = n in reduce mode with frequency router rows: a one-member weighted mean is the row itself, so nothing moves."""
    model = tiny_model(family)
    ids = random_ids()
    before = logits_of(model, ids)
    fam = adapter(model)
    stats = collect_statistics(model, fam.moe_layers(model), calibration(), progress=False)
    groups = plan_groups(stats, fam, model.config, N)
    apply_groups(model, fam, stats, groups, router_rows_rule="frequency")
    assert fam.num_experts(model.config) == N
    assert torch.equal(logits_of(model, ids), before)


def test_merging_exact_duplicates_changes_no_logit(family):
    """Experts that are copies of one another, merged under grouped routing, give the original logits.

    Pairs (0, 3) and (5, 6) are made copies (router rows stay distinct); grouped routing sends a token that picked
    either member to the merged copy and sums the two weights when it picked both, which is exactly the original sum.
    """
    model = tiny_model(family)
    fam = adapter(model)
    pairs = [(0, 3), (5, 6)]
    with torch.no_grad():
        for view in fam.moe_layers(model):
            for a, b in pairs:
                view.block.experts.gate_up_proj[b] = view.block.experts.gate_up_proj[a]
                view.block.experts.down_proj[b] = view.block.experts.down_proj[a]
                assert not torch.equal(view.router_weight[a], view.router_weight[b])
    copies = {v.layer: snapshot(v) for v in fam.moe_layers(model)}
    ids = random_ids()
    before = logits_of(model, ids)
    stats = collect_statistics(model, fam.moe_layers(model), calibration(), progress=False)
    groups = {layer: [[0, 3], [1], [2], [4], [5, 6], [7]] for layer in stats}
    originals = apply_groups(model, fam, stats, groups)
    install_grouped_routers(fam.moe_layers(model), originals, groups, TOP_K)
    for view in fam.moe_layers(model):
        gate_up, down, _, _ = copies[view.layer]
        # the frequency-weighted mean of identical tensors is that tensor, bit for bit
        assert torch.equal(view.block.experts.gate_up_proj, gate_up[[0, 1, 2, 4, 5, 7]])
        assert torch.equal(view.block.experts.down_proj, down[[0, 1, 2, 4, 5, 7]])
    # Not bit-exact: the experts run as a grouped matmul over the tokens of each expert, and a merged expert's batch
    # holds the tokens of both members, so BLAS blocks the rows differently and rounding moves by ~1 float32 ulp
    # (observed 1e-7 on logits of size ~0.5). The tolerance is far below any change a real merge makes.
    torch.testing.assert_close(logits_of(model, ids), before, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# statistics


def test_mean_outputs_counts_and_router_inputs_match_a_recomputation(family):
    """mean_output = mean over all tokens of E_j(x) (every token through every expert, no gate weight), recomputed
    in float64 from the MoE block inputs we capture; counts = top-k hits of our own routing re-implementation;
    router_inputs = every stride-th captured input."""
    model = tiny_model(family)
    fam = adapter(model)
    seqs = calibration()
    total = sum(len(s) for s in seqs)
    stats, inputs = stats_and_inputs(model, router_sample=16, seqs=seqs)
    views = fam.moe_layers(model)
    assert sorted(stats) == [v.layer for v in views]
    for view in views:
        s, x = stats[view.layer], inputs[view.layer]
        gate_up, down, router, bias = snapshot(view)
        assert s.num_tokens == total == len(x)
        expected = torch.stack([expert_out(gate_up[j], down[j], x).mean(0) for j in range(N)])
        assert s.mean_output.dtype == torch.float32
        torch.testing.assert_close(s.mean_output.double(), expected, rtol=1e-5, atol=1e-7)
        counts = oracle_counts(model.config, x, router, bias)
        assert s.counts.dtype == torch.int64
        assert torch.equal(s.counts, counts)
        assert int(s.counts.sum()) == TOP_K * total
        torch.testing.assert_close(s.frequency, counts.double() / total, rtol=0, atol=0)
        stride = -(-total // 16)
        torch.testing.assert_close(s.router_inputs.double(), x[::stride], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["average", "single", "complete"])
def test_groups_equal_scipy_linkage_on_the_mean_outputs(family, method):
    """plan_groups' hc-smoe groups equal scipy linkage + fcluster(maxclust=r) on the same features; for DeepSeek each
    routing block [0..3], [4..7] is clustered on its own into r/2 groups."""
    model = tiny_model(family)
    fam = adapter(model)
    stats = collect_statistics(model, fam.moe_layers(model), calibration(), progress=False)
    blocks = [list(range(4)), list(range(4, 8))] if family == "deepseek_v3" else [list(range(N))]
    for r in (2 * len(blocks), 6):
        groups = plan_groups(stats, fam, model.config, r, linkage=method)
        for layer, s in stats.items():
            expected = set()
            for ids in blocks:
                features = s.mean_output[ids].double().numpy()
                labels = fcluster(linkage(features, method=method, metric="euclidean"), r // len(blocks), "maxclust")
                expected |= {frozenset(np.array(ids)[labels == c].tolist()) for c in np.unique(labels)}
            assert len(expected) == r  # no ties: maxclust gave exactly r clusters
            assert partition(groups[layer]) == expected
            assert groups[layer] == sorted(sorted(g) for g in groups[layer])


# ----------------------------------------------------------------------------------------------------------------
# merging and router rows


@pytest.mark.parametrize("merge", ["frequency", "average"])
def test_merged_tensors_and_router_rows_equal_the_weighted_formula(family, merge):
    """Merged gate/up/down equal sum_i a_i W_i with a_i = counts_i / group total (our recomputed counts), or the
    plain mean for 'average'; frequency router rows and DeepSeek selection biases are the count-weighted means."""
    model = tiny_model(family)
    fam = adapter(model)
    stats, inputs = stats_and_inputs(model)
    originals = {v.layer: snapshot(v) for v in fam.moe_layers(model)}
    groups = {layer: HAND_GROUPS for layer in stats}
    apply_groups(model, fam, stats, groups, merge=merge, router_rows_rule="frequency")
    assert fam.num_experts(model.config) == len(HAND_GROUPS)
    for view in fam.moe_layers(model):
        gate_up, down, router, bias = originals[view.layer]
        counts = oracle_counts(model.config, inputs[view.layer], router, bias)
        alphas = [oracle_alphas(counts, g, merge) for g in HAND_GROUPS]
        tight = dict(rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(
            view.block.experts.gate_up_proj.double(), oracle_merge(gate_up, HAND_GROUPS, alphas), **tight
        )
        torch.testing.assert_close(
            view.block.experts.down_proj.double(), oracle_merge(down, HAND_GROUPS, alphas), **tight
        )
        if merge == "average":
            means = torch.stack([gate_up[g].double().mean(0) for g in HAND_GROUPS])
            torch.testing.assert_close(view.block.experts.gate_up_proj.double(), means, **tight)
        # router rows (and selection bias) always follow the frequency weights, whatever the expert merge rule
        freq = [oracle_alphas(counts, g, "frequency") for g in HAND_GROUPS]
        torch.testing.assert_close(view.router_weight.double(), oracle_merge(router, HAND_GROUPS, freq), **tight)
        if bias is None:
            assert view.selection_bias is None
        else:
            torch.testing.assert_close(view.selection_bias.double(), oracle_merge(bias, HAND_GROUPS, freq), **tight)


def test_a_group_no_token_used_is_averaged_plainly():
    """Frequency merge of a group whose members all have zero counts falls back to the plain mean (no 0/0)."""
    from moemerge.merging import member_weights, merge_experts

    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 3, 5, generator=g)
    stats = layer_stats(0, torch.zeros(4, 5), torch.tensor([0, 0, 5, 1]), 3)
    groups = [[0, 1], [2, 3]]
    merged, _, down = merge_experts((w, w, w.mT), groups, member_weights("frequency", stats, groups))
    torch.testing.assert_close(merged[0], w[[0, 1]].mean(0))
    torch.testing.assert_close(merged[1], (5 * w[2].double() + w[3].double()).div(6).float())
    torch.testing.assert_close(down, merged.mT)


# ----------------------------------------------------------------------------------------------------------------
# reduced models


@pytest.mark.parametrize("r", [4, 6])
def test_reduce_mode_shapes_config_and_forward(family, r):
    """Reduce mode leaves r experts, r router rows (and r biases), r in the config, and a model whose forward runs."""
    model = tiny_model(family)
    fam = adapter(model)
    stats = collect_statistics(model, fam.moe_layers(model), calibration(), progress=False)
    groups = plan_groups(stats, fam, model.config, r)
    apply_groups(model, fam, stats, groups)
    views = fam.moe_layers(model)
    assert len(views) == 2 and sorted(groups) == [v.layer for v in views]
    hidden = model.config.hidden_size
    for view in views:
        assert sorted(j for grp in groups[view.layer] for j in grp) == list(range(N))  # a partition of the experts
        inter = view.block.experts.down_proj.shape[2]
        assert view.num_experts == r
        assert view.block.experts.gate_up_proj.shape == (r, 2 * inter, hidden)
        assert view.block.experts.down_proj.shape == (r, hidden, inter)
        assert view.router_weight.shape == (r, hidden)
        assert view.selection_bias is None or view.selection_bias.shape == (r,)
    assert fam.num_experts(model.config) == r
    out = logits_of(model, random_ids())
    assert out.shape == (2, 12, VOCAB) and torch.isfinite(out).all()


# r = 1 < top-k is legal under grouped routing (the original router still picks top-k distinct originals), but
# DeepSeek-V3's routing blocks need an even r, so it takes part with r = 4 only.
GROUPED_CASES = [(f, 4) for f in FAMILIES] + [(f, 1) for f in FAMILIES if f != "deepseek_v3"]


@pytest.mark.parametrize(("family", "r"), GROUPED_CASES)
def test_grouped_block_equals_a_manual_moe_forward(family, r):
    """A grouped-routing block equals our manual MoE forward: original router top-k and weights, each chosen expert
    replaced by its group's frequency-merged expert (two chosen members of a group both count), plus shared experts."""
    model = tiny_model(family)
    fam = adapter(model)
    stats, inputs = stats_and_inputs(model)
    originals = {v.layer: snapshot(v) for v in fam.moe_layers(model)}
    groups = plan_groups(stats, fam, model.config, r, router="grouped")
    routers = apply_groups(model, fam, stats, groups)
    install_grouped_routers(fam.moe_layers(model), routers, groups, TOP_K)
    config = copy.copy(model.config)
    config.num_experts_per_tok = TOP_K  # the oracle routes with the original top-k, as the grouped router does
    g = torch.Generator().manual_seed(11)
    for view in fam.moe_layers(model):
        gate_up, down, router, bias = originals[view.layer]
        layer_groups = groups[view.layer]
        counts = oracle_counts(config, inputs[view.layer], router, bias)
        alphas = [oracle_alphas(counts, grp, "frequency") for grp in layer_groups]
        merged_gate_up, merged_down = (
            oracle_merge(gate_up, layer_groups, alphas),
            oracle_merge(down, layer_groups, alphas),
        )
        group_of = {j: k for k, grp in enumerate(layer_groups) for j in grp}

        x = 8 * torch.randn(40, config.hidden_size, generator=g)
        ids, weights = oracle_route(config, x, router, bias)
        x64 = x.double()
        expected = torch.zeros_like(x64)
        for t in range(len(x)):
            for slot in range(TOP_K):
                k = group_of[int(ids[t, slot])]
                expected[t] += weights[t, slot] * expert_out(merged_gate_up[k], merged_down[k], x64[t : t + 1])[0]
        if hasattr(view.block, "shared_expert"):  # Qwen2-MoE: sigmoid-gated shared expert
            expected += torch.sigmoid(x64 @ view.block.shared_expert_gate.weight.double().T) * mlp_out(
                view.block.shared_expert, x64
            )
        if hasattr(view.block, "shared_experts"):  # DeepSeek-V3: plain shared experts
            expected += mlp_out(view.block.shared_experts, x64)

        with torch.no_grad():
            got = view.block(x[None])[0].double()
        assert expected.abs().max() > 1e-3  # the comparison is not between two near-zero tensors
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
