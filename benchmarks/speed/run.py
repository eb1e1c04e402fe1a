"""The speed and memory benchmark of the streaming path (not a test).

Usage: ``python benchmarks/speed/run.py [--work DIR] [--out DIR] [--skip-headline]``
(work folder for the synthetic checkpoints, default ``/tmp/moemerge-speed``, deleted afterwards; results in
``benchmarks/results/speed/``: ``results.json`` and ``results.md``).

In one run, so that the ratios compare numbers taken under the same load:

1. **Statistics throughput.** One decoder layer of real shape (Qwen1.5-MoE-A2.7B: 60 experts of
   2048 -> 1408, top-4; Mixtral-8x7B: 8 experts of 4096 -> 14336, top-2), random weights stored in bfloat16
   (computed in the dtype :func:`moemerge.precision.compute_dtype` picks on this CPU, and in the other one for
   comparison) and in float32. :meth:`moemerge.statistics.LayerAccumulator.sequence_parts` on ``TOKENS`` hidden
   states (every expert on every token, plus REAP's down projection of the routed tokens), in GFLOP/s, against
   a dense matmul of the same chunk shape ([chunk, H] x [H, n 2I]) in the compute dtype and in float32.
2. **Memory against depth.** ``moemerge reduce`` (the default command) of Qwen-shaped checkpoints with 4 and 16 layers
   (vocabulary cut to 32,000, so that the embeddings do not hide the layers), peak RSS of each run and their
   ratio (target <= 1.2), and wall time per layer against the least it could take: max(bytes read / read rate +
   bytes written / write rate, statistics FLOPs / the float32 matmul rate of step 1), the rates measured here
   (target <= 2).
3. **Headline.** A Qwen1.5-MoE-shaped bfloat16 checkpoint of 24 layers, 60 experts + shared expert, hidden
   2048, full vocabulary (about 28.6 GB, more than this machine's 24 GiB of RAM), reduced to 30 experts per
   layer on ``HEADLINE_SEQUENCES`` x ``HEADLINE_SEQ_LEN`` calibration tokens: time, peak RSS
   and output size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moemerge.adapters import family_for
from moemerge.precision import compute_dtype, dtype_name, native_cpu_dtypes, to_compute
from moemerge.statistics import LayerAccumulator

REPO = Path(__file__).resolve().parents[2]
TOKENS = 512
DEPTH_LAYERS = (4, 16)
DEPTH_VOCAB = 32_000
HEADLINE_LAYERS = 24
HEADLINE_SEQUENCES, HEADLINE_SEQ_LEN = 8, 256
CALIB_VOCAB = 32_000

_spec = importlib.util.spec_from_file_location("synthetic", Path(__file__).with_name("synthetic.py"))
synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic)


def best_seconds(fn, repeats: int = 2) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up (the least disturbed by other load)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def one_layer(shape: str, dtype: torch.dtype):
    """A one-layer model of the shape (random weights, small vocabulary) and its MoE layer view."""
    config = AutoConfig.for_model(**{**synthetic.SHAPES[shape], "num_hidden_layers": 1, "vocab_size": 128})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return family_for(config.to_dict()).moe_layers(model)[0]


def write_results(out: Path, stem: str, results: dict, table: str) -> None:
    """``out/{stem}.json`` (``results``) and ``out/{stem}.md`` (``table``, their markdown), ``out`` made if absent."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(table, encoding="utf-8")


def machine() -> str:
    """The line each speed result names its machine by: CPU (see :func:`cpu_model`), cores and torch."""
    return f"{cpu_model()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def cpu_model() -> str:
    """The CPU's model name and whether it multiplies bfloat16 natively."""
    names = [
        line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line
    ]
    native = "native bfloat16" if torch.bfloat16 in native_cpu_dtypes() else "no native bfloat16"
    return f"{names[0] if names else platform.machine()} ({native})"


@torch.inference_mode()
def statistics_throughput(shape: str, stored: torch.dtype, dtype: torch.dtype) -> dict:
    """Throughput of the statistics of a layer whose weights are ``stored`` in one dtype, computed in ``dtype``."""
    view = one_layer(shape, stored)
    to_compute(view.block, dtype)
    n, two_i, hidden = view.block.experts.gate_up_proj.shape
    x = torch.randn(TOKENS, hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    accumulator = LayerAccumulator(view, TOKENS)
    seconds = best_seconds(lambda: accumulator.sequence_parts(x))
    k = view.routing.top_k
    flops = 2 * TOKENS * hidden * n * two_i + 2 * TOKENS * k * hidden * two_i // 2
    chunk = min(TOKENS, max(1, (128 << 20) // (n * two_i * 4)))
    dense = {}
    for name, dt in (("compute dtype", dtype), ("float32", torch.float32)):
        a = torch.randn(chunk, hidden).to(dt)
        b = torch.randn(n * two_i, hidden).to(dt)
        dense[name] = 2 * chunk * hidden * n * two_i / best_seconds(lambda a=a, b=b: a @ b.T) / 1e9
    del view
    gflops = flops / seconds / 1e9
    return {
        "shape": shape,
        "stored": dtype_name(stored),
        "computed": dtype_name(dtype),
        "chosen": dtype == compute_dtype(stored, torch.device("cpu")),
        "tokens": TOKENS,
        "seconds": seconds,
        "gflops": gflops,
        "dense_gflops_compute_dtype": dense["compute dtype"],
        "dense_gflops_float32": dense["float32"],
        "ratio_to_dense_compute_dtype": gflops / dense["compute dtype"],
        "ratio_to_dense_float32": gflops / dense["float32"],
    }


# VmHWM, not getrusage: Linux carries ru_maxrss over fork and exec, so the child would report this process's size
PEAK_RSS = """
import re, sys, time
from moemerge.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print(time.perf_counter() - start, re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
sys.exit(code)
"""


def calibration_rows(path: Path, sequences: int, seq_len: int) -> Path:
    """An input_ids .jsonl of random tokens (the synthetic models have no tokenizer)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, CALIB_VOCAB, (sequences, seq_len), generator=g).tolist()
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows), encoding="utf-8")
    return path


def streamed_reduce(model: Path, out: Path, calib: Path, sequences: int, seq_len: int) -> dict:
    """``moemerge reduce`` to 30 experts in a fresh process: wall seconds and peak RSS."""
    argv = ["reduce", str(model), "--experts", "30", "--calib", str(calib), "--out", str(out)]
    argv += ["--calib-samples", str(sequences), "--calib-seq-len", str(seq_len), "--no-report", "--quiet"]
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *argv], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"reduce failed: {result.stderr.strip().splitlines()[-1]}")
    seconds, rss_kib = result.stdout.split()[-2:]
    return {
        "seconds": float(seconds),
        "peak_rss_gib": int(rss_kib) / 2**20,
        "output_gb": sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9,
    }


def disk_rates(work: Path, size: int = 2**30) -> dict:
    """Bytes per second of writing a file of ``size`` bytes here (fsync'd) and of reading it back."""
    path, block = work / "disk-rate.bin", os.urandom(2**24)
    start = time.perf_counter()
    with path.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = size / (time.perf_counter() - start)
    start = time.perf_counter()
    with path.open("rb") as f:
        while f.read(2**24):
            pass
    read = size / (time.perf_counter() - start)
    path.unlink()
    return {"write_bytes_per_s": write, "read_bytes_per_s": read}


def statistics_flops(shape: str, tokens: int) -> float:
    """FLOPs of one layer's statistics: every expert's gate and up projections on every token, and the down
    projection of the routed ones (the formula of :func:`statistics_throughput`)."""
    config = synthetic.SHAPES[shape]
    n, hidden, inter = config["num_experts"], config["hidden_size"], config["moe_intermediate_size"]
    return 2 * tokens * hidden * n * 2 * inter + 2 * tokens * config["num_experts_per_tok"] * hidden * inter


def depth_runs(work: Path, fp32_gflops: float, disk: dict) -> dict:
    calib = calibration_rows(work / "calib-depth.jsonl", 4, 128)
    runs = {}
    for layers in DEPTH_LAYERS:
        model = work / f"qwen-{layers}"
        summary = synthetic.write_synthetic_checkpoint(
            model, "qwen1.5-moe-a2.7b", layers, vocab_size=DEPTH_VOCAB, progress=False
        )
        run = streamed_reduce(model, work / f"qwen-{layers}-out", calib, 4, 128)
        io = (
            summary["bytes"] / layers / disk["read_bytes_per_s"]
            + run["output_gb"] * 1e9 / layers / disk["write_bytes_per_s"]
        )
        compute = statistics_flops("qwen1.5-moe-a2.7b", 4 * 128) / (fp32_gflops * 1e9)
        per_layer = run["seconds"] / layers
        runs[layers] = run | {
            "checkpoint_gb": summary["bytes"] / 1e9,
            "seconds_per_layer": per_layer,
            "io_seconds_per_layer": io,
            "flops_seconds_per_layer": compute,
            "ratio_to_bound": per_layer / max(io, compute),
        }
        shutil.rmtree(model)
        shutil.rmtree(work / f"qwen-{layers}-out")
    deep, shallow = runs[DEPTH_LAYERS[1]], runs[DEPTH_LAYERS[0]]
    rss_ratio = deep["peak_rss_gib"] / shallow["peak_rss_gib"]
    return {"runs": runs, "rss_ratio": rss_ratio, "disk": disk, "fp32_gflops": fp32_gflops}


def headline(work: Path) -> dict:
    model = work / "qwen-headline"
    summary = synthetic.write_synthetic_checkpoint(model, "qwen1.5-moe-a2.7b", HEADLINE_LAYERS, progress=False)
    calib = calibration_rows(work / "calib-headline.jsonl", HEADLINE_SEQUENCES, HEADLINE_SEQ_LEN)
    run = streamed_reduce(model, work / "qwen-headline-out", calib, HEADLINE_SEQUENCES, HEADLINE_SEQ_LEN)
    shutil.rmtree(model)
    shutil.rmtree(work / "qwen-headline-out")
    return run | {
        "layers": HEADLINE_LAYERS,
        "checkpoint_gb": summary["bytes"] / 1e9,
        "calibration_tokens": HEADLINE_SEQUENCES * HEADLINE_SEQ_LEN,
        "seconds_per_layer": run["seconds"] / HEADLINE_LAYERS,
        "checkpoint_write_seconds": summary["seconds"],
        "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
    }


def markdown(results: dict) -> str:
    lines = [
        "# Speed and memory of `moemerge reduce`",
        "",
        f"`python benchmarks/speed/run.py` on {results['machine']}; every number below comes from one run.",
        "",
        f"## Statistics throughput ({TOKENS} tokens, every expert on every token)",
        "",
        "The row marked * is what moemerge computes in on this CPU for such weights.",
        "",
        "| layer shape | stored | computed | seconds | GFLOP/s | dense matmul, compute dtype | ratio | dense fp32 | ratio to fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["throughput"]:
        chosen = " *" if r["chosen"] else ""
        lines.append(
            f"| {r['shape']} | {r['stored']} | {r['computed']}{chosen} | {r['seconds']:.2f} | {r['gflops']:.1f}"
            f" | {r['dense_gflops_compute_dtype']:.1f} | {r['ratio_to_dense_compute_dtype']:.0%}"
            f" | {r['dense_gflops_float32']:.1f} | {r['ratio_to_dense_float32']:.0%} |"
        )
    depth = results["depth"]
    lines += [
        "",
        "## Peak memory against depth (Qwen1.5-MoE layers, vocabulary 32,000, 4 x 128 calibration tokens, 60 -> 30)",
        "",
        f"Disk here: write {depth['disk']['write_bytes_per_s'] / 1e9:.2f} GB/s (fsync'd), read "
        f"{depth['disk']['read_bytes_per_s'] / 1e9:.2f} GB/s; statistics FLOPs at the float32 matmul rate of "
        f"{depth['fp32_gflops']:.0f} GFLOP/s. The bound per layer is max(I/O seconds, FLOP seconds).",
        "",
        "| layers | checkpoint GB | peak RSS GiB | seconds | seconds per layer | I/O s | FLOP s | ratio to bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layers, r in depth["runs"].items():
        lines.append(
            f"| {layers} | {r['checkpoint_gb']:.2f} | {r['peak_rss_gib']:.2f} | {r['seconds']:.0f} | {r['seconds_per_layer']:.1f}"
            f" | {r['io_seconds_per_layer']:.2f} | {r['flops_seconds_per_layer']:.2f} | {r['ratio_to_bound']:.1f} |"
        )
    lines += [
        "",
        f"Peak RSS ratio {DEPTH_LAYERS[1]} / {DEPTH_LAYERS[0]} layers: **{depth['rss_ratio']:.2f}** (target <= 1.2).",
    ]
    if "headline" in results:
        h = results["headline"]
        lines += [
            "",
            "## Headline: a checkpoint larger than RAM",
            "",
            f"Qwen1.5-MoE-A2.7B shape, {h['layers']} layers, bfloat16, **{h['checkpoint_gb']:.1f} GB** on disk, on a machine "
            f"with {h['ram_gib']:.1f} GiB of RAM and 2 CPU cores: reduced from 60 to 30 experts per layer "
            f"on {h['calibration_tokens']:,} calibration tokens in **{h['seconds'] / 60:.1f} min** "
            f"({h['seconds_per_layer']:.0f} s per layer), peak RSS **{h['peak_rss_gib']:.2f} GiB**, output "
            f"{h['output_gb']:.1f} GB. (Writing the synthetic checkpoint took {h['checkpoint_write_seconds'] / 60:.1f} min.)",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/moemerge-speed"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "speed")
    parser.add_argument("--skip-headline", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": machine(),
        "throughput": [
            statistics_throughput(shape, stored, dtype)
            for shape in ("qwen1.5-moe-a2.7b", "mixtral-8x7b")
            for stored, dtype in (
                (torch.bfloat16, torch.bfloat16),
                (torch.bfloat16, torch.float32),
                (torch.float32, torch.float32),
            )
        ],
    }
    print(json.dumps(results["throughput"], indent=1), flush=True)
    fp32 = next(r for r in results["throughput"] if r["shape"] == "qwen1.5-moe-a2.7b" and r["stored"] == "float32")
    results["depth"] = depth_runs(args.work, fp32["dense_gflops_float32"], disk_rates(args.work))
    print(json.dumps(results["depth"], indent=1), flush=True)
    if not args.skip_headline:
        results["headline"] = headline(args.work)
        print(json.dumps(results["headline"], indent=1), flush=True)
    write_results(args.out, "results", results, markdown(results))
    print(f"wrote {args.out}/results.md")


if __name__ == "__main__":
    main()
