"""Every input a user or a model folder can hand moemerge: bad ones are one ``error:`` line, exit 2, no output.

Oracles: the field, file, tensor or layer the message must name (each case plants exactly one defect);
safetensors' own reader, which must refuse every header we refuse and accept the one we accept; the groups
of an edited recipe, counted by hand; a subprocess with a timeout for a FIFO, so that a hang fails the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, pickle_copy, run_cli, save_tiny, tiny_config
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from moemerge.adapters import FAMILIES as ADAPTERS
from moemerge.checkpoint import inspect_source, load_source
from moemerge.checkpoint.model_files import check_safetensors
from moemerge.errors import MoemergeError
from moemerge.evaluation.evaluate import check_reference
from moemerge.pipeline import check_layer_groups

SMALL = ["--calib-samples", "2", "--calib-seq-len", "32"]
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want of a wife.\n"
    * 12
)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inputs")


@pytest.fixture(scope="module")
def calib(root) -> Path:
    path = root / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def src(root) -> Path:
    """A tiny Mixtral (8 experts, top-2, context 256) with the demo tokenizer."""
    return save_tiny("mixtral", root / "mixtral")


@pytest.fixture(scope="module")
def reduced(root, src, calib) -> Path:
    out = root / "reduced"
    assert (
        run_cli(["reduce", src, "--out", out, "--experts", "4", "--calib", calib, *SMALL, "--quiet"], _Silent())[0] == 0
    )
    return out


class _Silent:
    """A stand-in capture fixture for module-scoped runs (pytest's capture fixtures are function-scoped)."""

    def readouterr(self):
        return "", ""


def copy_model(src: Path, folder: Path) -> Path:
    shutil.copytree(src, folder)
    return folder


def clean_error(code: int, err: str, out: Path | None = None) -> str:
    """The one ``error:`` line of a refused command: exit 2, no traceback, nothing written to ``out``."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert code == 2
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.partial-*"))  # (--stream's resumable state may stay)
    return lines[0]


def reduce_error(model: Path, tmp_path: Path, capfd, *extra) -> str:
    out = tmp_path / "out"
    code, _, err = run_cli(["reduce", model, "--out", out, "--experts", "4", *SMALL, "--quiet", *extra], capfd)
    return clean_error(code, err, out)


def edit_config(folder: Path, **fields) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | fields))
    return folder


# ---------------------------------------------------------------- config.json


@pytest.mark.parametrize("content", ["[1, 2]", '"mixtral"', "null", "8"], ids=["array", "string", "null", "number"])
def test_config_json_that_is_not_an_object(tmp_path, capfd, src, content):
    model = copy_model(src, tmp_path / "model")
    (model / "config.json").write_text(content)
    line = reduce_error(model, tmp_path, capfd)
    assert f"{model / 'config.json'} holds a JSON" in line and "not an object" in line


@pytest.mark.parametrize("value", ["8", 8.0, True, 0, -2], ids=["string", "float", "bool", "zero", "negative"])
@pytest.mark.parametrize("family", FAMILIES)
def test_expert_count_of_wrong_type_or_range(tmp_path, capfd, family, value):
    """Every family's expert-count field: the error names the field and config.json (checked before any weight)."""
    model = tmp_path / family
    tiny_config(family).save_pretrained(model)
    (model / "model.safetensors").write_bytes(b"never read")
    saved = json.loads((model / "config.json").read_text())
    (field,) = {"num_experts", "num_local_experts", "n_routed_experts"} & set(saved)  # as transformers saved it
    line = reduce_error(edit_config(model, **{field: value}), tmp_path, capfd)
    assert f"{field}" in line and "config.json" in line


@pytest.mark.parametrize("top_k", [0, -1, 9, True, 2.0], ids=["zero", "negative", "above-n", "bool", "float"])
def test_top_k_outside_one_to_n(tmp_path, capfd, top_k):
    """num_experts_per_tok 0 used to be accepted (every frequency 0); any value outside 1..n is refused."""
    model = tmp_path / "model"
    tiny_config("olmoe").save_pretrained(model)
    line = reduce_error(edit_config(model, num_experts_per_tok=top_k), tmp_path, capfd)
    assert "num_experts_per_tok" in line and "config.json" in line


@pytest.mark.parametrize(
    "fields",
    [{"n_group": 3}, {"topk_group": 3}, {"routed_scaling_factor": -1.0}],
    ids=["n_group", "topk_group", "scale"],
)
def test_deepseek_routing_fields(tmp_path, capfd, fields):
    model = tmp_path / "model"
    tiny_config("deepseek_v3").save_pretrained(model)
    line = reduce_error(edit_config(model, **fields), tmp_path, capfd)
    assert next(iter(fields)) in line and "config.json" in line


def test_every_tiny_config_passes_the_config_check(tmp_path):
    """The check refuses no real config: the tiny model of every family passes it."""
    for family in FAMILIES:
        config = tiny_config(family)
        ADAPTERS[family].check_config(config, tmp_path / "config.json")


# ---------------------------------------------------------------- safetensors headers


def _first(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def _shift(header: dict, body: bytes) -> tuple[dict, bytes]:
    for name, entry in header.items():
        if name != "__metadata__":
            entry["data_offsets"] = [o + 8 for o in entry["data_offsets"]]
    return header, bytes(8) + body


HEADER_DEFECTS = {
    "array": lambda h, b: ([h], b),
    "entry-not-object": lambda h, b: (h | {_first(h): [1, 2]}, b),
    "no-data_offsets": lambda h, b: (
        h | {_first(h): {k: v for k, v in h[_first(h)].items() if k != "data_offsets"}},
        b,
    ),
    "unknown-dtype": lambda h, b: (h | {_first(h): h[_first(h)] | {"dtype": "F31"}}, b),
    "negative-shape": lambda h, b: (h | {_first(h): h[_first(h)] | {"shape": [-1, *h[_first(h)]["shape"][1:]]}}, b),
    "bool-shape": lambda h, b: (h | {_first(h): h[_first(h)] | {"shape": [True] * len(h[_first(h)]["shape"])}}, b),
    "float-offsets": lambda h, b: (
        h | {_first(h): h[_first(h)] | {"data_offsets": [float(o) for o in h[_first(h)]["data_offsets"]]}},
        b,
    ),
    "short-span": lambda h, b: (
        h
        | {
            _first(h): h[_first(h)]
            | {"data_offsets": [h[_first(h)]["data_offsets"][0], h[_first(h)]["data_offsets"][1] - 4]}
        },
        b,
    ),
    "gap-before-data": _shift,
    "metadata-not-strings": lambda h, b: (h | {"__metadata__": {"format": 1}}, b),
}


def rewrite_header(file: Path, change) -> None:
    data = file.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header, body = change(json.loads(data[8 : 8 + length]), data[8 + length :])
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def test_rewritten_but_unchanged_header_is_accepted(tmp_path, src):
    """The control for the cases below: re-serialising the header unchanged keeps a file both readers accept."""
    model = copy_model(src, tmp_path / "model")
    rewrite_header(model / "model.safetensors", lambda h, b: (h, b))
    check_safetensors(model / "model.safetensors")
    with safe_open(model / "model.safetensors", "pt") as f:
        assert f.keys()


@pytest.mark.parametrize("defect", HEADER_DEFECTS)
def test_invalid_safetensors_header(tmp_path, capfd, src, defect):
    """Each defect is one error line naming the file, and safetensors itself refuses the same file."""
    model = copy_model(src, tmp_path / "model")
    rewrite_header(model / "model.safetensors", HEADER_DEFECTS[defect])
    line = reduce_error(model, tmp_path, capfd)
    assert f"{model / 'model.safetensors'} has an invalid safetensors header" in line
    with pytest.raises(SafetensorError), safe_open(model / "model.safetensors", "pt"):
        pass


# ---------------------------------------------------------------- files that are not regular files


def test_fifos_in_a_model_folder_are_refused_without_opening(tmp_path, src):
    """A FIFO named like a shard, as config.json or as tokenizer.json: one error line each, and no hang (a
    subprocess, so that a regression times out instead of blocking the suite)."""
    folders = []
    for name in ("extra.safetensors", "config.json", "tokenizer.json"):
        folder = copy_model(src, tmp_path / name.replace(".", "_"))
        (folder / name).unlink(missing_ok=True)
        os.mkfifo(folder / name)
        folders.append((folder, name))
    script = (
        "import sys\nfrom moemerge.cli import main\n"
        "for folder in sys.argv[1:]:\n"
        "    print(main(['reduce', folder, '--experts', '4', '--out', folder + '-out', '--quiet']), flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *(str(f) for f, _ in folders)], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["2", "2", "2"], done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 3
    for line, (folder, name) in zip(lines, folders, strict=True):
        assert line.startswith(f"error: {folder / name} in the model folder is a FIFO")
        assert not Path(f"{folder}-out").exists()


def _socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()


@pytest.mark.parametrize(
    ("name", "make", "kind"),
    [
        ("extra.safetensors", Path.mkdir, "a directory"),
        ("config.json", lambda p: (p.unlink(), p.mkdir()), "a directory"),
        ("vocab.json", _socket, "a socket"),
        ("tokenizer.model", lambda p: p.symlink_to(p.parent / "nowhere"), "a dangling symlink"),
    ],
    ids=["shard-directory", "config-directory", "socket", "dangling-symlink"],
)
def test_other_non_regular_files_in_a_model_folder(tmp_path, capfd, src, name, make, kind):
    model = copy_model(src, tmp_path / "model")
    make(model / name)
    assert f"{model / name} in the model folder is {kind}" in reduce_error(model, tmp_path, capfd)


def test_a_report_subfolder_is_fine(tmp_path, src):
    """Directories not named like a model file (a moemerge output's report/) stay allowed."""
    model = copy_model(src, tmp_path / "model")
    (model / "report").mkdir()
    assert inspect_source(model).path == model


@pytest.mark.parametrize("option", ["--calib", "--data"])
@pytest.mark.parametrize(
    ("make", "kind"),
    [(Path.mkdir, "a directory"), (os.mkfifo, "a FIFO"), (None, "a character device")],
    ids=["directory", "fifo", "device"],
)
def test_calibration_or_data_that_is_not_a_file(tmp_path, capfd, src, option, make, kind):
    """--calib / --data naming a directory, FIFO or device say what it is instead of "does not exist"."""
    path = Path("/dev/null") if make is None else tmp_path / "text.txt"
    if make is not None:
        make(path)
    out = tmp_path / "out"
    if option == "--calib":
        argv = ["reduce", src, "--out", out, "--experts", "4", "--calib", path, "--quiet"]
    else:
        argv = ["eval", src, "--data", path, "--no-cost", "--quiet"]
    code, _, err = run_cli(argv, capfd)
    assert f"text file {path} is {kind}" in clean_error(code, err, out)


def test_recipe_that_is_a_directory(tmp_path, capfd, src):
    (tmp_path / "recipe.json").mkdir()
    code, _, err = run_cli(["apply", tmp_path / "recipe.json", src, "--out", tmp_path / "out"], capfd)
    assert f"recipe {tmp_path / 'recipe.json'} is a directory" in clean_error(code, err, tmp_path / "out")


# ---------------------------------------------------------------- NaN and Inf


def plant(model: Path, name: str, value: float) -> Path:
    """Set one element of tensor ``name`` in the model's weights to ``value``."""
    tensors = load_file(model / "model.safetensors")
    tensors[name].view(-1)[3] = value
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.mark.parametrize(
    ("tensor", "value", "named"),
    [
        ("model.layers.1.block_sparse_moe.experts.5.w1.weight", float("nan"), "layer 1: experts.gate_up_proj"),
        ("model.layers.1.block_sparse_moe.experts.2.w2.weight", float("inf"), "layer 1: experts.down_proj"),
        ("model.layers.0.block_sparse_moe.gate.weight", float("-inf"), "layer 0: gate.weight"),
        ("model.layers.0.self_attn.q_proj.weight", float("nan"), "layer 0: calibration statistic"),
    ],
    ids=["nan-gate-up", "inf-down", "inf-router", "nan-attention"],
)
@pytest.mark.parametrize("how", [["--method", "hc-smoe"], ["--method", "f-prune"]])
def test_non_finite_weights_or_statistics(tmp_path, capfd, src, calib, tensor, value, named, how):
    """NaN / Inf in a layer's experts or router is named before its calibration; NaN produced by the forward pass
    (attention weights) is named in the statistics (hc-smoe, and f-prune, which used to crash in the report)."""
    model = plant(copy_model(src, tmp_path / "model"), tensor, value)
    line = reduce_error(model, tmp_path, capfd, "--calib", calib, *how)
    assert line.startswith(f"error: {named}") and "NaN or Inf" in line


def test_damage_found_in_a_later_layer_keeps_the_finished_ones_for_resume(tmp_path, capfd, src, calib):
    """NaN in layer 1's experts, where the weights fingerprint does not sample (as a damaged download can be): one
    error line that names layer 1, the partial folder with the finished layer 0 and --resume; with the file
    repaired, --resume finishes with the files of a clean run. (Damage found in the first layer leaves nothing:
    test_non_finite_weights_or_statistics.)"""
    name = "model.layers.1.block_sparse_moe.experts.5.w1.weight"
    model = copy_model(src, tmp_path / "model")
    tensor = load_file(model / "model.safetensors")[name]
    assert tensor.numel() * tensor.element_size() >= 8 * 64, "the planted value must lie between sampled bytes"
    original = (model / "model.safetensors").read_bytes()
    tensors = load_file(model / "model.safetensors")
    tensors[name].view(-1)[tensor.numel() // 4] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    argv = ["reduce", model, "--out", out, "--experts", "4", "--calib", calib, *SMALL, "--quiet", "--no-report"]
    code, _, err = run_cli(argv, capfd)
    partial = tmp_path / ".out.moemerge-partial"
    line = clean_error(code, err, out)
    assert line.startswith("error: layer 1: experts.gate_up_proj holds NaN or Inf")
    assert f"the run's first 1 steps (a step per decoder layer and pass) stay in {partial}" in line
    assert "rerun with --resume" in line
    assert json.loads((partial / ".moemerge-state" / "state.json").read_text())["next_layer"] == 1
    (model / "model.safetensors").write_bytes(original)
    code, _, err = run_cli([*argv, "--resume"], capfd)
    assert code == 0, err
    code, _, err = run_cli([*argv[:3], tmp_path / "clean", *argv[4:]], capfd)
    assert code == 0, err
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir()} and not partial.exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_finite_check_equals_an_element_wise_test(dtype):
    """check_finite against torch.isfinite(t).all() on every element: NaN, Inf or -Inf planted anywhere (also +Inf
    beside -Inf) is found, and the largest finite values, whose sum overflows, are not taken for Inf."""
    from moemerge.statistics.finite import check_finite

    big = torch.finfo(dtype).max
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(3, 5, 7, generator=g).to(dtype), torch.full((3, 5, 7), big, dtype=dtype)]
    for value in (float("nan"), float("inf"), float("-inf")):
        for index in (0, 52, 104):
            t = cases[0].clone()
            t.view(-1)[index] = value
            cases.append(t)
    both = cases[1].clone()
    both.view(-1)[[3, 4]] = torch.tensor([float("inf"), float("-inf")], dtype=dtype)
    cases.append(both)
    for k, t in enumerate(cases):
        finite = bool(torch.isfinite(t).all())
        try:
            check_finite(0, {"w": t}, "fix it")
            found = False
        except MoemergeError:
            found = True
        assert found != finite, (k, dtype)


# ---------------------------------------------------------------- token ids and context


@pytest.fixture(scope="module")
def small_vocab(root) -> Path:
    """A model of 300 tokens shipping the demo tokenizer of 4096: its text produces ids beyond the vocabulary."""
    return save_tiny("mixtral", root / "small_vocab", vocab_size=300)


@pytest.mark.parametrize("command", ["reduce", "stream", "eval"])
def test_tokenizer_ids_beyond_the_vocabulary(tmp_path, capfd, small_vocab, calib, command):
    out = tmp_path / "out"
    if command == "eval":
        argv = ["eval", small_vocab, "--data", calib, "--no-cost", "--quiet"]
    else:
        argv = ["reduce", small_vocab, "--out", out, "--experts", "4", "--calib", calib, *SMALL, "--quiet"]
        argv += ["--stream"] if command == "stream" else []
    code, _, err = run_cli(argv, capfd)
    assert "outside the model's vocabulary of 300" in clean_error(code, err, out)


@pytest.mark.parametrize("command", ["reduce", "stream", "plan", "inspect", "compare"])
def test_calibration_longer_than_the_context(tmp_path, capfd, src, command, monkeypatch):
    """--calib-seq-len 257 on a model of context 256 names both numbers, before any weight is loaded."""
    monkeypatch.setattr("moemerge.checkpoint.source.AutoModelForCausalLM", _NoLoading)
    out = tmp_path / ("out.json" if command == "plan" else "out")
    head = {"stream": ["reduce", src, "--stream"], "compare": ["compare", src, "--methods", "hc-smoe"]}
    argv = [*head.get(command, [command, src]), "--out", out, "--calib-seq-len", "257", "--quiet"]
    argv += [] if command == "inspect" else ["--experts", "4"]
    code, _, err = run_cli(argv, capfd)
    line = clean_error(code, err, out)
    assert "--calib-seq-len 257" in line and "context of 256" in line


class _NoLoading:
    """Stands in for AutoModelForCausalLM: loading weights fails the test (the check must come first)."""

    @staticmethod
    def from_pretrained(*args, **kwargs):
        raise AssertionError("weights were loaded before the check")


# ---------------------------------------------------------------- eval and compare


@pytest.fixture(scope="module")
def untokenized(root) -> Path:
    return save_tiny("mixtral", root / "untokenized", tokenizer=False)


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_tasks_need_a_tokenizer(tmp_path, capfd, untokenized, monkeypatch, command):
    """--tasks on a model without tokenizer files: one line, before any weight is loaded."""
    monkeypatch.setattr("moemerge.checkpoint.source.AutoModelForCausalLM", _NoLoading)
    out = tmp_path / "out"
    argv = ["eval", untokenized] if command == "eval" else ["compare", untokenized, "--methods", "f-prune"]
    argv += ["--tasks", "arc_easy", "--quiet"] + (["--out", out, "--experts", "4"] if command == "compare" else [])
    code, _, err = run_cli(argv, capfd)
    assert "--tasks needs the model's tokenizer" in clean_error(code, err, out)


def test_reference_that_is_the_evaluated_model(tmp_path, capfd, reduced):
    code, _, err = run_cli(["eval", reduced, "--reference", reduced, "--no-cost", "--quiet"], capfd)
    assert "is the evaluated model itself" in clean_error(code, err)


def test_unrelated_reference_of_the_same_shape(root, tmp_path, capfd, src, reduced):
    """A reference with other weights (another seed) or another config is refused, naming what differs; the
    recorded source, in any folder, is accepted."""
    other = save_tiny("mixtral", tmp_path / "other", seed=1)
    code, _, err = run_cli(["eval", reduced, "--reference", other, "--no-cost", "--quiet"], capfd)
    line = clean_error(code, err)
    assert "is not the model" in line and "(weights differ" in line
    tweaked = edit_config(copy_model(src, tmp_path / "tweaked"), rms_norm_eps=1e-3)
    code, _, err = run_cli(["eval", reduced, "--reference", tweaked, "--no-cost", "--quiet"], capfd)
    assert "(config.json differ" in clean_error(code, err)
    check_reference(inspect_source(reduced), inspect_source(copy_model(src, tmp_path / "moved")))


def test_the_source_identity_is_recorded(reduced, src):
    """moemerge.json records the source's config SHA-256 (config.json canonicalised without its version keys,
    recomputed here) and a weights fingerprint."""
    config = json.loads((src / "config.json").read_text())
    canonical = {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}
    recorded = json.loads((reduced / "moemerge.json").read_text())["source"]
    assert recorded["config_sha256"] == hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
    assert len(recorded["weights_sha256"]) == 64


# ---------------------------------------------------------------- loading errors


def test_malicious_pickle_with_allow_pickle(tmp_path, capfd, src):
    """A pickle whose loading would run a command: one error line, and the command never ran."""
    model = copy_model(src, tmp_path / "model")
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    payload = b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."  # os.system("touch MARKER")
    (model / "pytorch_model.bin").write_bytes(payload)
    line = reduce_error(model, tmp_path, capfd, "--allow-pickle")
    assert line.startswith(f"error: transformers could not load {model}")
    assert not marker.exists()


@pytest.mark.parametrize("where", ["moemerge.checkpoint.source", "moemerge.streaming.layers"])
def test_any_exception_from_transformers_is_one_line(tmp_path, capfd, src, monkeypatch, where):
    """Whether transformers loads the whole model (pickle weights) or builds the layer-by-layer skeleton."""

    class Broken:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise KeyError("a key transformers did not expect")

        from_config = from_pretrained

    model, extra = src, []
    if where.endswith("source"):
        model, extra = pickle_copy(src, tmp_path / "pickled"), ["--allow-pickle"]
    monkeypatch.setattr(f"{where}.AutoModelForCausalLM", Broken)
    out = tmp_path / "out"
    code, _, err = run_cli(["reduce", model, "--out", out, "--experts", "4", *SMALL, "--quiet", *extra], capfd)
    assert "a key transformers did not expect" in clean_error(code, err, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["pickled"] if extra else [])


def test_expert_count_mismatch_is_one_line(tmp_path, capfd, src):
    """config.json says 6 experts, the weights hold 8: one line naming a tensor and both shapes, not a table."""
    model = edit_config(copy_model(src, tmp_path / "model"), num_local_experts=6)
    line = reduce_error(model, tmp_path, capfd)
    assert "the weights do not fit config.json" in line
    assert "[8, " in line and "[6, " in line


def test_a_successful_load_still_shows_its_warnings(tmp_path, caplog, src):
    """Held-back transformers logs are released when loading succeeds (here: the report of an unexpected tensor)."""
    model = copy_model(src, tmp_path / "model")
    tensors = load_file(model / "model.safetensors") | {"extra.weight": torch.zeros(2)}
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    load_source(inspect_source(model))
    assert any("extra.weight" in record.getMessage() for record in caplog.records)


# ---------------------------------------------------------------- recipes


@pytest.fixture(scope="module")
def recipes(root, src, calib) -> dict:
    """Recipes planned on ``src``: hard groups (4 per layer) and fcm soft groups (3 per layer)."""
    made = {}
    for name, extra in (("hard", ["--experts", "4"]), ("fcm", ["--experts", "3", "--cluster", "fcm"])):
        made[name] = root / f"{name}.json"
        argv = ["plan", src, "--out", made[name], "--calib", calib, *SMALL, "--quiet", *extra]
        assert run_cli(argv, _Silent())[0] == 0
    return made


def _first_id(value):
    def change(content: dict) -> None:
        content["layers"][0]["groups"][0][0] = value

    return change


def _layer_entry(**fields):
    def change(content: dict) -> None:
        content["layers"][0].update(fields)

    return change


def _layer_twice(content: dict) -> None:
    content["layers"][1]["layer"] = content["layers"][0]["layer"]


def _entry_not_object(content: dict) -> None:
    content["layers"][0] = [1]


def _memberships_on_hard_groups(content: dict) -> None:
    content["layers"][0]["memberships"] = [[1.0] * len(g) for g in content["layers"][0]["groups"]]


def _option(**fields):
    def change(content: dict) -> None:
        content["options"].update(fields)

    return change


def _no_calibration_hash(content: dict) -> None:
    del content["calibration"]["sha256"]


def _one_group_per_layer(content: dict) -> None:
    for entry in content["layers"]:
        entry["groups"] = [sorted(e for g in entry["groups"] for e in g)]


def _membership(change_values):
    def change(content: dict) -> None:
        change_values(content["layers"][0]["memberships"][0])

    return change


def _no_memberships(content: dict) -> None:
    del content["layers"][0]["memberships"]


RECIPE_DEFECTS = {
    "id-true": ("hard", _first_id(True), "layer 0: group"),
    "id-float": ("hard", _first_id(1.0), "layer 0: group"),
    "id-negative": ("hard", _first_id(-1), "layer 0: group"),
    "id-string": ("hard", _first_id("1"), "layer 0: group"),
    "id-too-large": ("hard", _first_id(8), "layer 0: group"),
    "layer-string": ("hard", _layer_entry(layer="0"), "layer number"),
    "layer-twice": ("hard", _layer_twice, "layer number"),
    "entry-not-object": ("hard", _entry_not_object, "layer number"),
    "memberships-on-hard-groups": ("hard", _memberships_on_hard_groups, "layer 0: memberships without --cluster fcm"),
    "option-type": ("hard", _option(experts="4"), "option experts is '4'"),
    "option-unknown": ("hard", _option(bogus=1), "unknown option 'bogus'"),
    "no-calibration-hash": ("hard", _no_calibration_hash, "calibration.sha256"),
    "below-top-k": ("hard", _one_group_per_layer, "layer 0 has 1 groups, which reduce refuses: --experts 1 is below"),
    "memberships-short": ("fcm", _membership(lambda u: u.pop()), "layer 0: memberships must be one list per group"),
    "membership-zero": ("fcm", _membership(lambda u: u.__setitem__(0, 0)), "layer 0: memberships"),
    "membership-string": ("fcm", _membership(lambda u: u.__setitem__(0, "x")), "layer 0: memberships"),
    "memberships-not-summing": ("fcm", _membership(lambda u: u.__setitem__(0, u[0] / 2)), "layer 0: the memberships"),
    "memberships-missing": ("fcm", _no_memberships, "layer 0: the groups hold an expert twice"),
}


@pytest.mark.parametrize("defect", RECIPE_DEFECTS)
def test_recipe_defects(tmp_path, capfd, src, recipes, monkeypatch, defect):
    """Each planted defect is one line naming its layer or field, refused before the model is loaded; the
    recipe with fewer groups than top-k is refused as reduce refuses --experts 1."""
    monkeypatch.setattr("moemerge.checkpoint.source.AutoModelForCausalLM", _NoLoading)
    kind, change, expected = RECIPE_DEFECTS[defect]
    recipe, out = tmp_path / "recipe.json", tmp_path / "out"
    content = json.loads(recipes[kind].read_text())
    change(content)
    recipe.write_text(json.dumps(content))
    code, _, err = run_cli(["apply", recipe, src, "--out", out, "--quiet"], capfd)
    line = clean_error(code, err, out)
    assert str(recipe) in line and expected in line


def test_apply_prints_the_real_group_counts(tmp_path, capfd, src, recipes):
    """A recipe planned with --experts 4, edited to 3 groups per layer: the summary says 3, not the recorded 4."""
    content = json.loads(recipes["hard"].read_text())
    for entry in content["layers"]:
        first, second, *rest = entry["groups"]
        entry["groups"] = [sorted(first + second), *rest]
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(content))
    code, out, err = run_cli(["apply", recipe, src, "--out", tmp_path / "out", "--no-report"], capfd)
    assert code == 0, err
    assert content["options"]["experts"] == 4
    assert "8 -> 3 experts in 2 MoE layers" in out


def test_groups_must_respect_deepseek_routing_blocks():
    """check_layer_groups (apply's check) refuses a group mixing DeepSeek's routing blocks (experts 0-3, 4-7) or
    blocks holding unequal shares, and accepts what reduce could make."""
    family, config = ADAPTERS["deepseek_v3"], tiny_config("deepseek_v3")
    check_layer_groups(family, config, {1: [[0, 1], [2], [3], [4, 5], [6], [7]]})
    with pytest.raises(MoemergeError, match=r"group \[0, 4\] mixes routing blocks"):
        check_layer_groups(family, config, {1: [[0, 4], [1, 5], [2], [3], [6], [7]]})
    with pytest.raises(MoemergeError, match=r"\[4, 2\] groups in its routing blocks"):
        check_layer_groups(family, config, {1: [[0], [1], [2], [3], [4, 5, 6], [7]]})


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "argv",
    [
        ["reduce", "M", "--experts", "4", "--out", "O"],
        ["plan", "M", "--experts", "4", "--out", "R.json"],
        ["apply", "R.json", "M", "--out", "O"],
        ["inspect", "M", "--out", "O"],
        ["eval", "M"],
        ["compare", "M", "--methods", "hc-smoe", "--experts", "4", "--out", "O"],
    ],
    ids=lambda argv: argv[0],
)
def test_every_weight_loading_command_accepts_allow_pickle(argv):
    """So that the advice "pass --allow-pickle" holds whichever command gave it."""
    from moemerge.cli import build_parser

    assert build_parser().parse_args([*argv, "--allow-pickle"]).allow_pickle is True


def test_eval_runs_pickle_weights_with_allow_pickle(tmp_path, capfd, src, calib):
    model = pickle_copy(src, tmp_path / "model")
    argv = ["eval", model, "--data", calib, "--max-tokens", "64", "--seq-len", "32", "--no-cost", "--json"]
    code, _, err = run_cli(argv, capfd)
    assert "--allow-pickle" in clean_error(code, err)
    code, out, err = run_cli([*argv, "--allow-pickle"], capfd)
    assert code == 0, err
    assert json.loads(out)["perplexity"]["tokens"] > 0


@pytest.mark.parametrize(
    ("argv", "abbreviation"),
    [
        (["reduce", "{src}", "--experts", "4", "--out", "{out}"], "--calib-sample"),
        (["plan", "{src}", "--experts", "4", "--out", "{out}"], "--calib-sample"),
        (["apply", "{src}/config.json", "{src}", "--out", "{out}"], "--no-rep"),
        (["inspect", "{src}", "--out", "{out}"], "--calib-sample"),
        (["eval", "{src}"], "--max-token"),
        (["compare", "{src}", "--methods", "hc-smoe", "--experts", "4", "--out", "{out}"], "--calib-sample"),
    ],
    ids=lambda x: x[0] if isinstance(x, list) else x,
)
def test_abbreviated_options_are_refused(tmp_path, capfd, src, argv, abbreviation):
    """argparse's prefix matching is off on every command: --calib-sample is not --calib-samples, --exp not
    --experts."""
    out = tmp_path / "out"
    argv = [a.format(src=src, out=out) for a in argv]
    code, _, err = run_cli([*argv, abbreviation, "2"], capfd)
    assert f"unrecognized arguments: {abbreviation} 2" in clean_error(code, err, out)
