"""``reduce --stream`` where a process of its own is the point: peak memory against model depth, and torchrun
with 2 processes against a plain run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import pickle_copy, save_tiny
from test_streaming import all_files

from moemerge.cli import main

# One process imports moemerge once, then forks a child per run, so that every child starts from the same
# imported state (as a fresh process would) without paying the import each time. Each child reports its own
# VmHWM (peak RSS since its fork); getrusage would not do: Linux carries ru_maxrss over fork. argv: JSON list of
# CLI argument lists; prints a JSON list of peaks in KiB.
PEAK_RSS = """
import json, os, re, sys
from moemerge.cli import main

peaks = []
for argv in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99  # the child never returns into this loop, whatever main does
        try:
            os.close(read)
            code = main(argv)
            peak = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)
            os.write(write, peak.encode())
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        peak = f.read()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, argv
    peaks.append(int(peak))
print(json.dumps(peaks))
"""


def peak_rss_kib(runs: list[list]) -> list[int]:
    runs = [[str(a) for a in argv] for argv in runs]
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, json.dumps(runs)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.splitlines()[-1])


COMMANDS = ("reduce", "plan", "apply", "inspect", "eval", "compare")


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """Peak RSS of `reduce`, `plan`, `apply`, `inspect`, `eval` (of the reduce output, against the source) and
    `compare` of an 8-layer model is within 1.2x of the 2-layer one
    (same layer shape, 25 MB of experts per layer). Control: `reduce` of the same weights as pickle, which it
    loads whole, exceeds 1.2x on the same pair, so the bound is not trivially met."""
    shape = dict(hidden_size=128, intermediate_size=1024, num_experts=16)
    runs, keys = [], []
    for layers in (2, 8):
        source = save_tiny("mixtral", tmp_path / f"src{layers}", num_hidden_layers=layers, **shape)
        pickled = pickle_copy(source, tmp_path / f"pickle{layers}")
        options = ["--experts", "8", "--calib-samples", "2", "--calib-seq-len", "32", "--quiet"]
        evaluation = ["--max-tokens", "128", "--seq-len", "64", "--quiet"]
        recipe = tmp_path / f"plan{layers}.json"
        runs += [
            ["reduce", source, *options, "--no-report", "--out", tmp_path / f"out{layers}"],
            ["plan", source, *options, "--out", recipe],
            ["apply", recipe, source, "--quiet", "--no-report", "--out", tmp_path / f"apply{layers}"],
            ["inspect", source, *options[2:], "--out", tmp_path / f"inspect{layers}"],
            ["eval", tmp_path / f"out{layers}", "--reference", source, *evaluation, "--no-cost"],
            [
                "compare",
                source,
                "--methods",
                "hc-smoe",
                "--experts",
                "8",
                *options[2:],
                *evaluation,
                "--out",
                tmp_path / f"compare{layers}",
            ],
            ["reduce", pickled, *options, "--no-report", "--allow-pickle", "--out", tmp_path / f"whole{layers}"],
        ]
        keys += [(command, layers) for command in (*COMMANDS, "whole")]
    peaks = dict(zip(keys, peak_rss_kib(runs), strict=True))
    for command in COMMANDS:
        assert peaks[command, 8] <= 1.2 * peaks[command, 2], (command, peaks)
    assert peaks["whole", 8] > 1.2 * peaks["whole", 2], peaks


# torchrun runs this script in each of its processes: moemerge's CLI once per argument list (argv: JSON), so that
# one launch (3 interpreters importing torch and transformers) covers several runs.
RUNS = """
import json, sys
from moemerge.cli import main

for argv in json.loads(sys.argv[1]):
    assert main(argv) == 0, argv
"""


def test_torchrun_two_processes_equal_one(tmp_path):
    """torchrun with 2 gloo processes (each a block of the 5 calibration sequences) writes byte-identical files to
    a plain run in this process, which has the same threads per process (one, as torchrun's OMP_NUM_THREADS=1);
    in memory and with --stream."""
    assert torch.get_num_threads() == 1
    source = save_tiny("qwen2_moe", tmp_path / "src")
    argv = ["reduce", str(source), "--experts", "4", "--calib-samples", "5", "--calib-seq-len", "24", "--quiet"]
    argv += ["--router-rows", "lse", "--merge", "fix-dom", "--no-report"]
    runs = {"memory": argv, "stream": [*argv, "--stream"]}
    for name, run in runs.items():
        assert main([*run, "--out", str(tmp_path / f"{name}-one")]) == 0
    script = tmp_path / "runs.py"
    script.write_text(RUNS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    two = [[*run, "--out", str(tmp_path / f"{name}-two")] for name, run in runs.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, json.dumps(two)], check=True, env=env, capture_output=True)
    for name in runs:
        assert all_files(tmp_path / f"{name}-one") == all_files(tmp_path / f"{name}-two"), name
    expected = ["memory-one", "memory-two", "runs.py", "src", "stream-one", "stream-two"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
