"""Compute dtype apart from storage dtype (moemerge.precision): on a CPU without native bfloat16 a bf16 checkpoint is
reduced in float32 and written in bf16, exactly as reducing its float32 copy and rounding the result."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moemerge
from moemerge import precision
from moemerge.pipeline import reduce_in_memory
from moemerge.streaming import reduce_streaming

SMALL = dict(experts=4, calib_samples=3, calib_seq_len=24, progress=False, report=False)


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    raise AssertionError("/proc/cpuinfo names no CPU flags")


def test_private_torch_probes_agree_with_the_cpu_flags():
    """The private torch APIs precision.py uses, by name, and what they report against the kernel's CPU flags."""
    flags = cpu_flags()
    assert torch.cpu._is_avx512_bf16_supported() == ("avx512_bf16" in flags)
    assert torch.cpu._is_amx_tile_supported() == ("amx_tile" in flags)
    assert torch.cpu._is_amx_fp16_supported() == ("amx_fp16" in flags)
    bf16 = bool({"avx512_bf16", "amx_tile"} & flags)
    assert (torch.bfloat16 in precision.native_cpu_dtypes()) == bf16


def test_compute_dtype_rules(monkeypatch):
    """float32 computes in float32; a GPU in the stored dtype; a CPU in its native half dtypes, else float32."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(precision, "native_cpu_dtypes", lambda: frozenset({torch.float32}))
    assert precision.compute_dtype(torch.float32, cpu) == torch.float32
    assert precision.compute_dtype(torch.bfloat16, cpu) == torch.float32
    assert precision.compute_dtype(torch.float16, cpu) == torch.float32
    assert precision.compute_dtype(torch.bfloat16, gpu) == torch.bfloat16
    monkeypatch.setattr(precision, "native_cpu_dtypes", lambda: frozenset({torch.float32, torch.bfloat16}))
    assert precision.compute_dtype(torch.bfloat16, cpu) == torch.bfloat16
    assert precision.compute_dtype(torch.float16, cpu) == torch.float32


def test_round_trip_restores_every_tensor_and_tie():
    """to_compute then to_storage gives back every parameter and buffer bit for bit, in its dtype, with a tied
    head still tied (DeepSeek-V3 keeps its router and selection bias in float32 inside a bf16 model)."""
    source = AutoModelForCausalLM.from_config(
        tiny_config("deepseek_v3", tie_word_embeddings=True), dtype=torch.bfloat16
    )
    before = {name: t.clone() for name, t in [*source.named_parameters(), *source.named_buffers()]}
    stored = precision.to_compute(source, torch.float32)
    assert all(t.dtype == torch.float32 for t in source.parameters())
    precision.to_storage(source, stored)
    after = dict([*source.named_parameters(), *source.named_buffers()])
    assert before.keys() == after.keys()
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    assert source.lm_head.weight is source.get_input_embeddings().weight


def bf16_and_fp32_sources(tmp_path: Path, family: str) -> tuple[Path, Path]:
    """A bf16 checkpoint as transformers writes one (some tensors float32 where it keeps them so), and its exact
    float32 copy."""
    tiny = save_tiny(family, tmp_path / "tiny")
    bf16, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).save_pretrained(fp32)
    for file in tiny.glob("tokenizer*"):
        shutil.copyfile(file, bf16 / file.name)
        shutil.copyfile(file, fp32 / file.name)
    return bf16, fp32


def tensors(folder: Path, pattern: str = "model*.safetensors") -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(folder.glob(pattern)):
        found |= load_file(file)
    return found


CASES = [
    ("mixtral", {}),
    ("deepseek_v3", {}),
    ("olmoe", {"router": "grouped"}),
    ("qwen3_moe", {"method": "mone", "router": "grouped"}),
]


@pytest.mark.parametrize("family,options", CASES, ids=[f"{f}-{o.get('router', 'reduce')}" for f, o in CASES])
def test_bf16_source_on_a_cpu_without_bf16_is_its_float32_copy_reduced_and_rounded(
    tmp_path, monkeypatch, caplog, family, options
):
    """Oracle: the float32 copy of the bf16 checkpoint reduced (float32 throughout, as before this change), each
    tensor then rounded to the dtype the bf16 source stores it in. The in-memory and the streamed reduce of the bf16
    checkpoint on a CPU without bf16 equal it bit for bit (groups, weights, grouped routing's original routers),
    record float32 as their compute dtype and say so in the phase log."""
    bf16, fp32 = bf16_and_fp32_sources(tmp_path, family)
    oracle = moemerge.reduce(fp32, tmp_path / "oracle", **SMALL, **options)
    monkeypatch.setattr(precision, "native_cpu_dtypes", lambda: frozenset({torch.float32}))
    source_dtypes = {name: t.dtype for name, t in tensors(bf16).items()}
    expected = {name: t.to(source_dtypes[name]) for name, t in tensors(tmp_path / "oracle").items()}
    for name, reduce in (("memory", reduce_in_memory), ("stream", reduce_streaming)):
        with caplog.at_level(logging.INFO, logger="moemerge"):
            result = reduce(bf16, tmp_path / name, **SMALL, **options)
        assert "computing in float32, storing bfloat16" in caplog.text
        caplog.clear()
        assert result.groups == oracle.groups
        written = tensors(tmp_path / name)
        assert written.keys() == expected.keys()
        for key, t in expected.items():
            assert written[key].dtype == t.dtype and torch.equal(written[key], t), (name, key)
        assert json.loads((tmp_path / name / "moemerge.json").read_text())["compute_dtype"] == "float32"
        if options.get("router") == "grouped":
            sidecar = tensors(tmp_path / name, "moemerge_router.safetensors")
            original = {k: t.to(torch.bfloat16) for k, t in tensors(tmp_path / "oracle", "moemerge_router*").items()}
            assert sidecar.keys() == original.keys()
            assert all(sidecar[k].dtype == torch.bfloat16 and torch.equal(sidecar[k], original[k]) for k in original)


@pytest.mark.parametrize("name,reduce", [("memory", reduce_in_memory), ("stream", reduce_streaming)])
def test_computing_in_bf16_keeps_float32_tensors_in_float32(tmp_path, monkeypatch, name, reduce):
    """On a CPU with native bf16 a bf16 DeepSeek-V3 checkpoint computes in bf16, but the router and selection bias
    that transformers keeps in float32 stay float32 while computing: f-prune with frequency router rows (a one-member
    group's row is its expert's row) writes every kept expert's float32 router row and bias bit for bit as the source
    holds them, which their bf16 roundings are not."""
    bf16, _ = bf16_and_fp32_sources(tmp_path, "deepseek_v3")
    source = tensors(bf16)
    router_keys = [k for k in source if k.endswith(("mlp.gate.weight", "e_score_correction_bias"))]
    assert router_keys and all(source[k].dtype == torch.float32 for k in router_keys)
    assert not all(torch.equal(source[k], source[k].bfloat16().float()) for k in router_keys)
    monkeypatch.setattr(precision, "native_cpu_dtypes", lambda: frozenset({torch.float32, torch.bfloat16}))
    result = reduce(bf16, tmp_path / name, **SMALL, method="f-prune", router_rows="frequency")
    written = tensors(tmp_path / name)
    for layer, groups in result.groups.items():
        kept = [g[0] for g in groups]
        for key in (f"model.layers.{layer}.mlp.gate.weight", f"model.layers.{layer}.mlp.gate.e_score_correction_bias"):
            assert written[key].dtype == torch.float32 and torch.equal(written[key], source[key][kept]), key


def test_experts_of_a_width_grouped_mm_cannot_take_run_in_bf16(tmp_path, monkeypatch):
    """Experts of width 12 in bf16 (rows of 24 bytes): transformers' default grouped_mm kernel fails on them
    ("strides should be multiple of 16 bytes"). load_model runs them, to the logits of transformers' own eager
    experts loop on the same checkpoint, and reduce computing in bf16 (in memory and streamed) completes with the
    same output."""
    tiny = save_tiny("qwen3_moe", tmp_path / "tiny", moe_intermediate_size=12)
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).save_pretrained(bf16)
    for file in tiny.glob("tokenizer*"):
        shutil.copyfile(file, bf16 / file.name)
    ids = torch.tensor([[3, 50, 700, 9, 1200, 4000, 17, 2]])
    default = AutoModelForCausalLM.from_pretrained(bf16).eval()
    with pytest.raises(RuntimeError, match="multiple of 16 bytes"), torch.no_grad():
        default(input_ids=ids)  # the failure this guards against is still there
    eager = AutoModelForCausalLM.from_pretrained(bf16, experts_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(moemerge.load_model(bf16)(input_ids=ids).logits, eager(input_ids=ids).logits)
    monkeypatch.setattr(precision, "native_cpu_dtypes", lambda: frozenset({torch.float32, torch.bfloat16}))
    reduce_in_memory(bf16, tmp_path / "memory", **SMALL)
    reduce_streaming(bf16, tmp_path / "stream", **SMALL)
    assert (tmp_path / "memory" / "model.safetensors").read_bytes() == (
        tmp_path / "stream" / "model.safetensors"
    ).read_bytes()
