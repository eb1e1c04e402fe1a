"""Recipes: plan then apply equals a direct reduce byte for byte; apply refuses another model in one line.

Oracles: the direct ``moemerge reduce`` output (same options) for the weights; hashlib over the files for
byte identity; models that differ only in their weights (another seed) or in their family for the checks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import save_tiny
from test_cli import SMALL_CALIB, assert_clean_error, run

from moemerge.checkpoint.identity import weights_sha256
from moemerge.recipes import SCHEMA


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return save_tiny("mixtral", tmp_path_factory.mktemp("src") / "mixtral")


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize(
    "options",
    [
        ["--experts", "4"],
        ["--experts", "3", "--cluster", "fcm"],
        ["--experts", "4", "--budget", "frequency", "--merge", "fix-dom"],
        ["--experts", "5", "--router", "grouped", "--linkage", "single"],
        ["--ratio", "0.5", "--method", "mc-smoe", "--rank", "4"],
        ["--experts", "4", "--method", "reap"],
        ["--experts", "4", "--method", "mone", "--router", "grouped"],
    ],
    ids=["hc-smoe", "fcm", "budget-fixdom", "grouped", "mc-smoe", "reap", "mone"],
)
def test_plan_then_apply_is_byte_identical_to_reduce(tmp_path, capfd, src, options):
    recipe, planned, direct = tmp_path / "recipe.json", tmp_path / "planned", tmp_path / "direct"
    assert run(["plan", src, "--out", recipe, *SMALL_CALIB, "--quiet", *options], capfd)[0] == 0
    assert run(["apply", recipe, src, "--out", planned, "--quiet"], capfd)[0] == 0
    assert run(["reduce", src, "--out", direct, *SMALL_CALIB, "--quiet", *options], capfd)[0] == 0
    assert file_hashes(planned) and file_hashes(planned) == file_hashes(direct)
    assert (planned / "moemerge.json").read_bytes() == (direct / "moemerge.json").read_bytes()
    content = json.loads(recipe.read_text())
    assert content["schema"] == SCHEMA
    recorded = json.loads((direct / "moemerge.json").read_text())["layers"]
    assert [entry["groups"] for entry in content["layers"]] == [entry["groups"] for entry in recorded]


def test_recipe_is_small_readable_json(tmp_path, capfd, src):
    recipe = tmp_path / "recipe.json"
    code, out, _ = run(["plan", src, "--out", recipe, *SMALL_CALIB, "--experts", "4"], capfd)
    assert code == 0 and "wrote" in out
    text = recipe.read_text()
    assert len(text) < 8000 and text.count("\n") > 20  # indented, one value per line
    content = json.loads(text)
    assert set(content) == {"schema", "model", "options", "calibration", "layers"}
    assert content["options"]["experts"] == 4 and content["options"]["method"] == "hc-smoe"
    assert content["model"]["model_type"] == "mixtral" and content["model"]["num_experts"] == 8


def test_apply_to_a_model_with_other_weights_fails_in_one_line(tmp_path, capfd, src):
    other = save_tiny("mixtral", tmp_path / "other", seed=1)
    recipe, out = tmp_path / "recipe.json", tmp_path / "out"
    assert run(["plan", src, "--out", recipe, *SMALL_CALIB, "--experts", "4", "--quiet"], capfd)[0] == 0
    code, _, err = run(["apply", recipe, other, "--out", out, "--quiet"], capfd)
    assert "different weights" in assert_clean_error(code, err, out)


def test_apply_to_another_family_names_what_differs(tmp_path, capfd, src):
    other = save_tiny("olmoe", tmp_path / "olmoe")
    recipe, out = tmp_path / "recipe.json", tmp_path / "out"
    assert run(["plan", src, "--out", recipe, *SMALL_CALIB, "--experts", "4", "--quiet"], capfd)[0] == 0
    code, _, err = run(["apply", recipe, other, "--out", out, "--quiet"], capfd)
    line = assert_clean_error(code, err, out)
    assert "config.json differs" in line and "model_type mixtral vs olmoe" in line


def test_apply_with_changed_calibration_text_fails(tmp_path, capfd, src):
    calib = tmp_path / "calib.txt"
    calib.write_text("One calibration text, long enough for two short windows of tokens. " * 20)
    recipe, out = tmp_path / "recipe.json", tmp_path / "out"
    argv = ["plan", src, "--out", recipe, "--calib", calib, *SMALL_CALIB, "--experts", "4", "--quiet"]
    assert run(argv, capfd)[0] == 0
    calib.write_text("Another calibration text, also long enough for two short windows of tokens. " * 20)
    code, _, err = run(["apply", recipe, src, "--out", out, "--quiet"], capfd)
    assert "calibration tokens" in assert_clean_error(code, err, out)


@pytest.mark.parametrize(
    "content",
    ["not json", json.dumps({"schema": "moemerge.recipe/0"}), json.dumps({"schema": SCHEMA, "model": {}})],
    ids=["not-json", "old-schema", "missing-keys"],
)
def test_bad_recipe_files_are_one_line_errors(tmp_path, capfd, src, content):
    recipe, out = tmp_path / "recipe.json", tmp_path / "out"
    recipe.write_text(content)
    code, _, err = run(["apply", recipe, src, "--out", out], capfd)
    assert str(recipe) in assert_clean_error(code, err, out)


def test_tampered_groups_are_refused(tmp_path, capfd, src):
    recipe, out = tmp_path / "recipe.json", tmp_path / "out"
    assert run(["plan", src, "--out", recipe, *SMALL_CALIB, "--experts", "4", "--quiet"], capfd)[0] == 0
    content = json.loads(recipe.read_text())
    content["layers"][0]["groups"][0].append(content["layers"][0]["groups"][1][0])  # one expert in two groups
    recipe.write_text(json.dumps(content))
    code, _, err = run(["apply", recipe, src, "--out", out], capfd)
    assert "hold an expert twice" in assert_clean_error(code, err, out)


def test_a_grouped_merge_plan_that_leaves_an_expert_out_is_refused(tmp_path, capfd, src):
    """A hand-edited --router grouped recipe of a merging method whose groups miss an expert (the original router
    would send that expert's tokens nowhere): one error line naming the layer and the expert, nothing written."""
    recipe, out = tmp_path / "recipe.json", tmp_path / "out"
    plan = ["plan", src, "--out", recipe, *SMALL_CALIB, "--experts", "4", "--router", "grouped", "--quiet"]
    assert run(plan, capfd)[0] == 0
    content = json.loads(recipe.read_text())
    groups = content["layers"][1]["groups"]
    member = max(groups, key=len).pop()
    recipe.write_text(json.dumps(content))
    code, _, err = run(["apply", recipe, src, "--out", out], capfd)
    line = assert_clean_error(code, err, out)
    assert f"layer {content['layers'][1]['layer']}" in line and f"[{member}]" in line and "in no group" in line


def test_plan_refuses_to_replace_a_recipe_without_force(tmp_path, capfd, src):
    recipe = tmp_path / "recipe.json"
    recipe.write_text("keep me")
    code, _, err = run(["plan", src, "--out", recipe, *SMALL_CALIB, "--experts", "4"], capfd)
    assert "--force" in err and code == 2 and recipe.read_text() == "keep me"
    code, _, err = run(["plan", src, "--out", tmp_path / "recipe.txt", *SMALL_CALIB, "--experts", "4"], capfd)
    assert code == 2 and "must end in .json" in err


def test_weights_fingerprint_sees_a_changed_tensor_and_ignores_nothing_else(tmp_path, src):
    """Changing the bytes at the middle of one tensor changes the fingerprint; a copy of the files does not."""
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    file = next(copy.glob("*.safetensors"))
    assert weights_sha256([file]) == weights_sha256(list(src.glob("*.safetensors")))
    data = bytearray(file.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    begin, end = next(v for k, v in sorted(header.items()) if k != "__metadata__")["data_offsets"]
    data[8 + header_len + (begin + end) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    assert weights_sha256([file]) != weights_sha256(list(src.glob("*.safetensors")))


def test_json_summaries_are_the_recorded_facts(tmp_path, capfd, src):
    """--json prints one JSON object on stdout: plan's is the recipe file, reduce's and apply's groups are those in
    the output's moemerge.json, and its sizes are the files' and the model's."""
    recipe, out, applied = tmp_path / "recipe.json", tmp_path / "out", tmp_path / "applied"
    code, stdout, _ = run(["plan", src, "--out", recipe, *SMALL_CALIB, "--experts", "4", "--json"], capfd)
    assert code == 0 and json.loads(stdout) == json.loads(recipe.read_text())
    for argv, folder in (
        (["reduce", src, "--out", out, *SMALL_CALIB, "--experts", "4", "--json"], out),
        (["apply", recipe, src, "--out", applied, "--json"], applied),
    ):
        code, stdout, _ = run(argv, capfd)
        summary = json.loads(stdout)
        recorded = json.loads((folder / "moemerge.json").read_text())["layers"]
        assert code == 0 and summary["out"] == str(folder)
        assert summary["groups"] == {str(e["layer"]): e["groups"] for e in recorded}
        assert summary["bytes_after"] == sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        assert summary["experts"] == 4 and summary["num_experts"] == 8
