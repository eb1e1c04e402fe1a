"""Merges that match neurons by how they fire: fix-dom and ZipIt (HC-SMoE paper 3.2.3, appendix B.2).

Both compare the members' intermediate activations act = act_fn(x W_gate) * (x W_up) on the
sampled calibration tokens the original router sent to the group (all sampled tokens when fewer
than ``MIN_TOKENS`` were), by Pearson correlation, and return units [m, I]: the merged neuron
each member neuron goes into (:func:`moemerge.merging.weighted_average.merge_experts` then
averages gate and up rows and sums down columns, weighted by the members' frequency shares).
"""

from __future__ import annotations

import torch

from moemerge.adapters.base import intermediate_activations
from moemerge.merging.weighted_average import MergeRule, frequency_weights
from moemerge.registry import register

MIN_TOKENS = 32


def correlation(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[p, q] Pearson correlation of the columns of ``a`` [t, p] and ``b`` [t, q] in ``dtype`` (columns are
    standardised in float64); 0 where a column is constant."""

    def standardise(x: torch.Tensor) -> torch.Tensor:
        x = x.double() - x.double().mean(0)
        norm = x.norm(dim=0)
        return torch.where(norm > 0, x / norm.clamp_min(1e-300), torch.zeros_like(x)).to(dtype)

    return standardise(a).T @ standardise(b)


def fix_dom_units(acts: list[torch.Tensor], alphas: torch.Tensor) -> torch.Tensor:
    """Units [m, I]: the dominant member (first) keeps its neuron order; every neuron of another member goes
    into the dominant neuron it is most correlated with (ties: the lower index)."""
    dominant = acts[0]
    units = [torch.arange(dominant.shape[1])]
    units += [correlation(act, dominant).argmax(dim=1) for act in acts[1:]]
    return torch.stack(units)


def zipit_units(acts: list[torch.Tensor], alphas: torch.Tensor) -> torch.Tensor:
    """Units [m, I] by ZipIt's greedy matching over the neurons of all members, within members too.

    Rounds: every unit's activation is the alpha-weighted mean of its neurons'; the most correlated
    pair of units is joined, then the most correlated pair of units not yet joined this round, and so
    on until I units remain or every unit was joined this round. Units are numbered by their first
    neuron in member order (the dominant member's first), so that zipping an expert with an exact
    copy keeps its neuron order. Memory: the first round's correlation matrix holds (m I)^2 float32
    numbers (3.3 GB for two Mixtral-8x7B experts).
    """
    size, m = acts[0].shape[1], len(acts)
    flat = torch.cat([act.double() * a for act, a in zip(acts, alphas.tolist(), strict=True)], dim=1)
    unit = torch.arange(m * size)  # unit of every neuron, by its flat index member * I + neuron
    while (count := int(unit.max()) + 1) > size:
        unit_acts = torch.zeros(len(flat), count, dtype=torch.float64).index_add_(1, unit, flat)
        corr = correlation(unit_acts, unit_acts, torch.float32)  # float32: (m I)^2 numbers in the first round
        corr.fill_diagonal_(-torch.inf)
        best, partner = corr.max(dim=1)
        free = torch.ones(count, dtype=torch.bool)
        target = torch.arange(count)
        for _ in range(count - size):
            if not torch.isfinite(best).any():
                break
            i = int(best.argmax())  # ties: the lower unit, as argmax returns the first maximum
            j = int(partner[i])
            target[max(i, j)] = min(i, j)
            free[[i, j]] = False
            corr[:, [i, j]] = -torch.inf
            best[[i, j]] = -torch.inf
            stale = free & ((partner == i) | (partner == j))
            if stale.any():
                best[stale], partner[stale] = corr[stale].max(dim=1)
        unit = torch.unique(target[unit], return_inverse=True)[1]
    return unit.view(m, size)


register("merge", "fix-dom", needs=("router_inputs",))(MergeRule(frequency_weights, fix_dom_units))
register("merge", "zipit", needs=("router_inputs",))(MergeRule(frequency_weights, zipit_units))


def routed_tokens(routing, weight: torch.Tensor, bias: torch.Tensor | None, inputs: torch.Tensor) -> torch.Tensor:
    """[t, n] bool: which experts the original router (``weight`` [n, H], ``bias``) selects for ``inputs`` [t, H]."""
    _, ids = routing.route(inputs.float() @ weight.float().T, bias)
    return torch.zeros(len(inputs), len(weight), dtype=torch.bool).scatter_(1, ids.cpu(), True)


def match_groups(
    match,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    groups: list[list[int]],
    alphas: list[torch.Tensor],
    gated,
    inputs: torch.Tensor,
    routed: torch.Tensor,
) -> list[torch.Tensor | None]:
    """Units [m, I] of every group of several members (None for one-member groups) by ``match``.

    weights: (gate, up [n, I, H], down [n, H, I]); inputs: [t, H] sampled router inputs; routed: [t, n]
    from :func:`routed_tokens`. The dominant member is the one of largest weight (ties: the lower id);
    members of weight 0 add nothing to the merge and keep their neuron order.
    """
    gate, up, _ = weights
    units = []
    for group, a in zip(groups, alphas, strict=True):
        active = [m for m in range(len(group)) if a[m] > 0]
        if len(active) < 2:
            units.append(None)
            continue
        active.sort(key=lambda m: (-float(a[m]), group[m]))
        tokens = routed[:, group].any(dim=1)
        x = (inputs[tokens] if int(tokens.sum()) >= MIN_TOKENS else inputs).to(gate.device, torch.float32)
        acts = [intermediate_activations(gate[group[m]].float(), up[group[m]].float(), gated, x) for m in active]
        found = match(acts, a[active])
        unit = torch.arange(gate.shape[1]).repeat(len(group), 1)
        unit[active] = found
        units.append(unit)
    return units
