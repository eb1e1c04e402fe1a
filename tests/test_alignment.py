"""Permutation alignment: recovers known permutations, preserves every expert's function, merges copies exactly."""

from __future__ import annotations

import json

import torch
from conftest import layer_stats, save_permuted_copies
from transformers import AutoModelForCausalLM

from moemerge.cli import main
from moemerge.merging import align_groups, match_neurons, member_weights, merge_experts, permute_expert


def random_expert(seed: int, inter: int = 24, hidden: int = 16):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g) for shape in ((inter, hidden), (inter, hidden), (hidden, inter)))


def expert_output(gate, up, down, x):
    """E(x) = down (silu(gate x) * (up x)), written out here."""
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def test_match_recovers_a_known_permutation_exactly():
    """Aligning a randomly permuted copy back to its original returns the original tensors bit for bit."""
    for seed in range(5):
        expert = random_expert(seed)
        shuffled = permute_expert(*expert, torch.randperm(24, generator=torch.Generator().manual_seed(100 + seed)))
        restored = permute_expert(*shuffled, match_neurons(expert, shuffled))
        assert all(torch.equal(a, b) for a, b in zip(restored, expert, strict=True))


def test_permutation_preserves_the_expert_function():
    """A permuted expert computes the same function (up to float summation order)."""
    expert = random_expert(0)
    shuffled = permute_expert(*expert, torch.randperm(24, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(expert_output(*shuffled, x), expert_output(*expert, x), rtol=1e-5, atol=1e-5)


def stack(experts):
    return tuple(torch.stack(parts) for parts in zip(*experts, strict=True))


def test_aligned_merge_of_an_expert_and_its_permuted_copy_is_the_expert():
    """With --align, merging an expert with a permuted copy of itself (any weights) returns the expert exactly;
    without alignment it does not."""
    expert = random_expert(3)
    copy = permute_expert(*expert, torch.randperm(24, generator=torch.Generator().manual_seed(4)))
    other = random_expert(5)
    gate, up, down = stack([copy, other, expert])  # the dominant (most used) member is expert 2
    stats = layer_stats(0, torch.zeros(3, 16), torch.tensor([3, 9, 5]), 10)
    groups = [[0, 2], [1]]
    alphas = member_weights("frequency", stats, groups)
    merged = merge_experts(align_groups(gate, up, down, groups, torch.tensor([3, 9, 5])), groups, alphas)
    assert all(torch.equal(m[0], e) for m, e in zip(merged, expert, strict=True))
    assert all(torch.equal(m[1], o) for m, o in zip(merged, other, strict=True))
    unaligned = merge_experts((gate, up, down), groups, alphas)
    assert not torch.allclose(unaligned[0][0], expert[0])


def test_alignment_changes_no_experts_function():
    """Every expert of a layer computes the same function after align_groups, whatever the grouping."""
    gate, up, down = stack([random_expert(s) for s in range(6)])
    aligned = align_groups(gate, up, down, [[0, 3, 4], [1, 5], [2]], torch.tensor([1, 8, 2, 7, 7, 0]))
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(9))
    for j in range(6):
        got = expert_output(aligned[0][j], aligned[1][j], aligned[2][j], x)
        torch.testing.assert_close(got, expert_output(gate[j], up[j], down[j], x), rtol=1e-5, atol=1e-5)


def test_align_option_end_to_end(tmp_path):
    """--align through the CLI, on a family with a shared expert whose experts 2i + 1 are neuron-permuted copies of
    experts 2i (both used by the router): hc-smoe groups each copy with its original, and every merged expert
    written is that pair's dominant (more used) member bit for bit, which an unaligned merge of a permuted copy is
    not; the option is recorded in moemerge.json."""
    src = save_permuted_copies("qwen2_moe", tmp_path / "src")
    source = AutoModelForCausalLM.from_pretrained(src)
    out = tmp_path / "out"
    argv = ["reduce", str(src), "--experts", "4", "--out", str(out), "--align", "--quiet", "--no-report"]
    assert main([*argv, "--calib-samples", "2", "--calib-seq-len", "32"]) == 0
    meta = json.loads((out / "moemerge.json").read_text())
    assert meta["parameters"]["align"] is True
    reduced = AutoModelForCausalLM.from_pretrained(out)
    for entry in meta["layers"]:
        assert entry["groups"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
        before = source.model.layers[entry["layer"]].mlp.experts
        after = reduced.model.layers[entry["layer"]].mlp.experts
        for k, group in enumerate(entry["groups"]):
            frequency = [entry["frequency"][j] for j in group]
            assert min(frequency) > 0, "both members must weigh in the merge"
            dominant = group[0] if frequency[0] >= frequency[1] else group[1]
            assert torch.equal(after.gate_up_proj[k], before.gate_up_proj[dominant]), (entry["layer"], k)
            assert torch.equal(after.down_proj[k], before.down_proj[dominant]), (entry["layer"], k)
