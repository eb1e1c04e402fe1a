"""mc-smoe's compact output: experts stored only as low-rank and sparse factors, computed from them by
``moemerge.load_model`` (moemerge.checkpoint.compressed).

Oracle: the same reduction written with ``--mc-smoe-dense`` holds the dense L R + S of every expert (checked against
numpy's SVD in tests/test_low_rank.py) and runs in vanilla transformers' own forward; the parameter count is recounted
from the factor file's tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, save_tiny
from safetensors.torch import load_file, save_file
from test_cli import SMALL_CALIB, TEXT, assert_clean_error, reduce_args
from transformers import AutoModelForCausalLM

import moemerge
from moemerge.checkpoint.compressed import CompressedExperts

LOWRANK = "moemerge_lowrank.safetensors"
PROMPT = torch.tensor([[5, 17, 300, 2048, 9, 1000, 77, 4000, 12, 3]])
SMALL = dict(calib_samples=2, calib_seq_len=32, progress=False, report=False)
CASES = [
    ("mixtral", {}),
    ("qwen2_moe", {}),
    ("qwen3_moe", {"rank": 2, "sparsity": 0.5}),
    ("olmoe", {"param_budget": 0.6}),
    ("deepseek_v3", {}),
    ("mixtral", {"router": "grouped"}),
    ("olmoe", {"budget": "frequency", "experts": 5}),
]


def model_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in folder.glob("model*.safetensors"):
        tensors |= load_file(file)
    return tensors


@pytest.mark.parametrize(
    "family,options", CASES, ids=[f"{f}-{'-'.join(map(str, o.values())) or 'mc'}" for f, o in CASES]
)
def test_compact_output_computes_its_dense_reconstruction(tmp_path, family, options):
    """The default output's model files hold every tensor of the --mc-smoe-dense output bit for bit except the routed
    experts, which are only in the (identical) factor file; load_model's logits equal vanilla transformers' on the
    dense output (load_model's for grouped and budget outputs, which need it) to float32 rounding; its parameters are
    CompressedExperts' factors, as many as the factor file holds and (but for grouped routing's n-row routers) as
    moemerge.json records, and no dense expert is formed; and the compact output takes fewer bytes."""
    src = save_tiny(family, tmp_path / "src")
    reduce_options = {"method": "mc-smoe", "experts": 4} | SMALL | options
    moemerge.reduce(src, tmp_path / "compact", **reduce_options)
    moemerge.reduce(src, tmp_path / "dense", mc_smoe_dense=True, **reduce_options)
    compact, dense = tmp_path / "compact", tmp_path / "dense"
    record = json.loads((compact / "moemerge.json").read_text())
    assert record["compression"]["dense"] is False
    assert json.loads((dense / "moemerge.json").read_text())["compression"]["dense"] is True
    assert (compact / LOWRANK).read_bytes() == (dense / LOWRANK).read_bytes()

    kept, full = model_tensors(compact), model_tensors(dense)
    experts = {name for name in full if ".experts." in name}
    assert experts and sorted(kept) == sorted(set(full) - experts)
    assert all(torch.equal(t, full[name]) for name, t in kept.items())

    vanilla = "router" not in options and "budget" not in options
    oracle = AutoModelForCausalLM.from_pretrained(dense).eval() if vanilla else moemerge.load_model(dense)
    model = moemerge.load_model(compact)
    with torch.no_grad():
        expected, got = oracle(input_ids=PROMPT).logits, model(input_ids=PROMPT).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    factors = load_file(compact / LOWRANK)
    factor_count = sum(t.numel() for name, t in factors.items() if not name.endswith(".indices"))
    dense_experts = sum(t.numel() for name, t in full.items() if name in experts)
    parameters = sum(p.numel() for p in model.parameters())
    if "router" not in options:  # grouped routing loads the original n-row routers beside the stored r-row ones
        assert parameters == record["compression"]["stored_parameters"]
    assert parameters == sum(p.numel() for p in oracle.parameters()) - dense_experts + factor_count
    blocks = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    assert blocks and all(isinstance(block.experts, CompressedExperts) for block in blocks)
    assert not [name for name, _ in model.named_parameters() if ".mlp.experts." in name and "_proj" in name]
    size = sum(f.stat().st_size for f in compact.glob("*.safetensors"))
    assert size < sum(f.stat().st_size for f in dense.glob("*.safetensors"))


def damage_factors(out, damage: str) -> None:
    file = out / LOWRANK
    tensors = load_file(file)
    key = "layers.1.experts.2.up"
    if damage == "missing-file":
        file.unlink()
        return
    if damage == "missing-key":
        del tensors[f"{key}.values"]
    elif damage == "unsorted":
        tensors[f"{key}.indices"] = tensors[f"{key}.indices"].flip(0).contiguous()
    elif damage == "outside":
        tensors[f"{key}.indices"] = tensors[f"{key}.indices"] + 10**6
    elif damage == "shape":
        tensors[f"{key}.left"] = tensors[f"{key}.left"][:, :1].contiguous()
    elif damage == "rank":  # every expert of the layer consistent, but its up rank differs from its gate's
        for e in range(4):
            tensors[f"layers.1.experts.{e}.up.left"] = tensors[f"layers.1.experts.{e}.up.left"][:, :1].contiguous()
            tensors[f"layers.1.experts.{e}.up.right"] = tensors[f"layers.1.experts.{e}.up.right"][:1].contiguous()
    save_file(tensors, file)


@pytest.mark.parametrize("damage", ["missing-file", "missing-key", "unsorted", "outside", "shape", "rank"])
def test_a_damaged_factor_file_is_one_error_line(tmp_path, capfd, damage):
    """A compact output whose factor file is gone, lacks a factor, holds indices not ascending or outside the matrix,
    or factors of another shape: eval says so in one line naming the file, exit 2, and load_model raises
    MoemergeError, instead of a KeyError or a sparse-matrix crash."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 2, encoding="utf-8")
    src = save_tiny("mixtral", tmp_path / "src")
    out = tmp_path / "out"
    moemerge.reduce(src, out, experts=4, method="mc-smoe", calib=str(text), **SMALL)
    damage_factors(out, damage)
    code, _, err = run_cli(["eval", out, "--data", text, "--no-cost", "--quiet"], capfd)
    line = assert_clean_error(code, err, tmp_path / "no-output")
    assert LOWRANK in line
    with pytest.raises(moemerge.MoemergeError, match=LOWRANK):
        moemerge.load_model(out)


@pytest.mark.parametrize("command", ["reduce", "inspect", "compare"])
def test_commands_that_need_dense_experts_refuse_a_compact_output(tmp_path, capfd, command):
    """reduce, inspect and compare read the experts' weights, which a compact output does not hold: one line naming
    --mc-smoe-dense, exit 2, nothing written (and nothing read as random weights)."""
    src = save_tiny("mixtral", tmp_path / "src")
    compact = tmp_path / "compact"
    moemerge.reduce(src, compact, experts=4, method="mc-smoe", **SMALL)
    out = tmp_path / "out"
    argv = {
        "reduce": reduce_args(compact, out, "--experts", "2"),
        "inspect": ["inspect", compact, "--out", out, "--quiet"],
        "compare": ["compare", compact, "--methods", "hc-smoe", "--experts", "2", "--out", out, *SMALL_CALIB],
    }[command]
    code, _, err = run_cli(argv, capfd)
    line = assert_clean_error(code, err, out)
    assert "compact mc-smoe output" in line and "--mc-smoe-dense" in line


def test_dense_flag_without_mc_smoe_is_refused(tmp_path, capfd):
    """--mc-smoe-dense chooses how mc-smoe stores its experts; with a method that compresses nothing it is an error,
    not silently ignored."""
    src = save_tiny("mixtral", tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run_cli(reduce_args(src, out, "--experts", "4", "--mc-smoe-dense"), capfd)
    assert "--mc-smoe-dense" in assert_clean_error(code, err, out)


def test_compact_layers_are_read_one_at_a_time(tmp_path):
    """The factors of a layer are read when its turn comes: a LayerStream holds only meta tensors between layers."""
    from transformers import AutoConfig

    from moemerge.checkpoint import inspect_source
    from moemerge.streaming.calibrate import LayerStream

    src = save_tiny("qwen3_moe", tmp_path / "src")
    out = tmp_path / "out"
    moemerge.reduce(src, out, experts=4, method="mc-smoe", **SMALL)
    source = inspect_source(out, compact=True)
    stream = LayerStream(source, AutoConfig.from_pretrained(out), "auto", "cpu")
    assert all(t.is_meta for t in stream.skeleton.model.layers.parameters())
    with stream.layer(1) as (layer, _):
        assert not any(t.is_meta for t in layer.parameters())
        assert all(t.is_meta for t in stream.skeleton.model.layers[0].parameters())
    assert all(t.is_meta for t in stream.skeleton.model.layers.parameters())
