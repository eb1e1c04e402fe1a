"""Where outputs go and what may happen to what is there: nothing of the user's is replaced without --force or
ever deleted (the model, the current, home and root directories), outputs appear whole or not at all (disk
full, a concurrent run, SIGINT / SIGTERM / SIGHUP, SIGKILL leftovers), copied files leak nothing from outside
the model folder, modes are usable, and a damaged resumable run is one error line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import pickle_copy, run_cli, save_tiny
from safetensors import SafetensorError

from moemerge import output_files, pipeline
from moemerge.checkpoint import writer
from moemerge.streaming import calibrate, driver
from moemerge.streaming.state import RunState

SMALL = ["--calib-samples", "2", "--calib-seq-len", "16", "--quiet"]
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 40
HOST = output_files._HOST


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A tiny Mixtral checkpoint with the demo tokenizer, in a folder of its own."""
    return save_tiny("mixtral", tmp_path_factory.mktemp("models") / "mixtral")


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pickled(tmp_path_factory, src) -> Path:
    """``src`` with pickle weights, which reduce loads whole (the whole-model writer; safetensors stream)."""
    return pickle_copy(src, tmp_path_factory.mktemp("pickled") / "mixtral")


def writing_run(command: str, src: Path, calib: Path, pickled: Path) -> list:
    """The arguments (without --out) of a reduce that writes a 4-expert model: layer by layer ("reduce"), or from
    the whole model in memory ("pickle")."""
    model, extra = (src, []) if command == "reduce" else (pickled, ["--allow-pickle"])
    return ["reduce", model, "--experts", "4", "--calib", calib, "--no-report", *SMALL, *extra]


def is_partial(path) -> bool:
    """A folder where either writer builds its output (a temporary, or the streamed run's resumable one)."""
    return ".partial-" in Path(path).name or Path(path).name.endswith(".moemerge-partial")


WRITERS = ["reduce", "pickle"]


@pytest.fixture
def no_work(monkeypatch):
    """Any calibration (the first step of real work in every command) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the output path was refused")

    for module in ("moemerge.pipeline", "moemerge.compare", "moemerge.report.inspection"):
        monkeypatch.setattr(f"{module}.load_calibration", refuse)
    monkeypatch.setattr("moemerge.evaluation.evaluate", refuse)


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root``: file bytes, link targets, ``dir``; symlinks are not followed."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = ("link", os.readlink(path))
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = path.read_bytes()
    return found


def one_error(code: int, err: str, *needles: str) -> str:
    """Exit 2 and exactly one stderr line ``error: ...`` holding every needle; returns the line."""
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


# ------------------------------------------------------------------ paths that must stay


DIR_COMMANDS = {
    "reduce": lambda model, recipe: ["reduce", model, "--experts", "4", *SMALL],
    "stream": lambda model, recipe: ["reduce", model, "--experts", "4", "--stream", *SMALL],
    "apply": lambda model, recipe: ["apply", recipe, model, "--quiet"],
    "inspect": lambda model, recipe: ["inspect", model, *SMALL],
    "compare": lambda model, recipe: ["compare", model, "--methods", "f-prune", "--experts", "4", *SMALL],
}


TARGETS = {
    "parent-of-model": "which this run reads",
    "model": "which this run reads",
    "inside-model": "which this run reads",
    "recipe-folder": "which this run reads",
    "empty": "--out is empty",
    "cwd": "the current directory",
    "parent-of-cwd": "contains the current directory",
    "home": "your home directory",
    "root": "the filesystem root",
}


@pytest.mark.parametrize(
    "command,target",
    [(c, t) for c in sorted(DIR_COMMANDS) for t in TARGETS if t != "recipe-folder" or c == "apply"],
)
def test_out_never_replaces_inputs_or_special_folders(tmp_path, capfd, monkeypatch, src, no_work, command, target):
    """Even with --force, an --out that is, holds or lies inside the model (or the recipe), or that is or holds
    the current, home or root directory, or is empty, is one error line before any work, and nothing changes."""
    model = shutil.copytree(src, tmp_path / "models" / "mixtral")
    recipe = tmp_path / "recipes" / "recipe.json"
    recipe.parent.mkdir()
    recipe.write_text("{}", encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    out = {
        "parent-of-model": model.parent,
        "model": model,
        "inside-model": model / "reduced",
        "recipe-folder": recipe.parent,
        "empty": "",
        "cwd": ".",
        "parent-of-cwd": "..",
        "home": tmp_path / "home",
        "root": "/",
    }[target]
    before = snapshot(tmp_path)
    code, _, err = run_cli([*DIR_COMMANDS[command](model, recipe), "--out", out, "--force"], capfd)
    one_error(code, err, TARGETS[target])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "command,target",
    [
        ("plan", "model/recipe.json"),
        ("plan", ""),
        ("eval", "model/config.json"),
        ("eval", "calib"),
        ("eval", ""),
    ],
)
def test_file_out_never_replaces_inputs(tmp_path, capfd, src, no_work, command, target):
    """plan's recipe and eval's results file: not an input file, not inside the model, not empty (even with
    --force); one error line before any work, nothing changed."""
    model = shutil.copytree(src, tmp_path / "model")
    text = tmp_path / "calib.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = {"model/recipe.json": model / "recipe.json", "model/config.json": model / "config.json"}.get(target)
    out = text if target == "calib" else "" if target == "" else out
    argv = {
        "plan": ["plan", model, "--experts", "4", "--calib", text, *SMALL],
        "eval": ["eval", model, "--data", text, "--no-cost", "--quiet"],
    }[command]
    before = snapshot(tmp_path)
    code, _, err = run_cli([*argv, "--out", out, "--force"], capfd)
    one_error(code, err, "--out")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("file", [False, True], ids=["reduce", "eval"])
@pytest.mark.parametrize(
    "case", ["under-a-file", "under-proc", "dangling-symlink", "symlink-to-dir", "dangling-parent", "too-long"]
)
def test_unwritable_out_is_refused_before_work(tmp_path, capfd, src, no_work, case, file):
    """An --out that cannot be created (under a regular file, in /proc, under a dangling symlink, a name too long)
    or that is a symlink (dangling, or to a folder with --force) is one error line before any work; the link
    and its target stay as they were."""
    (tmp_path / "a-file").write_text("keep", encoding="utf-8")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("keep", encoding="utf-8")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "dir-link").symlink_to(tmp_path / "target")
    out = {
        "under-a-file": tmp_path / "a-file" / "out",
        "under-proc": Path("/proc/moemerge-test/out"),
        "dangling-symlink": tmp_path / "dangling",
        "symlink-to-dir": tmp_path / "dir-link",
        "dangling-parent": tmp_path / "dangling" / "out",
        "too-long": tmp_path / ("x" * 240),
    }[case]
    if file:
        argv = ["eval", src, "--no-cost", "--quiet", "--out", out, "--force"]
    else:
        argv = ["reduce", src, "--experts", "4", *SMALL, "--out", out, "--force"]
    before = snapshot(tmp_path)
    code, _, err = run_cli(argv, capfd)
    one_error(code, err, str(out))
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ replacing, and outputs that appear meanwhile


@pytest.mark.parametrize("command", WRITERS)
def test_output_appearing_during_a_run_is_kept_without_force(
    tmp_path, capfd, src, calib, pickled, monkeypatch, command
):
    """A second run's output that appears while this one works (the existence check at the start passed) is left
    whole without --force: one error line, this run's unfinished output removed. With --force it is replaced, and
    nothing unfinished (nor the old output moved aside) remains."""
    out = tmp_path / "out"
    real = os.rename

    def other_run_finishes_first(a, b):
        if is_partial(a) and Path(b) == out.resolve() and not out.exists():
            out.mkdir()
            (out / "keep.txt").write_text("the other run's", encoding="utf-8")
        real(a, b)

    monkeypatch.setattr(output_files.os, "rename", other_run_finishes_first)
    argv = [*writing_run(command, src, calib, pickled), "--out", out]
    code, _, err = run_cli(argv, capfd)
    one_error(code, err, "appeared", "--force")
    assert snapshot(out) == {"keep.txt": b"the other run's"}
    assert not [p for p in tmp_path.iterdir() if is_partial(p)]

    monkeypatch.setattr(output_files.os, "rename", real)
    code, _, err = run_cli([*argv, "--force"], capfd)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and json.loads((out / "config.json").read_text())["num_local_experts"] == 4
    assert not [p for p in tmp_path.iterdir() if is_partial(p)]


@pytest.mark.parametrize("command", WRITERS)
def test_force_keeps_the_old_output_when_the_final_rename_fails(
    tmp_path, capfd, src, calib, pickled, monkeypatch, command
):
    """With --force the old output is moved aside, not deleted, until the new one is in place: a failure of the
    final rename puts it back, whole."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old", encoding="utf-8")
    real = os.rename

    def rename(a, b):
        if is_partial(a) and Path(b) == out.resolve() and (Path(a) / "config.json").exists():
            raise OSError(errno.EIO, "Input/output error", str(b))
        real(a, b)

    monkeypatch.setattr(output_files.os, "rename", rename)
    argv = [*writing_run(command, src, calib, pickled), "--out", out, "--force"]
    code, _, err = run_cli(argv, capfd)
    one_error(code, err, "Input/output error")
    assert snapshot(out) == {"keep.txt": b"old"}
    assert temporaries(tmp_path) == []


def test_eval_out_needs_force(tmp_path, capfd, src, monkeypatch):
    """eval --out: an existing file is refused before any work without --force and replaced with it; a file
    that appears while eval works is kept without --force."""
    results = tmp_path / "results.json"
    results.write_text("old", encoding="utf-8")
    calls = []

    def evaluate(model, **kwargs):
        calls.append(model)
        return {"perplexity": 1.0}

    monkeypatch.setattr("moemerge.evaluation.evaluate", evaluate)
    argv = ["eval", src, "--no-cost", "--quiet", "--json", "--out", results]
    code, _, err = run_cli(argv, capfd)
    one_error(code, err, "already exists", "--force")
    assert results.read_text(encoding="utf-8") == "old" and calls == []
    code, _, err = run_cli([*argv, "--force"], capfd)
    assert code == 0, err
    assert json.loads(results.read_text(encoding="utf-8")) == {"perplexity": 1.0}

    fresh = tmp_path / "fresh.json"

    def evaluate_while_another_writes(model, **kwargs):
        fresh.write_text("the other run's", encoding="utf-8")
        return {"perplexity": 1.0}

    monkeypatch.setattr("moemerge.evaluation.evaluate", evaluate_while_another_writes)
    code, _, err = run_cli(["eval", src, "--no-cost", "--quiet", "--out", fresh], capfd)
    one_error(code, err, "appeared")
    assert fresh.read_text(encoding="utf-8") == "the other run's"
    assert temporaries(tmp_path) == []


# ------------------------------------------------------------------ what is copied, and modes


def test_symlink_out_of_the_model_folder_is_refused(tmp_path, capfd, src, no_work):
    """A tokenizer-like file that links outside the model folder would copy that file into the output: refused
    before any work, naming the link."""
    model = shutil.copytree(src, tmp_path / "model")
    secret = tmp_path / "secret.txt"
    secret.write_text("password", encoding="utf-8")
    (model / "vocab.json").symlink_to(secret)
    out = tmp_path / "out"
    code, _, err = run_cli(["reduce", model, "--experts", "4", *SMALL, "--out", out], capfd)
    one_error(code, err, "vocab.json", "outside the model folder")
    assert not out.exists() and temporaries(tmp_path) == []


def test_output_modes_follow_the_umask_and_inner_links_are_copied(tmp_path, capfd, src, calib):
    """Every folder of the output (report/ included) is 0777 and every file 0666, less the umask; a tokenizer file
    that links inside the model folder is copied as a regular file with the target's bytes."""
    model = shutil.copytree(src, tmp_path / "model")
    (model / "real-merges").write_text("#version: 0.2\n", encoding="utf-8")
    (model / "merges.txt").symlink_to("real-merges")
    out = tmp_path / "out"
    umask = os.umask(0o027)
    try:
        code, _, err = run_cli(["reduce", model, "--experts", "4", "--calib", calib, *SMALL, "--out", out], capfd)
    finally:
        os.umask(umask)
    assert code == 0, err
    assert (out / "report").is_dir()
    for folder, _, files in os.walk(out):
        assert os.stat(folder).st_mode & 0o7777 == 0o750, folder
        for name in files:
            assert os.stat(Path(folder) / name).st_mode & 0o7777 == 0o640, name
    assert not (out / "merges.txt").is_symlink() and (out / "merges.txt").read_text() == "#version: 0.2\n"


# ------------------------------------------------------------------ failed writes


@pytest.mark.parametrize("command", WRITERS)
@pytest.mark.parametrize("failure", ["oserror", "safetensors"])
def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, capfd, src, calib, pickled, monkeypatch, failure, command):
    """A write that fails for lack of space (as Python or safetensors reports it) is one error line naming the
    reason; an old output (with --force) stays whole; the whole-model writer's temporary is removed, and the
    streamed run keeps its finished layers for --resume and says so."""

    def fill_disk(source_dir, out_dir, *args):
        (out_dir / "tokenizer.json").write_bytes(b"half")
        if failure == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir / "tokenizer.json"))
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(writer, "write_extras", fill_disk)
    monkeypatch.setattr(driver, "write_extras", fill_disk)
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("old", encoding="utf-8")
    for out, extra in ((tmp_path / "fresh", []), (old, ["--force"])):
        argv = [*writing_run(command, src, calib, pickled), "--out", out, *extra]
        code, _, err = run_cli(argv, capfd)
        line = one_error(code, err, "No space left on device", str(out.name))
        assert temporaries(tmp_path) == []
        partial = tmp_path / f".{out.name}.moemerge-partial"
        if command == "reduce":
            assert partial.is_dir() and f"{partial}: once this is fixed, rerun with --resume" in line
            shutil.rmtree(partial)
        assert not partial.exists()
    assert not (tmp_path / "fresh").exists()
    assert snapshot(old) == {"keep.txt": b"old"}


def test_disk_full_while_streaming_is_one_line(tmp_path, capfd, src, calib, monkeypatch):
    """reduce: a failed write of the first layer's shard is one error line, and nothing stays (no layer was
    finished, so there is nothing to resume)."""

    def fill_disk(tensors, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(driver, "save_file", fill_disk)
    out = tmp_path / "out"
    code, _, err = run_cli(["reduce", src, "--experts", "4", "--calib", calib, *SMALL, "--out", out], capfd)
    one_error(code, err, "No space left on device", "model-00001")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------ signals


KILLED_RUN = ["--experts", "4", "--allow-pickle", "--no-report", *SMALL]  # after "reduce MODEL --calib FILE"
CHILD = """
import pathlib, sys, time
from moemerge import pipeline
from moemerge.cli import main

real = pipeline.write_checkpoint


def write_then_wait(model, source_dir, out_dir, *args, **kwargs):
    real(model, source_dir, out_dir, *args, **kwargs)
    pathlib.Path(sys.argv[1]).write_text(str(out_dir))
    time.sleep(300)


pipeline.write_checkpoint = write_then_wait
sys.exit(main(["reduce", *sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, pickled, calib) -> dict[str, tuple[Path, subprocess.Popen, Path]]:
    """Real `moemerge reduce` processes of pickle weights (the whole-model writer; a layer-by-layer run keeps its
    partial folder for --resume, test_streaming_resume.py) stopped in the middle of writing (their temporary output holds the whole model), one
    per test below, started together to share their start-up time: name -> (folder, process, temporary).
    "sigterm" replaces an old output with --force; "sigkill" writes a new one."""
    started = {}
    for name, force in (("sigterm", True), ("sigkill", False)):
        root = tmp_path_factory.mktemp(name)
        if force:
            (root / "out").mkdir()
            (root / "out" / "keep.txt").write_text("old", encoding="utf-8")
        argv = [*KILLED_RUN, "--out", root / "out", *(["--force"] if force else [])]
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD, root / "writing", pickled, "--calib", calib, *map(str, argv)],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        started[name] = (root, process)
    found = {}
    try:
        for name, (root, process) in started.items():
            marker = root / "writing"
            deadline = time.time() + 240
            while not marker.exists() and process.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            assert marker.exists(), process.communicate()[1] if process.poll() is not None else "no marker"
            tmp = Path(marker.read_text())
            assert (tmp / "model.safetensors").is_file() and ".partial-" in tmp.name
            found[name] = (root, process, tmp)
        yield found
    finally:
        for _, process in started.values():
            if process.poll() is None:
                process.kill()
            process.communicate()


def test_sigterm_while_writing_removes_the_temporary(stopped):
    """A real process that gets SIGTERM while writing: one error line, exit 143, its temporary (a full model copy)
    removed, and the old output (being replaced with --force) as it was."""
    root, process, tmp = stopped["sigterm"]
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert err.splitlines() == ["error: interrupted by SIGTERM"]
    assert not tmp.exists() and temporaries(root) == []
    assert snapshot(root / "out") == {"keep.txt": b"old"}


class NotTakenOver(Exception):
    pass


def not_taken_over(signum, frame):
    raise NotTakenOver(signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signals_while_writing_in_process(tmp_path, capfd, pickled, calib, monkeypatch, signum):
    """Ctrl-C, SIGTERM and SIGHUP while the whole-model writer (pickle weights) writes: one error line naming the signal,
    exit 128 + its number, no temporary, no output; the handlers that were there before main are back
    afterwards."""
    real = pipeline.write_checkpoint
    seen = []

    def write_then_signal(model, source_dir, out_dir, *args, **kwargs):
        real(model, source_dir, out_dir, *args, **kwargs)
        seen.append(out_dir)
        os.kill(os.getpid(), signum)
        time.sleep(30)

    monkeypatch.setattr(pipeline, "write_checkpoint", write_then_signal)
    # stands for the default action (which would kill pytest if main did not take the signal over); SIGINT gets
    # Python's own KeyboardInterrupt handler, which main relies on, since a shell leaves SIGINT ignored in a job it
    # starts in the background (and main leaves an ignored signal ignored, as nohup users expect)
    handlers = {
        signal.SIGINT: signal.default_int_handler,
        signal.SIGTERM: not_taken_over,
        signal.SIGHUP: not_taken_over,
    }
    previous = {s: signal.signal(s, handler) for s, handler in handlers.items()}
    try:
        out = tmp_path / "out"
        code, _, err = run_cli(["reduce", pickled, "--calib", calib, *KILLED_RUN, "--out", out], capfd)
        assert {s: signal.getsignal(s) for s in handlers} == handlers
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert code == 128 + signum and err.splitlines() == [f"error: interrupted by {signum.name}"]
    assert seen and not seen[0].exists() and not out.exists() and temporaries(tmp_path) == []


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_temporaries_left_by_sigkill_are_removed_by_the_next_run(capfd, pickled, calib, stopped):
    """After a real SIGKILL while writing, the next run with the same --out removes the killed process's
    temporary; moemerge's other folders (another output's, another host's, a live process's, the resumable
    --stream one) and look-alikes stay."""
    root, process, tmp = stopped["sigkill"]
    process.kill()
    process.communicate(timeout=60)
    assert tmp.exists(), "SIGKILL leaves the temporary"
    pid = dead_pid()
    kept = [
        f".other.partial-{HOST}-{pid}-abcdefgh",
        f".out.partial-elsewhere-{pid}-abcdefgh",
        f".out.partial-{HOST}-1-abcdefgh",
        ".out.partial-notes",
        ".out.moemerge-partial",
    ]
    for name in kept:
        (root / name).mkdir()
    code, _, err = run_cli(["reduce", pickled, "--calib", calib, *KILLED_RUN, "--out", root / "out"], capfd)
    assert code == 0, err
    assert not tmp.exists()
    assert temporaries(root) == sorted(n for n in kept if ".partial-" in n)
    assert (root / ".out.moemerge-partial").is_dir()


# ------------------------------------------------------------------ a damaged resumable run


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, src, calib) -> tuple[Path, list]:
    """The partial folder of a reduce run stopped after its first of two layers (so that resuming needs every kind
    of recorded file), and the run's arguments (without --out)."""
    root = tmp_path_factory.mktemp("interrupted")
    argv = ["reduce", src, "--experts", "4", "--calib", calib, "--no-report", *SMALL]
    advance = RunState.advance

    def stop_after_the_first_layer(state, next_layer):
        advance(state, next_layer)
        if next_layer == 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(RunState, "advance", stop_after_the_first_layer)
        from moemerge.cli import main

        assert main([str(a) for a in [*argv, "--out", root / "out"]]) == 128 + signal.SIGINT
    return root / ".out.moemerge-partial", argv


DAMAGE = {
    "state-not-json": lambda p: (p / ".moemerge-state" / "state.json").write_text("{", encoding="utf-8"),
    "state-a-list": lambda p: (p / ".moemerge-state" / "state.json").write_text("[]", encoding="utf-8"),
    "next-layer-a-string": lambda p: _edit_state(p, next_layer="2"),
    "record-without-groups": lambda p: _edit_state(p, layers={"0": {"saved": 0}}),
    "hidden-state-missing": lambda p: next((p / ".moemerge-state").glob("hidden-*")).unlink(),
    "hidden-state-truncated": lambda p: next((p / ".moemerge-state").glob("hidden-*")).write_bytes(b"\0" * 9),
    "layer-record-missing": lambda p: (p / ".moemerge-state" / "layer-0.safetensors").unlink(),
    "shard-missing": lambda p: next(p.glob("model-00001-of-*.safetensors")).unlink(),
}


def _edit_state(partial: Path, **fields) -> None:
    file = partial / ".moemerge-state" / "state.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | fields), encoding="utf-8")


@pytest.mark.parametrize("damage", [None, *DAMAGE])
def test_resume_of_a_damaged_run_is_one_line(tmp_path, capfd, monkeypatch, interrupted, damage):
    """--resume of a partial folder with a malformed state.json or a missing or unreadable recorded file: one error
    line that says to start over with --force, and the folder is left as it was; all but an unreadable file are
    found before any work. The undamaged copy resumes."""
    partial, argv = interrupted
    out = tmp_path / "out"
    mine = tmp_path / ".out.moemerge-partial"
    shutil.copytree(partial, mine)
    if damage is None:
        code, _, err = run_cli([*argv, "--out", out, "--resume"], capfd)
        assert code == 0 and out.is_dir(), err
        return
    DAMAGE[damage](mine)
    if damage != "hidden-state-truncated":  # found when read; the rest before the first step of work

        def refuse(*args, **kwargs):
            raise AssertionError("work started before the damage was found")

        monkeypatch.setattr(calibrate, "layer_inputs", refuse)
    before = snapshot(mine)
    code, _, err = run_cli([*argv, "--out", out, "--resume"], capfd)
    one_error(code, err, "damaged", "--force")
    assert snapshot(mine) == before and not out.exists()
