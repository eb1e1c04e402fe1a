"""The quality benchmark: every method on the three benchmark models, per-domain test perplexity and fidelity.

Usage: ``python benchmarks/quality/run.py [--models NAME ...] [--out DIR] [--smoke]``
(default: all models in ``benchmarks/models/``, output ``benchmarks/results/quality/``).

For each model (``benchmarks/models/*``, made by ``scripts/train_benchmark_models.py``) and each calibration set
of ``benchmarks/data/`` (general, prose, code; ``scripts/benchmark_text.py``), one calibration pass of
``CALIB_SAMPLES`` windows of ``SEQ_LEN`` tokens (the models are trained on 256-token sequences; 256 x 256 =
65,536 tokens, the paper's 32 x 2048). Then every variant at 25 %, 50 % and 75 % of the experts removed, with
``--router reduce`` and, for merging methods, ``--router grouped``: perplexity on each domain's test split
(windows of ``SEQ_LEN``), their geometric mean, and fidelity to the original on all those windows (mean L2 and
cosine of the last hidden state). The prose and code calibration sets run HC-SMoE only (the paper's
calibration-set study). ``seconds`` is the plan + merge time of a variant, without evaluation.

Writes ``results.csv`` (every row), ``results.md`` (tables and the paper's findings, each counted over the
cells where it can be tested) and ``quality.png`` (mean test perplexity against the fraction removed).
``--smoke``: one model, two methods, 50 % removed, 8 calibration windows, 512 test tokens per domain; CI runs
it (``tests/test_benchmark_models.py``).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure
from transformers import AutoConfig

from moemerge.calibration import load_calibration, load_tokens
from moemerge.checkpoint import inspect_source, load_source
from moemerge.compare import parse_variant, reduce_variant, write_csv
from moemerge.evaluation.fidelity import FidelitySums
from moemerge.evaluation.perplexity import perplexity_of, summed_nll, windows
from moemerge.pipeline import statistics_needs
from moemerge.registry import resolve
from moemerge.statistics import collect_statistics

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "benchmarks" / "models"
DATA = REPO / "benchmarks" / "data"
DOMAINS = ("austen", "bible", "lambada", "wiki", "pydocs")
SEQ_LEN = 256
CALIB_SAMPLES = 256
TEST_TOKENS = 4096  # per domain: 20,480 test tokens per cell, the same for every method (paired)
REMOVED = (0.25, 0.5, 0.75)
VARIANTS = (
    "hc-smoe",
    "hc-smoe:linkage=single",
    "hc-smoe:linkage=complete",
    "hc-smoe:cluster=kmeans,kmeans_init=k-means++",
    "hc-smoe:metric=router-logits",
    "hc-smoe:metric=weight",
    "hc-smoe:merge=average",
    "hc-smoe:merge=fix-dom",
    "hc-smoe:align=true",
    "m-smoe",
    "mc-smoe",
    "f-prune",
    "s-prune",
    "reap",
    "o-prune:oprune_budget=2000",
)
CALIB_SETS = ("general", "prose", "code")
SMOKE = {"variants": ("hc-smoe", "f-prune"), "removed": (0.5,), "calib_samples": 8, "test_tokens": 512}


def test_windows(tokenizer, vocab: int, max_tokens: int) -> dict[str, list[torch.Tensor]]:
    """Per domain, the first ``max_tokens`` tokens of its test split cut into windows of SEQ_LEN."""
    return {
        d: windows(
            load_tokens(str(DATA / "test" / f"{d}.jsonl.gz"), tokenizer, max_tokens, vocab).sequences[0], SEQ_LEN
        )
        for d in DOMAINS
    }


def read_rows(path: Path) -> list[dict]:
    """The rows of a results csv written before (numbers as floats, text as text); none if there is no file."""
    if not path.exists():
        return []
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    text = ("model", "calibration", "router", "method")
    return [{k: v if k in text else float(v) for k, v in row.items()} for row in rows]


@torch.inference_mode()
def last_hidden(model, chunks: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Per domain, each window's last hidden state [T, H] (the base model's output, after its final norm)."""
    return {d: [model.model(input_ids=w[None]).last_hidden_state[0] for w in c] for d, c in chunks.items()}


@torch.inference_mode()
def measure(model, reference: dict[str, list[torch.Tensor]], chunks: dict[str, list[torch.Tensor]]) -> dict:
    """Per-domain perplexity, their geometric mean, and last-hidden fidelity to ``reference`` (the original's
    :func:`last_hidden`) on all windows, from one forward of each window (a hook on the base model keeps its
    last hidden state while the causal LM computes the logits)."""
    captured = []
    handle = model.model.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state[0]))
    sums, row = FidelitySums([]), {}
    try:
        for domain, chunk in chunks.items():
            total = 0.0
            for window, h_ref in zip(chunk, reference[domain], strict=True):
                captured.clear()
                total += summed_nll(model(input_ids=window[None]).logits[0], window)
                sums.add_hidden(captured[0], h_ref)
            row[f"ppl_{domain}"] = perplexity_of(total, chunk)["perplexity"]
    finally:
        handle.remove()
    row["ppl_mean"] = math.exp(sum(math.log(v) for v in row.values()) / len(row))
    hidden = sums.result()["last_hidden"]
    return row | {"hidden_l2": hidden["l2"], "hidden_cosine": hidden["cosine"]}


def run_model(
    name: str, variants, removed, calib_sets, calib_samples: int, test_tokens: int, log, novices: bool = False
) -> list[dict]:
    """Rows of the original and of every variant at every removed fraction, with both router modes where a
    variant's method can use them (pruning methods with ``grouped`` only with ``novices``: their dropped experts
    then become novices)."""
    source = inspect_source(MODELS / name)
    model, tokenizer = load_source(source, dtype="float32")
    config, family = AutoConfig.from_pretrained(source.path), source.family
    n, layers = family.num_experts(config), family.moe_layers(model)
    vocab = model.get_input_embeddings().num_embeddings
    chunks = test_windows(tokenizer, vocab, test_tokens)
    base = {"model": name, "calibration": "", "router": "", "method": "original", "removed": 0.0, "experts": n}
    began = time.perf_counter()
    reference = last_hidden(model, chunks)
    rows = [base | measure(model, reference, chunks)]
    for calib in calib_sets:
        chosen = variants if calib == calib_sets[0] else variants[:1]
        calibration = load_calibration(
            str(DATA / f"calib_{calib}.jsonl.gz"), tokenizer, calib_samples, SEQ_LEN, 0, vocab
        )
        runs = [
            parse_variant(spec, router=router)
            for router in ("reduce", "grouped")
            for spec in chosen
            if runs_with(resolve("method", spec.split(":")[0]), router, novices)
        ]
        stats = collect_statistics(
            model, layers, calibration.sequences, statistics_needs([v.options for v in runs]), progress=False
        )
        for variant in runs:
            router = variant.options.router
            for fraction in removed:
                r = round(n * (1 - fraction))
                start = time.perf_counter()
                reduced, _ = reduce_variant(model, family, config, stats, variant.options, r)
                seconds = time.perf_counter() - start
                cell = {"calibration": calib, "router": router, "method": variant.spec, "removed": fraction}
                row = base | cell | {"experts": r} | measure(reduced, reference, chunks)
                rows.append(row | {"seconds": seconds})
                log(f"{name} {calib} {router} {variant.spec} -{fraction:.0%}: mean ppl {row['ppl_mean']:.2f}")
                del reduced
    return [rows[0] | {"seconds": time.perf_counter() - began}, *rows[1:]]


def runs_with(method, router: str, novices: bool) -> bool:
    """Whether a variant of ``method`` runs with ``router``: the mode the method needs, if any; grouped for a
    pruning method only with ``novices``."""
    return method.router in (None, router) and not (router == "grouped" and method.prunes and not novices)


def lookup(rows, model, method, fraction, calibration="general", router="reduce") -> dict | None:
    for row in rows:
        if (row["model"], row["method"], row["removed"], row["calibration"], row["router"]) == (
            model,
            method,
            fraction,
            calibration,
            router,
        ):
            return row
    return None


def finding(rows, models, removed, title: str, better, worse: list[str], better_router: str = "reduce") -> str | None:
    """'title: holds in k of m cells' where ``better``'s mean perplexity (with ``better_router``) is below every one
    of ``worse``'s (router reduce); general calibration."""
    cells, holds, details = 0, 0, []
    for model in models:
        for fraction in removed:
            a = lookup(rows, model, better, fraction, router=better_router)
            others = [lookup(rows, model, w, fraction) for w in worse]
            if a is None or any(o is None for o in others):
                continue
            best_other = min(others, key=lambda o: o["ppl_mean"])
            cells += 1
            holds += a["ppl_mean"] < best_other["ppl_mean"]
            details.append(f"{model} -{fraction:.0%}: {a['ppl_mean']:.1f} vs {best_other['ppl_mean']:.1f}")
    if not cells:
        return None
    return f"- **{title}**: holds in {holds} of {cells} cells ({'; '.join(details)})."


def findings(rows: list[dict], models: list[str], removed) -> list[str]:
    pruning = [m for m in VARIANTS if resolve("method", m.split(":")[0]).prunes]
    checks = [
        (
            "Average linkage beats single and complete",
            "hc-smoe",
            ["hc-smoe:linkage=single", "hc-smoe:linkage=complete"],
        ),
        ("Hierarchical clustering beats k-means (k-means++)", "hc-smoe", [VARIANTS[3]]),
        (
            "Expert outputs beat router logits and weights as the similarity metric",
            "hc-smoe",
            ["hc-smoe:metric=router-logits", "hc-smoe:metric=weight"],
        ),
        ("HC-SMoE beats every pruning method (merging beats pruning)", "hc-smoe", pruning),
        ("HC-SMoE beats M-SMoE", "hc-smoe", ["m-smoe"]),
        ("Frequency-weighted merging beats plain averaging", "hc-smoe", ["hc-smoe:merge=average"]),
        ("Permutation alignment before merging helps", "hc-smoe:align=true", ["hc-smoe"]),
    ]
    lines = [finding(rows, models, removed, *check) for check in checks]
    title = "Grouped routing (the paper's exact routing) beats the reduced r-row router, HC-SMoE"
    lines.append(finding(rows, models, removed, title, "hc-smoe", ["hc-smoe"], better_router="grouped"))
    lines += calibration_spread(rows, models, removed)
    return [line for line in lines if line]


def calibration_spread(rows, models, removed) -> list[str]:
    """The paper finds HC-SMoE robust to the calibration set: per cell, the worst over the best mean perplexity,
    and whether the code set gives the best Python-docs perplexity."""
    lines = []
    for model in models:
        for fraction in removed:
            found = {c: lookup(rows, model, "hc-smoe", fraction, calibration=c) for c in CALIB_SETS}
            if any(v is None for v in found.values()):
                continue
            means = {c: v["ppl_mean"] for c, v in found.items()}
            code_best = min(CALIB_SETS, key=lambda c: found[c]["ppl_pydocs"]) == "code"
            prose_best = min(CALIB_SETS, key=lambda c: found[c]["ppl_austen"]) == "prose"
            lines.append(
                f"- Calibration set, {model} -{fraction:.0%}: mean ppl "
                + ", ".join(f"{c} {v:.1f}" for c, v in means.items())
                + f" (worst/best {max(means.values()) / min(means.values()):.3f}); code set best on pydocs: "
                f"{'yes' if code_best else 'no'}; prose set best on Austen: {'yes' if prose_best else 'no'}."
            )
    return lines


def markdown(rows: list[dict], models: list[str], removed, settings: str) -> str:
    lines = [f"# Quality benchmark\n\n{settings}\n", "## The paper's findings on these models\n"]
    lines += [*findings(rows, models, removed), ""]
    for model in models:
        original = next(r for r in rows if r["model"] == model and r["method"] == "original")
        lines += [
            f"## {model} ({original['experts']:.0f} experts; original mean test ppl {original['ppl_mean']:.2f}; "
            f"benchmark {original['seconds'] / 60:.0f} min)\n",
            "Mean test perplexity over the five domains (hidden-state cosine to the original), calibration: general.\n",
            "| router | method | " + " | ".join(f"-{f:.0%}" for f in removed) + " | seconds |",
            "|---|---|" + "---|" * (len(removed) + 1),
        ]
        cells = [r for r in rows if r["model"] == model and r["method"] != "original"]
        for router, method, calib in dict.fromkeys((r["router"], r["method"], r["calibration"]) for r in cells):
            found = [lookup(rows, model, method, f, calib, router) for f in removed]
            label = method if calib == "general" else f"{method} (calib {calib})"
            values = " | ".join(f"{r['ppl_mean']:.2f} ({r['hidden_cosine']:.3f})" if r else "" for r in found)
            seconds = sum(r["seconds"] for r in found if r)
            lines.append(f"| {router} | {label} | {values} | {seconds:.1f} |")
        lines += ["", f"Per-domain test perplexity at -{removed[len(removed) // 2]:.0%}, router reduce:\n"]
        lines += ["| method | " + " | ".join(DOMAINS) + " |", "|---|" + "---|" * len(DOMAINS)]
        lines.append("| original | " + " | ".join(f"{original[f'ppl_{d}']:.2f}" for d in DOMAINS) + " |")
        for r in cells:
            if r["router"] == "reduce" and r["removed"] == removed[len(removed) // 2]:
                label = r["method"] if r["calibration"] == "general" else f"{r['method']} (calib {r['calibration']})"
                lines.append(f"| {label} | " + " | ".join(f"{r[f'ppl_{d}']:.2f}" for d in DOMAINS) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], models: list[str], path: Path) -> None:
    fig = Figure(figsize=(5 * len(models), 4.6), dpi=110)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        original = next(r for r in rows if r["model"] == model and r["method"] == "original")
        cells = [r for r in rows if r["model"] == model and r["router"] == "reduce" and r["calibration"] == "general"]
        colours = matplotlib.colormaps["tab20"].colors  # 15 methods: the default 10-colour cycle repeats
        for number, method in enumerate(dict.fromkeys(r["method"] for r in cells)):
            points = sorted((r["removed"], r["ppl_mean"]) for r in cells if r["method"] == method)
            style = {"color": colours[number % 20], "marker": "osD^v"[number % 5]}
            ax.plot(*zip(*points, strict=True), label=method, linestyle="-" if number < 9 else "--", **style)
        ax.axhline(original["ppl_mean"], color="black", linestyle="--", linewidth=1, label="original")
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_xlabel("fraction of experts removed")
        ax.set_ylabel("mean test perplexity (5 domains)")
        ax.grid(True, alpha=0.3)
    axes[-1].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=None, help="names under benchmarks/models (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/quality (--smoke: required)")
    ap.add_argument("--smoke", action="store_true", help="one model, two methods, one ratio, few tokens")
    args = ap.parse_args(argv)
    if args.smoke and args.out is None:
        ap.error("--smoke needs --out DIR: its rows would replace the committed results")
    args.out = args.out or REPO / "benchmarks" / "results" / "quality"
    models = args.models or sorted(p.parent.name for p in MODELS.glob("*/card.json"))
    variants, removed, calib_sets, samples, tokens = VARIANTS, REMOVED, CALIB_SETS, CALIB_SAMPLES, TEST_TOKENS
    if args.smoke:
        models, calib_sets = models[:1], CALIB_SETS[:1]
        variants, removed = SMOKE["variants"], SMOKE["removed"]
        samples, tokens = SMOKE["calib_samples"], SMOKE["test_tokens"]
    args.out.mkdir(parents=True, exist_ok=True)
    for name in models:
        torch.manual_seed(0)
        rows = run_model(name, variants, removed, calib_sets, samples, tokens, lambda m: print(m, flush=True))
        rows = [r for r in read_rows(args.out / "results.csv") if r["model"] != name] + rows
        done = sorted({r["model"] for r in rows})
        minutes = sum(r["seconds"] for r in rows if r["method"] == "original") / 60
        settings = (
            f"Regenerate: `python benchmarks/quality/run.py{' --smoke' if args.smoke else ''}` ({minutes:.0f} min "
            f"on 2 CPU cores, each model's share in its heading; `--models NAME` reruns one). Calibration: "
            f"{samples} windows of {SEQ_LEN} tokens; test: the first {tokens:,} tokens of each domain's test split "
            f"in windows of {SEQ_LEN}; fidelity on all of them. Geometric mean over domains."
        )
        write_csv(rows, args.out / "results.csv")
        (args.out / "results.md").write_text(markdown(rows, done, removed, settings), encoding="utf-8")
        plot(rows, done, args.out / "quality.png")


if __name__ == "__main__":
    main(sys.argv[1:])
