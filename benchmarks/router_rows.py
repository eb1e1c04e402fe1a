"""Which router rows should ``--router reduce`` write? Measure the options against ``grouped``.

Usage: python benchmarks/router_rows.py MODEL HELDOUT.txt [--experts R ...] [--out results.md]

One calibration pass (bundled corpus, 32 x 2048 tokens, the CLI default); for each r, HC-SMoE groups (average
linkage, frequency merge) and then each router-rows rule. Reported on held-out text: perplexity,
and the mean KL divergence of each model's next-token distribution from the ``grouped`` model
(the paper's semantics, which the standard router approximates) and from the original model.
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch
from report import emit_table  # benchmarks/ is on sys.path when a script here runs
from transformers import AutoModelForCausalLM, AutoTokenizer

import moemerge
from moemerge.adapters import FAMILIES
from moemerge.calibration import load_calibration
from moemerge.registry import names
from moemerge.routing.grouped import install_grouped_routers
from moemerge.statistics import collect_statistics

WINDOW = 256


@torch.inference_mode()
def log_probs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Next-token log-probabilities [W, V] for each non-overlapping window of held-out tokens."""
    out = []
    for start in range(0, len(ids) - 1, WINDOW):
        chunk = ids[start : start + WINDOW + 1]
        out.append(torch.log_softmax(model(input_ids=chunk[None, :-1]).logits[0].float(), -1))
    return out


def perplexity(lp: list[torch.Tensor], ids: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for i, chunk_lp in enumerate(lp):
        target = ids[i * WINDOW + 1 : i * WINDOW + 1 + len(chunk_lp)]
        nll -= chunk_lp.gather(1, target[:, None]).sum().item()
        count += len(target)
    return math.exp(nll / count)


def kl(p_lp: list[torch.Tensor], q_lp: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(p || q)."""
    total = sum((p.exp() * (p - q)).sum().item() for p, q in zip(p_lp, q_lp, strict=True))
    return total / sum(len(p) for p in p_lp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("heldout")
    ap.add_argument("--experts", type=int, nargs="+", default=[6, 4, 2])
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    family = FAMILIES[model.config.model_type]
    ids = torch.tensor(tokenizer(Path(args.heldout).read_text(encoding="utf-8"))["input_ids"])
    calib = load_calibration(None, tokenizer, samples=32, seq_len=2048, seed=0)
    stats = collect_statistics(model, family.moe_layers(model), calib.sequences, {"router_inputs"})
    original = log_probs(model, ids)
    rows = [f"| original | {family.num_experts(model.config)} | {perplexity(original, ids):.3f} | - | 0 |"]
    for r in args.experts:
        groups = moemerge.plan_groups(stats, family, model.config, r)
        results = {}
        for rule in names("router-rows"):
            reduced = copy.deepcopy(model)
            originals = moemerge.apply_groups(reduced, family, stats, groups, router_rows_rule=rule)
            results[rule] = log_probs(reduced, ids)
        install_grouped_routers(family.moe_layers(reduced), originals, groups, family.routing_rule(model.config).top_k)
        grouped = log_probs(reduced, ids)
        rows.append(f"| grouped | {r} | {perplexity(grouped, ids):.3f} | 0 | {kl(original, grouped):.4f} |")
        for rule, lp in results.items():
            rows.append(
                f"| reduce, {rule} rows | {r} | {perplexity(lp, ids):.3f} | {kl(grouped, lp):.4f} | {kl(original, lp):.4f} |"
            )
    emit_table(
        f"Model {args.model}, held-out {args.heldout} ({len(ids)} tokens)",
        ["routing", "experts", "perplexity", "KL(grouped ‖ this)", "KL(original ‖ this)"],
        rows,
        args.out,
    )


if __name__ == "__main__":
    main()
