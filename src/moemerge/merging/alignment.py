"""Permutation alignment of experts before merging (weight matching, as in MC-SMoE and git re-basin).

The intermediate neurons of an expert can be permuted without changing its function: row i of
``gate`` and ``up`` and column i of ``down`` belong together. Before a group is averaged, every
member is permuted so that its neurons match the dominant member's (the one most often
selected) as closely as possible, the matching found with the Hungarian algorithm on the
neurons' concatenated weights.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment


def neuron_vectors(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """[I, 3H] float64: each intermediate neuron's gate row, up row and down column side by side."""
    return torch.cat([gate, up, down.T], dim=1).double()


def match_neurons(reference: tuple[torch.Tensor, ...], member: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Permutation p [I] maximising sum_i <ref neuron i, member neuron p[i]> (scipy linear_sum_assignment).

    reference / member: (gate [I, H], up [I, H], down [H, I]) of one expert each.
    """
    similarity = neuron_vectors(*reference) @ neuron_vectors(*member).T
    rows, cols = linear_sum_assignment(similarity.cpu().numpy(), maximize=True)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.int64)


def permute_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, order: torch.Tensor):
    """The same expert with its intermediate neurons in ``order`` (a function-preserving relabelling)."""
    order = order.to(gate.device)
    return gate[order], up[order], down[:, order]


def align_groups(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, groups: list[list[int]], counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of a layer's experts (gate/up [n, I, H], down [n, H, I]) in which every member of a group of several
    is permuted to match the group's dominant member (highest ``counts``, ties: the lower id)."""
    gate, up, down = gate.detach().clone(), up.detach().clone(), down.detach().clone()
    for group in groups:
        dominant = min(group, key=lambda j: (-int(counts[j]), j))
        reference = (gate[dominant], up[dominant], down[dominant])
        for j in group:
            if j != dominant:
                order = match_neurons(reference, (gate[j], up[j], down[j]))
                gate[j], up[j], down[j] = permute_expert(gate[j], up[j], down[j], order)
    return gate, up, down
