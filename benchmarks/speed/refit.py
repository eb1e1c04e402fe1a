"""What ``--refit down`` costs per layer on real layer shapes (not a test).

Usage: ``python benchmarks/speed/refit.py [--out DIR]`` (default ``benchmarks/results/speed``; writes
``refit.md`` and ``refit.json``). One float32 decoder layer of each shape of ``run.py`` (random weights), its
experts merged in consecutive pairs (n -> n/2, r-row router from the frequency rule), refit on
``ROUTER_SAMPLE_TOKENS`` random hidden states: the wall seconds of the refit, beside the seconds of the same
layer's statistics on those tokens (every expert on every token) for scale.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

from moemerge.merging import merge_experts
from moemerge.merging.refit import refit_down
from moemerge.statistics import LayerAccumulator
from moemerge.statistics.expert_stats import ROUTER_SAMPLE_TOKENS

_spec = importlib.util.spec_from_file_location("speed_run", Path(__file__).with_name("run.py"))
speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(speed)


@torch.no_grad()
def refit_cost(shape: str) -> dict:
    view = speed.one_layer(shape, torch.float32)
    n, two_i, hidden = view.block.experts.gate_up_proj.shape
    x = torch.randn(ROUTER_SAMPLE_TOKENS, hidden, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    LayerAccumulator(view, len(x)).sequence_parts(x)
    statistics = time.perf_counter() - start
    groups = [[2 * g, 2 * g + 1] for g in range(n // 2)]
    original, router = view.expert_weights(), (view.router_weight.detach().clone(), view.selection_bias)
    halves = [torch.full((2,), 0.5, dtype=torch.float64) for _ in groups]
    view.set_experts(*merge_experts(original, groups, halves))
    view.set_router(torch.stack([router[0][g].mean(dim=0) for g in groups]))
    start = time.perf_counter()
    refit_down(view, original, router, groups, False, x)
    return {
        "shape": shape,
        "experts": f"{n} -> {n // 2}",
        "intermediate": two_i // 2,
        "hidden": hidden,
        "tokens": len(x),
        "refit_seconds": time.perf_counter() - start,
        "statistics_seconds": statistics,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=speed.REPO / "benchmarks" / "results" / "speed")
    args = parser.parse_args()
    machine = speed.machine()
    rows = [refit_cost(shape) for shape in ("qwen1.5-moe-a2.7b", "mixtral-8x7b")]
    lines = [
        "# Cost of `--refit down` per layer",
        "",
        f"`python benchmarks/speed/refit.py` on {machine}; float32 weights, {ROUTER_SAMPLE_TOKENS} sampled tokens.",
        "",
        "| layer shape | experts | I | H | refit seconds | statistics seconds on the same tokens |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['shape']} | {r['experts']} | {r['intermediate']} | {r['hidden']} | {r['refit_seconds']:.1f} "
        f"| {r['statistics_seconds']:.1f} |"
        for r in rows
    ]
    speed.write_results(args.out, "refit", {"machine": machine, "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
