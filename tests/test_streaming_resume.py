"""``reduce --stream --resume``: after a crash at every write and after a real kill -9, the resumed output equals
an uninterrupted run's byte for byte; bad combinations and resume mistakes are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import run_cli, save_tiny
from test_streaming import SMALL, all_files

from moemerge.cli import main
from moemerge.streaming import driver, reduce_streaming
from moemerge.streaming import state as streaming_state


class Crash(Exception):
    """Stands for the process dying at a write."""


def crash_at(monkeypatch, k: int) -> list[int]:
    """Make the k-th file write of a streamed run (shards, state files, hidden states) raise Crash."""
    calls = [0]

    def counting(real):
        def write(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                raise Crash
            return real(*args, **kwargs)

        return write

    for module in (driver, streaming_state):
        monkeypatch.setattr(module, "save_file", counting(module.save_file))
    monkeypatch.setattr(streaming_state, "write_json", counting(streaming_state.write_json))
    return calls


def test_resume_after_a_crash_at_every_write_is_byte_identical(tmp_path, monkeypatch):
    """Crash at the 1st, 2nd, ... file write of a streamed run, then --resume (again and again until it finishes):
    every file of the output, report included, equals an uninterrupted run's (MoNE, layer-sequential: a grouped
    router sidecar with novices, and hidden states carried through the reduced layers)."""
    source = save_tiny("qwen2_moe", tmp_path / "src")
    options = {**SMALL, "method": "mone", "router": "grouped", "sequential": True, "calib_samples": 2}
    clean = reduce_streaming(source, tmp_path / "clean", **options)
    crash_at_every_write_then_resume(tmp_path, monkeypatch, source, options, all_files(tmp_path / "clean"), clean)


def crash_at_every_write_then_resume(tmp_path, monkeypatch, source, options: dict, expected: dict, result) -> None:
    """For k = 1, 2, ... up to the run's number of file writes: crash a streamed run at its k-th write (no output
    appears), then --resume it; its files must equal ``expected`` and its groups and parameter count ``result``'s."""
    with monkeypatch.context() as m:
        writes = crash_at(m, 0)
        reduce_streaming(source, tmp_path / "count", **options)
    for k in range(1, writes[0] + 1):
        out = tmp_path / f"crash{k}"
        with monkeypatch.context() as m:
            crash_at(m, k)
            with pytest.raises(Crash):
                reduce_streaming(source, out, **options)
        assert not out.exists()
        resumed = reduce_streaming(source, out, resume=True, **options)
        assert all_files(out) == expected, f"crash at write {k}"
        assert (resumed.groups, resumed.params_after) == (result.groups, result.params_after), f"crash at write {k}"


# The kill -9 test's helper process: it imports moemerge once, then for each kill point forks a child that runs
# moemerge's CLI with one write function of the streamed run wrapped so that the child SIGKILLs itself right after
# that function's N-th call returns; it prints each child's exit code (argv: JSON [[out, module, function, N], ...],
# then the CLI arguments without --out). Forking from a process that has only imported (no torch work yet) saves
# the import in every child.
KILL_AFTER_NTH_WRITE = """
import json, os, signal, sys
from moemerge.cli import main
from moemerge.streaming import driver, state as streaming_state

def child(out, module, name, n):
    module = {"reduce": driver, "state": streaming_state}[module]
    real, calls = getattr(module, name), [0]
    def write_then_die(*args, **kwargs):
        result = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(module, name, write_then_die)
    return main([*sys.argv[2:], "--out", out])

codes = {}
for out, module, name, n in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        try:
            code = child(out, module, name, n)
        except BaseException:
            code = 99
        os._exit(code if isinstance(code, int) else 98)
    codes[out] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(codes))
"""
# (module, function, N): the write after which the child dies, in a 3-layer run (4 shards); per layer the order is
# layer stats (state.save_file), its shard (reduce.save_file), next hidden states (state.save_file, to .tmp then
# renamed), state.json (state.write_json); the finish writes the 4th shard, then config, moemerge.json and publishes.
# Then: (next_layer recorded, shards written, files that must be in .moemerge-state/).
KILL_POINTS = {
    "after-first-state": (("state", "write_json", 1), (0, 0, [])),  # state.json of a new run, nothing done yet
    "after-shard-before-advance": (("reduce", "save_file", 2), (1, 2, [])),  # layer 1's shard, layer 1 not recorded
    "after-hidden-tmp-before-rename": (("state", "save_file", 4), (1, 2, ["hidden-2.rank0.tmp"])),
    "after-advance": (("state", "write_json", 3), (2, 2, ["hidden-1.rank0.safetensors", "hidden-2.rank0.safetensors"])),
    "after-last-shard-before-publish": (("reduce", "save_file", 4), (3, 4, [])),  # layers done, output incomplete
}


def test_resume_after_kill_9_is_byte_identical(tmp_path):
    """A real SIGKILL of the CLI at chosen points of a streamed run (the process kills itself right after a given
    write, so no timing is involved), then --resume in this process: every file equals an uninterrupted run's. Each
    killed process must have died by the signal, left no output, and left the partial run in the state that point
    implies."""
    source = save_tiny("mixtral", tmp_path / "src", num_hidden_layers=3)
    calib = tmp_path / "calib.jsonl"  # token ids as given: nothing to tokenize
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 4096, (24,), generator=g).tolist() for _ in range(3)]
    calib.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in rows))
    argv = ["reduce", source, "--experts", "4", "--calib", calib, "--calib-samples", "3", "--calib-seq-len", "24"]
    argv = [str(a) for a in [*argv, "--stream", "--quiet", "--no-report"]]  # resumed reports: the test above
    assert main([*argv, "--out", str(tmp_path / "clean")]) == 0
    expected = all_files(tmp_path / "clean")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the tests' own process (the bits depend on the thread count)
    points = [[str(tmp_path / point), *write] for point, (write, _) in KILL_POINTS.items()]
    done = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_NTH_WRITE, json.dumps(points), *argv],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    for point, (_, (next_layer, shards, files)) in KILL_POINTS.items():
        out = tmp_path / point
        assert codes[str(out)] == -signal.SIGKILL, (point, codes, done.stderr[-2000:])
        assert not out.exists(), point
        partial = tmp_path / f".{point}.moemerge-partial"
        state = json.loads((partial / ".moemerge-state" / "state.json").read_text())
        assert state["next_layer"] == next_layer, point
        assert len(list(partial.glob("model-*.safetensors"))) == shards, point
        assert all((partial / ".moemerge-state" / name).is_file() for name in files), point
        assert not (partial / "moemerge.json").exists(), point
        assert main([*argv, "--out", str(out), "--resume"]) == 0, point
        assert all_files(out) == expected, point
        assert not partial.exists(), point


def test_stream_errors_are_one_line(tmp_path, capfd, monkeypatch):
    """Bad combinations and resume mistakes: exit 2, one line naming the problem and the fix, nothing written."""
    source = save_tiny("mixtral", tmp_path / "src")
    base = ["reduce", source, "--experts", "4", "--calib-samples", "2", "--calib-seq-len", "16", "--quiet"]
    out = tmp_path / "out"
    cases = [
        ([*base, "--out", out, "--sequential", "--budget", "frequency"], "use --budget uniform or drop --sequential"),
    ]
    for argv, needle in cases:
        code, _, err = run_cli(argv, capfd)
        assert code == 2 and err.count("\n") == 1 and needle in err, (argv, err)
    with monkeypatch.context() as m:
        crash_at(m, 3)
        with pytest.raises(Crash):
            reduce_streaming(source, out, **SMALL)
    code, _, err = run_cli([*base, "--out", out, "--stream"], capfd)
    assert code == 2 and "pass --resume" in err and err.count("\n") == 1
    code, _, err = run_cli([*base, "--out", out, "--stream", "--resume", "--linkage", "single"], capfd)
    assert code == 2 and "used other options" in err and err.count("\n") == 1
    assert not out.exists()
    code, _, _ = run_cli([*base, "--out", out, "--stream", "--force"], capfd)
    assert code == 0 and out.is_dir()


def test_budget_two_passes_equal_the_whole_model_and_resume_after_a_crash_at_every_write(tmp_path, monkeypatch):
    """--budget frequency layer by layer (statistics pass, then merging pass): every file equals the whole-model
    reduction's (reduce_in_memory, the oracle) with per-layer counts that differ and a layer that keeps all its
    experts; a crash at the 1st, 2nd, ... write of either pass, then --resume, gives the same files."""
    from test_budgets import SAMPLES, SEQ_LEN, calibration_rows

    from moemerge.pipeline import reduce_in_memory

    source = save_tiny("qwen2_moe", tmp_path / "src", tokenizer=False)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in calibration_rows()), encoding="utf-8")
    options = dict(experts=7, budget="frequency", calib=str(calib), calib_samples=SAMPLES, calib_seq_len=SEQ_LEN)
    options |= dict(progress=False, report=False)
    memory = reduce_in_memory(source, tmp_path / "memory", **options)
    counts = {layer: len(groups) for layer, groups in memory.groups.items()}
    assert len(set(counts.values())) > 1 and 8 in counts.values(), counts
    reduce_streaming(source, tmp_path / "clean", **options)
    expected = all_files(tmp_path / "memory")
    assert all_files(tmp_path / "clean") == expected
    crash_at_every_write_then_resume(tmp_path, monkeypatch, source, options, expected, memory)
