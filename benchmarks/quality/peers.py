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

from moemerge import load_model
from moemerge.checkpoint import inspect_source, load_source
from moemerge.compare import write_csv
from moemerge.streaming import reduce_streaming

METHODS = ("hc-smoe", "reap", "man", "msan", "ream", "sub-moe", "mone")
GROUPED = (
    "hc-smoe",
    "ream",
    "sub-moe",
    "reap",
    "mone",
)  # the grouped-routing columns (reap's: with novices; mone: only so)
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


def markdown(rows: list[dict], models: list[str]) -> str:
    names = [*METHODS, *STREAMED]
    lines = [
        "# HC-SMoE against the retraining-free peers",
        "",
        "`python benchmarks/quality/peers.py`. The quality benchmark's settings; mean test perplexity (geometric "
        "mean of the five domains); router `reduce` unless marked grouped; each cell without / with `--refit down`. "
        "`NAME` runs on the original model's statistics, `NAME (sequential)` layer-sequentially; budget search: "
        "`--budget search`; n/a: not measured.",
        "",
        "| model | removed | original | "
        + " | ".join([*(n for n in names if n != "mone"), *(f"{m} grouped" for m in GROUPED)])
        + " |",
        "|---|---|---|" + "---|" * (len(names) - 1 + len(GROUPED)),
    ]
    ours_best = cells = 0
    for model in models:
        original = quality.lookup(rows, model, "original", 0.0, calibration="", router="")["ppl_mean"]
        for fraction in quality.REMOVED:
            cell = {}
            for method in (n for n in names if n != "mone"):
                cell[method] = [quality.lookup(rows, model, m, fraction) for m in (method, f"{method}:refit=down")]
            for method in GROUPED:
                cell[f"{method} grouped"] = [
                    quality.lookup(rows, model, m, fraction, router="grouped") for m in (method, f"{method}:refit=down")
                ]
            text = [" / ".join("n/a" if r is None else f"{r['ppl_mean']:.1f}" for r in pair) for pair in cell.values()]
            lines.append(f"| {model} | {fraction:.0%} | {original:.1f} | " + " | ".join(text) + " |")
            best = {m: min(r["ppl_mean"] for r in pair if r) for m, pair in cell.items() if any(pair)}
            ours = min(v for m, v in best.items() if m.startswith("hc-smoe"))
            peers = min(v for m, v in best.items() if not m.startswith("hc-smoe"))
            cells += 1
            ours_best += ours < peers
    lines += [
        "",
        f"HC-SMoE (best of its variants, with or without the refit) beats the best peer in {ours_best} of "
        f"{cells} cells.",
    ]
    return "\n".join(lines) + "\n"


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
            log(f"wrote {args.out}/peers.md")


if __name__ == "__main__":
    main()
