"""What each method costs: wall time and peak memory of one ``moemerge reduce`` per method, each in a process of
its own, on the quality benchmark's calibration (256 x 256 general tokens) at 50 % of the experts removed.

Usage: ``python benchmarks/quality/cost.py [--models NAME ...] [--out DIR]`` (default: every benchmark model,
``benchmarks/results/quality``; writes ``cost.md`` and ``cost.csv``). Peak memory is the child's own maximum
resident set size (``os.wait4``), so each number is that run's alone; the runs are sequential, under the same
load, and the CPU model is recorded beside them. The time includes loading the model, calibration, the method,
writing the checkpoint and the process start (about 3 s of imports).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoConfig

from moemerge.adapters import family_for

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "benchmarks" / "models"
CALIB = ["--calib", str(REPO / "benchmarks" / "data" / "calib_general.jsonl.gz")]
CALIB += ["--calib-samples", "256", "--calib-seq-len", "256"]
VARIANTS = {  # label: reduce options
    "hc-smoe": [],
    "hc-smoe --refit down": ["--refit", "down"],
    "hc-smoe --router grouped": ["--router", "grouped"],
    "hc-smoe --sequential": ["--sequential"],
    "hc-smoe --budget search": ["--budget", "search"],
    "sub-moe": ["--method", "sub-moe"],
    "m-smoe": ["--method", "m-smoe"],
    "mc-smoe": ["--method", "mc-smoe"],
    "reap": ["--method", "reap"],
    "man": ["--method", "man"],
    "o-prune --oprune-budget 2000": ["--method", "o-prune", "--oprune-budget", "2000"],  # the quality benchmark's
    "mone --router grouped": ["--method", "mone", "--router", "grouped"],
    "ream": ["--method", "ream"],
}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def expert_count(folder: Path) -> int:
    """The routed experts per MoE layer of the model in ``folder``, from the config field its family reads."""
    family = family_for(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    return family.num_experts(AutoConfig.from_pretrained(folder))


def run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of ``moemerge`` run with ``args`` in a child process."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "moemerge", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"moemerge {' '.join(args)} failed with exit code {child.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="names under benchmarks/models (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quality")
    args = parser.parse_args()
    models = args.models or sorted(p.parent.name for p in MODELS.glob("*/card.json"))
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for name in models:
            n = expert_count(MODELS / name)
            for label, options in VARIANTS.items():
                out = Path(work) / f"{name}-{len(rows)}"
                reduce = ["reduce", str(MODELS / name), "--experts", str(n // 2), "--out", str(out), *CALIB]
                seconds, mib = run([*reduce, *options, "--quiet", "--no-report"])
                rows.append({"model": name, "variant": label, "experts": n // 2, "seconds": seconds, "peak_mib": mib})
                print(f"{name} {label}: {seconds:.1f} s, {mib:.0f} MiB", flush=True)
                write(rows, args.out)  # after each run, so that an interrupted benchmark keeps what it measured


def write(rows: list[dict], out: Path) -> None:
    """``cost.csv`` and ``cost.md`` of the rows measured so far."""
    with open(out / "cost.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# What each method costs",
        "",
        f"`python benchmarks/quality/cost.py` on {cpu_model()} ({os.cpu_count()} cores). One `moemerge reduce` per "
        "row in a process of its own, 50 % of the experts removed, 256 x 256 general calibration tokens, the "
        "checkpoints' own dtype: wall time (load, calibration, method, write) and the process's peak resident "
        "memory.",
        "",
        "| model | variant | experts | seconds | peak MiB |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['variant']} | {r['experts']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} |" for r in rows
    ]
    (out / "cost.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
