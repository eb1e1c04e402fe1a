"""moemerge inspect and the report reduce writes: every figure exists and is a valid PNG that the HTML shows,
the numbers are those of an independent recount, and the files are deterministic.

Oracles: parameter counts summed over the model's own tensors; usage recounted from the router logits that
transformers returns (``output_router_logits``) on the same calibration tokens; groups from moemerge.json.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from PIL import Image
from test_cli import SMALL_CALIB, TEXT, assert_clean_error, run
from transformers import AutoModelForCausalLM, AutoTokenizer

from moemerge.calibration import load_calibration

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def calib_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("calib")
    first, second = folder / "prose.txt", folder / "other.txt"
    first.write_text(TEXT, encoding="utf-8")
    second.write_text(TEXT.upper() + " 12345 def f(x): return x\n" * 8, encoding="utf-8")
    return [first, second]


def assert_valid_report(folder: Path, moe_layers: list[int]) -> str:
    """Every PNG the report should have exists, opens with PIL, and is shown by report.html; returns the HTML."""
    names = ["usage.png"] + [f"layer_{layer:03d}.png" for layer in moe_layers]
    page = (folder / "report.html").read_text(encoding="utf-8")
    shown = re.findall(r'<img src="([^"]+)"', page)
    assert shown == names
    for name in names:
        data = (folder / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        with Image.open(folder / name) as image:
            image.verify()
    assert "http" not in page and "<script" not in page
    assert html.escape((folder / "summary.txt").read_text(encoding="utf-8").strip()) in page
    return page


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_inspect_writes_every_figure_and_true_numbers(tmp_path, capfd, calib_files, family):
    src = save_tiny(family, tmp_path / family)
    out = tmp_path / "report"
    argv = ["inspect", src, "--calib", *calib_files, *SMALL_CALIB, "--out", out, "--json"]
    code, stdout, _ = run(argv, capfd)
    assert code == 0
    result = json.loads(stdout)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    arch = result["architecture"]
    assert arch["parameters"] == sum(p.numel() for p in model.parameters())
    experts = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
    assert arch["expert_parameters"] == sum(p.numel() for m in experts for p in m.parameters())
    assert arch["moe_layers"] == len(experts) and arch["decoder_layers"] == model.config.num_hidden_layers
    assert arch["shared_experts"] == (family != "mixtral")
    assert arch["other_parameters"] + arch["expert_parameters"] + arch["shared_expert_parameters"] == arch["parameters"]
    moe_layers = [int(name.split(".")[2]) for name, _ in model.named_modules() if name.endswith("mlp.experts")]
    assert_valid_report(out, moe_layers)
    assert list(result["usage"]) == [str(p) for p in calib_files]
    for layer_usage in result["usage"].values():
        assert sorted(int(k) for k in layer_usage) == moe_layers
        for row in layer_usage.values():
            assert sum(row) == pytest.approx(1.0)
    # the mixtral router is a plain softmax top-k: recount it from transformers' own router logits
    if family == "mixtral":
        tokenizer = AutoTokenizer.from_pretrained(src)
        calibration = load_calibration(str(calib_files[0]), tokenizer, 2, 32, 0, model.config.vocab_size)
        counts = 0
        with torch.inference_mode():
            for seq in calibration.sequences:
                logits = model(input_ids=seq[None], output_router_logits=True).router_logits
                top = [lg.topk(model.config.num_experts_per_tok, dim=-1).indices.flatten() for lg in logits]
                counts = counts + torch.stack([torch.bincount(t, minlength=logits[0].shape[-1]) for t in top])
        shares = counts.double() / counts.sum(dim=1, keepdim=True)
        got = torch.tensor([result["usage"][str(calib_files[0])][str(layer)] for layer in moe_layers])
        assert torch.allclose(got.double(), shares)


def test_inspect_is_deterministic(tmp_path, capfd, calib_files):
    src = save_tiny("olmoe", tmp_path / "olmoe")
    for name in ("a", "b"):
        assert (
            run(["inspect", src, "--calib", calib_files[0], *SMALL_CALIB, "--out", tmp_path / name, "--quiet"], capfd)[
                0
            ]
            == 0
        )
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_inspect_prints_the_summary(tmp_path, capfd, calib_files):
    src = save_tiny("mixtral", tmp_path / "mixtral")
    code, stdout, _ = run(["inspect", src, "--calib", calib_files[0], *SMALL_CALIB, "--out", tmp_path / "r"], capfd)
    assert code == 0
    summary = (tmp_path / "r" / "summary.txt").read_text(encoding="utf-8")
    assert summary.strip() in stdout and "8 experts per layer, top-2" in summary
    assert summary.count("  layer ") == len(list((tmp_path / "r").glob("layer_*.png")))


@pytest.mark.parametrize("bad", ["same-calib-twice", "out-exists"])
def test_inspect_bad_input_is_one_line(tmp_path, capfd, calib_files, bad):
    src = save_tiny("mixtral", tmp_path / "mixtral")
    out = tmp_path / "report"
    calib = [calib_files[0], calib_files[0]] if bad == "same-calib-twice" else [calib_files[0]]
    if bad == "out-exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    code, _, err = run(["inspect", src, "--calib", *calib, *SMALL_CALIB, "--out", out], capfd)
    if bad == "out-exists":
        assert code == 2 and "--force" in err and (out / "keep.txt").read_text() == "mine"
    else:
        assert "twice" in assert_clean_error(code, err, out)


def test_reduce_writes_the_report_of_its_groups(tmp_path, capfd, calib_files):
    src = save_tiny("mixtral", tmp_path / "mixtral")
    out, bare = tmp_path / "out", tmp_path / "bare"
    argv = ["reduce", src, "--experts", "4", "--calib", calib_files[0], *SMALL_CALIB, "--quiet"]
    assert run([*argv, "--out", out], capfd)[0] == 0
    layers = json.loads((out / "moemerge.json").read_text())["layers"]
    assert_valid_report(out / "report", [entry["layer"] for entry in layers])
    summary = (out / "report" / "summary.txt").read_text(encoding="utf-8")
    for entry in layers:
        assert f"  layer {entry['layer']}:" in summary and f"groups {entry['groups']}" in summary
    assert run([*argv, "--out", bare, "--no-report"], capfd)[0] == 0
    assert not (bare / "report").exists()
    assert {p.name: p.read_bytes() for p in bare.glob("*.safetensors")} == {
        p.name: p.read_bytes() for p in out.glob("*.safetensors")
    }
