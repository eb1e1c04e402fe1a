"""REAM's merge (code: github.com/SamsungSAILMontreal/ream, ``ream/merger.py``, ``--merging logits``).

Each group's members are weighted by their REAP saliency (an expert of saliency 0 counts as the smallest non-zero
saliency of its layer, capped at 0.5, so that unused experts still merge), and every member's intermediate neurons
are permuted onto the centre's (its most salient member) by the Hungarian algorithm on the Euclidean distance
between the neurons' activation vectors over the sampled calibration tokens, each scaled to unit length.

REAM's default (``logits+weights``) adds to that cost the distance between the neurons' weight vectors projected
on the 64 principal components of all of a layer's neurons; that projection needs every neuron of the layer in
memory at once (n I x 3H numbers: 5.6 GB per Mixtral-8x7B layer), and is left out here.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from moemerge.merging.weighted_average import MergeRule
from moemerge.registry import register
from moemerge.statistics import LayerStatistics

ZERO_SALIENCY_CAP = 0.5


def saliency_weights(stats: LayerStatistics, group: list[int]) -> torch.Tensor:
    """[m] REAP saliency of the members, normalised to sum to 1 (zeros replaced as the module docstring says)."""
    saliency = stats.reap.double()
    used = saliency[saliency > 0]
    floor = min(ZERO_SALIENCY_CAP, float(used.min())) if len(used) else 1.0
    members = saliency[group].clamp_min(floor)
    return members / members.sum()


def hungarian_units(acts: list[torch.Tensor], alphas: torch.Tensor) -> torch.Tensor:
    """Units [m, I]: the centre (first) keeps its order; member m's neuron b goes into the centre neuron a it is
    matched with, the matching of least total distance between unit-length activation columns (acts [t, I])."""

    def unit_columns(act: torch.Tensor) -> torch.Tensor:
        columns = act.double().T
        return columns / (columns.norm(dim=1, keepdim=True) + 1e-8)

    centre = unit_columns(acts[0])
    units = [torch.arange(centre.shape[0])]
    for act in acts[1:]:
        rows, cols = linear_sum_assignment(torch.cdist(centre, unit_columns(act)).cpu().numpy())
        into = torch.empty(len(cols), dtype=torch.int64)
        into[torch.as_tensor(cols)] = torch.as_tensor(rows)
        units.append(into)
    return torch.stack(units)


register("merge", "saliency", needs=("router_inputs",))(MergeRule(saliency_weights, hungarian_units, all_tokens=True))
