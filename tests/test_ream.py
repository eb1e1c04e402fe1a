"""REAM (``--method ream``): its statistic, similarity, grouping, merge and router rows against oracles.

Oracles: a float64 recomputation from block inputs captured with hooks written here (the model's own router for
the probabilities); numpy/scipy re-computations of REAM's similarity; brute force over all neuron permutations;
invariants (a neuron-permuted copy merges back into its centre; the greedy grouping's exchange property); and,
for the layer-sequential run, the groups planned from statistics of a model whose earlier layers are the reduced
output's, taken through a route of their own (the reduced checkpoint spliced into the original).
"""

from __future__ import annotations

import copy
import itertools
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, VOCAB, plant_permuted_copies, run_cli, save_tiny, tiny_model
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from transformers import AutoModelForCausalLM

import moemerge
from moemerge import MoemergeError, apply_groups, plan_groups
from moemerge.adapters import FAMILIES as ADAPTERS
from moemerge.grouping import pseudo_groups, ream_similarity
from moemerge.merging import hungarian_units, saliency_weights
from moemerge.options import ReduceOptions
from moemerge.pipeline import merge_layer
from moemerge.routing.router_rows import router_rows
from moemerge.statistics import collect_statistics

R, SAMPLES, SEQ_LEN = 4, 2, 32
NEEDS = ReduceOptions(method="ream").statistics()


def sequences() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, VOCAB, (SEQ_LEN,), generator=g).tolist() for _ in range(SAMPLES)]


def statistics_of(model, family: str, only: int | None = None):
    """Statistics of every MoE layer (or of layer ``only``) on :func:`sequences`, all tokens sampled."""
    views = [v for v in ADAPTERS[family].moe_layers(model) if only is None or v.layer == only]
    rows = [torch.tensor(r) for r in sequences()]
    return collect_statistics(model, views, rows, NEEDS, router_sample=SAMPLES * SEQ_LEN, progress=False)


def block_inputs(model) -> dict[int, torch.Tensor]:
    """[T, H] inputs of every MoE block on :func:`sequences`, captured with forward pre-hooks."""
    captured: dict[int, list[torch.Tensor]] = {}
    blocks = {i: layer.mlp for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}
    hooks = [
        block.register_forward_pre_hook(
            lambda module, args, i=i: captured.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for i, block in blocks.items()
    ]
    with torch.no_grad():
        for row in sequences():
            model(input_ids=torch.tensor([row]), use_cache=False)
    for hook in hooks:
        hook.remove()
    return {i: torch.cat(parts) for i, parts in captured.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_gated_mean_output_equals_float64_recomputation(family):
    """gated_mean_output [n, H] = mean over all tokens of p_j(x) E_j(x), p the softmax (DeepSeek: sigmoid) of the
    router logits x W^T, E_j from the fused expert weights in float64."""
    model = tiny_model(family)
    assert model.config.hidden_act == "silu"
    stats = statistics_of(model, family)
    for layer, x in block_inputs(model).items():
        block = model.model.layers[layer].mlp
        x = x.double()
        logits = x @ block.gate.weight.double().T
        p = logits.sigmoid() if family == "deepseek_v3" else logits.softmax(-1)
        expected = []
        for j in range(len(block.experts.down_proj)):
            gate, up = block.experts.gate_up_proj[j].double().chunk(2)
            out = (F.silu(x @ gate.T) * (x @ up.T)) @ block.experts.down_proj[j].double().T
            expected.append((p[:, j, None] * out).mean(0))
        torch.testing.assert_close(stats[layer].gated_mean_output.double(), torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_similarity_is_reams_mean_of_output_and_router_similarity():
    """(1 + cos(f_i, f_j)) / 2 averaged with 1 - d_ij / max d (d: Euclidean between unit-length logit rows), by
    numpy and scipy."""
    g = torch.Generator().manual_seed(2)
    f, logits = torch.randn(7, 5, generator=g), torch.randn(7, 40, generator=g)
    fn, ln = f.double().numpy(), logits.double().numpy()
    cos = np.array([[a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for b in fn] for a in fn])
    rows = ln / np.linalg.norm(ln, axis=1, keepdims=True)
    d = cdist(rows, rows)
    expected = ((1 + cos) / 2 + 1 - d / d.max()) / 2
    np.testing.assert_allclose(ream_similarity(f, logits).numpy(), expected, rtol=1e-7, atol=1e-9)


def test_pseudo_groups_follow_saliency_order_on_a_hand_case():
    """The most salient centre takes its C - 1 most similar experts first, even one closer to a later centre."""
    saliency = torch.tensor([5.0, 4.0, 1.0, 1.0, 1.0, 1.0])
    sim = torch.zeros(6, 6, dtype=torch.float64)
    sim[0, [2, 3, 4, 5]] = torch.tensor([0.9, 0.8, 0.7, 0.1], dtype=torch.float64)
    sim[1, [2, 3, 4, 5]] = torch.tensor([0.95, 0.1, 0.2, 0.3], dtype=torch.float64)
    assert pseudo_groups(saliency, sim, list(range(6)), 2, 3) == [[0, 2, 3], [1, 4, 5]]
    assert pseudo_groups(saliency, sim, list(range(6)), 2, 5) == [[0, 2, 3, 4, 5], [1]]
    assert pseudo_groups(saliency, sim, [1, 2, 3, 5], 2, 3) == [[1, 3, 5], [2]]  # a subset (a routing block)
    tied = torch.ones(4)  # ties of saliency and of similarity go to the lower id
    assert pseudo_groups(tied, torch.zeros(4, 4, dtype=torch.float64), list(range(4)), 2, 3) == [[0, 2, 3], [1]]


def test_pseudo_groups_partition_with_one_centre_each_and_the_greedy_exchange_property():
    """Random instances: r groups partitioning the experts, each holding exactly one of the r most salient, at most
    C members; a centre's group that is not full left nothing for later centres; and no expert in a later centre's
    group is more similar to an earlier centre than that centre's least similar non-centre member."""
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randrange(2, 13)
        r = rng.randrange(1, n + 1)
        size = rng.randrange(-(-n // r), n + 1)
        saliency = torch.tensor([rng.random() for _ in range(n)])
        sim = torch.tensor([[rng.random() for _ in range(n)] for _ in range(n)], dtype=torch.float64)
        groups = pseudo_groups(saliency, sim, list(range(n)), r, size)
        centres = sorted(range(n), key=lambda j: -float(saliency[j]))[:r]
        assert sorted(j for g in groups for j in g) == list(range(n)) and len(groups) == r
        leader = {}
        for group in groups:
            assert len(group) <= size
            (centre,) = set(group) & set(centres)
            leader[centre] = group
        for a, earlier in enumerate(centres):
            taken = [j for j in leader[earlier] if j != earlier]
            later = [j for c in centres[a + 1 :] for j in leader[c] if j != c]
            if len(leader[earlier]) < size:
                assert later == []
            elif taken and later:
                assert max(float(sim[earlier, j]) for j in later) <= min(float(sim[earlier, j]) for j in taken)


def test_groups_too_small_to_hold_every_expert_are_refused_before_any_work(tmp_path, capfd):
    """r x C below the expert count: pseudo_groups raises, and reduce refuses before calibrating (one error line,
    naming the group size to give; nothing written), as compare does for its variant."""
    with pytest.raises(MoemergeError, match="of 3 or more"):
        pseudo_groups(torch.ones(9), torch.zeros(9, 9), list(range(9)), 3, 2)
    src = save_tiny("mixtral", tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text("Some text to calibrate and evaluate on.\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["reduce", src, "--experts", 2, "--method", "ream", "--ream-group-size", 3, "--out", out, "--quiet"]
    code, _, err = run_cli([*argv, "--calib", text], capfd)
    assert code == 2 and len(err.splitlines()) == 1 and "--ream-group-size" in err and "of 4 or more" in err, err
    assert not out.exists()
    grid = tmp_path / "grid"
    argv = ["compare", src, "--methods", "ream:ream_group_size=3", "--experts", 2, "--out", grid]
    code, _, err = run_cli([*argv, "--data", text, "--calib", text, "--calib-seq-len", SEQ_LEN], capfd)
    assert code == 2 and "ream_group_size=" in err and "of 4 or more" in err, err
    assert not grid.exists()


def test_hungarian_units_minimise_the_total_distance_by_brute_force():
    """Member neuron b goes into centre neuron a for the permutation of least sum of Euclidean distances between
    unit-length activation columns (numpy), over all 5! permutations."""
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        acts = [torch.randn(30, 5, generator=g) for _ in range(3)]
        units = hungarian_units(acts, torch.full((3,), 1 / 3))
        assert units[0].tolist() == list(range(5))
        columns = [a.double().numpy().T / np.linalg.norm(a.double().numpy().T, axis=1, keepdims=True) for a in acts]
        for m in (1, 2):
            cost = cdist(columns[0], columns[m])
            best = min(sum(cost[a, p[a]] for a in range(5)) for p in itertools.permutations(range(5)))
            got = sum(cost[int(units[m][b]), b] for b in range(5))
            assert sorted(units[m].tolist()) == list(range(5))
            assert got == pytest.approx(best, rel=1e-12)


def test_saliency_weights_are_normalised_reap_with_zeros_lifted():
    """Members weigh by REAP saliency over the group's sum; a saliency of 0 counts as min(0.5, least non-zero)."""
    stats = type("S", (), {"reap": torch.tensor([0.0, 2.0, 0.8, 3.0, 0.0], dtype=torch.float64)})()
    torch.testing.assert_close(saliency_weights(stats, [1, 3]), torch.tensor([0.4, 0.6], dtype=torch.float64))
    torch.testing.assert_close(
        saliency_weights(stats, [0, 2]), torch.tensor([0.5 / 1.3, 0.8 / 1.3], dtype=torch.float64)
    )
    stats.reap = torch.tensor([0.0, 0.3, 0.0], dtype=torch.float64)
    torch.testing.assert_close(saliency_weights(stats, [0, 1, 2]), torch.full((3,), 1 / 3, dtype=torch.float64))


def merged_pairs(model, family: str):
    """(statistics, groups {layer: experts (2i, 2i + 1)}, [(original view, merged view)] per MoE layer): a copy of
    ``model`` merged pairwise by the saliency merge and router rows."""
    adapter = ADAPTERS[family]
    stats = statistics_of(model, family)
    merged = copy.deepcopy(model)
    groups = {layer: [[a, a + 1] for a in range(0, 8, 2)] for layer in stats}
    apply_groups(merged, adapter, stats, groups, "saliency", "saliency")
    return stats, groups, list(zip(adapter.moe_layers(model), adapter.moe_layers(merged), strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_neuron_permuted_copy_merges_back_into_its_centre(family):
    """Experts 2i + 1 are neuron-permuted copies of 2i: the saliency merge of each pair is the pair's centre (its
    more salient member) up to float rounding, and the router row and selection bias are the centre's exactly."""
    stats, groups, pairs = merged_pairs(plant_permuted_copies(tiny_model(family)), family)
    for old, new in pairs:
        reap = stats[old.layer].reap
        for k, (a, b) in enumerate(groups[old.layer]):
            centre = a if reap[a] >= reap[b] else b
            for merged, original in zip(new.expert_weights(), old.expert_weights(), strict=True):
                torch.testing.assert_close(merged[k], original[centre], rtol=1e-5, atol=1e-6)
            assert torch.equal(new.router_weight[k], old.router_weight[centre])
            if old.selection_bias is not None:
                assert torch.equal(new.selection_bias[k], old.selection_bias[centre])


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_saliency_merge_of_two_different_experts_equals_a_recomputation(family):
    """Merging two different experts: centre = the higher REAP saliency; the other member's neurons permuted by
    scipy's assignment on unit-length activation columns over all sampled tokens (numpy); the merge is the
    saliency-weighted sum of the centre and the permuted member."""
    stats, groups, pairs = merged_pairs(tiny_model(family), family)
    for old, new in pairs:
        x = stats[old.layer].router_inputs.double()
        reap = stats[old.layer].reap.double()
        gate, up, down = (w.detach().double() for w in old.expert_weights())
        for k, pair in enumerate(groups[old.layer]):
            centre, other = sorted(pair, key=lambda j: (-float(reap[j]), j))
            acts = [(F.silu(x @ gate[j].T) * (x @ up[j].T)).numpy().T for j in (centre, other)]
            unit = [a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-8) for a in acts]
            rows, cols = linear_sum_assignment(cdist(unit[0], unit[1]))
            order = torch.as_tensor(cols[np.argsort(rows)])  # merged neuron a takes the other's neuron order[a]
            w = reap[[centre, other]] / reap[[centre, other]].sum()
            expected = (
                w[0] * gate[centre] + w[1] * gate[other][order],
                w[0] * up[centre] + w[1] * up[other][order],
                w[0] * down[centre] + w[1] * down[other][:, order],
            )
            for got, want in zip(new.expert_weights(), expected, strict=True):
                torch.testing.assert_close(got[k].double(), want, rtol=1e-5, atol=1e-6)


def test_saliency_router_rows_keep_the_most_salient_members_row_and_bias():
    stats = type("S", (), {"reap": torch.tensor([1.0, 3.0, 3.0, 0.5]), "counts": torch.tensor([4, 1, 1, 9])})()
    weight, bias = torch.randn(4, 6), torch.randn(4)
    rows, new_bias = router_rows("saliency", weight, bias, [[0, 1, 2], [3]], stats)
    assert torch.equal(rows, weight[[1, 3]]) and torch.equal(new_bias, bias[[1, 3]])


@pytest.mark.parametrize("router", ["reduce", "grouped"])
@pytest.mark.parametrize("family", FAMILIES)
def test_reduce_runs_ream_layer_sequentially(family, router, tmp_path, capfd):
    """``moemerge reduce --method ream``: exit 0, a checkpoint of r experts, the first MoE layer grouped as REAM
    groups the original model's statistics, and the second grouped and merged (its saliency weights) as from
    statistics of the original second layer on hidden states from the reduced first layer (the output's first MoE
    block, as vanilla transformers or, for --router grouped, moemerge.load_model loads it, spliced into the
    original)."""
    src = save_tiny(family, tmp_path / "src")
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in sequences()), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["reduce", src, "--experts", R, "--method", "ream", "--ream-group-size", 3, "--out", out, "--calib", calib]
    argv += ["--router", router]
    code, _, err = run_cli([*argv, "--calib-samples", SAMPLES, "--calib-seq-len", SEQ_LEN, "--no-report"], capfd)
    assert code == 0, err
    meta = json.loads((out / "moemerge.json").read_text())
    assert meta["parameters"]["sequential"] is True
    assert (meta["parameters"]["merge"], meta["parameters"]["router_rows"]) == ("saliency", "saliency")
    layers = {e["layer"]: e["groups"] for e in meta["layers"]}
    first, second = sorted(layers)

    original = AutoModelForCausalLM.from_pretrained(src).eval()
    adapter = ADAPTERS[family]
    options = dict(method="ream", ream_group_size=3)
    assert plan_groups(statistics_of(original, family), adapter, original.config, R, **options)[first] == layers[first]

    spliced = copy.deepcopy(original)
    reduced = moemerge.load_model(out) if router == "grouped" else AutoModelForCausalLM.from_pretrained(out).eval()
    spliced.model.layers[first].mlp = reduced.model.layers[first].mlp
    stats = statistics_of(spliced, family, second)
    groups = plan_groups(stats, adapter, original.config, R, **options)[second]
    assert groups == layers[second]
    (view,) = [v for v in adapter.moe_layers(spliced) if v.layer == second]
    merge_layer(view, groups, stats[second], "saliency", "saliency")
    (got,) = [v for v in adapter.moe_layers(reduced) if v.layer == second]
    for expected, weights in zip(view.expert_weights(), got.expert_weights(), strict=True):
        torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert torch.isfinite(reduced(input_ids=torch.tensor([sequences()[0]])).logits).all()


def test_ream_refuses_a_non_uniform_budget(tmp_path, capfd):
    src = save_tiny("mixtral", tmp_path / "src")
    out = tmp_path / "out"
    argv = ["reduce", src, "--experts", R, "--method", "ream", "--budget", "frequency", "--out", out]
    code, _, err = run_cli([*argv, "--calib-samples", SAMPLES, "--calib-seq-len", SEQ_LEN, "--quiet"], capfd)
    assert code == 2 and err.startswith("error: ") and "--method ream" in err and "--budget uniform" in err, err
    assert not out.exists()
