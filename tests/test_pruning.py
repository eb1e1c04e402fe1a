"""Pruning methods (F-prune, S-prune, REAP, MAN, MSAN, MoNE, O-prune) against oracles: each family's own router and MoE block forward.

The oracles here never read a method's answer back: routing comes from the model's own ``block.gate``, O-prune's
objective from the model's own MoE block forward on a copy with the experts sliced away (or, for DeepSeek's
partially pruned routing blocks, with the dropped experts' selection bias set to -inf), the statistics from plain
float64 torch on block inputs captured with hooks written here, and every search is a brute force.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import EXPERT_FIELD, FAMILIES, VOCAB, run_cli, save_tiny, tiny_config, tiny_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import moemerge
from moemerge import MoemergeError, plan_groups
from moemerge.adapters import FAMILIES as ADAPTERS
from moemerge.methods import keep_highest, o_prune
from moemerge.options import ReduceOptions
from moemerge.pipeline import statistics_needs
from moemerge.registry import names, resolve
from moemerge.statistics import collect_statistics

OUTPUTS = {"expert_outputs", "router_logits"}  # o-prune's statistics
PRUNING_METHODS = (
    "f-prune",
    "s-prune",
    "reap",
    "man",
    "msan",
    "mone",
    "o-prune",
)  # the methods that keep whole experts (their papers)
NOVICE_STATS = {"routed_mean_output", "routing_weight_mean"}

N, R = 8, 4
SAMPLES, SEQ_LEN = 2, 32
T = SAMPLES * SEQ_LEN
SOFTMAX = [f for f in FAMILIES if f != "deepseek_v3"]
BLOCKS = {"deepseek_v3": [[0, 1, 2, 3], [4, 5, 6, 7]]}  # DeepSeek's routing groups (n_group=2); others: one block
SCORE_OF = {
    "f-prune": "counts",
    "s-prune": "prob_sum",
    "reap": "reap",
    "man": "activation_norm",
    "msan": "activation_sq_norm",
    "mone": "mone",
}
# no report: the report's tests are in test_report.py
SMALL_CALIB = ["--calib-samples", str(SAMPLES), "--calib-seq-len", str(SEQ_LEN), "--no-report"]


def blocks_of(family: str) -> list[list[int]]:
    return BLOCKS.get(family, [list(range(N))])


def router_for(method: str) -> str:
    """The router mode a method is planned with here: mone needs the original router (its novices)."""
    return "grouped" if method == "mone" else "reduce"


# ----------------------------------------------------------------------------------------------------------------
# oracles


def sequences() -> list[list[int]]:
    """The calibration rows of this module (also written as the CLI's input_ids .jsonl, used as given)."""
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, VOCAB, (SEQ_LEN,), generator=g).tolist() for _ in range(SAMPLES)]


def moe_blocks(model) -> dict[int, nn.Module]:
    return {i: layer.mlp for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}


def capture_block_inputs(model, rows: list[list[int]]) -> dict[int, torch.Tensor]:
    """Per decoder layer, the float32 inputs [T, H] of its MoE block, captured with a forward pre-hook."""
    captured: dict[int, list[torch.Tensor]] = {}
    hooks = [
        block.register_forward_pre_hook(
            lambda module, args, i=i: captured.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]).clone())
        )
        for i, block in moe_blocks(model).items()
    ]
    with torch.no_grad():
        for row in rows:
            model(input_ids=torch.tensor([row]), use_cache=False)
    for hook in hooks:
        hook.remove()
    return {i: torch.cat(xs) for i, xs in captured.items()}


def expert_output(block: nn.Module, j: int, x: torch.Tensor) -> torch.Tensor:
    """[T, H] float64 E_j(x) = down_j @ (silu(gate_j x) * (up_j x)), from the fused tensors (gate rows first)."""
    gate_up = block.experts.gate_up_proj[j].double()
    half = gate_up.shape[0] // 2
    x = x.double()
    return (F.silu(x @ gate_up[:half].T) * (x @ gate_up[half:].T)) @ block.experts.down_proj[j].double().T


def sliced_block(block: nn.Module, kept: list[int]) -> nn.Module:
    """A copy of the model's own MoE block whose routed experts and router rows are only ``kept`` (in that order)."""
    out = copy.deepcopy(block)
    idx = torch.tensor(kept)
    out.experts.gate_up_proj = nn.Parameter(block.experts.gate_up_proj.detach()[idx].clone(), requires_grad=False)
    out.experts.down_proj = nn.Parameter(block.experts.down_proj.detach()[idx].clone(), requires_grad=False)
    out.experts.num_experts = len(kept)
    out.gate.weight = nn.Parameter(block.gate.weight.detach()[idx].clone(), requires_grad=False)
    out.gate.num_experts = len(kept)
    if hasattr(block.gate, "e_score_correction_bias"):
        out.gate.e_score_correction_bias = block.gate.e_score_correction_bias[idx].clone()
    return out


def bias_masked_block(block: nn.Module, kept: list[int]) -> nn.Module:
    """A copy of a DeepSeek-V3 MoE block whose dropped experts get selection bias -inf: the model's own router then
    never selects them (while every routing group keeps >= 2 experts), and the kept experts' weights are untouched."""
    out = copy.deepcopy(block)
    dropped = [j for j in range(block.gate.weight.shape[0]) if j not in kept]
    out.gate.e_score_correction_bias[dropped] = float("-inf")
    return out


def deepseek_reference(logits: torch.Tensor, bias: torch.Tensor, keep: list[int], rule) -> tuple:
    """Independent per-token DeepSeek-V3 routing restricted to ``keep``, written from the transformers docstring:
    sigmoid scores; choice = score + bias; a group's score is the sum of its two best choices among kept experts;
    the best ``topk_group`` groups compete; top-k by choice; weights = scores of the chosen, normalised, scaled."""
    n = logits.shape[1]
    size = n // rule.n_group
    all_ids, all_weights = [], []
    for row in logits.double():
        score = row.sigmoid()
        choice = {j: float(score[j] + bias[j]) for j in keep}
        group_score = {}
        for g in range(rule.n_group):
            members = sorted((choice[j] for j in keep if j // size == g), reverse=True)
            group_score[g] = sum(members[:2]) if len(members) >= 2 else -math.inf
        groups = sorted(group_score, key=lambda g: -group_score[g])[: rule.topk_group]
        candidates = [j for j in keep if j // size in groups]
        ids = sorted(sorted(candidates, key=lambda j: -choice[j])[: rule.top_k])
        w = score[ids]
        all_ids.append(ids)
        all_weights.append((w / w.sum() if rule.normalize else w) * rule.scale)
    return torch.stack(all_weights), torch.tensor(all_ids)


def by_id(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) with each token's selections sorted by expert id."""
    ids, order = ids.sort(dim=1)
    return weights.gather(1, order), ids


@functools.cache
def calibrated(family: str):
    """(model, captured block inputs per layer, statistics of every token) for the tiny model of ``family``."""
    model = tiny_model(family)
    assert model.config.hidden_act == "silu", "the expert oracle assumes SiLU"
    rows = sequences()
    inputs = capture_block_inputs(model, rows)
    adapter = ADAPTERS[family]
    stats = collect_statistics(
        model,
        adapter.moe_layers(model),
        [torch.tensor(r) for r in rows],
        OUTPUTS | NOVICE_STATS | {"activation_norm", "activation_sq_norm"},
        router_sample=T,
        output_sample=T,
        progress=False,
    )
    return model, inputs, stats


@functools.cache
def block_errors(family: str, layer: int, block_index: int, token_stride: int = 1) -> dict[tuple[int, ...], float]:
    """Oracle O-prune objective of every subset of one routing block (the other blocks kept whole), computed with
    the model's OWN MoE block forward: sum over tokens of ||block(x) - pruned_block(x)||^2, float64 sums.

    Softmax families: the pruned block is a copy sliced to the kept experts. DeepSeek: a 2-of-4 subset of one block
    with the other block whole cannot be sliced (transformers needs equal routing groups), so its pruned block keeps
    all rows and sets the dropped experts' selection bias to -inf, which the model's own router never selects.
    """
    model, inputs, _ = calibrated(family)
    block = moe_blocks(model)[layer]
    x = inputs[layer][::token_stride][None]
    experts = blocks_of(family)[block_index]
    share = R // len(blocks_of(family))
    others = [j for j in range(N) if j not in experts]
    errors = {}
    with torch.no_grad():
        full = block(x).double()
        for subset in itertools.combinations(experts, share):
            kept = sorted([*subset, *others])
            pruned = bias_masked_block(block, kept) if family == "deepseek_v3" else sliced_block(block, kept)
            errors[subset] = float(((full - pruned(x).double()) ** 2).sum())
    return errors


def assert_argmin(chosen: tuple[int, ...], errors: dict[tuple[int, ...], float], candidates=None) -> None:
    """``chosen`` minimises the oracle error over ``candidates`` (default all), up to float32 round-off."""
    candidates = list(errors) if candidates is None else candidates
    best = min(candidates, key=lambda s: errors[s])
    assert chosen in candidates
    assert errors[chosen] <= errors[best] * (1 + 1e-6) + 1e-12, (chosen, best, errors[chosen], errors[best])


@functools.cache
def oracle_statistics(family: str, layer: int) -> dict[str, torch.Tensor]:
    """counts / prob_sum / reap / activation_norm / activation_sq_norm / routed_mean_output / routing_weight_mean
    and MoNE's score of one layer recomputed in float64 from the captured block inputs: routing by the model's own
    gate, probabilities from softmax (sigmoid for DeepSeek) of x W^T, E_j(x) from plain torch; MoNE's score is
    the root of the mean squared distance of j's routed outputs from their mean, times j's summed routing weight
    over T."""
    model, inputs, _ = calibrated(family)
    block = moe_blocks(model)[layer]
    x = inputs[layer]
    with torch.no_grad():
        _, weights, ids = block.gate(x)
    logits = x.double() @ block.gate.weight.detach().double().T
    probs = logits.sigmoid() if family == "deepseek_v3" else logits.softmax(-1)
    g = weights.double() / weights.double().sum(-1, keepdim=True)
    counts = torch.zeros(N, dtype=torch.int64)
    reap_sum = torch.zeros(N, dtype=torch.float64)
    norm_sum = torch.zeros(N, dtype=torch.float64)
    sq_norm_sum = torch.zeros(N, dtype=torch.float64)
    routed_mean = torch.zeros(N, x.shape[1], dtype=torch.float64)
    spread = torch.zeros(N, dtype=torch.float64)
    weight_sum = torch.zeros(N, dtype=torch.float64)
    for j in range(N):
        token, slot = (ids == j).nonzero(as_tuple=True)
        counts[j] = len(token)
        if len(token):
            with torch.no_grad():
                outputs = expert_output(block, j, x[token])
            norms = outputs.norm(dim=-1)
            reap_sum[j] = (g[token, slot] * norms).sum()
            norm_sum[j] = norms.double().sum()
            sq_norm_sum[j] = (norms.double() ** 2).sum()
            routed_mean[j] = outputs.mean(0)
            spread[j] = (outputs - routed_mean[j]).square().sum(-1).mean().sqrt()
            weight_sum[j] = weights[token, slot].double().sum()
    per_token = counts.clamp(min=1)
    return {
        "counts": counts,
        "prob_sum": probs.sum(0),
        "reap": reap_sum / per_token,
        "activation_norm": norm_sum / per_token,
        "activation_sq_norm": sq_norm_sum / per_token,
        "routed_mean_output": routed_mean,
        "routing_weight_mean": weight_sum / len(x),
        "mone": spread * weight_sum / len(x),
    }


def brute_force_keep(score: torch.Tensor, experts: list[int], r: int) -> tuple[int, ...]:
    """Of all r-subsets, the one of highest total score; among equal totals the lexicographically smallest ids."""
    return min(itertools.combinations(experts, r), key=lambda s: (-sum(float(score[j]) for j in s), s))


@functools.cache
def expected_kept(family: str, method: str, layer: int) -> list[int]:
    """The oracle's kept experts of ``method`` in one layer: keep-highest of recomputed statistics, or the O-prune
    brute-force argmin (per routing block for DeepSeek)."""
    kept = []
    for b, experts in enumerate(blocks_of(family)):
        share = R // len(blocks_of(family))
        if method == "o-prune":
            errors = block_errors(family, layer, b)
            kept += min(errors, key=errors.get)
        else:
            kept += brute_force_keep(oracle_statistics(family, layer)[SCORE_OF[method]], experts, share)
    return sorted(kept)


# ----------------------------------------------------------------------------------------------------------------
# 1. the routing rule equals each family's own router


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_rule_equals_the_models_own_router(family):
    """RoutingRule.route(x W^T, bias) picks the same experts with the same weights as the model's own block.gate."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, model.config.hidden_size, generator=g)
    for view in ADAPTERS[family].moe_layers(model):
        with torch.no_grad():
            _, ref_w, ref_ids = view.block.gate(x)
            w, ids = view.routing.route(F.linear(x, view.router_weight), view.selection_bias)
        ref_w, ref_ids = by_id(ref_w.float(), ref_ids)
        w, ids = by_id(w, ids)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


def random_keeps(seed: int) -> list[list[int]]:
    """Random kept sets of every size from top-k to n."""
    rng = random.Random(seed)
    return [sorted(rng.sample(range(N), size)) for size in range(2, N + 1) for _ in range(3)]


@pytest.mark.parametrize("family", SOFTMAX)
def test_keep_mask_equals_router_sliced_to_kept_rows(family):
    """Softmax families: route(keep=S) equals the model's own router sliced to rows S, for random S of every size."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(200, model.config.hidden_size, generator=g)
    for view in ADAPTERS[family].moe_layers(model):
        logits = F.linear(x, view.router_weight).detach()
        for kept in random_keeps(view.layer):
            keep = torch.zeros(N, dtype=torch.bool)
            keep[kept] = True
            with torch.no_grad():
                _, ref_w, ref_local = sliced_block(view.block, kept).gate(x)
            ref_w, ref_ids = by_id(ref_w.float(), torch.tensor(kept)[ref_local])
            w, ids = by_id(*view.routing.route(logits, None, keep))
            assert torch.equal(ids, ref_ids), kept
            torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


DEEPSEEK_KEEPS = {
    "balanced": [[0, 1, 4, 5], [1, 3, 6, 7], [0, 2, 3, 4, 5, 7], [1, 2, 3, 4, 6, 7]],
    "unbalanced": [[0, 1, 4, 5, 6, 7], [0, 1, 2, 3, 5, 7], [1, 2, 3, 4, 5, 6, 7], [0, 2, 4, 6, 7]],
}


def test_deepseek_keep_mask_equals_pruned_router_and_independent_reference():
    """DeepSeek: route(keep=S) equals the sliced own router (equal groups), the -inf-bias own router, and a reference.

    Checked differently because transformers' DeepSeek router views the experts as n_group EQUAL routing groups, so
    only kept sets with the same count per group can be sliced into a real router. For those, the oracle is the
    model's own router sliced to the kept rows and biases; for unequal kept sets (each group keeping >= 2, as
    O-prune's per-block search produces) it is the model's own router with the dropped experts' selection bias at
    -inf. Every kept set is also checked against the independent per-token deepseek_reference written here.
    Not covered: kept sets leaving a group fewer than 2 experts (no pipeline path produces them).
    """
    family = "deepseek_v3"
    model = tiny_model(family)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(150, model.config.hidden_size, generator=g)
    for view in ADAPTERS[family].moe_layers(model):
        logits = F.linear(x, view.router_weight).detach()
        bias = view.selection_bias.detach()
        for kind, keeps in DEEPSEEK_KEEPS.items():
            for kept in keeps:
                keep = torch.zeros(N, dtype=torch.bool)
                keep[kept] = True
                w, ids = by_id(*view.routing.route(logits, bias, keep))
                with torch.no_grad():
                    if kind == "balanced":
                        _, ref_w, ref_local = sliced_block(view.block, kept).gate(x)
                        ref_ids = torch.tensor(kept)[ref_local]
                    else:
                        _, ref_w, ref_ids = bias_masked_block(view.block, kept).gate(x)
                ref_w, ref_ids = by_id(ref_w.float(), ref_ids)
                assert torch.equal(ids, ref_ids), (kind, kept)
                torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
                ind_w, ind_ids = deepseek_reference(logits, bias.double(), kept, view.routing)
                assert torch.equal(ids, ind_ids), (kind, kept)
                torch.testing.assert_close(w.double(), ind_w, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# 2. O-prune is the brute-force argmin of the model's own output error


@pytest.mark.parametrize("family", FAMILIES)
def test_o_prune_is_exhaustive_argmin_of_block_output_error(family):
    """O-prune (direct and via plan_groups) is the brute-force argmin of the own-block-forward error, all subsets."""
    # all C(8, 4) subsets; DeepSeek: all C(4, 2) subsets of each routing block, the other block kept whole
    model, _, stats = calibrated(family)
    adapter = ADAPTERS[family]
    plan = plan_groups(stats, adapter, model.config, R, method="o-prune")
    for layer in stats:
        kept = []
        for b, experts in enumerate(blocks_of(family)):
            share = R // len(blocks_of(family))
            groups = o_prune(stats[layer], experts, share, ReduceOptions())
            assert all(len(g) == 1 for g in groups) and len(groups) == share
            chosen = tuple(g[0] for g in groups)
            assert_argmin(chosen, block_errors(family, layer, b))
            kept += chosen
        assert plan[layer] == [[j] for j in sorted(kept)]


@pytest.mark.parametrize("family", FAMILIES)
def test_o_prune_with_small_budget_is_best_of_the_seeded_random_subsets(family):
    """Budget < C(n, r): deterministic best of random.Random(seed)'s subsets; budget == C(n, r): still exhaustive."""
    _, _, stats = calibrated(family)
    for layer in stats:
        for b, experts in enumerate(blocks_of(family)):
            share = R // len(blocks_of(family))
            errors = block_errors(family, layer, b)
            total = math.comb(len(experts), share)
            for seed in (0, 1, 7):
                budget = 3
                rng = random.Random(seed)
                candidates = [tuple(sorted(rng.sample(experts, share))) for _ in range(budget)]
                options = ReduceOptions(oprune_budget=budget, seed=seed)
                first = o_prune(stats[layer], experts, share, options)
                assert o_prune(stats[layer], experts, share, options) == first
                assert_argmin(tuple(g[0] for g in first), errors, candidates)
            exhaustive = o_prune(stats[layer], experts, share, ReduceOptions(oprune_budget=total, seed=3))
            assert_argmin(tuple(g[0] for g in exhaustive), errors)


def test_o_prune_objective_uses_only_the_sampled_tokens():
    """output_sample=16 of T=64: O-prune is the brute-force argmin of the own-block error on every 4th token only."""
    family = "mixtral"
    model, _, _ = calibrated(family)
    stats = collect_statistics(
        model,
        ADAPTERS[family].moe_layers(model),
        [torch.tensor(r) for r in sequences()],
        OUTPUTS,
        router_sample=T,
        output_sample=16,
        progress=False,
    )
    for layer, layer_stats in stats.items():
        assert layer_stats.expert_outputs.shape[0] == 16
        chosen = tuple(g[0] for g in o_prune(layer_stats, list(range(N)), R, ReduceOptions()))
        assert_argmin(chosen, block_errors(family, layer, 0, token_stride=4))


def test_o_prune_without_expert_outputs_is_an_error():
    """O-prune on statistics collected without output samples raises instead of guessing; the statistics the pipeline
    asks for when the method is o-prune (statistics_needs) do hold output samples, and O-prune on them is the
    brute-force argmin (its sample of up to 512 tokens holds all T tokens here)."""
    family = "olmoe"
    model, _, _ = calibrated(family)
    adapter = ADAPTERS[family]
    rows = [torch.tensor(r) for r in sequences()]
    stats = collect_statistics(model, adapter.moe_layers(model), rows[:1], progress=False)
    with pytest.raises(ValueError, match="expert_outputs"):
        o_prune(next(iter(stats.values())), list(range(N)), R, ReduceOptions())
    needs = statistics_needs([ReduceOptions(method="o-prune")])
    stats = collect_statistics(model, adapter.moe_layers(model), rows, needs, progress=False)
    for layer, layer_stats in stats.items():
        assert layer_stats.expert_outputs.shape[0] == T
        chosen = tuple(g[0] for g in o_prune(layer_stats, list(range(N)), R, ReduceOptions()))
        assert_argmin(chosen, block_errors(family, layer, 0))


# ----------------------------------------------------------------------------------------------------------------
# 3. F-prune / S-prune / REAP keep the highest recomputed statistics


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_equal_independent_recomputation(family):
    """counts (exactly), prob_sum, reap and the (squared) activation norms equal a float64 recomputation from block
    inputs captured by our own hook."""
    _, inputs, stats = calibrated(family)
    for layer, layer_stats in stats.items():
        oracle = oracle_statistics(family, layer)
        assert layer_stats.num_tokens == T == len(inputs[layer])
        assert torch.equal(layer_stats.counts, oracle["counts"])
        assert int(oracle["counts"].sum()) == T * 2
        torch.testing.assert_close(layer_stats.prob_sum, oracle["prob_sum"], rtol=1e-5, atol=1e-5)
        for name in ("reap", "activation_norm", "activation_sq_norm", "routing_weight_mean"):
            torch.testing.assert_close(getattr(layer_stats, name), oracle[name], rtol=1e-4, atol=1e-6)
        routed_mean = layer_stats.routed_mean_output.double()
        torch.testing.assert_close(routed_mean, oracle["routed_mean_output"], rtol=1e-4, atol=1e-6)
        assert torch.equal(layer_stats.router_inputs, inputs[layer])


@pytest.mark.parametrize("method", list(SCORE_OF))
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_highest_methods_keep_highest_recomputed_score(family, method):
    """f-prune / s-prune / reap / man / msan / mone keep, per routing block, the brute-force top-r of the recomputed
    count / prob / REAP / norms / MoNE score."""
    model, _, stats = calibrated(family)
    plan = plan_groups(stats, ADAPTERS[family], model.config, R, method=method, router=router_for(method))
    for layer in stats:
        assert plan[layer] == [[j] for j in expected_kept(family, method, layer)]


def test_keep_highest_ties_go_to_lower_ids():
    """keep_highest equals the brute-force best-total, smallest-ids subset on tie-heavy integer scores, every r."""
    rng = random.Random(0)
    for _ in range(40):
        score = torch.tensor([rng.randrange(3) for _ in range(N)], dtype=torch.float64)
        for experts in (list(range(N)), [1, 3, 4, 6], [4, 5, 6, 7]):
            for r in range(1, len(experts) + 1):
                expected = brute_force_keep(score, experts, r)
                assert keep_highest(score, experts, r) == [[j] for j in expected]


# ----------------------------------------------------------------------------------------------------------------
# 6. invariant: O-prune is never worse than the other pruning methods under its own objective


@pytest.mark.parametrize("family", FAMILIES)
def test_o_prune_error_not_above_other_pruning_methods(family):
    """Under the own-forward oracle objective, the kept set plan_groups gives for o-prune has error <= the kept sets
    plan_groups gives for f-prune, s-prune, reap, man and msan (all six chosen by the code under test, scored by the oracle)."""
    model, _, stats = calibrated(family)
    plans = {
        m: plan_groups(stats, ADAPTERS[family], model.config, R, method=m, router=router_for(m))
        for m in ["o-prune", *SCORE_OF]
    }
    for layer in stats:
        kept = {m: [g[0] for g in plan[layer]] for m, plan in plans.items()}
        for b, experts in enumerate(blocks_of(family)):
            errors = block_errors(family, layer, b)
            part = tuple(j for j in kept["o-prune"] if j in experts)
            for method in SCORE_OF:
                other = tuple(j for j in kept[method] if j in experts)
                assert errors[part] <= errors[other] * (1 + 1e-6) + 1e-12, (method, part, other)


# ----------------------------------------------------------------------------------------------------------------
# 4. every pruning method end to end through the CLI


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pruning")
    (folder / "calib.jsonl").write_text(
        "".join(json.dumps({"input_ids": row}) + "\n" for row in sequences()), encoding="utf-8"
    )
    return folder


@pytest.fixture(scope="module")
def source(workdir):
    """A factory of tiny checkpoints, one per family, saved once for the module (same weights as tiny_model)."""

    @functools.cache
    def make(family: str) -> Path:
        return save_tiny(family, workdir / "src" / family, tokenizer=False)

    return make


def cli(argv: list, capfd) -> tuple[int, str]:
    code, _, err = run_cli(argv, capfd)
    return code, err


def expert_key(key: str) -> tuple[str, int, str] | None:
    """(prefix, expert id, suffix) of a routed expert's tensor name, else None (shared experts are not routed)."""
    parts = key.split(".")
    if "experts" in parts:
        i = parts.index("experts")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return ".".join(parts[: i + 1]), int(parts[i + 1]), ".".join(parts[i + 2 :])
    return None


def pruned_reference(family: str, kept: dict[int, list[int]]) -> nn.Module:
    """The source model with every MoE block sliced to its kept experts by the helper above."""
    model = copy.deepcopy(calibrated(family)[0])
    for i, block in moe_blocks(model).items():
        model.model.layers[i].mlp = sliced_block(block, kept[i])
    return model


@pytest.mark.parametrize("method", [*(m for m in PRUNING_METHODS if m != "mone"), "hc-smoe", "m-smoe"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cli_reduce_end_to_end(family, method, source, workdir, capfd):
    """CLI reduce: oracle's r one-member groups, bit-identical sliced tensors, loaded logits equal the sliced source."""
    # Checks: exit 0; r experts in config and tensors; moemerge.json groups equal the oracle's kept sets (hc-smoe: a
    # partition respecting DeepSeek's blocks); every checkpoint tensor is a bit-identical copy of the source's (kept
    # experts renumbered, router rows and selection bias sliced; hc-smoe: singleton groups and non-expert tensors);
    # plain from_pretrained runs, and for pruning its logits equal the in-memory source sliced to the kept experts.
    src = source(family)
    out = workdir / "out" / f"{family}-{method}"
    argv = ["reduce", src, "--experts", R, "--out", out, "--method", method, "--calib", workdir / "calib.jsonl"]
    code, err = cli([*argv, *SMALL_CALIB, "--quiet"], capfd)
    assert code == 0, err
    config = AutoConfig.from_pretrained(out)
    assert getattr(config, EXPERT_FIELD[family]) == R and config.num_experts_per_tok == 2

    layers = json.loads((out / "moemerge.json").read_text(encoding="utf-8"))["layers"]
    groups = {entry["layer"]: entry["groups"] for entry in layers}
    assert sorted(groups) == sorted(moe_blocks(calibrated(family)[0]))
    for layer, layer_groups in groups.items():
        assert len(layer_groups) == R
        for block in blocks_of(family):
            assert all(set(g) <= set(block) or not set(g) & set(block) for g in layer_groups)
        if method in PRUNING_METHODS:
            assert layer_groups == [[j] for j in expected_kept(family, method, layer)]
        else:
            assert sorted(j for g in layer_groups for j in g) == list(range(N))

    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    copied = {layer: {i: g[0] for i, g in enumerate(gs) if len(g) == 1} for layer, gs in groups.items()}
    expected_keys = set()
    for key in before:
        parsed = expert_key(key)
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else None
        if parsed is None:
            expected_keys.add(key)
            if key.split(".")[-2] == "gate" and layer in groups:  # the router (not qwen2's shared_expert_gate)
                assert after[key].shape[0] == R
                for i, j in copied[layer].items():
                    assert torch.equal(after[key][i], before[key][j]), (key, i, j)
            else:
                assert torch.equal(after[key], before[key]), key
        elif parsed[1] < R:
            expected_keys.add(key)
    assert set(after) == expected_keys
    for key in after:
        parsed = expert_key(key)
        if parsed is not None:
            prefix, i, suffix = parsed
            j = copied[int(key.split(".")[2])].get(i)
            if j is not None:
                assert torch.equal(after[key], before[f"{prefix}.{j}.{suffix}"]), key
    if method in PRUNING_METHODS:
        assert all(len(c) == R for c in copied.values())

    reduced = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([sequences()[1][:12]])
    with torch.no_grad():
        logits = reduced(input_ids=ids).logits
    assert logits.shape == (1, 12, VOCAB) and torch.isfinite(logits).all()
    if method in PRUNING_METHODS:
        kept = {layer: [g[0] for g in gs] for layer, gs in groups.items()}
        with torch.no_grad():
            expected = pruned_reference(family, kept)(input_ids=ids).logits
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# 5. refused combinations


def assert_clean_error(code: int, err: str, out: Path, *needles: str) -> None:
    """Exit 2, one ``error:`` line containing ``needles``, no traceback, nothing written in out's (empty) folder."""
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert all(n in lines[0] for n in needles), lines[0]
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary or partial output beside it either


def test_mone_without_the_original_router_is_refused(source, workdir, capfd, tmp_path):
    """--method mone with --router reduce: exit 2, one error line that names --router grouped, no output; the API
    raises MoemergeError."""
    out = tmp_path / "out"
    argv = ["reduce", source("mixtral"), "--experts", R, "--out", out, "--method", "mone"]
    code, err = cli([*argv, "--calib", workdir / "calib.jsonl", *SMALL_CALIB], capfd)
    assert_clean_error(code, err, out, "mone", "--router grouped")
    with pytest.raises(MoemergeError, match="--router grouped"):
        moemerge.reduce(source("mixtral"), out, experts=R, method="mone", progress=False)
    assert not out.exists()


def novice_reference(family: str, kept: dict[int, list[int]]) -> nn.Module:
    """The source model whose MoE blocks answer a token routed to a dropped expert j with the oracle's mean routed
    output of j instead of E_j(x): the block's own output, minus w_j (E_j(x) - mean_j) per such selection, routing
    from the block's own gate."""
    model = copy.deepcopy(calibrated(family)[0])

    def novices(layer: int):
        def hook(block, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            _, weights, ids = block.gate(x)
            correction = torch.zeros(len(x), x.shape[1], dtype=torch.float64)
            for j in sorted(set(range(N)) - set(kept[layer])):
                token, slot = (ids == j).nonzero(as_tuple=True)
                mean = oracle_statistics(family, layer)["routed_mean_output"][j]
                outputs = expert_output(block, j, x[token])
                correction[token] += weights[token, slot, None].double() * (outputs - mean)
            return output - correction.reshape(output.shape).to(output.dtype)

        return hook

    for i, block in moe_blocks(model).items():
        block.register_forward_hook(novices(i))
    return model


@pytest.mark.parametrize("method", PRUNING_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_router_with_pruning_gives_the_dropped_experts_novices(family, method, source, workdir, capfd):
    """CLI reduce --router grouped with a pruning method: the oracle's kept experts, and moemerge.load_model's logits
    equal the source model whose dropped experts answer with their mean routed output (MoNE's novices)."""
    out = workdir / "out" / f"{family}-{method}-grouped"
    argv = ["reduce", source(family), "--experts", R, "--out", out, "--method", method, "--router", "grouped"]
    code, err = cli([*argv, "--calib", workdir / "calib.jsonl", *SMALL_CALIB, "--quiet"], capfd)
    assert code == 0, err
    layers = json.loads((out / "moemerge.json").read_text(encoding="utf-8"))["layers"]
    kept = {entry["layer"]: [g[0] for g in entry["groups"]] for entry in layers}
    assert kept == {layer: expected_kept(family, method, layer) for layer in kept}
    ids = torch.tensor([sequences()[1][:12]])
    with torch.no_grad():
        logits = moemerge.load_model(out)(input_ids=ids).logits
        expected = novice_reference(family, kept)(input_ids=ids).logits
        pruned = pruned_reference(family, kept)(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (logits - pruned).abs().max() > 1e-3  # the novices are not the masked-out experts of --router reduce


@pytest.mark.parametrize("budget", [0, -5])
def test_oprune_budget_below_one_is_refused(budget, source, workdir, capfd, tmp_path):
    """--oprune-budget 0 (or negative) exits 2 with one ``error:`` line about the budget and leaves no output."""
    out = tmp_path / "out"
    argv = ["reduce", source("mixtral"), "--experts", R, "--out", out, "--method", "o-prune"]
    code, err = cli([*argv, "--oprune-budget", budget, "--calib", workdir / "calib.jsonl", *SMALL_CALIB], capfd)
    assert_clean_error(code, err, out, "--oprune-budget")


def test_tiny_config_matches_module_constants():
    """The module's N, top-k and DeepSeek block layout agree with the conftest configs the oracles assume."""
    for family in FAMILIES:
        config = tiny_config(family)
        assert getattr(config, EXPERT_FIELD[family]) == N and config.num_experts_per_tok == 2
    deepseek = tiny_config("deepseek_v3")
    assert deepseek.n_group == len(BLOCKS["deepseek_v3"]) and deepseek.topk_group == 1
    assert ADAPTERS["deepseek_v3"].partitions(deepseek, R) == [(b, 2) for b in BLOCKS["deepseek_v3"]]


def test_exactly_the_pruning_methods_declare_that_they_prune():
    """The registered methods' ``prunes`` declarations (which give --router grouped novices and skip the metric's
    statistics) name exactly the methods that keep whole experts."""
    assert {m for m in names("method") if resolve("method", m).prunes} == set(PRUNING_METHODS)
