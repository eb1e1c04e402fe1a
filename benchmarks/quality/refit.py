"""Does the closed-form refit of the down projections (``--refit down``) help every method, and by how much?

Usage: ``python benchmarks/quality/refit.py [--models NAME ...] [--out DIR]`` (default: every benchmark model,
``benchmarks/results/quality``; writes ``refit.md`` and ``refit.csv``). The quality benchmark's settings
(``run.py``: 256 x 256 general calibration tokens, the first 4,096 test tokens of each domain, 25 / 50 / 75 %
removed, both router modes for merging methods), each method with and without the refit.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from moemerge.compare import write_csv

METHODS = ("hc-smoe", "m-smoe", "f-prune", "reap")

_spec = importlib.util.spec_from_file_location("quality_run", Path(__file__).with_name("run.py"))
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def markdown(rows: list[dict], models: list[str]) -> str:
    lines = [
        "# Closed-form refit of the down projections (`--refit down`)",
        "",
        "`python benchmarks/quality/refit.py`. The quality benchmark's settings; mean = geometric mean of the five "
        "domains' test perplexity; change = refit against the same method without it.",
        "",
        "| model | removed | router | method | mean ppl | with refit | change | hidden cosine | with refit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    wins = cells = 0
    for model in models:
        original = quality.lookup(rows, model, "original", 0.0, calibration="", router="")
        lines.append(f"| {model} | 0 % | | original | {original['ppl_mean']:.2f} | | | | |")
        for fraction in quality.REMOVED:
            for router in ("reduce", "grouped"):
                for method in METHODS:
                    plain = quality.lookup(rows, model, method, fraction, router=router)
                    fitted = quality.lookup(rows, model, f"{method}:refit=down", fraction, router=router)
                    if plain is None:
                        continue
                    cells += 1
                    wins += fitted["ppl_mean"] < plain["ppl_mean"]
                    change = fitted["ppl_mean"] / plain["ppl_mean"] - 1
                    lines.append(
                        f"| {model} | {fraction:.0%} | {router} | {method} | {plain['ppl_mean']:.2f} "
                        f"| {fitted['ppl_mean']:.2f} | {change:+.1%} | {plain['hidden_cosine']:.4f} "
                        f"| {fitted['hidden_cosine']:.4f} |"
                    )
    lines += ["", f"The refit gives the lower mean perplexity in {wins} of {cells} cells."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="names under benchmarks/models (default: all)")
    parser.add_argument("--out", type=Path, default=quality.REPO / "benchmarks" / "results" / "quality")
    args = parser.parse_args()
    models = args.models or sorted(p.parent.name for p in quality.MODELS.glob("*/card.json"))
    variants = [v for m in METHODS for v in (m, f"{m}:refit=down")]
    rows = []
    for name in models:
        rows += quality.run_model(
            name,
            variants,
            quality.REMOVED,
            ("general",),
            quality.CALIB_SAMPLES,
            quality.TEST_TOKENS,
            lambda line: print(line, flush=True),
        )
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "refit.csv")
    (args.out / "refit.md").write_text(markdown(rows, models), encoding="utf-8")
    print(f"wrote {args.out}/refit.md")


if __name__ == "__main__":
    main()
