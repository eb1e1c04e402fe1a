"""MC-SMoE's low-rank plus sparse compression, and the mc-smoe method end to end."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import FAMILIES, save_tiny
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moemerge
from moemerge.merging import low_rank_plus_sparse, reconstruct


def test_rank_k_matrix_is_exact_at_rank_k():
    """A matrix of rank k is rebuilt exactly (to float32 rounding) from its rank-k factors with no residual kept."""
    g = torch.Generator().manual_seed(0)
    for k in (1, 3, 7):
        w = torch.randn(24, k, generator=g) @ torch.randn(k, 17, generator=g)
        left, right, indices, values = low_rank_plus_sparse(w, k, sparsity=1.0)
        assert left.shape == (24, k) and right.shape == (k, 17) and len(values) == 0
        torch.testing.assert_close(reconstruct(left, right, indices, values, w.shape), w, rtol=1e-5, atol=1e-5)


def test_error_falls_as_rank_rises():
    """For a fixed sparsity, the reconstruction error never rises with the rank and is ~0 at full rank."""
    w = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
    errors = []
    for k in range(1, 21):
        parts = low_rank_plus_sparse(w, k, sparsity=0.9)
        errors.append(float((reconstruct(*parts, w.shape) - w).norm()))
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-4


def test_residual_keeps_the_largest_entries():
    """The sparse part holds floor((1 - sparsity) * size) residual entries, the largest in magnitude, with their
    exact residual values (the residual recomputed here from a float64 SVD)."""
    w = torch.randn(12, 9, generator=torch.Generator().manual_seed(2))
    rank, sparsity = 2, 0.75
    _, _, indices, values = low_rank_plus_sparse(w, rank, sparsity)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    residual = (w.double() - (u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(-1)
    keep = math.floor((1 - sparsity) * w.numel())
    assert len(indices) == keep
    threshold = residual.abs().sort(descending=True).values[keep - 1]
    assert bool((residual[indices].abs() >= threshold).all())
    torch.testing.assert_close(values.double(), residual[indices], rtol=1e-6, atol=1e-6)
    full = reconstruct(*low_rank_plus_sparse(w, rank, 0.0), w.shape)
    torch.testing.assert_close(full, w, rtol=1e-5, atol=1e-5)  # keeping the whole residual is exact


def merged_oracle(source_model, layer: int, group: list[int], frequency: list[float]) -> dict[str, torch.Tensor]:
    """The group's merged expert recomputed here in float64: the frequency-weighted mean (plain mean when no token
    used the group) of the source experts' gate [I, H], up [I, H] and down [H, I]."""
    experts = source_model.model.layers[layer].mlp.experts
    f = torch.tensor([frequency[j] for j in group], dtype=torch.float64)
    a = f / f.sum() if f.sum() > 0 else torch.full_like(f, 1 / len(f))
    gate_up, down = experts.gate_up_proj.detach().double()[group], experts.down_proj.detach().double()[group]
    gate, up = gate_up.chunk(2, dim=1)
    return {name: torch.einsum("m,mij->ij", a, t) for name, t in (("gate", gate), ("up", up), ("down", down))}


@pytest.mark.parametrize("family", FAMILIES)
def test_mc_smoe_checkpoint_holds_its_factors(tmp_path, family):
    """mc-smoe: for every merged matrix W (recomputed here from the source experts, moemerge.json's groups and
    frequencies), the stored L R is a best rank-3 approximation (Eckart-Young: ||W - L R||_F = the root of the sum of
    W's discarded squared singular values, numpy SVD), the stored residual holds exactly the floor(0.2 size)
    largest-magnitude entries of W - L R with their values, and the dense expert written is L R + S (so equals W at
    those entries); with --mc-smoe-dense the checkpoint loads in plain transformers, and the reported stored-parameter count equals the
    closed form from the factor shapes."""
    src = save_tiny(family, tmp_path / "src")
    out = tmp_path / "out"
    options = dict(method="mc-smoe", rank=3, sparsity=0.8, calib_samples=2, calib_seq_len=32, progress=False)
    result = moemerge.reduce(src, out, experts=4, report=False, mc_smoe_dense=True, **options)
    meta = json.loads((out / "moemerge.json").read_text())
    assert meta["compression"]["rank"] == 3 and meta["parameters"]["cluster"] == "single-shot"
    factors = load_file(out / meta["compression"]["file"])
    model = AutoModelForCausalLM.from_pretrained(out)
    source_model = AutoModelForCausalLM.from_pretrained(src)
    saved = 0
    merged_groups = 0
    for entry in meta["layers"]:
        experts = model.model.layers[entry["layer"]].mlp.experts
        gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
        for e, group in enumerate(entry["groups"]):
            merged_groups += len(group) > 1
            oracle = merged_oracle(source_model, entry["layer"], group, entry["frequency"])
            for name, dense in (("gate", gate[e]), ("up", up[e]), ("down", experts.down_proj.detach()[e])):
                key = f"layers.{entry['layer']}.experts.{e}.{name}"
                left, right = factors[f"{key}.left"], factors[f"{key}.right"]
                indices, values = factors[f"{key}.indices"].long(), factors[f"{key}.values"]
                w = oracle[name]
                keep = math.floor(0.2 * w.numel())
                assert left.shape == (w.shape[0], 3) and right.shape == (3, w.shape[1]) and len(values) == keep
                low_rank = left.double() @ right.double()
                singular = np.linalg.svd(w.numpy(), compute_uv=False)
                assert (w - low_rank).norm().item() == pytest.approx(np.sqrt((singular[3:] ** 2).sum()), rel=1e-5)
                residual = (w - low_rank).reshape(-1)
                assert len(set(indices.tolist())) == keep
                dropped = torch.ones(w.numel(), dtype=torch.bool)
                dropped[indices] = False
                assert residual[indices].abs().min() >= residual[dropped].abs().max() - 1e-5
                torch.testing.assert_close(values.double(), residual[indices], rtol=1e-5, atol=1e-5)
                expected = low_rank.reshape(-1).clone()
                expected[indices] += values.double()
                torch.testing.assert_close(dense.double().reshape(-1), expected, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(dense.double().reshape(-1)[indices], w.reshape(-1)[indices])
                saved += dense.numel() - left.numel() - right.numel() - values.numel()
    assert merged_groups > 0  # some matrices are real merges, not copies of one expert
    assert result.stored_params == result.params_after - saved == meta["compression"]["stored_parameters"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
