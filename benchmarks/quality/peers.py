"""HC-SMoE against the retraining-free peers (REAP, MAN, MSAN, REAM, Sub-MoE, MoNE), each with and without ``--refit down``.

Usage: ``python benchmarks/quality/peers.py [--models NAME ...] [--methods NAME ...] [--out DIR]`` (default: every
benchmark model and method, ``benchmarks/results/quality``; writes ``peers.md`` and ``peers.csv`` after each model,
replacing that model's earlier rows of the methods measured and keeping the rest). The quality benchmark's settings
(``run.py``: 256 x 256 general calibration tokens, the first 4,096 test tokens of each domain, 25 / 50 / 75 %
removed). Every method runs on one calibration pass of the original model (both router modes for the merging
methods, and for the pruning ones too, their dropped experts then replaced by novices as MoNE's). HC-SMoE and REAM
also run layer-sequentially (``NAME (sequential)``: every layer's statistics from the
already-reduced layers, as ``reduce --sequential`` and ``reduce --method ream`` run them), and HC-SMoE with
``--budget search``, each through ``reduce`` with a calibration pass of its own per cell.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import tempfile
import time
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from moemerge import load_model
from moemerge.checkpoint import inspect_source, load_source
from moemerge.compare import write_csv
from moemerge.streaming import reduce_streaming

METHODS = ("hc-smoe", "reap", "man", "msan", "ream", "sub-moe", "mone")
# the grouped-routing columns (reap's: with novices; mone: only so)
GROUPED = ("hc-smoe", "ream", "sub-moe", "reap", "mone")
STREAMED = {  # label: reduce options of the variants that compare cannot run from shared statistics
    "hc-smoe (sequential)": {"method": "hc-smoe", "sequential": True},
    "ream (sequential)": {"method": "ream", "sequential": True},
    "hc-smoe (budget search)": {"method": "hc-smoe", "budget": "search"},
}

_spec = importlib.util.spec_from_file_location("quality_run", Path(__file__).with_name("run.py"))
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def streamed_rows(name: str, variants: dict, work: Path, log) -> list[dict]:
    """Rows of ``variants`` (label: options, of STREAMED) reduced by ``reduce``, without and with the refit, at
    every ratio."""
    source = inspect_source(quality.MODELS / name)
    original, tokenizer = load_source(source, dtype="float32")
    n = source.family.num_experts(original.config)
    vocab = original.get_input_embeddings().num_embeddings
    chunks = quality.test_windows(tokenizer, vocab, quality.TEST_TOKENS)
    reference = quality.last_hidden(original, chunks)
    rows = []
    for fraction, (variant, options), refit in itertools.product(quality.REMOVED, variants.items(), ("none", "down")):
        r = round(n * (1 - fraction))
        out = work / f"{name}-{r}-{len(rows)}"
        start = time.perf_counter()
        reduce_streaming(
            source.path,
            out,
            experts=r,
            refit=refit,
            **options,
            calib=str(quality.DATA / "calib_general.jsonl.gz"),
            calib_samples=quality.CALIB_SAMPLES,
            calib_seq_len=quality.SEQ_LEN,
            dtype="float32",
            progress=False,
            report=False,
        )
        seconds = time.perf_counter() - start
        label = variant + ("" if refit == "none" else ":refit=down")
        row = {"model": name, "calibration": "general", "router": "reduce", "method": label, "removed": fraction}
        row |= {"experts": r} | quality.measure(load_model(out, dtype="float32"), reference, chunks)
        rows.append(row | {"seconds": seconds})
        log(f"{name} {label} -{fraction:.0%}: mean ppl {row['ppl_mean']:.2f}")
    return rows


def columns() -> list[str]:
    """The table's method columns: each method and streamed variant with router reduce (MoNE only grouped), then
    the grouped-routing ones."""
    return [*(n for n in [*METHODS, *STREAMED] if n != "mone"), *(f"{m} grouped" for m in GROUPED)]


def cell(rows: list[dict], model: str, fraction: float) -> dict[str, list[dict | None]]:
    """Per column, its rows (without, with ``--refit down``) for ``model`` at ``fraction`` removed (None: not
    measured)."""
    found = {}
    for column in columns():
        router = "grouped" if column.endswith(" grouped") else "reduce"
        method = column.removesuffix(" grouped")
        found[column] = [
            quality.lookup(rows, model, m, fraction, router=router) for m in (method, f"{method}:refit=down")
        ]
    return found


def best(pair: list[dict | None]) -> dict | None:
    """The row of lower mean perplexity of a (without, with refit) pair."""
    measured = [r for r in pair if r]
    return min(measured, key=lambda r: r["ppl_mean"]) if measured else None


def markdown(rows: list[dict], models: list[str]) -> str:
    names = columns()
    lines = [
        "# HC-SMoE against the retraining-free peers",
        "",
        "`python benchmarks/quality/peers.py`. The quality benchmark's settings; mean test perplexity (geometric "
        "mean of the five domains); router `reduce` unless marked grouped; each cell without / with `--refit down`. "
        "`NAME` runs on the original model's statistics, `NAME (sequential)` layer-sequentially; budget search: "
        "`--budget search`; n/a: not measured. Plot: `peers.png` (each column's better of without / with the "
        "refit). Time and peak memory of each method's whole `reduce`: `cost.md`.",
        "",
        "| model | removed | original | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    wins = dict.fromkeys(names, 0)
    ours_best = cells = 0
    for model in models:
        original = quality.lookup(rows, model, "original", 0.0, calibration="", router="")["ppl_mean"]
        for fraction in quality.REMOVED:
            found = cell(rows, model, fraction)
            text = [" / ".join("n/a" if r is None else f"{r['ppl_mean']:.1f}" for r in pair) for pair in found.values()]
            lines.append(f"| {model} | {fraction:.0%} | {original:.1f} | " + " | ".join(text) + " |")
            means = {m: best(pair)["ppl_mean"] for m, pair in found.items() if best(pair)}
            wins[min(means, key=means.get)] += 1
            ours = min(v for m, v in means.items() if m.startswith("hc-smoe"))
            peers = min(v for m, v in means.items() if not m.startswith("hc-smoe"))
            cells += 1
            ours_best += ours < peers
    lines += [
        "",
        f"HC-SMoE (best of its variants, with or without the refit) beats the best peer in {ours_best} of "
        f"{cells} cells. Cells won (lowest mean perplexity of all columns, each with or without the refit): "
        + ", ".join(f"{m} {k}" for m, k in sorted(wins.items(), key=lambda x: -x[1]) if k)
        + ".",
        "",
    ]
    middle = quality.REMOVED[len(quality.REMOVED) // 2]
    for model in models:
        lines += [
            f"## {model}: per-domain test perplexity at {middle:.0%} removed (each column's better of without / with "
            "the refit)",
            "",
            "seconds: plan and merge from the shared statistics; for the sequential and budget-search columns, the "
            "whole `reduce` (calibration and writing included).",
            "",
            "| method | " + " | ".join(quality.DOMAINS) + " | seconds |",
            "|---|" + "---|" * (len(quality.DOMAINS) + 1),
        ]
        for column, pair in cell(rows, model, middle).items():
            row = best(pair)
            if row:
                domains = " | ".join(f"{row[f'ppl_{d}']:.1f}" for d in quality.DOMAINS)
                lines.append(f"| {column}{' (refit)' if row is pair[1] else ''} | {domains} | {row['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], models: list[str], path: Path) -> None:
    """Mean test perplexity against the fraction removed, per model, for each column's better of without / with
    the refit."""
    fig = Figure(figsize=(5 * len(models), 4.6), dpi=110)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    colours = matplotlib.colormaps["tab20"].colors
    for ax, model in zip(axes, models, strict=True):
        original = quality.lookup(rows, model, "original", 0.0, calibration="", router="")["ppl_mean"]
        found = {f: cell(rows, model, f) for f in quality.REMOVED}
        for number, column in enumerate(columns()):
            points = [(f, best(found[f][column])["ppl_mean"]) for f in quality.REMOVED if best(found[f][column])]
            if points:
                style = {"color": colours[number % 20], "marker": "osD^v"[number % 5]}
                ax.plot(*zip(*points, strict=True), label=column, linestyle="-" if number < 9 else "--", **style)
        ax.axhline(original, color="black", linestyle="--", linewidth=1, label="original")
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_xlabel("fraction of experts removed")
        ax.set_ylabel("mean test perplexity (5 domains)")
        ax.grid(True, alpha=0.3)
    axes[-1].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="names under benchmarks/models (default: all)")
    parser.add_argument(
        "--methods", nargs="+", choices=[*METHODS, *STREAMED], default=[*METHODS, *STREAMED], help="default: all"
    )
    parser.add_argument("--out", type=Path, default=quality.REPO / "benchmarks" / "results" / "quality")
    args = parser.parse_args()
    models = args.models or sorted(p.parent.name for p in quality.MODELS.glob("*/card.json"))
    variants = [v for m in METHODS if m in args.methods for v in (m, f"{m}:refit=down")]
    streamed = {label: options for label, options in STREAMED.items() if label in args.methods}
    measured = {"original", *args.methods}
    log = lambda line: print(line, flush=True)  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for name in models:  # each model's rows replace its earlier ones, written as soon as they are measured
            rows = quality.run_model(
                name, variants, quality.REMOVED, ("general",), quality.CALIB_SAMPLES, quality.TEST_TOKENS, log, True
            )
            rows += streamed_rows(name, streamed, Path(work), log)
            earlier = quality.read_rows(args.out / "peers.csv")
            rows = [r for r in earlier if r["model"] != name or r["method"].split(":")[0] not in measured] + rows
            write_csv(rows, args.out / "peers.csv")
            done = sorted({r["model"] for r in rows})
            (args.out / "peers.md").write_text(markdown(rows, done), encoding="utf-8")
            plot(rows, done, args.out / "peers.png")
            log(f"wrote {args.out}/peers.md")


if __name__ == "__main__":
    main()
