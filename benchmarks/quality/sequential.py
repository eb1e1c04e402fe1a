"""Statistics from the original model's hidden states (the paper) or from the already-reduced layers'
(``reduce --sequential``): which gives the better reduced model on the benchmark models?

Usage: ``python benchmarks/quality/sequential.py [--out DIR]`` (default ``benchmarks/results/quality``; writes
``sequential.md`` and ``sequential.csv``). HC-SMoE defaults, ``CALIB_SAMPLES`` windows of the general
calibration set (a quarter of the quality benchmark's: every run calibrates anew), 50 and 75 % of the experts
removed, per-domain test perplexity and last-hidden fidelity on the quality benchmark's test windows.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

from moemerge import load_model
from moemerge.checkpoint import inspect_source, load_source
from moemerge.compare import write_csv
from moemerge.streaming import reduce_streaming

CALIB_SAMPLES = 64
REMOVED = (0.5, 0.75)

_spec = importlib.util.spec_from_file_location("quality_run", Path(__file__).with_name("run.py"))
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def run_model(name: str, work: Path, log) -> list[dict]:
    source = inspect_source(quality.MODELS / name)
    original, tokenizer = load_source(source, dtype="float32")
    n = source.family.num_experts(original.config)
    vocab = original.get_input_embeddings().num_embeddings
    chunks = quality.test_windows(tokenizer, vocab, quality.TEST_TOKENS)
    reference = quality.last_hidden(original, chunks)
    rows = []
    for fraction in REMOVED:
        r = round(n * (1 - fraction))
        for sequential in (False, True):
            out = work / f"{name}-{r}-{sequential}"
            result = reduce_streaming(
                source.path,
                out,
                experts=r,
                calib=str(quality.DATA / "calib_general.jsonl.gz"),
                calib_samples=CALIB_SAMPLES,
                calib_seq_len=quality.SEQ_LEN,
                dtype="float32",
                sequential=sequential,
                progress=False,
                report=False,
            )
            row = {"model": name, "statistics": "sequential" if sequential else "original", "removed": fraction}
            row |= {"experts": r} | quality.measure(load_model(out, dtype="float32"), reference, chunks)
            rows.append(row | {"seconds": result.seconds})
            log(f"{name} -{fraction:.0%} {row['statistics']}: mean ppl {row['ppl_mean']:.2f}")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Statistics from the original or the reduced model (`reduce --sequential`)",
        "",
        f"`python benchmarks/quality/sequential.py`. HC-SMoE defaults, {CALIB_SAMPLES} x {quality.SEQ_LEN} general "
        "calibration tokens; mean = geometric mean of the five domains' test perplexity; L2 / cosine of the last "
        "hidden state against the original model.",
        "",
        "| model | removed | statistics | mean ppl | hidden L2 | hidden cosine | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['removed']:.0%} | {r['statistics']} | {r['ppl_mean']:.2f} | {r['hidden_l2']:.3f} "
        f"| {r['hidden_cosine']:.4f} | {r['seconds']:.0f} |"
        for r in rows
    ]
    pairs = [(a, b) for a, b in zip(rows[::2], rows[1::2], strict=True)]
    wins = sum(b["ppl_mean"] < a["ppl_mean"] for a, b in pairs)
    lines += ["", f"Sequential statistics give the lower mean perplexity in {wins} of {len(pairs)} cells."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=quality.REPO / "benchmarks" / "results" / "quality")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in sorted(p.name for p in quality.MODELS.iterdir() if p.is_dir()):
            rows += run_model(name, Path(work), lambda line: print(line, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "sequential.csv")
    (args.out / "sequential.md").write_text(markdown(rows), encoding="utf-8")
    print(f"wrote {args.out}/sequential.md")


if __name__ == "__main__":
    main()
