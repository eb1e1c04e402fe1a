"""Neuron-matching merges (fix-dom, ZipIt): each piece against an oracle written here, and end to end on every family.

Oracles: a loop over neurons for the unit merge formula, numpy's corrcoef for fix-dom, a plain greedy over a full
sort of all unit pairs for ZipIt, and exact recovery of an expert merged with a neuron-permuted copy of itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import EXPERT_FIELD, FAMILIES, layer_stats, save_permuted_copies
from transformers import AutoModelForCausalLM

import moemerge
from moemerge.merging import fix_dom_units, match_groups, member_weights, merge_experts, zipit_units
from moemerge.merging.neuron_matching import MIN_TOKENS
from moemerge.registry import resolve

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families.\n"
) * 4


def random_layer(n: int, inter: int, hidden: int, seed: int):
    """(gate [n, I, H], up [n, I, H], down [n, H, I]) float32 random expert weights."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, inter, hidden, generator=g),
        torch.randn(n, inter, hidden, generator=g),
        torch.randn(n, hidden, inter, generator=g),
    )


def activations(gate: torch.Tensor, up: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[t, I] float64 silu(x gate^T) * (x up^T) of one expert, written out here."""
    x = x.double()
    return torch.nn.functional.silu(x @ gate.double().T) * (x @ up.double().T)


# ----------------------------------------------------------------------------------------------------------------
# the merge formula with units


def oracle_unit_merge(weights, group, alphas, unit):
    """One merged expert by a loop over merged neurons: gate/up rows = a-weighted mean of the member rows put into the
    neuron, down column = a-weighted sum of their down columns (float64)."""
    gate, up, down = (w.double() for w in weights)
    inter = gate.shape[1]
    out_gate, out_up = torch.zeros(gate.shape[1:], dtype=torch.float64), torch.zeros(up.shape[1:], dtype=torch.float64)
    out_down = torch.zeros(down.shape[1:], dtype=torch.float64)
    for u in range(inter):
        members = [(m, k) for m in range(len(group)) for k in range(inter) if int(unit[m][k]) == u]
        mass = sum(float(alphas[m]) for m, _ in members)
        for m, k in members:
            a, e = float(alphas[m]), group[m]
            out_gate[u] += a * gate[e, k] / mass
            out_up[u] += a * up[e, k] / mass
            out_down[:, u] += a * down[e, :, k]
    return out_gate, out_up, out_down


def test_merge_with_units_equals_a_loop_over_merged_neurons():
    """merge_experts with explicit units (one member folding two of its neurons into one unit) equals the per-neuron
    loop; None units in the same call give sum_i a_i W_i, and explicit identity units give the same."""
    inter = 6
    weights = random_layer(5, inter, 4, seed=0)
    groups = [[0, 2, 3], [1, 4]]
    alphas = [torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.25, 0.75], dtype=torch.float64)]
    unit = torch.tensor(
        [
            [4, 0, 5, 1, 3, 2],  # the first member is a permutation, so every merged neuron gets some mass
            [3, 3, 0, 1, 5, 4],  # neurons 0 and 1 fold into merged neuron 3 (no neuron of this member goes to 2)
            [1, 1, 1, 0, 2, 5],
        ]
    )
    assert len(set(unit[1].tolist())) < inter
    merged = merge_experts(weights, groups, alphas, [unit, None])
    for got, want in zip(merged, oracle_unit_merge(weights, groups[0], alphas[0], unit), strict=True):
        torch.testing.assert_close(got[0].double(), want, rtol=1e-6, atol=1e-6)
    plain = [(alphas[1].view(-1, 1, 1) * w[groups[1]].double()).sum(0) for w in weights]
    for got, want in zip(merged, plain, strict=True):
        torch.testing.assert_close(got[1].double(), want, rtol=1e-6, atol=1e-6)
    identity = merge_experts(weights, groups[1:], alphas[1:], [torch.arange(inter).repeat(2, 1)])
    for got, want in zip(identity, plain, strict=True):
        torch.testing.assert_close(got[0].double(), want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# fix-dom


def test_fix_dom_equals_a_numpy_corrcoef_argmax():
    """fix_dom_units: the dominant keeps its order and every other neuron goes to the argmax of np.corrcoef against
    the dominant's neurons (constant columns correlate 0, ties to the lower index), whatever the member weights."""
    rng = np.random.default_rng(0)
    for trial in range(5):
        inter, t = 7, 40
        acts = [rng.normal(size=(t, inter)) for _ in range(3)]
        acts[0][:, 2] = 1.5  # a constant dominant neuron: correlation 0 with everything
        acts[1][:, 4] = -0.5  # a constant member neuron: all correlations 0, so it goes to dominant neuron 0
        alphas = torch.from_numpy(rng.dirichlet(np.ones(3)))
        got = fix_dom_units([torch.from_numpy(a).float() for a in acts], alphas)
        expected = [np.arange(inter)]
        for act in acts[1:]:
            with np.errstate(invalid="ignore", divide="ignore"):
                corr = np.nan_to_num(np.corrcoef(act.T, acts[0].T)[:inter, inter:], nan=0.0)
            expected.append(corr.argmax(axis=1))
        assert got.tolist() == np.stack(expected).tolist(), trial
        assert got[1, 4] == 0
        flipped = fix_dom_units([torch.from_numpy(a).float() for a in acts], alphas.flip(0))
        assert torch.equal(flipped, got)


# ----------------------------------------------------------------------------------------------------------------
# ZipIt


def brute_force_zipit(acts: list[np.ndarray], alphas: np.ndarray) -> np.ndarray:
    """Oracle [m, I]: rounds of global greedy matching over a full sort of all unit pairs.

    A unit's activation is sum of alpha * activation over its neurons; in a round the pairs are taken by decreasing
    correlation (ties: the lexicographically first pair), skipping units already joined this round, until I units
    remain; units are numbered by their first neuron in flat order member * I + neuron.
    """
    m, inter = len(acts), acts[0].shape[1]
    flat = np.concatenate([a * act for act, a in zip(acts, alphas, strict=True)], axis=1)
    units = [[j] for j in range(m * inter)]  # each unit a list of flat neuron indices, ordered by first neuron
    while len(units) > inter:
        unit_acts = np.stack([flat[:, u].sum(axis=1) for u in units], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.nan_to_num(np.corrcoef(unit_acts.T), nan=0.0)
        pairs = sorted(
            ((corr[i, j], i, j) for i in range(len(units)) for j in range(i + 1, len(units))),
            key=lambda p: (-p[0], p[1], p[2]),
        )
        joined, merges = set(), []
        for _, i, j in pairs:
            if len(merges) == len(units) - inter:
                break
            if i not in joined and j not in joined:
                merges.append((i, j))
                joined |= {i, j}
        partner, absorbed = dict(merges), {j for _, j in merges}
        units = sorted(
            (
                units[i] + units[partner[i]] if i in partner else units[i]
                for i in range(len(units))
                if i not in absorbed
            ),
            key=min,
        )
    labels = np.empty(m * inter, dtype=np.int64)
    for k, u in enumerate(units):
        labels[u] = k
    return labels.reshape(m, inter)


@pytest.mark.parametrize(("m", "inter", "t"), [(3, 5, 50), (2, 6, 40), (4, 3, 30)])
def test_zipit_equals_a_brute_force_greedy(m, inter, t):
    """zipit_units equals the full-sort greedy oracle on random activations with unequal member weights, and yields
    exactly I units numbered 0..I-1 in order of their first neuron."""
    for seed in range(6):
        rng = np.random.default_rng(100 * m + seed)
        acts = [rng.normal(size=(t, inter)) * rng.uniform(0.5, 2.0, size=inter) for _ in range(m)]
        alphas = rng.dirichlet(np.ones(m))
        got = zipit_units([torch.from_numpy(a).float() for a in acts], torch.from_numpy(alphas))
        expected = brute_force_zipit([a.astype(np.float32).astype(np.float64) for a in acts], alphas)
        assert got.shape == (m, inter)
        assert got.tolist() == expected.tolist(), seed
        flat = got.reshape(-1).tolist()
        assert sorted(set(flat)) == list(range(inter))
        firsts = [flat.index(u) for u in range(inter)]
        assert firsts == sorted(firsts)


# ----------------------------------------------------------------------------------------------------------------
# matching through match_groups


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The experts' activations of their gate and up pre-activations, as match_groups takes them."""
    return torch.nn.functional.silu(gate) * up


def test_match_groups_feeds_the_matcher_the_dominant_first_on_routed_tokens():
    """match_groups gives the matcher the active members' activations (largest weight first, ties the lower id) on the
    tokens routed to the group when at least MIN_TOKENS were (boundary included), else on all tokens; members of
    weight 0 keep identity units, groups with fewer than two weighted members get None, and the matcher's rows land
    on the right members."""
    inter, hidden, t = 4, 6, 64
    gate, up, down = random_layer(7, inter, hidden, seed=1)
    x = torch.randn(t, hidden, generator=torch.Generator().manual_seed(2))
    routed = torch.zeros(t, 7, dtype=torch.bool)
    routed[:20, 2] = routed[12:32, 4] = True  # group 0: exactly MIN_TOKENS routed tokens, which are used
    routed[33:, 3] = True  # group 1: one token fewer, so all sampled tokens are used
    assert int(routed[:, [0, 2, 4, 5]].any(1).sum()) == MIN_TOKENS == int(routed[:, [1, 3]].any(1).sum()) + 1
    groups = [[0, 2, 4, 5], [1, 3], [6]]
    alphas = [
        torch.tensor([0.25, 0.5, 0.0, 0.25], dtype=torch.float64),
        torch.tensor([0.5, 0.5], dtype=torch.float64),
        torch.tensor([1.0], dtype=torch.float64),
    ]
    calls = []

    def recording_match(acts, a):
        calls.append((acts, a))
        return torch.stack([torch.arange(inter).roll(k + 1) for k in range(len(acts))])

    units = match_groups(recording_match, (gate, up, down), groups, alphas, swiglu, x, routed)
    assert len(calls) == 2 and units[2] is None
    # group 0: active members by weight: expert 2 (0.5), then experts 0 and 5 (0.25, ties by id); expert 4 has weight 0
    tokens = routed[:, groups[0]].any(1)
    expected = [([2, 0, 5], [0.5, 0.25, 0.25], tokens), ([1, 3], [0.5, 0.5], torch.ones(t, dtype=torch.bool))]
    for (acts, a), (order, weights, rows) in zip(calls, expected, strict=True):
        assert len(acts) == len(order)
        for act, e in zip(acts, order, strict=True):
            torch.testing.assert_close(act.double(), activations(gate[e], up[e], x[rows]), rtol=1e-5, atol=1e-6)
        assert a.tolist() == weights
    rolled = [torch.arange(inter).roll(k + 1) for k in range(3)]
    assert units[0].tolist() == [rolled[1].tolist(), rolled[0].tolist(), list(range(inter)), rolled[2].tolist()]
    assert units[1].tolist() == [rolled[0].tolist(), rolled[1].tolist()]


@pytest.mark.parametrize("merge", ["fix-dom", "zipit"])
@pytest.mark.parametrize("dominant", [0, 1])
def test_merging_an_expert_with_a_permuted_copy_returns_the_dominant(merge, dominant):
    """fix-dom and zipit, without alignment, merge an expert with a neuron-permuted copy of itself into that expert in
    the dominant member's neuron order (gate, up, down), through match_groups on real activations; the plain frequency
    average of the same pair does not."""
    inter, hidden = 16, 12
    gate, up, down = random_layer(1, inter, hidden, seed=3)
    perm = torch.randperm(inter, generator=torch.Generator().manual_seed(4))
    other = random_layer(1, inter, hidden, seed=5)
    stacked = (
        torch.cat([gate, gate[:, perm], other[0]]),
        torch.cat([up, up[:, perm], other[1]]),
        torch.cat([down, down[:, :, perm], other[2]]),
    )
    counts = torch.tensor([7, 3, 4]) if dominant == 0 else torch.tensor([2, 9, 4])
    stats = layer_stats(0, torch.zeros(3, hidden), counts, 10)
    groups = [[0, 1], [2]]
    alphas = member_weights(merge, stats, groups)
    x = torch.randn(64, hidden, generator=torch.Generator().manual_seed(6))
    routed = torch.ones(64, 3, dtype=torch.bool)
    units = match_groups(resolve("merge", merge).match, stacked, groups, alphas, swiglu, x, routed)
    merged = merge_experts(stacked, groups, alphas, units)
    expected = tuple(w[dominant] for w in stacked)
    for got, want in zip(merged, expected, strict=True):
        torch.testing.assert_close(got[0], want, rtol=1e-6, atol=1e-6)
    for got, want in zip(merged, other, strict=True):
        assert torch.equal(got[1], want[0])
    plain = merge_experts(stacked, groups, alphas)
    assert not torch.allclose(plain[0][0], expected[0], atol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize("merge", ["fix-dom", "zipit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_neuron_matching_reduce_end_to_end(tmp_path, calib, family, merge):
    """reduce(..., merge=fix-dom|zipit) on a model whose experts 2i + 1 are neuron-permuted copies of experts 2i (both
    used by the router): hc-smoe pairs each copy with its original, and the matched merge of every pair is the pair's
    dominant (more used) member, which a merge that fails to match the permuted neurons is not; r experts in every
    MoE layer, loads with vanilla transformers and runs a finite forward, records the merge, and two runs write
    byte-identical weights."""
    src = save_permuted_copies(family, tmp_path / "src")
    source = AutoModelForCausalLM.from_pretrained(src)
    r = 4
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        moemerge.reduce(
            src, out, experts=r, merge=merge, calib=str(calib), calib_samples=2, calib_seq_len=32, progress=False,
            report=False,
        )  # fmt: skip
        runs.append(out)
    a, b = runs
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    meta = json.loads((a / "moemerge.json").read_text())
    assert meta["parameters"]["merge"] == merge
    model = AutoModelForCausalLM.from_pretrained(a)
    assert getattr(model.config, EXPERT_FIELD[family]) == r
    moe = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert len(moe) == 2
    for block in moe:
        assert block.experts.gate_up_proj.shape[0] == r
        assert block.experts.down_proj.shape[0] == r
        assert block.gate.weight.shape[0] == r
    for entry in meta["layers"]:
        assert entry["groups"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
        before = source.model.layers[entry["layer"]].mlp.experts
        after = model.model.layers[entry["layer"]].mlp.experts
        for k, group in enumerate(entry["groups"]):
            frequency = [entry["frequency"][j] for j in group]
            assert min(frequency) > 0, "both members must weigh in the merge"
            dominant = group[0] if frequency[0] >= frequency[1] else group[1]
            torch.testing.assert_close(after.gate_up_proj[k], before.gate_up_proj[dominant], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(after.down_proj[k], before.down_proj[dominant], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(1, 13)[None], use_cache=False).logits
    assert torch.isfinite(logits).all()
