"""``--budget search`` (moemerge.budget_search) against brute force and errors recomputed from the blocks' forward.

Oracles: every allocation of the expert slots enumerated; each layer's error at each count recomputed from a copy
of the whole model reduced uniformly to that count (apply_groups) and the MoE blocks' own forward on block inputs
captured with hooks written here.
"""

from __future__ import annotations

import copy
import itertools
import json
import random

import pytest
import torch
from conftest import VOCAB, run_cli, save_tiny, tiny_model

from moemerge import MoemergeError, apply_groups, plan_groups
from moemerge.adapters import FAMILIES as ADAPTERS
from moemerge.budget_search import layer_errors, searched_budgets
from moemerge.checkpoint import inspect_source, load_source
from moemerge.compare import parse_variant
from moemerge.options import ReduceOptions
from moemerge.routing.grouped import install_grouped_routers
from moemerge.statistics import collect_statistics

SAMPLES, SEQ_LEN, R = 2, 32, 4
SOFTMAX = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]  # DeepSeek's tiny config has n_group = 2: refused


def best_allocation(errors: dict[int, list[float]], r: int, floor: int) -> float:
    """The least total error over every allocation with floor <= c_l <= n and sum c_l = r x layers."""
    layers = sorted(errors)
    ranges = [range(floor, floor + len(errors[layer])) for layer in layers]
    totals = [
        sum(errors[layer][c - floor] for layer, c in zip(layers, counts, strict=True))
        for counts in itertools.product(*ranges)
        if sum(counts) == r * len(layers)
    ]
    return min(totals)


def test_searched_budgets_reach_the_brute_force_optimum():
    rng = random.Random(0)
    for _ in range(300):
        layers = rng.sample(range(10), rng.randrange(1, 5))
        floor, n = rng.randrange(1, 3), rng.randrange(3, 7)
        r = rng.randrange(floor, n + 1)
        errors = {layer: [rng.choice([0.0, rng.random(), 1.0]) for _ in range(n - floor + 1)] for layer in layers}
        kept = searched_budgets({k: torch.tensor(v) for k, v in errors.items()}, r, floor)
        assert sorted(kept) == sorted(layers) and sum(kept.values()) == r * len(layers)
        assert all(floor <= c <= n for c in kept.values())
        total = sum(errors[layer][c - floor] for layer, c in kept.items())
        assert total == pytest.approx(best_allocation(errors, r, floor), abs=1e-12)


def rows() -> list[list[int]]:
    g = torch.Generator().manual_seed(8)
    return [torch.randint(0, VOCAB, (SEQ_LEN,), generator=g).tolist() for _ in range(SAMPLES)]


def statistics(model, family: str, options: ReduceOptions) -> dict:
    """Every MoE layer's statistics on :func:`rows`, those ``options`` need included."""
    views = ADAPTERS[family].moe_layers(model)
    return collect_statistics(model, views, [torch.tensor(r) for r in rows()], options.statistics(), progress=False)


def oracle_errors(model, family: str, stats, router: str = "reduce") -> dict[int, list[float]]:
    """Per MoE layer, [e(c) for c = top-k .. n]: mean over the captured block inputs of the squared L2 distance
    between the block of a uniformly reduced copy (its router mode installed) and the original block."""
    adapter = ADAPTERS[family]
    inputs: dict[int, list[torch.Tensor]] = {}
    blocks = {v.layer: v.block for v in adapter.moe_layers(model)}
    hooks = [
        b.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(a[0][0]))
        for i, b in blocks.items()
    ]
    with torch.no_grad():
        for row in rows():
            model(input_ids=torch.tensor([row]), use_cache=False)
    for hook in hooks:
        hook.remove()
    x = {i: torch.cat(parts)[None] for i, parts in inputs.items()}
    top_k, n = model.config.num_experts_per_tok, len(stats[next(iter(stats))].counts)
    errors = {i: [] for i in blocks}
    for count in range(top_k, n + 1):
        reduced = copy.deepcopy(model)
        if count < n:
            groups = plan_groups(stats, adapter, model.config, count, router=router)
            routers = apply_groups(reduced, adapter, stats, groups, "frequency", "lse", router=router)
            if router == "grouped":
                install_grouped_routers(adapter.moe_layers(reduced), routers, groups, top_k)
        with torch.no_grad():
            for view in adapter.moe_layers(reduced):
                diff = view.block(x[view.layer]).double() - blocks[view.layer](x[view.layer]).double()
                errors[view.layer].append(float(diff.square().sum(-1).mean()))
    return errors


@pytest.mark.parametrize("family", SOFTMAX)
def test_reduce_budget_search_picks_the_least_total_error_allocation(family, tmp_path, capfd):
    """layer_errors equals the recomputed errors; ``reduce --budget search``'s per-layer counts in moemerge.json have
    the least summed recomputed error of all allocations of R x layers experts, and are not all equal."""
    src = save_tiny(family, tmp_path / "src")
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in rows()), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["reduce", src, "--experts", R, "--budget", "search", "--out", out, "--calib", calib, "--no-report"]
    code, _, err = run_cli([*argv, "--calib-samples", SAMPLES, "--calib-seq-len", SEQ_LEN, "--quiet"], capfd)
    assert code == 0, err
    meta = json.loads((out / "moemerge.json").read_text())
    assert meta["parameters"]["budget"] == "search" and meta["parameters"]["sequential"] is False
    kept = {e["layer"]: len(e["groups"]) for e in meta["layers"]}
    model, _ = load_source(inspect_source(src), dtype="float32")
    adapter = ADAPTERS[family]
    options = ReduceOptions(budget="search")
    stats = statistics(model, family, options)
    errors = oracle_errors(model, family, stats)
    for view in adapter.moe_layers(model):
        got = layer_errors(view, stats[view.layer], adapter, model.config, options)
        torch.testing.assert_close(got, torch.tensor(errors[view.layer], dtype=torch.float64), rtol=1e-5, atol=1e-9)
    top_k = model.config.num_experts_per_tok
    assert sum(kept.values()) == R * len(kept)
    total = sum(errors[layer][c - top_k] for layer, c in kept.items())
    assert total <= best_allocation(errors, R, top_k) * (1 + 1e-6) + 1e-12, (kept, errors)
    assert len(set(kept.values())) > 1 or all(len(set(e)) == 1 for e in errors.values())


def test_layer_errors_with_grouped_routing_equal_the_recomputation():
    """--router grouped: each count's error is that of the block routed by the original router mapped to groups."""
    model = tiny_model("olmoe")
    adapter = ADAPTERS["olmoe"]
    options = ReduceOptions(budget="search", router="grouped")
    stats = statistics(model, "olmoe", options)
    errors = oracle_errors(model, "olmoe", stats, "grouped")
    assert errors != oracle_errors(model, "olmoe", stats)
    for view in adapter.moe_layers(model):
        got = layer_errors(view, stats[view.layer], adapter, model.config, options)
        torch.testing.assert_close(got, torch.tensor(errors[view.layer], dtype=torch.float64), rtol=1e-5, atol=1e-9)


def test_layer_errors_leave_the_block_unchanged_and_vanish_at_n():
    model = tiny_model("mixtral")
    adapter = ADAPTERS["mixtral"]
    options = ReduceOptions(budget="search")
    stats = statistics(model, "mixtral", options)
    view = adapter.moe_layers(model)[0]
    before = {k: v.clone() for k, v in view.block.state_dict().items()}
    errors = layer_errors(view, stats[view.layer], adapter, model.config, options)
    assert len(errors) == 8 - 2 + 1 and errors[-1] == 0 and (errors[:-1] > 0).all()
    assert all(torch.equal(before[k], v) for k, v in view.block.state_dict().items())


def test_search_is_refused_outside_reduce(tmp_path, capfd):
    """plan and compare refuse --budget search with one error line naming reduce; nothing is written."""
    src = save_tiny("mixtral", tmp_path / "src")
    recipe = tmp_path / "recipe.json"
    code, _, err = run_cli(["plan", src, "--experts", R, "--budget", "search", "--out", recipe], capfd)
    assert code == 2 and err.startswith("error: ") and "moemerge reduce" in err and len(err.splitlines()) == 1, err
    assert not recipe.exists()
    with pytest.raises(MoemergeError, match="moemerge reduce"):
        parse_variant("hc-smoe:budget=search")
