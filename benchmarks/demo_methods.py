"""Held-out perplexity of every method and hc-smoe variant on one model, from one calibration pass.

Usage: python benchmarks/demo_methods.py MODEL HELDOUT.txt [--experts R ...] [--out results.md]

Calibration: the bundled corpus, 32 x 2048 tokens; router rows: lse (the default); mc-smoe with
the CLI's default rank (I/4) and sparsity (0.9). A quick
comparison for the demo model, not the quality benchmark (that one covers several trained
models, domains and fidelity metrics).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from report import emit_table  # benchmarks/ is on sys.path when a script here runs
from transformers import AutoModelForCausalLM, AutoTokenizer

import moemerge
from moemerge.adapters import FAMILIES
from moemerge.calibration import load_calibration
from moemerge.options import ReduceOptions
from moemerge.pipeline import compress_experts
from moemerge.registry import resolve
from moemerge.statistics import collect_statistics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
from compare import perplexity

DEFAULTS = ReduceOptions()
VARIANTS = [  # keyword arguments of run_variant: method, options, merge, align, budget
    {"method": "hc-smoe"},
    {"method": "hc-smoe", "align": True},
    {"method": "hc-smoe", "options": ReduceOptions(linkage="single")},
    {"method": "hc-smoe", "options": ReduceOptions(linkage="complete")},
    {"method": "hc-smoe", "options": ReduceOptions(linkage="ward")},
    {"method": "hc-smoe", "options": ReduceOptions(distance="cosine")},
    {"method": "hc-smoe", "merge": "average"},
    {"method": "hc-smoe", "merge": "fix-dom"},
    {"method": "hc-smoe", "merge": "zipit"},
    {"method": "hc-smoe", "options": ReduceOptions(metric="router-logits")},
    {"method": "hc-smoe", "options": ReduceOptions(metric="weight")},
    {"method": "hc-smoe", "options": ReduceOptions(cluster="kmeans")},
    {"method": "hc-smoe", "options": ReduceOptions(cluster="kmeans", kmeans_init="k-means++")},
    {"method": "hc-smoe", "options": ReduceOptions(cluster="single-shot")},
    {"method": "hc-smoe", "options": ReduceOptions(cluster="fcm")},
    {"method": "hc-smoe", "budget": "frequency"},
    {"method": "m-smoe"},
    {"method": "m-smoe", "align": True},
    {"method": "mc-smoe"},
    {"method": "f-prune"},
    {"method": "f-prune", "budget": "frequency"},
    {"method": "s-prune"},
    {"method": "s-prune", "budget": "probability"},
    {"method": "reap"},
    {"method": "o-prune"},
]


def describe(method: str, options=DEFAULTS, merge="frequency", align=False, budget="uniform") -> str:
    changed = [f"{k}={v}" for k, v in options.as_dict().items() if v != DEFAULTS.as_dict()[k] and k != "method"]
    extra = [f"merge={merge}"] if merge != "frequency" else []
    extra += [f"budget={budget}"] if budget != "uniform" else []
    return ", ".join([method, *changed, *extra, *(["align"] if align else [])])


def run_variant(model, family, stats, r, method, options=DEFAULTS, merge="frequency", align=False, budget="uniform"):
    """A reduced copy of ``model`` and its per-layer expert counts."""
    reduced = copy.deepcopy(model)
    groups = moemerge.plan_groups(stats, family, model.config, r, options.replace(method=method, budget=budget))
    moemerge.apply_groups(reduced, family, stats, groups, merge=merge, router_rows_rule="lse", align=align)
    if resolve("method", method).compresses:
        intermediate = family.moe_layers(reduced)[0].block.experts.down_proj.shape[2]
        compress_experts(family.moe_layers(reduced), rank=intermediate // 4, sparsity=0.9)
    return reduced, [len(g) for g in groups.values()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("heldout")
    ap.add_argument("--experts", type=int, nargs="+", default=[6, 4])
    ap.add_argument("--out")
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    family = FAMILIES[model.config.model_type]
    ids = torch.tensor(tokenizer(Path(args.heldout).read_text(encoding="utf-8"))["input_ids"])
    calib = load_calibration(None, tokenizer, samples=32, seq_len=2048, seed=0)
    stats = collect_statistics(
        model,
        family.moe_layers(model),
        calib.sequences,
        {"router_inputs", "expert_outputs", "router_logits", "router_logit_features", "weight_gram"},
    )
    rows = [f"| original | {family.num_experts(model.config)} | {perplexity(model, ids):.2f} | - |"]
    for r in args.experts:
        for variant in VARIANTS:
            start = time.perf_counter()
            reduced, counts = run_variant(model, family, stats, r, **variant)
            seconds = time.perf_counter() - start
            kept = str(r) if len(set(counts)) == 1 else f"{r} ({'/'.join(map(str, counts))})"
            rows.append(f"| {describe(**variant)} | {kept} | {perplexity(reduced, ids):.2f} | {seconds:.2f} |")
    emit_table(
        f"Model {args.model}, held-out {args.heldout} ({len(ids)} tokens), router rows lse",
        ["method", "experts", "held-out perplexity", "plan + merge (s)"],
        rows,
        args.out,
    )


if __name__ == "__main__":
    main()
