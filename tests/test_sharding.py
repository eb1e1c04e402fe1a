"""Large outputs are sharded with an index, and the shards load in vanilla transformers."""

from __future__ import annotations

import json

import torch
from conftest import save_tiny
from transformers import AutoModelForCausalLM

import moemerge
from moemerge.checkpoint import writer


def test_output_is_sharded_above_the_limit_and_loads(tmp_path, monkeypatch):
    """With the shard limit lowered to 200 kB, the output is split, indexed, and loads with every tensor present."""
    monkeypatch.setattr(writer, "MAX_SHARD_SIZE", "200KB")
    src = save_tiny("mixtral", tmp_path / "src")
    out = tmp_path / "out"
    moemerge.reduce(src, out, experts=4, calib_samples=2, calib_seq_len=32, progress=False)
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 1
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    # every tensor of the reduced model is stored: the sharded and in-memory models agree exactly
    monkeypatch.setattr(writer, "MAX_SHARD_SIZE", "2GB")
    moemerge.reduce(src, tmp_path / "single", experts=4, calib_samples=2, calib_seq_len=32, progress=False)
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "single")
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), single.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
