"""A reduced checkpoint has what llama.cpp's converter (convert_hf_to_gguf.py) reads, named as it expects.

The oracle is the ``gguf`` package, which llama.cpp maintains beside that converter: its ``TensorNameMap`` is the
table the converter maps every Hugging Face tensor name through, and ``MODEL_TENSORS`` lists the tensors each
GGUF architecture has. The converter stacks a layer's routed experts ``experts.0 .. experts.{n-1}`` (n read from
the config) into one tensor per matrix, named as the per-expert name without the expert index; it fails on a
missing index and leaves extra ones unprocessed. The conversion and a llama.cpp run themselves are
benchmarks/runtimes/llama_cpp.py (they need llama.cpp built, minutes).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import gguf
import pytest
from conftest import FAMILIES, save_tiny
from safetensors import safe_open

import moemerge

# The GGUF architecture the converter registers each family's model class to (llama.cpp's conversion/__init__.py).
ARCH = {
    "mixtral": gguf.MODEL_ARCH.LLAMA,
    "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
    "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE,
    "olmoe": gguf.MODEL_ARCH.OLMOE,
    "deepseek_v3": gguf.MODEL_ARCH.DEEPSEEK2,
}
T = gguf.MODEL_TENSOR
ROUTED = {T.FFN_GATE_INP, T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP}
SHARED = {T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP}
MOE_LAYER = {  # GGUF tensors every MoE layer of the family must have
    "mixtral": ROUTED,
    "qwen2_moe": ROUTED | SHARED | {T.FFN_GATE_INP_SHEXP},
    "qwen3_moe": ROUTED,
    "olmoe": ROUTED,
    "deepseek_v3": ROUTED | SHARED | {T.FFN_EXP_PROBS_B},
}
EXPERT = re.compile(r"^(.*\.experts\.)(\d+)\.(.*)$")


def tensor_names(folder: Path) -> list[str]:
    names = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            names += list(f.keys())
    return names


def gguf_layout(folder: Path, family: str, blocks: int) -> tuple[dict[int, set], dict[tuple[int, str], set[int]]]:
    """({block: GGUF tensor types}, {(block, per-expert name without index): expert indices}) the converter would
    write; an unmappable tensor fails the test with its name."""
    names = gguf.TensorNameMap(ARCH[family], blocks)
    layout: dict[int, set] = {}
    experts: dict[tuple[int, str], set[int]] = {}
    for name in tensor_names(folder):
        block = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        if match := EXPERT.match(name):
            prefix, index, rest = match.groups()
            experts.setdefault((block, prefix + rest), set()).add(int(index))
            name = prefix + rest  # the converter's stacked name
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")  # the converter renames it so
        found = names.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        assert found is not None, f"llama.cpp has no GGUF name for {name!r} ({family})"
        assert found[0] in gguf.MODEL_TENSORS[ARCH[family]], (name, found)
        layout.setdefault(block, set()).add(found[0])
    return layout, experts


def write_calibration(path: Path) -> Path:
    rng = random.Random(0)
    rows = [[rng.randrange(1, 4096) for _ in range(40)] for _ in range(2)]
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["hc-smoe", "reap"])
def test_reduced_checkpoint_is_what_llama_cpp_converts(tmp_path, family, method):
    source = save_tiny(family, tmp_path / "source")
    out = tmp_path / "out"
    calib = write_calibration(tmp_path / "calib.jsonl")
    moemerge.reduce(
        source, out, experts=4, method=method, calib=str(calib), calib_samples=2, calib_seq_len=32, progress=False
    )
    config = json.loads((out / "config.json").read_text())
    blocks = config["num_hidden_layers"]
    layout, experts = gguf_layout(out, family, blocks)
    counts = {config[field] for field in ("num_local_experts", "num_experts", "n_routed_experts") if field in config}
    assert counts == {4} and config["num_experts_per_tok"] <= 4  # the converter reads the first field it finds
    width = config.get("moe_intermediate_size", config["intermediate_size"])
    moe_blocks = {b for b, types in layout.items() if T.FFN_GATE_INP in types}
    assert moe_blocks == set(range(config.get("first_k_dense_replace", 0), blocks))
    for block in moe_blocks:
        assert MOE_LAYER[family] <= layout[block], (block, MOE_LAYER[family] - layout[block])
    assert {b for b, _ in experts} == moe_blocks
    for (block, name), indices in experts.items():
        assert indices == set(range(4)), (block, name, indices)  # what the converter stacks: 0 .. n-1, no more
    with safe_open(out / "model.safetensors", framework="pt") as f:
        for (_, name), indices in experts.items():  # torch.stack in the converter needs one shape
            down = name.endswith(("down_proj.weight", "w2.weight"))
            for e in indices:
                shape = f.get_slice(name.replace(".experts.", f".experts.{e}.", 1)).get_shape()
                assert shape == ([config["hidden_size"], width] if down else [width, config["hidden_size"]]), (name, e)
    if family == "deepseek_v3":  # grouped routing: the converter writes n_group and topk_group as they are
        assert config["n_routed_experts"] % config["n_group"] == 0 and config["topk_group"] <= config["n_group"]
