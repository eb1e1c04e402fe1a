"""moemerge inspect and the report reduce writes: every figure exists and is a valid PNG that the HTML shows,
the numbers are those of an independent recount, and the files are deterministic.

Oracles: parameter counts summed over the model's own tensors; usage recounted from the router logits that
transformers returns (``output_router_logits``) on the same calibration tokens; groups from moemerge.json.
"""

from __future__ import annotations

import html
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, pickle_copy, save_tiny
from PIL import Image
from scipy.spatial.distance import pdist
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


def oracle_layer_numbers(model, sequences: list[torch.Tensor]) -> dict[int, dict]:
    """Per MoE decoder layer, recounted here from the model's own router and expert weights: top-k counts [n] (the
    ids block.gate selects, captured with a forward hook) and the mean over all tokens of every expert's output
    E_j(x) [n, H] in float64 (block inputs captured with a pre-hook; gate rows first in the fused gate_up_proj)."""
    blocks = {i: layer.mlp for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}
    ids: dict[int, list[torch.Tensor]] = {i: [] for i in blocks}
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in blocks}
    handles = []
    for i, block in blocks.items():
        handles.append(block.gate.register_forward_hook(lambda m, a, out, i=i: ids[i].append(out[2].reshape(-1))))
        handles.append(
            block.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].reshape(-1, a[0].shape[-1])))
        )
    with torch.inference_mode():
        for seq in sequences:
            model(input_ids=seq[None], use_cache=False)
    for handle in handles:
        handle.remove()
    numbers = {}
    for i, block in blocks.items():
        n = block.experts.gate_up_proj.shape[0]
        x = torch.cat(inputs[i]).double()
        means = []
        for j in range(n):
            gate_up, down = (
                block.experts.gate_up_proj[j].detach().double(),
                block.experts.down_proj[j].detach().double(),
            )
            half = gate_up.shape[0] // 2
            out = (torch.nn.functional.silu(x @ gate_up[:half].T) * (x @ gate_up[half:].T)) @ down.T
            means.append(out.mean(0))
        counts = torch.bincount(torch.cat(ids[i]), minlength=n)
        numbers[i] = {"counts": counts, "mean_output": torch.stack(means).numpy()}
    return numbers


SUMMARY_LINE = re.compile(
    r"  layer (\d+): most used (\d+) \(([\d.]+) %\), least used (\d+) \(([\d.]+) %\), usage entropy ([\d.]+) of 1; "
    r"closest outputs: experts (\d+) and (\d+) \(([^)]+)\)"
)


def assert_summary_numbers(summary: str, name: str, numbers: dict[int, dict]) -> None:
    """The summary's lines for calibration set ``name``: most / least used experts (shares to the printed 0.1 %),
    usage entropy / log n (to 0.01) and the closest pair of mean outputs (scipy pdist) with its distance (3 digits),
    against :func:`oracle_layer_numbers`."""
    lines = summary.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith(f"calibration {name}:"))
    parsed = [SUMMARY_LINE.fullmatch(line) for line in lines[start + 1 : start + 1 + len(numbers)]]
    assert all(parsed), lines[start : start + 1 + len(numbers)]
    for match, (layer, expected) in zip(parsed, numbers.items(), strict=True):
        assert int(match[1]) == layer
        shares = expected["counts"].double().numpy() / float(expected["counts"].sum())
        most, least = int(match[2]), int(match[4])
        assert shares[most] == shares.max() and float(match[3]) == pytest.approx(100 * shares.max(), abs=0.051)
        assert shares[least] == shares.min() and float(match[5]) == pytest.approx(100 * shares.min(), abs=0.051)
        p = shares[shares > 0]
        entropy = float(-(p * np.log(p)).sum() / np.log(len(shares)))
        assert float(match[6]) == pytest.approx(entropy, abs=0.0051)
        distances = pdist(expected["mean_output"])
        order = np.argsort(distances)
        # the runner-up must be farther than the float32 round-off of the statistics (about 1e-6 relative)
        assert distances[order[1]] > distances[order[0]] * (1 + 1e-4), "near-tie for the closest pair: pick other data"
        pairs = list(itertools.combinations(range(len(shares)), 2))
        assert (int(match[7]), int(match[8])) == pairs[order[0]]
        assert float(match[9]) == pytest.approx(distances[order[0]], rel=5e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_writes_every_figure_and_true_numbers(tmp_path, capfd, calib_files, family):
    """inspect on every family with two calibration sets: architecture counts summed over the model's own tensors;
    per set and MoE layer, the usage shares, most / least used experts, usage entropy and closest pair of mean expert
    outputs equal a recount from the model's own router and expert weights; every figure is a valid PNG the HTML
    shows."""
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
    shared = [m for name, m in model.named_modules() if name.endswith(("mlp.shared_expert", "mlp.shared_experts"))]
    assert arch["shared_experts"] == bool(shared) == (family in ("qwen2_moe", "deepseek_v3"))
    assert arch["other_parameters"] + arch["expert_parameters"] + arch["shared_expert_parameters"] == arch["parameters"]
    moe_layers = [int(name.split(".")[2]) for name, _ in model.named_modules() if name.endswith("mlp.experts")]
    assert_valid_report(out, moe_layers)
    assert list(result["usage"]) == [str(p) for p in calib_files]
    tokenizer = AutoTokenizer.from_pretrained(src)
    summary = (out / "summary.txt").read_text(encoding="utf-8")
    assert result["summary"] == summary.strip()
    for path in calib_files:
        calibration = load_calibration(str(path), tokenizer, 2, 32, 0, model.config.vocab_size)
        numbers = oracle_layer_numbers(model, calibration.sequences)
        assert sorted(numbers) == moe_layers
        got = torch.tensor([result["usage"][str(path)][str(layer)] for layer in moe_layers], dtype=torch.float64)
        counts = torch.stack([numbers[layer]["counts"] for layer in moe_layers]).double()
        torch.testing.assert_close(got, counts / counts.sum(dim=1, keepdim=True), rtol=0, atol=1e-12)
        assert_summary_numbers(summary, str(path), numbers)


def test_inspect_of_pickle_weights_loads_the_whole_model_to_the_same_report(tmp_path, capfd, calib_files):
    """Pickle weights cannot be read one layer at a time: inspect loads them whole, and its report (every file) and
    result equal the layer-by-layer inspect of the same weights in safetensors."""
    src = save_tiny("olmoe", tmp_path / "safetensors")
    pickled = pickle_copy(src, tmp_path / "pickle")
    results, files = {}, {}
    for name, model in (("layers", src), ("whole", pickled)):
        argv = ["inspect", model, "--calib", *calib_files, *SMALL_CALIB, "--out", tmp_path / name, "--json"]
        code, stdout, err = run([*argv, "--allow-pickle"], capfd)
        assert code == 0, err
        path = str(model).encode()  # the report names the model's folder
        results[name] = json.loads(stdout.replace(str(model), "MODEL"))
        files[name] = {p.name: p.read_bytes().replace(path, b"MODEL") for p in (tmp_path / name).iterdir()}
    assert results["layers"] == results["whole"] and "MODEL" in results["layers"]["summary"]
    assert files["layers"] == files["whole"] and len(files["layers"]) > 3


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
