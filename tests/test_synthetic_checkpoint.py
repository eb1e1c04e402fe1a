"""The synthetic checkpoint writer of the speed benchmark (benchmarks/speed/synthetic.py), on tiny shapes.

Each family's checkpoint must load with vanilla transformers with no missing and no unexpected keys, hold what
transformers' own ``save_pretrained`` writes for that class (names, shapes, dtypes), be byte-identical for the
same seed, and have an index that matches its shards; the full-size layouts must have the real models' sizes.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "speed" / "synthetic.py"
_spec = importlib.util.spec_from_file_location("synthetic", SCRIPT)
synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic)

LAYERS, EXPERTS, VOCAB, HIDDEN = 2, 4, 128, 64
TINY = {  # shape: (overrides, intermediate size of a routed expert, disk name of expert 0's first projection)
    "qwen1.5-moe-a2.7b": (
        {
            "hidden_size": HIDDEN,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 96,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        },
        32,
        "model.layers.{}.mlp.experts.{}.gate_proj.weight",
    ),
    "mixtral-8x7b": (
        {"hidden_size": HIDDEN, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2},
        96,
        "model.layers.{}.block_sparse_moe.experts.{}.w1.weight",
    ),
}


def write(out: Path, shape: str, seed: int = 0) -> dict:
    overrides = TINY[shape][0]
    return synthetic.write_synthetic_checkpoint(
        out, shape, LAYERS, num_experts=EXPERTS, vocab_size=VOCAB, seed=seed, progress=False, overrides=overrides
    )


def on_disk(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.fixture(scope="module", params=sorted(TINY))
def checkpoint(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / request.param
    summary = write(out, request.param)
    return request.param, out, summary


def test_loads_with_no_missing_or_unexpected_keys_and_round_trips(checkpoint):
    """from_pretrained loads every tensor; reverted to the disk layout, its state dict is exactly the files."""
    _, out, summary = checkpoint
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == LAYERS
    reverted = revert_weight_conversion(model, model.state_dict())
    disk = on_disk(out)
    assert reverted.keys() == disk.keys()
    for name, tensor in disk.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(reverted[name], tensor), name
    assert summary["parameters"] == model.num_parameters() == sum(t.numel() for t in disk.values())
    assert summary["files"] == LAYERS + 1 and summary["experts"] == EXPERTS


def test_shapes_values_and_experts_differ(checkpoint):
    """The loaded (fused) experts have the intended shapes and differ from one another; matrices are N(0, 0.02),
    norms ones, biases zeros."""
    shape, out, _ = checkpoint
    intermediate = TINY[shape][1]
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    for layer in range(LAYERS):
        gate_up = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = state[f"model.layers.{layer}.mlp.experts.down_proj"]
        assert gate_up.shape == (EXPERTS, 2 * intermediate, HIDDEN) and down.shape == (EXPERTS, HIDDEN, intermediate)
        for a in range(EXPERTS):
            for b in range(a):
                assert not torch.equal(gate_up[a], gate_up[b]) and not torch.equal(down[a], down[b])
    assert state["model.embed_tokens.weight"].shape == state["lm_head.weight"].shape == (VOCAB, HIDDEN)
    for name, tensor in on_disk(out).items():
        if name.endswith(".bias"):
            assert not tensor.any(), name
        elif tensor.dim() == 1:
            assert name.endswith("norm.weight") and (tensor == 1).all(), name
        elif tensor.numel() >= 1000:
            assert abs(tensor.float().mean()) < 0.005 and 0.015 < tensor.float().std() < 0.025, name
    first = on_disk(out)
    assert not torch.equal(first[TINY[shape][2].format(0, 0)], first[TINY[shape][2].format(1, 0)])


def test_same_layout_as_transformers_save_pretrained(checkpoint, tmp_path):
    """Names, shapes and dtypes, and config.json, are those transformers itself writes for a model of that class
    and config."""
    _, out, _ = checkpoint
    config = AutoConfig.from_pretrained(out)
    assert config.dtype == torch.bfloat16
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    ours = {name: (t.shape, t.dtype) for name, t in on_disk(out).items()}
    theirs = {name: (t.shape, t.dtype) for name, t in load_file(tmp_path / "model.safetensors").items()}
    assert ours == theirs
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "config.json").read_text())


def test_same_seed_writes_identical_files(checkpoint, tmp_path):
    shape, out, _ = checkpoint
    write(tmp_path / "again", shape)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in files:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    write(tmp_path / "other", shape, seed=1)
    for name in files:  # another seed: other weights, same config and index
        same = (out / name).read_bytes() == (tmp_path / "other" / name).read_bytes()
        assert same == (not name.endswith(".safetensors")), name


def test_index_matches_the_shards(checkpoint):
    """The weight map covers exactly the shards' tensors; total_size is their bytes; shard i holds layer i - 1 and
    the last one the rest."""
    _, out, summary = checkpoint
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{LAYERS + 1:05d}.safetensors" for i in range(1, LAYERS + 2)]
    located, total = {}, 0
    for path in shards:
        with safe_open(path, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                located[name] = path.name
                total += f.get_tensor(name).nbytes
    assert index["weight_map"] == located
    assert index["metadata"] == {"total_size": total, "total_parameters": summary["parameters"]}
    assert summary["bytes"] == total
    for name, filename in located.items():
        match = re.match(r"model\.layers\.(\d+)\.", name)
        assert filename == shards[int(match.group(1)) if match else LAYERS].name, name


@pytest.mark.parametrize(
    ("shape", "parameters", "expert_name", "expert_shape"),
    [
        ("qwen1.5-moe-a2.7b", 14_315_784_192, "model.layers.23.mlp.experts.59.down_proj.weight", (2048, 1408)),
        ("mixtral-8x7b", 46_702_792_704, "model.layers.31.block_sparse_moe.experts.7.w1.weight", (14336, 4096)),
    ],
)
def test_full_size_layouts_have_the_real_models_sizes(shape, parameters, expert_name, expert_shape):
    """On the meta device only: Qwen1.5-MoE-A2.7B has 14.3 B parameters over 24 layers, Mixtral-8x7B 46.7 B over
    32."""
    layers = {"qwen1.5-moe-a2.7b": 24, "mixtral-8x7b": 32}[shape]
    layout = synthetic.disk_layout(synthetic.build_config(shape, layers))
    assert sum(torch.Size(s).numel() for s in layout.values()) == parameters
    assert layout[expert_name] == expert_shape
    assert len(synthetic.shard_plan(layout)) == layers + 1


def test_cli_refuses_a_non_empty_folder(tmp_path, capfd):
    (tmp_path / "keep.txt").write_text("x")
    code = synthetic.main(["--shape", "mixtral-8x7b", "--layers", "1", "--out", str(tmp_path)])
    out, err = capfd.readouterr()
    assert code == 2 and out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
