"""``reduce --stream``: the layer-by-layer path against the in-memory one (the oracle), ``--sequential`` against
an in-memory re-implementation, resume after crashes at every write and after kill -9, memory independent of
depth, and torchrun with 2 processes against 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, save_tiny
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moemerge
from moemerge.adapters import family_for
from moemerge.calibration import load_calibration
from moemerge.cli import main
from moemerge.pipeline import merge_layer, plan_groups
from moemerge.statistics import collect_statistics
from moemerge.streaming import reduce as streaming_reduce
from moemerge.streaming import reduce_streaming
from moemerge.streaming import state as streaming_state

SMALL = dict(experts=4, calib_samples=3, calib_seq_len=24, progress=False)
PROMPT = torch.tensor([[11, 402, 97, 1500, 33, 7, 2048, 64, 5, 300]])


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("model*.safetensors")):
        tensors |= load_file(file)
    return tensors


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_model(a: Path, b: Path) -> None:
    """Same tensors (names, dtypes, bits), same config.json and moemerge.json text, same report files."""
    ta, tb = model_tensors(a), model_tensors(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    for name in ("config.json", "moemerge.json", "generation_config.json"):
        assert (a / name).read_text() == (b / name).read_text(), name
    assert all_files(a / "report") == all_files(b / "report")


CASES = [
    ("mixtral", {}),
    ("qwen2_moe", {}),
    ("qwen3_moe", {"method": "mc-smoe"}),
    ("olmoe", {"router": "grouped"}),
    ("deepseek_v3", {}),
    ("mixtral", {"cluster": "fcm"}),
    ("qwen2_moe", {"merge": "zipit", "align": True}),
    ("olmoe", {"method": "o-prune", "oprune_budget": 50}),
]


@pytest.mark.parametrize(
    "family,options", CASES, ids=[f"{f}-{'-'.join(map(str, o.values())) or 'hc'}" for f, o in CASES]
)
def test_streaming_equals_in_memory(tmp_path, family, options):
    """The in-memory reduce is the oracle: the streamed output holds the same tensors bit for bit, the same config
    and moemerge.json, the same counts; it loads with vanilla transformers (or load_model for grouped) to the
    same logits; and no partial folder is left."""
    check_streaming_equals_in_memory(tmp_path, save_tiny(family, tmp_path / "src"), options)


def test_streaming_equals_in_memory_with_tied_embeddings(tmp_path):
    """The same with an output head tied to the input embeddings (the benchmark models'): not written twice."""
    source = save_tiny("olmoe", tmp_path / "src", tie_word_embeddings=True)
    check_streaming_equals_in_memory(tmp_path, source, {})
    assert "lm_head.weight" not in model_tensors(tmp_path / "stream")


def check_streaming_equals_in_memory(tmp_path: Path, source: Path, options: dict) -> None:
    memory = moemerge.reduce(source, tmp_path / "memory", **SMALL, **options)
    streamed = reduce_streaming(source, tmp_path / "stream", **SMALL, **options)
    assert_same_model(tmp_path / "memory", tmp_path / "stream")
    assert streamed.groups == memory.groups
    for field in ("num_experts", "experts", "params_before", "params_after", "stored_params", "calibration_tokens"):
        assert getattr(streamed, field) == getattr(memory, field), field
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    assert files == [f"model-{i:05d}-of-{layers + 1:05d}.safetensors" for i in range(1, layers + 2)]
    tensors = model_tensors(tmp_path / "stream")
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    with torch.no_grad():
        a = moemerge.load_model(tmp_path / "memory")(PROMPT).logits
        b = moemerge.load_model(tmp_path / "stream")(PROMPT).logits
    assert torch.equal(a, b)
    if options.get("router") != "grouped":
        AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "src", "stream"]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_sequential_matches_reducing_layer_after_layer_in_memory(tmp_path, family):
    """Oracle for --sequential: in memory, reduce the MoE layers one at a time, each from statistics collected on
    the model whose earlier layers are already reduced. Bit-identical weights; and it differs from the default
    (statistics of the original model), so the option does something."""
    source = save_tiny(family, tmp_path / "src")
    streamed = reduce_streaming(source, tmp_path / "seq", sequential=True, **SMALL)
    reduce_streaming(source, tmp_path / "orig", **SMALL)

    model = AutoModelForCausalLM.from_pretrained(source).eval()
    fam = family_for(json.loads((source / "config.json").read_text()))
    calibration = load_calibration(None, moemerge_tokenizer(source), SMALL["calib_samples"], SMALL["calib_seq_len"])
    for view in fam.moe_layers(model):
        stats = collect_statistics(model, [view], calibration.sequences, progress=False, router_sample=8192)
        groups = plan_groups(stats, fam, model.config, SMALL["experts"])
        merge_layer(view, groups[view.layer], stats[view.layer], router_rows_rule="lse")
        assert groups[view.layer] == streamed.groups[view.layer]
    fam.set_num_experts(model, SMALL["experts"])
    model.save_pretrained(tmp_path / "oracle")
    expected, got = model_tensors(tmp_path / "oracle"), model_tensors(tmp_path / "seq")
    assert set(expected) == set(got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    original = model_tensors(tmp_path / "orig")
    assert any(not torch.equal(original[k], got[k]) for k in got)


def moemerge_tokenizer(source: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


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

    for module in (streaming_reduce, streaming_state):
        monkeypatch.setattr(module, "save_file", counting(module.save_file))
    monkeypatch.setattr(streaming_state, "write_json", counting(streaming_state.write_json))
    return calls


def test_resume_after_a_crash_at_every_write_is_byte_identical(tmp_path, monkeypatch):
    """Crash at the 1st, 2nd, ... file write of a streamed run, then --resume (again and again until it finishes):
    every file of the output, report included, equals an uninterrupted run's."""
    source = save_tiny("qwen2_moe", tmp_path / "src")
    options = {**SMALL, "router": "grouped", "calib_samples": 2}
    reduce_streaming(source, tmp_path / "clean", **options)
    expected = all_files(tmp_path / "clean")
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
        reduce_streaming(source, out, resume=True, **options)
        assert all_files(out) == expected, f"crash at write {k}"


# The kill -9 test's helper process: it imports moemerge once, then for each kill point forks a child that runs
# moemerge's CLI with one write function of the streamed run wrapped so that the child SIGKILLs itself right after
# that function's N-th call returns; it prints each child's exit code (argv: JSON [[out, module, function, N], ...],
# then the CLI arguments without --out). Forking from a process that has only imported (no torch work yet) saves
# the import in every child.
KILL_AFTER_NTH_WRITE = """
import json, os, signal, sys
from moemerge.cli import main
from moemerge.streaming import reduce as streaming_reduce, state as streaming_state

def child(out, module, name, n):
    module = {"reduce": streaming_reduce, "state": streaming_state}[module]
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
    argv = [str(a) for a in [*argv, "--stream", "--quiet"]]
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
        ([*base, "--out", out, "--sequential"], "add --stream"),
        ([*base, "--out", out, "--resume"], "add --stream"),
        ([*base, "--out", out, "--stream", "--budget", "frequency"], "--budget uniform"),
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


# VmHWM, not getrusage: Linux carries ru_maxrss over fork and exec, so a child of the big test process would
# report the parent's size
PEAK_RSS = """
import re, sys
from moemerge.cli import main
code = main(sys.argv[1:])
print(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
sys.exit(code)
"""


def peak_rss_kib(argv: list) -> int:
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *map(str, argv)], capture_output=True, text=True, check=True
    )
    return int(result.stdout.split()[-1])


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """Peak RSS of a streamed 16-layer model is within 1.2x of the 4-layer one (same layer shape, 25 MB of experts
    per layer). Control: the in-memory path on the same pair exceeds 1.2x, so the bound is not trivially met."""
    shape = dict(hidden_size=128, intermediate_size=1024, num_experts=16)
    peaks = {}
    for layers in (4, 16):
        source = save_tiny("mixtral", tmp_path / f"src{layers}", num_hidden_layers=layers, **shape)
        argv = ["reduce", source, "--experts", "8", "--calib-samples", "2", "--calib-seq-len", "32", "--quiet"]
        argv += ["--no-report"]
        peaks["stream", layers] = peak_rss_kib([*argv, "--stream", "--out", tmp_path / f"s{layers}"])
        peaks["memory", layers] = peak_rss_kib([*argv, "--out", tmp_path / f"m{layers}"])
    assert peaks["stream", 16] <= 1.2 * peaks["stream", 4], peaks
    assert peaks["memory", 16] > 1.2 * peaks["memory", 4], peaks


def torchrun(nproc: int, argv: list) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    subprocess.run([*command, "-m", "moemerge", *map(str, argv)], check=True, env=env, capture_output=True)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "in-memory"])
def test_torchrun_two_processes_equal_one(tmp_path, stream):
    """torchrun with 2 gloo processes (each a block of the 5 calibration sequences) writes byte-identical files to
    a 1-process run with the same threads per process (torchrun sets OMP_NUM_THREADS=1)."""
    source = save_tiny("qwen2_moe", tmp_path / "src")
    argv = ["reduce", source, "--experts", "4", "--calib-samples", "5", "--calib-seq-len", "24", "--quiet"]
    argv += ["--router-rows", "lse", "--merge", "fix-dom"] + (["--stream"] if stream else [])
    torchrun(1, [*argv, "--out", tmp_path / "one"])
    torchrun(2, [*argv, "--out", tmp_path / "two"])
    assert all_files(tmp_path / "one") == all_files(tmp_path / "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "src", "two"]
