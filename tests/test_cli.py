"""The ``moemerge reduce`` command: bad input is one clean error line and no output; good input a correct summary."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import EXPERT_FIELD, FAMILIES, pickle_copy, save_tiny, tiny_model
from conftest import run_cli as run
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moemerge import pipeline
from moemerge.adapters import REFUSED
from moemerge.cli import main
from moemerge.errors import MoemergeError

SMALL_CALIB = ["--calib-samples", "2", "--calib-seq-len", "32"]
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families.\n"
) * 4


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """A small .txt calibration file (a few hundred tokens), so that good runs skip the large bundled corpus."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A tiny Mixtral checkpoint (8 experts, top-2) with the demo tokenizer."""
    return save_tiny("mixtral", tmp_path_factory.mktemp("src") / "mixtral")


def assert_clean_error(code: int, err: str, out_dir: Path) -> str:
    """Exit 2, exactly one stderr line ``error: ...``, no traceback, and no output or partial output left behind."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr should be one line, got {err!r}"
    assert lines[0].startswith("error: ")
    assert code == 2
    assert not out_dir.exists()
    if out_dir.parent.exists():
        assert not list(out_dir.parent.glob(f".{out_dir.name}.partial-*"))
    return lines[0]


def reduce_args(model, out, *extra) -> list:
    return ["reduce", model, "--out", out, *SMALL_CALIB, "--quiet", "--no-report", *extra]  # reports: test_report.py


# ---------------------------------------------------------------- bad input


def test_missing_model_path(tmp_path, capfd):
    """A model path that does not exist is one error line naming it, exit 2."""
    out = tmp_path / "out"
    code, _, err = run(reduce_args(tmp_path / "nope", out, "--experts", "4"), capfd)
    assert str(tmp_path / "nope") in assert_clean_error(code, err, out)


def test_directory_without_config(tmp_path, capfd):
    """A directory that is not a model (no config.json) is one error line, exit 2."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    code, _, err = run(reduce_args(tmp_path / "empty", out, "--experts", "4"), capfd)
    assert_clean_error(code, err, out)


def test_dense_model(tmp_path, capfd):
    """A dense (Llama) checkpoint is refused as having no experts, exit 2."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    out = tmp_path / "out"
    code, _, err = run(reduce_args(tmp_path / "llama", out, "--experts", "4"), capfd)
    assert "dense" in assert_clean_error(code, err, out)


def reduce_error_of_config(config, tmp_path, capfd) -> str:
    """The one-line error of ``reduce`` on a folder holding only ``config`` as config.json (nothing written)."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config.to_dict()), encoding="utf-8")
    out = tmp_path / "out"
    code, _, err = run(reduce_args(model_dir, out, "--experts", "2"), capfd)
    return assert_clean_error(code, err, out)


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_moe_family_says_why(tmp_path, capfd, model_type):
    """A family whose MoE layers do not fit moemerge's view (transformers' own config of it) is refused in one line
    that names it and gives the family's reason, before anything is written."""
    config = CONFIG_MAPPING[model_type]()
    assert config.model_type == model_type
    line = reduce_error_of_config(config, tmp_path, capfd)
    assert f"model family {model_type!r} is not supported: {REFUSED[model_type]}" in line


@pytest.mark.parametrize("config_class", ["PhimoeConfig", "DbrxConfig", "Llama4Config", "GptOssConfig"])
def test_unsupported_moe_family(tmp_path, capfd, config_class):
    """A Mixture-of-Experts family moemerge lacks (transformers' own config) is named as unsupported, listing the supported ones."""
    config = getattr(transformers, config_class)()
    line = reduce_error_of_config(config, tmp_path, capfd)
    assert config.model_type in line
    assert "dense" not in line, "an MoE family must not be reported as a dense model"
    for family in FAMILIES:
        assert family in line


@pytest.mark.parametrize(
    "size,named",
    [
        (["--experts", "8"], r"--experts 8 .*below .*8 experts"),
        (["--experts", "9"], r"--experts 9 .*below .*8 experts"),
        (["--experts", "0"], r"--experts 0 .*at least 1"),
        (["--experts", "-3"], r"--experts -3 .*at least 1"),
        (["--experts", "1"], r"--experts 1 .*top-k \(2\)"),  # below top-k 2 with a standard router
        (["--ratio", "0"], r"--ratio 0(\.0)? .*between 0 and 1"),
        (["--ratio", "1"], r"--ratio 1(\.0)? .*between 0 and 1"),
        (["--ratio", "1.5"], r"--ratio 1\.5 .*between 0 and 1"),
        (["--ratio", "-0.25"], r"--ratio -0\.25 .*between 0 and 1"),
        (["--ratio", "0.01"], r"--experts 1 .*top-k \(2\)"),  # rounds to 1 expert, below top-k
    ],
    ids=lambda s: "".join(s) if isinstance(s, list) else "",
)
def test_bad_target_size(tmp_path, capfd, src, size, named):
    """Expert counts outside [top-k, n) and ratios outside (0, 1) are one error line, exit 2, that names the value
    given and the bound it breaks."""
    out = tmp_path / "out"
    code, _, err = run(reduce_args(src, out, *size), capfd)
    line = assert_clean_error(code, err, out)
    assert re.search(named, line), line


@pytest.mark.parametrize(
    "name,content,named",
    [
        ("empty.txt", "", r"has 0 tokens, fewer than --calib-samples 2 x --calib-seq-len 32"),
        ("short.txt", "Only a few words here.", r"has \d tokens, fewer than --calib-samples 2 x --calib-seq-len 32"),
        ("empty.jsonl", "\n\n", r"is empty"),
        ("broken.jsonl", '{"text": "fine"}\n{"text": "unterminated\n', r":2: not valid JSON"),
        ("wrongkey.jsonl", '{"body": "no text key"}\n', r"'text'.*'input_ids'"),
        (
            "outofvocab.jsonl",
            '{"input_ids": [5, 6, 99999]}\n{"input_ids": [7, 8, 9]}\n',
            r"99999\b.*vocabulary of 4096",
        ),
    ],
    ids=["empty-txt", "short-txt", "empty-jsonl", "broken-jsonl", "wrong-key-jsonl", "out-of-vocab-ids"],
)
def test_bad_calibration_file(tmp_path, capfd, src, name, content, named):
    """Empty, too short or malformed calibration files, and token ids outside the vocabulary, are one error line, exit 2,
    that names the file and what is wrong with it."""
    calib = tmp_path / name
    calib.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    code, _, err = run(reduce_args(src, out, "--experts", "4", "--calib", calib), capfd)
    line = assert_clean_error(code, err, out)
    assert str(calib) in line and re.search(named, line), line


@pytest.mark.parametrize(
    "extra,named",
    [
        (["--calib", "/definitely/missing.txt"], r"/definitely/missing\.txt does not exist"),
        (["--calib", "hf:"], r"calibration spec 'hf:'.*hf:NAME"),
        (["--calib-samples", "0"], r"--calib-samples \(0\).*at least 1"),
        (["--dtype", "float64"], r"dtype 'float64'.*float32"),
        (["--device", "tpu"], r"device 'tpu'.*cuda:N"),
        (["--device", "nonsense:x"], r"device 'nonsense:x'.*cuda:N"),
    ],
    ids=lambda e: "".join(e) if isinstance(e, list) else "",
)
def test_bad_options(tmp_path, capfd, src, extra, named):
    """Missing calibration files, bad specs and sizes, unknown dtypes and devices are one error line, exit 2, naming
    the bad value and what would be accepted."""
    out = tmp_path / "out"
    code, _, err = run(reduce_args(src, out, "--experts", "4", *extra), capfd)
    line = assert_clean_error(code, err, out)
    assert re.search(named, line), line


@pytest.mark.parametrize("cut", ["data", "header", "length"])
def test_truncated_safetensors(tmp_path, capfd, src, cut):
    """A safetensors file cut short (in the tensor data, inside the header, or in the length prefix) is one error line
    naming the file as truncated."""
    model_dir = tmp_path / "model"
    shutil.copytree(src, model_dir)
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    keep = {"data": len(data) - 1000, "header": 8 + header_len // 2, "length": 5}[cut]
    weights.write_bytes(data[:keep])
    out = tmp_path / "out"
    code, _, err = run(reduce_args(model_dir, out, "--experts", "4"), capfd)
    line = assert_clean_error(code, err, out)
    assert str(weights) in line and "truncated" in line, line


def test_existing_output_needs_force(tmp_path, capfd, src, calib):
    """An existing --out is left untouched without --force (exit 2); with --force it is replaced by the new output."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious", encoding="utf-8")
    code, _, err = run(reduce_args(src, out, "--experts", "4"), capfd)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text(encoding="utf-8") == "precious"
    assert not list(tmp_path.glob(".out.partial-*"))

    code, _, err = run(reduce_args(src, out, "--experts", "4", "--force", "--calib", calib), capfd)
    assert code == 0, err
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4
    assert not list(tmp_path.glob(".out.partial-*"))


def test_force_with_bad_input_keeps_old_output(tmp_path, capfd, src):
    """--force does not remove an existing output when the new run is rejected."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious", encoding="utf-8")
    code, _, err = run(reduce_args(src, out, "--experts", "8", "--force"), capfd)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert (out / "keep.txt").read_text(encoding="utf-8") == "precious"


@pytest.mark.parametrize("failure", [MoemergeError("disk full"), RuntimeError("killed")], ids=["error", "crash"])
def test_failed_write_leaves_no_trace(tmp_path, capfd, src, calib, monkeypatch, failure):
    """A whole-model write (pickle weights; safetensors are reduced layer by layer, see test_output_safety.py) that
    fails leaves no output and no partial directory, and an old output stays whole."""
    pickled = pickle_copy(src, tmp_path / "pickled")

    def write_then_fail(model, source_dir, out_dir, *args, **kwargs):
        (out_dir / "model.safetensors").write_bytes(b"half written")
        raise failure

    monkeypatch.setattr(pipeline, "write_checkpoint", write_then_fail)
    fresh = tmp_path / "fresh"
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("precious", encoding="utf-8")
    for out, extra in ((fresh, []), (old, ["--force"])):
        argv = reduce_args(pickled, out, "--experts", "4", "--calib", calib, "--allow-pickle", *extra)
        if isinstance(failure, MoemergeError):
            code, _, err = run(argv, capfd)
            assert code == 2 and err.splitlines() == ["error: disk full"]
        else:
            with pytest.raises(RuntimeError):
                main([str(a) for a in argv])
        assert not list(tmp_path.glob(".*.partial-*"))
    assert not fresh.exists()
    assert sorted(p.name for p in old.iterdir()) == ["keep.txt"]


def test_model_without_tokenizer(tmp_path, capfd, calib):
    """A model without tokenizer files: text calibration is one error line; input_ids calibration works."""
    model_dir = save_tiny("olmoe", tmp_path / "olmoe", tokenizer=False)
    out = tmp_path / "out"
    for spec in ([], ["--calib", calib]):
        code, _, err = run(reduce_args(model_dir, out, "--experts", "4", *spec), capfd)
        assert_clean_error(code, err, out)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"input_ids": list(range(1, 40))}) + "\n" for _ in range(2)))
    code, _, err = run(reduce_args(model_dir, out, "--experts", "4", "--calib", rows), capfd)
    assert code == 0, err
    assert not any(out.glob("tokenizer*"))


def test_deepseek_counts_follow_group_limited_routing(tmp_path, capfd):
    """DeepSeek-V3 (n=8, n_group=2, topk_group=1, top-2): only r in {4, 6} (even, >= 2 per routing group) are accepted.

    In grouped mode the same counts fail, and the message must not advise --router grouped, which was given.
    """
    model_dir = save_tiny("deepseek_v3", tmp_path / "ds")
    out = tmp_path / "out"
    valid = [r for r in range(1, 8) if r % 2 == 0 and r // 2 >= 2 and 1 * (r // 2) >= 2]
    assert valid == [4, 6]
    for r in (1, 2, 3, 5, 7):
        code, _, err = run(reduce_args(model_dir, out, "--experts", r), capfd)
        line = assert_clean_error(code, err, out)
        assert all(str(v) in line for v in valid)
    code, _, err = run(reduce_args(model_dir, out, "--experts", "6", "--calib-samples", "1"), capfd)
    assert code == 0, err
    assert AutoConfig.from_pretrained(out).n_routed_experts == 6
    for r in (2, 3):
        grouped_out = tmp_path / f"grouped{r}"
        code, _, err = run(reduce_args(model_dir, grouped_out, "--experts", r, "--router", "grouped"), capfd)
        line = assert_clean_error(code, err, grouped_out)
        assert "--router grouped" not in line, "advises the option the user already gave"


def test_output_path_is_a_file(tmp_path, capfd, src):
    """An --out that is a regular file is refused even with --force, and the file is kept."""
    out = tmp_path / "out"
    out.write_text("a file", encoding="utf-8")
    code, _, err = run(reduce_args(src, out, "--experts", "4", "--force"), capfd)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert out.read_text(encoding="utf-8") == "a file"


def test_pickle_weights_need_allow_pickle(tmp_path, capfd, calib):
    """A checkpoint with only pickle weights is refused without --allow-pickle, and reduced with it."""
    model_dir = save_tiny("mixtral", tmp_path / "pickled")
    (model_dir / "model.safetensors").unlink()
    torch.save(tiny_model("mixtral").state_dict(), model_dir / "pytorch_model.bin")
    out = tmp_path / "out"
    code, _, err = run(reduce_args(model_dir, out, "--experts", "4"), capfd)
    assert "--allow-pickle" in assert_clean_error(code, err, out)

    code, _, err = run(reduce_args(model_dir, out, "--experts", "4", "--allow-pickle", "--calib", calib), capfd)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4
    assert not list(out.glob("*.bin")), "the output is safetensors only"


@pytest.mark.parametrize(
    "extra",
    [
        ["--experts", "4", "--linkage", "centroid"],
        ["--experts", "4", "--merge", "median"],
        ["--experts", "4", "--router", "soft"],
        ["--experts", "4", "--router-rows", "mean"],
        ["--experts", "4", "--method", "kmeans"],
        ["--experts", "four"],
        ["--experts", "4", "--ratio", "0.5"],
        [],
    ],
    ids=lambda e: "".join(e) or "no-size",
)
def test_usage_errors(tmp_path, capfd, src, extra):
    """Unknown option values, a non-integer count, both or neither size options: argparse exit 2, one error line."""
    out = tmp_path / "out"
    code, out_text, err = run(["reduce", src, "--out", out, *extra], capfd)
    assert_clean_error(code, err, out)
    assert out_text == ""


def test_missing_out_is_a_usage_error(tmp_path, capfd, src):
    """Without --out the command is a usage error: exit 2, one error line, nothing written beside the model."""
    before = sorted(p.name for p in src.parent.iterdir())
    code, _, err = run(["reduce", src, "--experts", "4"], capfd)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert sorted(p.name for p in src.parent.iterdir()) == before


def cli_process(*argv) -> subprocess.CompletedProcess:
    """The real command in a new process, as a user's shell runs it."""
    return subprocess.run(
        [sys.executable, "-m", "moemerge", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_entry_point_error_is_one_line(tmp_path, src):
    """The real command (a new process) exits 2 with exactly one ``error:`` line on its stderr.

    An empty calibration file is found only after the model is loaded, so this also proves that no
    progress output of the loading reaches the real stderr.
    """
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    out = tmp_path / "out"
    proc = cli_process(*reduce_args(src, out, "--experts", "4", "--calib", empty))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


# ---------------------------------------------------------------- good input


def expert_count(folder: Path, family: str) -> int:
    """Routed experts per layer as transformers reads the folder's config.json; every expert-count key agrees."""
    raw = json.loads((folder / "config.json").read_text())
    count = getattr(AutoConfig.from_pretrained(folder), EXPERT_FIELD[family])
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        assert raw.get(key, count) == count, f"config.json {key}={raw[key]} disagrees with {count}"
    return count


def closed_form(config, family: str, r: int) -> tuple[int, int]:
    """(parameters removed, extra buffer elements removed) when every MoE layer goes from n to r experts.

    Each routed expert holds gate and up [I, H] and down [H, I] (3 I H) plus its router row (H);
    DeepSeek-V3 also stores a selection bias entry per expert, a buffer rather than a parameter.
    """
    n, hidden = getattr(config, EXPERT_FIELD[family]), config.hidden_size
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    assert not getattr(config, "mlp_only_layers", None) and getattr(config, "decoder_sparse_step", 1) == 1
    moe_layers = config.num_hidden_layers - getattr(config, "first_k_dense_replace", 0)
    params = moe_layers * (n - r) * (3 * inter * hidden + hidden)
    buffers = moe_layers * (n - r) if family == "deepseek_v3" else 0
    return params, buffers


def safetensors_counts(folder: Path) -> tuple[int, int, int]:
    """(bytes of the model's *.safetensors, bytes of tensor data alone, parameter elements), from the files' own headers.

    Parameter elements: all stored elements except DeepSeek-V3's ``e_score_correction_bias``, a buffer.
    """
    total = data = params = 0
    for file in folder.glob("model*.safetensors"):
        raw = file.read_bytes()
        header_len = struct.unpack("<Q", raw[:8])[0]
        total += len(raw)
        data += len(raw) - 8 - header_len
        header = json.loads(raw[8 : 8 + header_len])
        params += sum(
            math.prod(t["shape"])
            for name, t in header.items()
            if name != "__metadata__" and not name.endswith("e_score_correction_bias")
        )
    return total, data, params


@pytest.mark.parametrize("family", FAMILIES)
def test_summary_matches_closed_form(tmp_path, capfd, calib, family):
    """The printed summary's experts, parameter and byte counts equal counts of the files and the closed-form drop."""
    model_dir = save_tiny(family, tmp_path / family)
    out = tmp_path / "out"
    r = 4
    code, stdout, err = run(["reduce", model_dir, "--experts", r, "--out", out, "--calib", calib, *SMALL_CALIB], capfd)
    assert code == 0, err
    config = AutoConfig.from_pretrained(model_dir)
    n = expert_count(model_dir, family)
    removed_params, removed_buffers = closed_form(config, family, r)

    numbers = {}
    for key in ("parameters", "weights on disk"):
        match = re.search(rf"^{key}: ([\d,]+) -> ([\d,]+)", stdout, re.M)
        assert match, stdout
        numbers[key] = tuple(int(g.replace(",", "")) for g in match.groups())
    assert re.search(rf"{n} -> {r} experts in 2 MoE layers", stdout), stdout
    calib = re.search(r"^calibration: ([\d,]+) tokens", stdout, re.M)
    assert calib and int(calib.group(1).replace(",", "")) == 2 * 32

    assert not config.tie_word_embeddings  # else the file would hold the embedding once for two parameters
    (bytes_before, data_before, params_in_source), (bytes_after, data_after, params_in_out) = (
        safetensors_counts(model_dir),
        safetensors_counts(out),
    )
    assert numbers["parameters"] == (params_in_source, params_in_out)
    assert params_in_source - params_in_out == removed_params
    assert numbers["weights on disk"] == (bytes_before, bytes_after)
    assert data_before - data_after == 4 * (removed_params + removed_buffers)  # float32
    assert expert_count(out, family) == r


def test_ratio_rounds_to_nearest(tmp_path, capfd, src, calib):
    """--ratio F keeps round(F x n) experts: 0.3 of 8 experts is 2 (2.4 rounded), 0.7 is 6 (5.6 rounded)."""
    for ratio, expected in (("0.3", 2), ("0.7", 6)):
        out = tmp_path / f"out{ratio}"
        code, _, err = run(reduce_args(src, out, "--ratio", ratio, "--calib", calib), capfd)
        assert code == 0, err
        assert json.loads((out / "config.json").read_text())["num_local_experts"] == expected


def test_quiet_run_prints_nothing(tmp_path, capfd, src, calib):
    """--quiet: a successful run writes nothing to stdout or stderr, file descriptors included (no summary, no bars)."""
    out = tmp_path / "out"
    code, stdout, err = run(reduce_args(src, out, "--experts", "4", "--calib", calib), capfd)
    assert code == 0, err
    assert stdout == ""
    assert err == ""
    assert (out / "model.safetensors").is_file()


def test_grouped_router_allows_fewer_experts_than_top_k(tmp_path, capfd, src, calib):
    """--router grouped with --experts 1 (below top-2) succeeds: one expert per layer, a valid top-1 standard config."""
    out = tmp_path / "out"
    code, _, err = run(reduce_args(src, out, "--experts", "1", "--router", "grouped", "--calib", calib), capfd)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 1
    assert config["num_experts_per_tok"] == 1  # a top-k above the expert count could not load as a standard model
    model = AutoModelForCausalLM.from_pretrained(out)
    for layer in model.model.layers:
        assert layer.mlp.experts.gate_up_proj.shape[0] == 1
        assert layer.mlp.gate.weight.shape[0] == 1


def test_cli_defaults_are_the_python_api_defaults():
    """`reduce` and `plan` without options pass exactly the defaults of moemerge.pipeline.prepare (the Python API),
    and `compare`, `inspect` and `eval` those of their functions: each default is written once."""
    import inspect as introspect

    from moemerge.cli import _reduction_kwargs, build_parser
    from moemerge.compare import compare
    from moemerge.evaluation.evaluate import evaluate
    from moemerge.options import ReduceOptions
    from moemerge.report.inspection import inspect

    def defaults(function) -> dict:
        return {k: p.default for k, p in introspect.signature(function).parameters.items() if p.default is not p.empty}

    parser = build_parser()
    for command in ("reduce", "plan"):
        args = parser.parse_args([command, "MODEL", "--experts", "4", "--out", "OUT.json"])
        assert _reduction_kwargs(args) == ReduceOptions().as_dict() | {"experts": 4}, command
    checks = {
        "compare": (["compare", "MODEL", "--methods", "hc-smoe", "--experts", "4", "--out", "OUT"], compare),
        "inspect": (["inspect", "MODEL", "--out", "OUT"], inspect),
        "eval": (["eval", "MODEL"], evaluate),
    }
    for command, (argv, function) in checks.items():
        args = vars(parser.parse_args(argv))
        shared = {k: v for k, v in defaults(function).items() if k in args and k not in ("calib", "tasks")}
        assert shared and {k: args[k] for k in shared} == shared, command
