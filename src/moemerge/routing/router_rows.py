"""Router rows for a standard r-way router (``--router reduce``), one per merged expert.

- ``frequency``: w_g = sum_i a_i w_i with a the frequency merge weights of the group.
- ``lse``: least-squares fit, on sampled calibration router inputs X [t, H], of x . w_g to
  log sum_{i in g} u_ig exp(x . w_i), u the memberships (1 for hard groups). Under a softmax
  router that target gives the merged expert exactly the (membership-shared) summed probability
  of its members, as ``grouped`` routing does; the fit is ridge-regularised towards the
  ``frequency`` row. Members of hard one-member groups keep their row exactly.
- ``saliency``: the row of the group's most salient member (REAP saliency; ties: the lower id), as REAM
  keeps its group centre's row.

The selection bias (DeepSeek-V3) of a merged expert is the frequency-weighted mean of its
members' (``saliency``: the most salient member's). Which rule is the default was decided by
measurement (see the README).
"""

from __future__ import annotations

import torch

from moemerge.grouping import SoftGroups
from moemerge.merging.weighted_average import member_weights
from moemerge.registry import register, resolve
from moemerge.statistics import LayerStatistics

RIDGE = 1e-3


def router_rows(
    rule: str, weight: torch.Tensor, bias: torch.Tensor | None, groups: list[list[int]], stats: LayerStatistics
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New router ``weight`` [r, H] (input dtype) and selection ``bias`` [r] (or None) by ``rule``."""
    alphas = member_weights("frequency", stats, groups)
    rows = resolve("router-rows", rule)(weight.double(), groups, alphas, stats)
    new_bias = None
    if bias is not None:
        shares = centre_weights(groups, stats) if rule == "saliency" else alphas
        new_bias = torch.stack([(a * bias[g].double()).sum() for g, a in zip(groups, shares, strict=True)])
        new_bias = new_bias.to(bias.dtype)
    return rows.to(weight.dtype), new_bias


@register("router-rows", "frequency")
def frequency_rows(weight, groups, alphas, stats) -> torch.Tensor:
    """[r, H] float64 frequency-weighted mean of member rows."""
    return torch.stack([a @ weight[g] for g, a in zip(groups, alphas, strict=True)])


def centre_weights(groups: list[list[int]], stats: LayerStatistics) -> list[torch.Tensor]:
    """Per group [m] float64: 1 for its most salient member (REAP saliency; ties: the lower id), 0 for the rest."""
    shares = []
    for group in groups:
        centre = min(range(len(group)), key=lambda m: (-float(stats.reap[group[m]]), group[m]))
        shares.append(torch.nn.functional.one_hot(torch.tensor(centre), len(group)).double())
    return shares


@register("router-rows", "saliency")
def saliency_rows(weight, groups, alphas, stats) -> torch.Tensor:
    """[r, H] float64 the row of each group's most salient member."""
    return frequency_rows(weight, groups, centre_weights(groups, stats), stats)


@register("router-rows", "lse", needs=("router_inputs",))
def lse_rows(weight, groups, alphas, stats) -> torch.Tensor:
    """[r, H] float64 ridge least-squares fit of each group's log-sum-exp of member logits."""
    if stats.router_inputs is None:
        raise ValueError("lse router rows need router inputs sampled during calibration")
    x = stats.router_inputs.double()
    logits = x @ weight.T
    gram = x.T @ x
    ridge = RIDGE * gram.trace() / len(gram) + 1e-12
    system = gram + ridge * torch.eye(len(gram), dtype=gram.dtype)
    start = frequency_rows(weight, groups, alphas, stats)
    rows = []
    soft = isinstance(groups, SoftGroups)
    for g, members in enumerate(groups):
        if len(members) == 1 and not soft:
            rows.append(weight[members[0]])
            continue
        shares = groups.memberships[g].log() if soft else 0.0
        target = torch.logsumexp(logits[:, members] + shares, dim=1)
        rows.append(torch.linalg.solve(system, x.T @ target + ridge * start[g]))
    return torch.stack(rows)
