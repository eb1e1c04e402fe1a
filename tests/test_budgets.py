"""Per-layer expert budgets (--budget frequency|probability) and MC-SMoE's --param-budget, against oracles written here.

Oracles: a brute force over every vector of per-layer expert counts (exact Fraction sums of each layer's best
scores), brute-force best subsets per layer, expert counts recomputed from the model's own routers with hooks, the
source model sliced to the oracle's kept experts with plain torch, the source with each expert replaced by its
group's merge (grouped routing), and an exact (Fraction) search over the rank for --param-budget.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import NUM_EXPERTS, TOP_K, VOCAB, layer_stats, save_tiny, tiny_config, tiny_model
from safetensors.torch import load_file
from test_cli import assert_clean_error, run
from torch import nn
from transformers import AutoModelForCausalLM

import moemerge
from moemerge import MoemergeError, apply_groups, pipeline, plan_groups
from moemerge.adapters import FAMILIES as ADAPTERS
from moemerge.grouping import layer_budgets
from moemerge.merging import rank_for_budget
from moemerge.pipeline import experts_per_layer
from moemerge.statistics import collect_statistics

N = NUM_EXPERTS
SAMPLES, SEQ_LEN = 2, 32
# no report: the report's tests are in test_report.py
CALIB = ["--calib-samples", str(SAMPLES), "--calib-seq-len", str(SEQ_LEN), "--quiet", "--no-report"]
SOFTMAX = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
# families whose routing allows per-layer counts; "deepseek_v3_flat" is the tiny DeepSeek-V3 with n_group = 1
E2E = [*SOFTMAX, "deepseek_v3_flat"]
R = 4  # the average experts per layer of the end-to-end runs (chosen so that every family's counts differ by layer)


# ----------------------------------------------------------------------------------------------------------------
# oracles


def brute_force_counts(scores: dict[int, list], r: int, floor: int) -> dict[int, int]:
    """Of every vector of per-layer counts c_l in [floor, n] summing to r * L, the one whose layers' c_l best scores
    add up to the most (exact Fraction sums); among equal totals the lexicographically largest (earlier layers first)."""
    layers = sorted(scores)
    prefix = []
    for layer in layers:
        ordered = sorted((Fraction(float(s)) for s in scores[layer]), reverse=True)
        prefix.append([sum(ordered[:c], Fraction(0)) for c in range(len(ordered) + 1)])
    ranges = [range(floor, len(p)) for p in prefix]
    feasible = (c for c in itertools.product(*ranges) if sum(c) == r * len(layers))
    best = max(feasible, key=lambda c: (sum(p[ci] for p, ci in zip(prefix, c, strict=True)), c))
    return dict(zip(layers, best, strict=True))


def best_subset(score, c: int) -> list[int]:
    """The c-subset of highest total score (exact sums); among equal totals the lexicographically smallest ids."""
    ids = range(len(score))
    return list(min(itertools.combinations(ids, c), key=lambda s: (-sum(Fraction(float(score[j])) for j in s), s)))


def global_kept(scores: dict[int, list], r: int, floor: int) -> dict[int, list[int]]:
    """The oracle's kept experts per layer: the brute-force counts, each layer keeping its best subset of that size."""
    return {layer: best_subset(scores[layer], c) for layer, c in brute_force_counts(scores, r, floor).items()}


def assert_global_top(kept: dict[int, list[int]], scores: dict[int, list], floor: int) -> None:
    """Invariant of a global top set: every kept expert beyond its layer's best ``floor`` scores at least as much as
    every dropped expert of any layer, and each layer keeps its best ``floor``."""
    beyond, dropped = [], []
    for layer, score in scores.items():
        assert set(best_subset(score, floor)) <= set(kept[layer]), layer
        beyond += [float(score[j]) for j in kept[layer] if j not in best_subset(score, floor)]
        dropped += [float(score[j]) for j in range(len(score)) if j not in kept[layer]]
    if beyond and dropped:
        assert min(beyond) >= max(dropped)


def calibration_rows() -> list[list[int]]:
    """Random token rows; the seed is one under which every E2E family's global counts differ by layer at R."""
    g = torch.Generator().manual_seed(2017)
    return [torch.randint(0, VOCAB, (SEQ_LEN,), generator=g).tolist() for _ in range(SAMPLES)]


def moe_blocks(model) -> dict[int, nn.Module]:
    return {i: layer.mlp for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}


def routed_counts(model) -> dict[int, torch.Tensor]:
    """Per MoE decoder layer, how often the model's own router (block.gate, hooked here) put each expert in its
    top-k over the calibration rows."""
    counts: dict[int, torch.Tensor] = {}

    def hook(module, args, output, i):
        counts[i] = counts.get(i, torch.zeros(N, dtype=torch.int64)) + torch.bincount(
            output[2].reshape(-1), minlength=N
        )

    handles = [block.gate.register_forward_hook(functools.partial(hook, i=i)) for i, block in moe_blocks(model).items()]
    with torch.no_grad():
        for row in calibration_rows():
            model(input_ids=torch.tensor([row]), use_cache=False)
    for handle in handles:
        handle.remove()
    return counts


def slice_experts(model, kept: dict[int, list[int]]):
    """``model`` with each MoE block's routed experts, router rows (and selection bias) cut to ``kept``, in place."""
    for i, block in moe_blocks(model).items():
        idx = torch.tensor(kept[i])
        block.experts.gate_up_proj = nn.Parameter(block.experts.gate_up_proj.detach()[idx].clone())
        block.experts.down_proj = nn.Parameter(block.experts.down_proj.detach()[idx].clone())
        block.experts.num_experts = len(idx)
        block.gate.weight = nn.Parameter(block.gate.weight.detach()[idx].clone())
        block.gate.num_experts = len(idx)
        if hasattr(block.gate, "e_score_correction_bias"):
            block.gate.e_score_correction_bias = block.gate.e_score_correction_bias[idx].clone()
    return model


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([calibration_rows()[1][:12]]), use_cache=False).logits


def experts_in(model) -> dict[int, int]:
    """Per MoE decoder layer, the routed experts held by the expert tensors and by the router (which must agree)."""
    sizes = {}
    for i, block in moe_blocks(model).items():
        router = block.gate.router if hasattr(block.gate, "router") else block.gate
        n = block.experts.gate_up_proj.shape[0]
        assert block.experts.down_proj.shape[0] == n
        if not hasattr(block.gate, "router"):  # grouped routing keeps the original n-row router
            assert router.weight.shape[0] == n
        sizes[i] = n
    return sizes


def groups_of(out: Path) -> dict[int, list[list[int]]]:
    meta = json.loads((out / "moemerge.json").read_text(encoding="utf-8"))
    return {entry["layer"]: entry["groups"] for entry in meta["layers"]}


# ----------------------------------------------------------------------------------------------------------------
# 1. layer_budgets is the brute-force optimum


def random_scores(rng: random.Random, layers: list[int], n: int, kind: str) -> dict[int, torch.Tensor]:
    if kind == "ties":  # integer counts in a tiny range: ties within and across layers
        return {layer: torch.tensor([rng.randrange(3) for _ in range(n)]) for layer in layers}
    if kind == "counts":
        return {layer: torch.tensor([rng.randrange(1000) for _ in range(n)]) for layer in layers}
    return {layer: torch.tensor([rng.random() for _ in range(n)], dtype=torch.float64) for layer in layers}


@pytest.mark.parametrize("kind", ["ties", "counts", "probabilities"])
def test_layer_budgets_equal_brute_force_optimum(kind):
    """layer_budgets equals the brute force over all count vectors (most total score, ties to earlier layers) on random
    scores of several seeds, layer sets and floors; the counts sum to r * L and lie in [floor, n]."""
    for seed in range(12):
        rng = random.Random(seed)
        n = rng.choice([4, 6, 8])
        layers = sorted(rng.sample(range(12), rng.randint(1, 4)))  # non-contiguous ids, as with dense layers
        scores = random_scores(rng, layers, n, kind)
        for floor in range(3):
            for r in range(floor, n + 1):
                got = layer_budgets(scores, r, floor)
                assert got == brute_force_counts(scores, r, floor), (seed, floor, r)
                assert sum(got.values()) == r * len(layers)
                assert all(floor <= c <= n for c in got.values())


def test_layer_budgets_ties_go_to_the_earlier_layer():
    """Equal scores everywhere: the extra slots fill the earliest layers first (each up to n); tied slots go to the
    earlier layer even when the dict lists the layers in reverse order."""
    scores = {layer: torch.ones(4) for layer in (2, 5, 7)}
    assert layer_budgets(scores, 3, 1) == {2: 4, 5: 4, 7: 1}
    reverse = {7: torch.tensor([5, 1, 0, 0]), 3: torch.tensor([5, 1, 1, 0])}  # 3 tied candidates for 2 slots
    assert layer_budgets(reverse, 2, 1) == {3: 3, 7: 1} == brute_force_counts(reverse, 2, 1)


# ----------------------------------------------------------------------------------------------------------------
# 2. plan_groups with a budget: global F-prune / S-prune, hc-smoe counts


@functools.cache
def calibrated(family: str):
    """(config, statistics) of the tiny model of ``family`` on the calibration rows."""
    model = tiny_model(family)
    layers = ADAPTERS[family].moe_layers(model)
    stats = collect_statistics(model, layers, [torch.tensor(r) for r in calibration_rows()], progress=False)
    return model.config, stats


@pytest.mark.parametrize("family", SOFTMAX)
@pytest.mark.parametrize(
    "method,budget,field", [("f-prune", "frequency", "counts"), ("s-prune", "probability", "prob_sum")]
)
def test_global_pruning_keeps_the_global_top_set(family, method, budget, field):
    """f-prune --budget frequency (s-prune --budget probability) keeps exactly the oracle's global top experts by
    stats.counts (prob_sum) with each layer's top-k floor, for every average r from top-k to n - 1."""
    config, stats = calibrated(family)
    scores = {layer: getattr(s, field) for layer, s in stats.items()}
    for r in range(TOP_K, N):
        plan = plan_groups(stats, ADAPTERS[family], config, r, method=method, budget=budget)
        kept = global_kept(scores, r, TOP_K)
        assert plan == {layer: [[j] for j in ids] for layer, ids in kept.items()}, r
        assert_global_top(kept, scores, TOP_K)
        assert experts_per_layer(stats, ADAPTERS[family], config, r, budget) == {k: len(v) for k, v in kept.items()}


@pytest.mark.parametrize("family", SOFTMAX)
def test_uniform_budget_keeps_r_in_every_layer(family):
    """--budget uniform: r experts in every layer, and f-prune keeps each layer's own best r by count."""
    config, stats = calibrated(family)
    for r in range(TOP_K, N):
        assert experts_per_layer(stats, ADAPTERS[family], config, r, "uniform") == dict.fromkeys(stats, r)
        plan = plan_groups(stats, ADAPTERS[family], config, r, method="f-prune")
        assert plan == {layer: [[j] for j in best_subset(s.counts, r)] for layer, s in stats.items()}


def handmade_stats() -> dict[int, object]:
    """Four MoE layers (ids 1, 3, 4, 6) with tied counts: layer 3 dominant, layer 6 nearly unused."""
    counts = {
        1: [5, 5, 3, 3, 3, 0, 1, 2],
        3: [9, 9, 9, 9, 8, 8, 8, 7],
        4: [3, 5, 5, 1, 0, 0, 2, 2],
        6: [1, 0, 0, 0, 0, 0, 0, 1],
    }
    g = torch.Generator().manual_seed(11)
    return {
        layer: layer_stats(layer, torch.randn(N, 6, generator=g), torch.tensor(c), 40, prob_sum=torch.tensor(c) / 20.0)
        for layer, c in counts.items()
    }


@pytest.mark.parametrize("method", ["f-prune", "s-prune", "hc-smoe"])
def test_handmade_budgets_with_ties_and_a_full_layer(method):
    """Hand-made tied counts over four layers: pruning keeps the oracle's global top set, hc-smoe makes exactly the
    oracle's number of groups per layer (a partition of all experts), and a layer whose budget is all n experts gets
    n one-member groups."""
    stats = handmade_stats()
    config, family = tiny_config("mixtral"), ADAPTERS["mixtral"]
    field = "prob_sum" if method == "s-prune" else "counts"
    budget = "probability" if method == "s-prune" else "frequency"
    scores = {layer: getattr(s, field) for layer, s in stats.items()}
    saw_full = False
    for r in range(TOP_K, N):
        plan = plan_groups(stats, family, config, r, method=method, budget=budget)
        counts = brute_force_counts(scores, r, TOP_K)
        assert {layer: len(groups) for layer, groups in plan.items()} == counts, r
        for layer, groups in plan.items():
            if method == "hc-smoe":
                assert sorted(j for g in groups for j in g) == list(range(N))
            else:
                assert groups == [[j] for j in best_subset(scores[layer], counts[layer])]
            if counts[layer] == N:
                saw_full = True
                assert groups == [[j] for j in range(N)]
    assert saw_full, "the hand-made counts should give some layer all n experts"


def test_budget_refusals_in_the_api(tmp_path, capfd):
    """DeepSeek-V3 with n_group > 1 refuses non-uniform budgets; r below top-k refuses them; an unknown budget name is
    refused; all as MoemergeError, while uniform stays allowed. On the command line an unknown --budget is one error
    line (exit 2) naming it and the three documented budgets."""
    config, family = tiny_config("deepseek_v3"), ADAPTERS["deepseek_v3"]
    stats = {1: handmade_stats()[1], 2: handmade_stats()[3]}
    assert config.n_group > 1
    for budget in ("frequency", "probability"):
        with pytest.raises(MoemergeError, match="n_group"):
            plan_groups(stats, family, config, 4, method="f-prune", budget=budget)
        with pytest.raises(MoemergeError, match="top-k"):
            plan_groups(handmade_stats(), ADAPTERS["mixtral"], tiny_config("mixtral"), TOP_K - 1, budget=budget)
    with pytest.raises(MoemergeError, match="budget"):
        plan_groups(handmade_stats(), ADAPTERS["mixtral"], tiny_config("mixtral"), 4, budget="global")
    assert experts_per_layer(stats, family, config, 4, "uniform") == {1: 4, 2: 4}
    out = tmp_path / "out"
    code, _, err = run(["reduce", tmp_path, "--experts", "4", "--out", out, "--budget", "global"], capfd)
    line = assert_clean_error(code, err, out)
    assert "--budget" in line and "global" in line
    assert all(name in line for name in ("uniform", "frequency", "probability")), line


# ----------------------------------------------------------------------------------------------------------------
# 3. end to end: non-uniform outputs load with moemerge.load_model only


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("budgets")
    rows = "".join(json.dumps({"input_ids": row}) + "\n" for row in calibration_rows())
    (folder / "calib.jsonl").write_text(rows, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def source(workdir):
    """A factory of tiny checkpoints saved once per module; deepseek_v3_flat is DeepSeek-V3 with one routing group."""

    @functools.cache
    def make(name: str) -> Path:
        family = "deepseek_v3" if name == "deepseek_v3_flat" else name
        path = save_tiny(family, workdir / "src" / name, tokenizer=False)
        if name == "deepseek_v3_flat":
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            config |= {"n_group": 1, "topk_group": 1}
            (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
        return path

    return make


def reduce_cli(capfd, workdir: Path, src: Path, out: Path, *extra, r: int = R) -> tuple[int, str]:
    argv = ["reduce", src, "--out", out, "--experts", r, "--calib", workdir / "calib.jsonl", *CALIB, *extra]
    code, _, err = run(argv, capfd)
    return code, err


def vanilla(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@functools.cache
def oracle_kept(src: Path, r: int = R) -> dict[int, list[int]]:
    """Global F-prune's kept experts from counts recomputed with hooks on the source's own routers; the counts must
    differ by layer (else the end-to-end tests would not test per-layer loading)."""
    counts = routed_counts(vanilla(src))
    kept = global_kept(counts, r, TOP_K)
    assert len({len(k) for k in kept.values()}) > 1, f"choose another r or seed: uniform counts {kept}"
    return kept


# (family, average r): R everywhere, and r = 7 for qwen2_moe, where layer 0 keeps all n experts (checked)
E2E_CASES = [(family, R) for family in E2E] + [("qwen2_moe", 7)]


def check_full_layer(kept: dict[int, list[int]], r: int) -> None:
    """The r = 7 case must really give some layer all n experts (else the seed no longer tests that edge)."""
    if r == 7:
        assert N in {len(k) for k in kept.values()}, f"no layer keeps all {N} experts: {kept}"


@pytest.mark.parametrize("family,r", E2E_CASES)
def test_global_f_prune_output_loads_with_per_layer_counts(family, r, source, workdir, capfd):
    """reduce --method f-prune --budget frequency: moemerge.json keeps the oracle's global top set (hooked router
    counts), load_model builds each layer with len(groups) experts and its logits equal the source sliced to those
    experts in plain torch; plain from_pretrained refuses the output, and reducing it again exits 2 with one line."""
    src, out = source(family), workdir / "out" / f"{family}-f-prune-{r}"
    code, err = reduce_cli(capfd, workdir, src, out, "--method", "f-prune", "--budget", "frequency", r=r)
    assert code == 0, err
    kept = oracle_kept(src, r)
    check_full_layer(kept, r)
    groups = groups_of(out)
    assert groups == {layer: [[j] for j in ids] for layer, ids in kept.items()}
    assert json.loads((out / "moemerge.json").read_text())["parameters"]["budget"] == "frequency"

    model = moemerge.load_model(out)
    assert experts_in(model) == {layer: len(g) for layer, g in groups.items()}
    torch.testing.assert_close(logits_of(model), logits_of(slice_experts(vanilla(src), kept)), rtol=1e-5, atol=1e-5)

    with pytest.raises((RuntimeError, ValueError, OSError), match=r"(?i)mismatch"):
        AutoModelForCausalLM.from_pretrained(out)

    again = workdir / "out" / f"{family}-{r}-again"
    capfd.readouterr()  # transformers' load report of the refused load above
    code, _, err = run(["reduce", out, "--out", again, "--experts", 2, *CALIB], capfd)
    assert "--budget" in assert_clean_error(code, err, again)


def frequency_merge(source_tensor: torch.Tensor, groups: list[list[int]], frequency: list[float]) -> torch.Tensor:
    """[len(groups), ...] the frequency-weighted average of each group's source experts, in float64."""
    out = []
    for members in groups:
        f = torch.tensor([frequency[j] for j in members], dtype=torch.float64)
        w = f / f.sum() if f.sum() > 0 else torch.full_like(f, 1 / len(f))
        out.append(torch.einsum("m,m...->...", w, source_tensor.detach().double()[members]))
    return torch.stack(out)


@pytest.mark.parametrize("family,r", E2E_CASES)
def test_hc_smoe_budget_output_equals_in_memory_reduction(family, r, source, workdir, capfd):
    """reduce --method hc-smoe --budget frequency: each layer has the oracle's number of groups (a partition; a layer
    keeping all n has one-member groups), its merged experts are the frequency-weighted averages of the source's, and
    load_model's logits equal those of the source reduced in memory with plan_groups + apply_groups."""
    src, out = source(family), workdir / "out" / f"{family}-hc-smoe-{r}"
    code, err = reduce_cli(capfd, workdir, src, out, "--budget", "frequency", r=r)
    assert code == 0, err
    meta = json.loads((out / "moemerge.json").read_text())
    groups = groups_of(out)
    kept = oracle_kept(src, r)
    check_full_layer(kept, r)
    assert {layer: len(g) for layer, g in groups.items()} == {k: len(v) for k, v in kept.items()}
    assert all(sorted(j for g in gs for j in g) == list(range(N)) for gs in groups.values())
    assert all(gs == [[j] for j in range(N)] for gs in groups.values() if len(gs) == N)

    model = moemerge.load_model(out)
    assert experts_in(model) == {layer: len(g) for layer, g in groups.items()}
    original = moe_blocks(vanilla(src))
    for entry in meta["layers"]:
        block = moe_blocks(model)[entry["layer"]]
        for name in ("gate_up_proj", "down_proj"):
            expected = frequency_merge(
                getattr(original[entry["layer"]].experts, name), entry["groups"], entry["frequency"]
            )
            torch.testing.assert_close(getattr(block.experts, name).detach().double(), expected, rtol=1e-5, atol=1e-6)

    reference, family_ = vanilla(src), ADAPTERS["deepseek_v3" if family == "deepseek_v3_flat" else family]
    seqs = [torch.tensor(r) for r in calibration_rows()]
    stats = collect_statistics(reference, family_.moe_layers(reference), seqs, {"router_inputs"}, progress=False)
    plan = plan_groups(stats, family_, reference.config, r, method="hc-smoe", budget="frequency")
    assert plan == groups
    apply_groups(reference, family_, stats, plan, "frequency", "lse")
    torch.testing.assert_close(logits_of(model), logits_of(reference), rtol=1e-5, atol=1e-5)


def test_summary_line_names_the_per_layer_counts(source, workdir, capfd):
    """Without --quiet, the summary's first line gives the oracle's per-layer counts and the average r."""
    src, out = source("olmoe"), workdir / "out" / "olmoe-summary"
    argv = ["reduce", src, "--out", out, "--experts", R, "--calib", workdir / "calib.jsonl", "--method", "f-prune"]
    code, stdout, err = run(
        [*argv, "--calib-samples", SAMPLES, "--calib-seq-len", SEQ_LEN, "--budget", "frequency"], capfd
    )
    assert code == 0, err
    counts = "/".join(str(len(k)) for _, k in sorted(oracle_kept(src).items()))
    assert stdout.splitlines()[0] == f"wrote {out}: {N} -> {counts} (average {R}) experts in 2 MoE layers"


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3_flat"])
def test_grouped_routing_with_budget_routes_through_the_original_router(family, source, workdir, capfd):
    """--router grouped --budget frequency: load_model runs, each layer holding the oracle's count of merged experts,
    and its logits equal the source model (original routers) with every expert replaced by the frequency-weighted
    average of its group (computed here from moemerge.json's groups and frequencies)."""
    src, out = source(family), workdir / "out" / f"{family}-grouped"
    code, err = reduce_cli(capfd, workdir, src, out, "--router", "grouped", "--budget", "frequency")
    assert code == 0, err
    groups = groups_of(out)
    assert {layer: len(g) for layer, g in groups.items()} == {k: len(v) for k, v in oracle_kept(src).items()}
    model = moemerge.load_model(out)
    assert experts_in(model) == {layer: len(g) for layer, g in groups.items()}

    meta = json.loads((out / "moemerge.json").read_text())
    oracle = vanilla(src)
    with torch.no_grad():
        for entry in meta["layers"]:
            block, groups_ = moe_blocks(oracle)[entry["layer"]], entry["groups"]
            group_of = torch.tensor([next(g for g, m in enumerate(groups_) if j in m) for j in range(N)])
            for name in ("gate_up_proj", "down_proj"):
                merged = frequency_merge(getattr(block.experts, name), groups_, entry["frequency"])
                getattr(block.experts, name).copy_(merged[group_of])
    got = logits_of(model)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, logits_of(oracle), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# 4. refused command lines


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--experts", "4", "--budget", "global"], "--budget"),
        (["--experts", "1", "--budget", "frequency"], "top-k"),
        (["--experts", "1", "--budget", "probability"], "top-k"),
        (["--experts", "4", "--method", "mc-smoe", "--param-budget", "0.5", "--rank", "2"], "--param-budget"),
        (["--experts", "4", "--method", "mc-smoe", "--param-budget", "0.01", "--sparsity", "0.9"], "--param-budget"),
        (["--experts", "4", "--method", "mc-smoe", "--param-budget", "0"], "--param-budget"),
        (["--experts", "4", "--method", "mc-smoe", "--param-budget", "1.5"], "--param-budget"),
    ],
    ids=["unknown", "freq-below-top-k", "prob-below-top-k", "with-rank", "too-small", "zero", "above-one"],
)
def test_bad_budget_options_are_one_error_line(extra, needle, source, workdir, tmp_path, capfd):
    """Each bad --budget / --param-budget combination exits 2 with exactly one `error:` line naming the option and
    leaves no output directory (nor a partial one)."""
    src, out = source("mixtral"), tmp_path / "out"
    capfd.readouterr()  # saving the source may print progress bars
    code, _, err = run(["reduce", src, "--out", out, "--calib", workdir / "calib.jsonl", *CALIB, *extra], capfd)
    assert needle in assert_clean_error(code, err, out)


def test_too_small_param_budget_is_refused_before_the_calibration_pass(source, workdir, tmp_path, capfd, monkeypatch):
    """--param-budget 0.01 at --sparsity 0.9 is refused (exit 2, one line) without running the calibration pass, and
    the API refuses --param-budget together with --rank."""
    calls = []
    monkeypatch.setattr(pipeline, "collect_statistics", lambda *args, **kwargs: calls.append(args))
    src, out = source("mixtral"), tmp_path / "out"
    capfd.readouterr()  # saving the source may print progress bars
    extra = ["--experts", 4, "--method", "mc-smoe", "--param-budget", "0.01", "--sparsity", "0.9"]
    code, _, err = run(["reduce", src, "--out", out, "--calib", workdir / "calib.jsonl", *CALIB, *extra], capfd)
    assert "too small" in assert_clean_error(code, err, out)
    assert calls == []
    with pytest.raises(MoemergeError, match="--param-budget"):
        moemerge.reduce(src, out, experts=4, method="mc-smoe", param_budget=0.5, rank=2, progress=False)


def test_deepseek_grouped_routing_refuses_non_uniform_budget(workdir, tmp_path, capfd):
    """DeepSeek-V3 with n_group = 2: --budget frequency exits 2 with one error line naming n_group, no output."""
    src = save_tiny("deepseek_v3", tmp_path / "deepseek", tokenizer=False)
    out = tmp_path / "out"
    capfd.readouterr()  # saving the source may print progress bars
    code, _, err = run(["reduce", src, "--out", out, "--experts", 4, "--budget", "frequency", *CALIB], capfd)
    assert "n_group" in assert_clean_error(code, err, out)


# ----------------------------------------------------------------------------------------------------------------
# 5. --param-budget: the largest rank that fits


def brute_force_rank(a: int, b: int, sparsity: str, budget: str) -> int:
    """Largest k in 1..min(a, b) with k (a + b) + floor((1 - sparsity) a b) <= budget a b, exactly (decimal
    Fractions); 0 if none."""
    values = math.floor((1 - Fraction(sparsity)) * a * b)
    fits = [k for k in range(1, min(a, b) + 1) if k * (a + b) + values <= Fraction(budget) * a * b]
    return max(fits, default=0)


def test_rank_for_budget_equals_brute_force():
    """rank_for_budget equals the exact brute-force search on several shapes, sparsities and budgets (budgets above 1
    reach the min(a, b) cap), including budgets met with equality."""
    shapes = [(16, 32), (32, 16), (7, 13), (4, 4), (48, 32), (1, 9)]
    sparsities = ["0", "0.5", "0.75", "0.9", "0.95", "1"]
    budgets = [f"{i / 20:g}" for i in range(1, 21)] + ["0.53125", "2", "5"]
    capped = 0
    for (a, b), sparsity, budget in itertools.product(shapes, sparsities, budgets):
        expected = brute_force_rank(a, b, sparsity, budget)
        assert rank_for_budget((a, b), float(sparsity), float(budget)) == expected, (a, b, sparsity, budget)
        capped += expected == min(a, b)
    assert brute_force_rank(16, 32, "0.75", "0.53125") == 3  # 3 * 48 + 128 == 0.53125 * 512: equality fits
    assert capped > 0


@pytest.mark.parametrize("sparsity,budget", [("0.9", "0.5"), ("0.75", "0.53125"), ("0.95", "0.2")])
def test_mc_smoe_param_budget_stores_each_matrix_within_budget(sparsity, budget, source, workdir, capfd):
    """mc-smoe --param-budget F: the recorded rank is the brute-force one; every stored matrix's left + right + values
    count is <= F * a * b while one more rank would exceed it; stored_parameters equals the model's parameters minus
    what the factors save."""
    src, out = source("mixtral"), workdir / "out" / f"mc-smoe-{sparsity}-{budget}"
    code, err = reduce_cli(
        capfd, workdir, src, out, "--method", "mc-smoe", "--sparsity", sparsity, "--param-budget", budget
    )
    assert code == 0, err
    meta = json.loads((out / "moemerge.json").read_text())
    compression = meta["compression"]
    factors = load_file(out / compression["file"])
    model = vanilla(out)
    expected_rank = brute_force_rank(16, 32, sparsity, budget)
    assert expected_rank >= 1
    assert compression["rank"] == meta["parameters"]["rank"] == expected_rank
    assert compression["param_budget"] == float(budget) == meta["parameters"]["param_budget"]
    saved, matrices = 0, 0
    for layer, block in moe_blocks(model).items():
        gate, up = block.experts.gate_up_proj.detach().chunk(2, dim=1)
        for e in range(block.experts.down_proj.shape[0]):
            for name, dense in (("gate", gate[e]), ("up", up[e]), ("down", block.experts.down_proj.detach()[e])):
                key = f"layers.{layer}.experts.{e}.{name}"
                left, right, values = factors[f"{key}.left"], factors[f"{key}.right"], factors[f"{key}.values"]
                a, b = dense.shape
                assert left.shape == (a, expected_rank) and right.shape == (expected_rank, b)
                assert len(values) == len(factors[f"{key}.indices"]) == math.floor((1 - Fraction(sparsity)) * a * b)
                stored = left.numel() + right.numel() + values.numel()
                assert stored <= Fraction(budget) * a * b
                assert stored + a + b > Fraction(budget) * a * b
                saved += dense.numel() - stored
                matrices += 1
    assert matrices == 2 * R * 3
    assert compression["stored_parameters"] == sum(p.numel() for p in model.parameters()) - saved
