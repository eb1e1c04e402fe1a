"""Qwen3-MoE with dense layers (``mlp_only_layers``): reduce, in memory and streamed, leaves the dense layers as they
are and reduces the MoE ones, and the output loads in plain transformers with the original model's logits.

Oracle: a model whose experts 2i + 1 are exact copies of experts 2i, router rows included, routing top-1 with
renormalised weights. The original model then sends each token to one of two identical experts with weight 1; merged
in pairs, the reduced router (any rows that shift every pair's logit alike, as lse and frequency rows do here) sends
it to that pair's expert with weight 1: the same function, so the same logits as the original.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_with_tokenizer, tiny_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from moemerge.pipeline import reduce_in_memory
from moemerge.streaming import reduce_streaming

DENSE = [1]  # decoder layer 1 of 3 has a plain MLP; layers 0 and 2 are MoE
OPTIONS = dict(experts=4, calib_samples=2, calib_seq_len=32, progress=False, report=False)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("model*.safetensors")):
        out |= load_file(file)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The tiny Qwen3-MoE (3 layers, layer 1 dense, 8 experts, top-1) with experts and router rows 2i + 1 copies of
    2i, and the demo tokenizer."""
    model = tiny_model("qwen3_moe", top_k=1, num_hidden_layers=3, mlp_only_layers=DENSE)
    assert [hasattr(layer.mlp, "experts") for layer in model.model.layers] == [True, False, True]
    assert model.config.norm_topk_prob
    with torch.no_grad():
        for i in (0, 2):
            block = model.model.layers[i].mlp
            for a in range(0, 8, 2):
                block.experts.gate_up_proj[a + 1] = block.experts.gate_up_proj[a]
                block.experts.down_proj[a + 1] = block.experts.down_proj[a]
                block.gate.weight[a + 1] = block.gate.weight[a]
    return save_with_tokenizer(model, tmp_path_factory.mktemp("dense") / "qwen3")


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "stream"])
def test_dense_layers_kept_moe_layers_reduced_logits_unchanged(source, tmp_path, stream):
    """reduce to 4 experts: config keeps mlp_only_layers and says 4 experts; moemerge.json lists MoE layers 0 and 2
    with the copy pairs as groups; every tensor outside the MoE layers' experts and routers (the dense layer's MLP
    included) is the source's bit for bit; each MoE layer holds 4 experts equal to the even originals and 4 router
    rows; plain from_pretrained gives the original's logits."""
    out = tmp_path / "out"
    (reduce_streaming if stream else reduce_in_memory)(source, out, **OPTIONS)
    config = AutoConfig.from_pretrained(out)
    assert config.mlp_only_layers == DENSE and config.num_experts == 4
    meta = json.loads((out / "moemerge.json").read_text(encoding="utf-8"))
    assert [entry["layer"] for entry in meta["layers"]] == [0, 2]
    assert all(entry["groups"] == [[0, 1], [2, 3], [4, 5], [6, 7]] for entry in meta["layers"])

    before, after = tensors(source), tensors(out)
    assert any(key.startswith("model.layers.1.mlp.") for key in before)
    moe = ("model.layers.0.mlp.", "model.layers.2.mlp.")
    kept = {key for key in before if not key.startswith(moe)}
    assert kept <= set(after)
    for key in kept:
        assert torch.equal(after[key], before[key]), key
    for key in set(after) - kept:
        assert key.startswith(moe), key
        parts = key.split(".")
        if "experts" in parts:
            at = parts.index("experts") + 1
            assert int(parts[at]) < 4
            original = ".".join([*parts[:at], str(2 * int(parts[at])), *parts[at + 1 :]])
            assert torch.equal(after[key], before[original]), key
        else:
            assert parts[-2:] == ["gate", "weight"] and after[key].shape == (4, 32), key

    original = AutoModelForCausalLM.from_pretrained(source).eval()
    reduced = AutoModelForCausalLM.from_pretrained(out).eval()
    assert [hasattr(layer.mlp, "experts") for layer in reduced.model.layers] == [True, False, True]
    ids = torch.tensor([[11, 402, 97, 1500, 33, 7, 2048, 64, 5, 300, 1, 2]])
    with torch.no_grad():
        expected, got = original(input_ids=ids).logits, reduced(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
