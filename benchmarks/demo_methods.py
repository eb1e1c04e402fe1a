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
from moemerge.methods import COMPRESSING_METHODS, MethodOptions
from moemerge.pipeline import compress_experts
from moemerge.statistics import collect_statistics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
from compare import perplexity

VARIANTS = [  # (method, options, merge, align)
    ("hc-smoe", MethodOptions(), "frequency"),
    ("hc-smoe", MethodOptions(), "frequency", True),
    ("hc-smoe", MethodOptions(linkage="single"), "frequency"),
    ("hc-smoe", MethodOptions(linkage="complete"), "frequency"),
    ("hc-smoe", MethodOptions(linkage="ward"), "frequency"),
    ("hc-smoe", MethodOptions(), "average"),
    ("hc-smoe", MethodOptions(metric="router-logits"), "frequency"),
    ("hc-smoe", MethodOptions(metric="weight"), "frequency"),
    ("hc-smoe", MethodOptions(cluster="kmeans"), "frequency"),
    ("m-smoe", MethodOptions(), "frequency"),
    ("m-smoe", MethodOptions(), "frequency", True),
    ("mc-smoe", MethodOptions(), "frequency"),
    ("f-prune", MethodOptions(), "frequency"),
    ("s-prune", MethodOptions(), "frequency"),
    ("reap", MethodOptions(), "frequency"),
    ("o-prune", MethodOptions(), "frequency"),
]


def describe(method: str, options: MethodOptions, merge: str, align: bool) -> str:
    default = MethodOptions()
    changed = [f"{k}={v}" for k, v in vars(options).items() if v != vars(default)[k]]
    extra = [f"merge={merge}"] if merge != "frequency" else []
    return ", ".join([method, *changed, *extra, *(["align"] if align else [])])


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
        router_sample=8192,
        output_sample=512,
        keep_router_logits=True,
        weight_gram=True,
    )
    rows = [f"| original | {family.num_experts(model.config)} | {perplexity(model, ids):.2f} | - |"]
    for r in args.experts:
        for method, options, merge, *align in VARIANTS:
            align = bool(align)
            reduced = copy.deepcopy(model)
            start = time.perf_counter()
            groups = moemerge.plan_groups(stats, family, model.config, r, method, options=options)
            moemerge.apply_groups(reduced, family, stats, groups, merge=merge, router_rows_rule="lse", align=align)
            if method in COMPRESSING_METHODS:
                intermediate = family.moe_layers(reduced)[0].block.experts.down_proj.shape[2]
                compress_experts(family.moe_layers(reduced), rank=intermediate // 4, sparsity=0.9)
            seconds = time.perf_counter() - start
            rows.append(
                f"| {describe(method, options, merge, align)} | {r} | {perplexity(reduced, ids):.2f} | {seconds:.2f} |"
            )
    emit_table(
        f"Model {args.model}, held-out {args.heldout} ({len(ids)} tokens), router rows lse",
        ["method", "experts", "held-out perplexity", "plan + merge (s)"],
        rows,
        args.out,
    )


if __name__ == "__main__":
    main()
