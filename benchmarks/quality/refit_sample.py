"""Does ``--refit down`` still help when an expert sees fewer sampled tokens than it has neurons?

Usage: ``python benchmarks/quality/refit_sample.py [--model NAME] [--out DIR]`` (default ``olmoe-scratch``,
``benchmarks/results/quality``; writes ``refit_sample.md``). HC-SMoE to half the experts with frequency router
rows (so only the refit reads the sampled router inputs), 32 x 256 general calibration tokens, the router inputs
cut to 100 / 300 / 1,000 / 8,192 tokens (about 25 to 2,048 per reduced expert), perplexity on the first 768
test tokens of each domain, without and with the refit. Large models sit at the small end: 8,192 sampled
tokens give a Mixtral expert about 4,096 tokens for 14,336 neurons.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig

from moemerge import apply_groups, plan_groups
from moemerge.calibration import load_calibration
from moemerge.checkpoint import inspect_source, load_source
from moemerge.evaluation.perplexity import perplexity
from moemerge.statistics import collect_statistics

SAMPLES = (100, 300, 1000, 8192)

_spec = importlib.util.spec_from_file_location("quality_run", Path(__file__).with_name("run.py"))
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="olmoe-scratch")
    parser.add_argument("--out", type=Path, default=quality.REPO / "benchmarks" / "results" / "quality")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = inspect_source(quality.MODELS / args.model)
    model, tokenizer = load_source(source, dtype="float32")
    config, family = AutoConfig.from_pretrained(source.path), source.family
    vocab = model.get_input_embeddings().num_embeddings
    calibration = load_calibration(str(quality.DATA / "calib_general.jsonl.gz"), tokenizer, 32, 256, 0, vocab)
    layers = family.moe_layers(model)
    stats = collect_statistics(model, layers, calibration.sequences, {"router_inputs"}, progress=False)
    chunks = [w for c in quality.test_windows(tokenizer, vocab, 768).values() for w in c]
    n, k = family.num_experts(config), config.num_experts_per_tok
    r = n // 2
    groups = plan_groups(stats, family, config, r)
    width = layers[0].block.experts.down_proj.shape[2]
    lines = [
        f"# `--refit down` against the sampled tokens per expert ({args.model}, {n} -> {r} experts, I = {width})",
        "",
        f"`python benchmarks/quality/refit_sample.py --model {args.model}`. Original model: "
        f"{perplexity(model, chunks)['perplexity']:.1f}.",
        "",
        "| sampled tokens | per reduced expert | no refit | refit |",
        "|---|---|---|---|",
    ]
    for tokens in SAMPLES:
        cut = {layer: dataclasses.replace(s, router_inputs=s.router_inputs[:tokens]) for layer, s in stats.items()}
        row = []
        for fit in ("none", "down"):
            reduced = copy.deepcopy(model)
            apply_groups(reduced, family, cut, groups, router_rows_rule="frequency", refit=fit)
            row.append(perplexity(reduced, chunks)["perplexity"])
        lines.append(f"| {tokens:,} | {tokens * k // r:,} | {row[0]:.1f} | {row[1]:.1f} |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "refit_sample.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
