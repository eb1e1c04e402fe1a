"""REAM's grouping ("REAM: Merging Improves Pruning of Experts in LLMs", Samsung SAIL Montreal 2026; code:
github.com/SamsungSAILMontreal/ream, ``ream/ream.py``).

The r experts of highest saliency are the group centres. From the most salient centre down, each centre takes
the unassigned non-centre experts most similar to it, until its group holds ``group_size`` experts (REAM's C,
default 16) or none is left. Similarity of experts i and j is the mean of

- an output similarity, (1 + cos(f_i, f_j)) / 2 of the gate-weighted mean outputs f_j = mean_t p_j(x_t) E_j(x_t);
- a router similarity, 1 - d_ij / max d with d_ij the Euclidean distance between the experts' router-logit
  vectors over all calibration tokens, each scaled to unit length.
"""

from __future__ import annotations

import torch

from moemerge.errors import MoemergeError

GROUP_SIZE = 16  # REAM's published C


def ream_similarity(gated_outputs: torch.Tensor, logit_features: torch.Tensor) -> torch.Tensor:
    """[n, n] float64 similarity in [0, 1] from gated mean outputs [n, H] and router logits [n, T]."""
    f = gated_outputs.double()
    unit = f / f.norm(dim=1, keepdim=True).clamp_min(1e-8)
    output = (1 + unit @ unit.T) / 2
    logits = logit_features.double()
    rows = logits / (logits.norm(dim=1, keepdim=True) + 1e-8)
    distance = torch.cdist(rows, rows)
    largest = distance.max()
    router = 1 - distance / largest if largest > 0 else torch.ones_like(distance)
    return (output + router) / 2


def check_capacity(n: int, r: int, group_size: int) -> None:
    """Raise MoemergeError unless r groups of at most ``group_size`` experts can hold n experts."""
    if r * group_size < n:
        raise MoemergeError(
            f"ream: {r} groups of at most {group_size} experts cannot hold {n} experts; give a group size "
            f"(--ream-group-size, or ream_group_size= in compare --methods) of {-(-n // r)} or more, or keep more "
            "experts"
        )


def pseudo_groups(
    saliency: torch.Tensor, similarity: torch.Tensor, experts: list[int], r: int, group_size: int
) -> list[list[int]]:
    """REAM's groups of ``experts`` (ids into ``saliency`` [n] and ``similarity`` [n, n]): r groups, each led by
    one of the r most salient experts; ties of saliency and of similarity go to the lower id.

    Raises MoemergeError when r groups of ``group_size`` cannot hold every expert.
    """
    check_capacity(len(experts), r, group_size)
    centres = sorted(experts, key=lambda j: (-float(saliency[j]), j))[:r]
    unassigned = [j for j in experts if j not in centres]
    groups = []
    for centre in centres:
        nearest = sorted(unassigned, key=lambda j: (-float(similarity[centre, j]), j))[: group_size - 1]
        unassigned = [j for j in unassigned if j not in nearest]
        groups.append(sorted([centre, *nearest]))
    return sorted(groups)
