"""Closed-form refit of a reduced layer's down projections (``--refit down``), after any grouping or pruning.

A reduction changes what a layer outputs: merged experts compute something none of their members did, and
tokens whose experts were merged or dropped go elsewhere. This refit gives that error back to the only weights
that can absorb it linearly. On the sampled calibration router inputs X [t, H] (``router_inputs``):

- original routed output  y(x) = sum_{j in top-k(x)} g_j(x) D_j h_j(x)   (the n experts, the original router);
- reduced routed output   y'(x) = sum_{c in top-k'(x)} g'_c(x) D'_c h'_c(x)   (the r reduced experts routed as the
  output will be: the new r-row router for ``--router reduce``, the original one mapped to groups for
  ``grouped``, where the novices of a pruning method add their fixed share);

with h the intermediate activations act(G x) * (U x) [I] and D the down projection [H, I]. One expert at a time,
most used first (a Gauss-Seidel sweep), D'_c becomes the ridge least-squares solution of

    min_D  sum_{x routed to c} || y(x) - y'_{-c}(x) - g'_c(x) D h'_c(x) ||^2  +  lam ||D - D'_c||_F^2

where y'_{-c} is the other selected experts' current contribution: each refit expert corrects what the ones
before it left. The solve is in float64, through the I x I primal Gram matrix or the m x m dual (m tokens
routed to c), whichever is smaller. The ridge lam is chosen per expert by two-fold cross-validation over
``RIDGE_GRID`` x the Gram matrix's mean eigenvalue, with "no update" as a candidate: a fixed ridge lets an
expert that fewer tokens reach than it has neurons (m < I, the usual case on large models with 8192 sampled
tokens) interpolate its residual, noise included; generalised cross-validation, which assumes independent
tokens, picked too small a ridge on the benchmark models (neighbouring tokens are alike), so the folds are
the first and second half of the expert's tokens in calibration order. Gate and up projections, routers and
shared experts (which a reduction leaves alone, so they cancel) are untouched. Cost per layer: one pass of the n
original and the r reduced experts over the t sampled tokens, plus per reduced expert three eigendecompositions
(the two folds' and the whole sample's Gram matrices, each of size at most min(m, I)).
"""

from __future__ import annotations

import torch

from moemerge.adapters.base import MoELayerView, RoutingRule, intermediate_activations
from moemerge.registry import register
from moemerge.routing.grouped import KeptRouter, expert_map

RIDGE_GRID = tuple(10.0**e for e in range(-4, 4))  # candidate ridges, times the Gram matrix's mean eigenvalue
MIN_TOKENS = 8  # an expert fewer sampled tokens reach keeps its merged down projection


@register("refit", "none")
def no_refit(*_) -> None:
    """Keep the merged down projections."""


@register("refit", "down", needs=("router_inputs",))
@torch.no_grad()
def refit_down(
    view: MoELayerView,
    original: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    original_router: KeptRouter,
    groups: list[list[int]],
    grouped: bool,
    inputs: torch.Tensor | None,
) -> None:
    """Refit ``view``'s (already reduced: r experts, r-row router) down projections in place, as the module
    docstring says.

    original: the n original experts' (gate [n, I, H], up [n, I, H], down [n, H, I]); original_router: their
    router's weight [n, H] and selection bias [n] or None, and the novices of grouped routing; groups: the r groups of original expert ids;
    grouped: the output routes with the original router mapped to groups (``--router grouped``), not with the
    view's r-row router; inputs: the sampled router inputs [t, H].
    """
    if inputs is None:
        raise ValueError("--refit down needs router inputs sampled during calibration (router_inputs)")
    gate, up, down = view.expert_weights()
    x = inputs.to(gate.dtype)
    n, r = len(original[0]), view.num_experts
    weight, bias, novices = KeptRouter(*original_router)
    target = weighted_outputs(view.gating, original, routing_weights(view.routing, (weight, bias), x, n), x)
    if grouped:
        slots = r + (0 if novices is None else len(novices))
        mapping = expert_map(groups, n, novices is not None)
        weights = routing_weights(view.routing, (weight, bias), x, slots, mapping)
    else:
        weights = routing_weights(view.routing, (view.router_weight, view.selection_bias), x, r)
    current = weighted_outputs(view.gating, (gate, up, down), weights[:, :r], x)  # kept up to date below
    if weights.shape[1] > r:  # the novices' share, which no refit changes
        current += weights[:, r:].double() @ novices.double()

    def features(c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens routed to reduced expert c [m] and their routing-weighted activations [m, I] float64."""
        rows = weights[:, c].nonzero().squeeze(1)
        h = intermediate_activations(gate[c], up[c], view.gating, x[rows]).double()
        return rows, weights[rows, c, None].double() * h

    refit = down.double().clone()
    for c in sorted(range(r), key=lambda c: (-int((weights[:, c] > 0).sum()), c)):
        rows, z = features(c)
        if len(rows):
            delta = ridge_solve(z, target[rows] - current[rows])  # [H, I]
            refit[c] += delta
            current[rows] += z @ delta.T
    down.copy_(refit.to(down.dtype))


def ridge_solve(z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """[H, I] float64 argmin_D ||residual - z D^T||^2 + lam ||D||^2 for z [m, I], residual [m, H] (float64), with
    lam chosen by two-fold cross-validation on the expert's tokens; zero when no lam of ``RIDGE_GRID`` beats no
    update on held-out tokens, or when fewer than ``MIN_TOKENS`` reach the expert.

    The folds are the first and second half of the tokens in calibration order, so that they come mostly from
    different sequences (neighbouring tokens are alike, and a split between them would reward interpolation).
    A fold's held-out error for every lam comes from k x k products (k = the fold's basis size, :func:`basis`):
    with P = z_held L and w = 1 / (s + lam), ||R_held - P diag(w) q||^2 = ||R_held||^2 - 2 w . c + w^T G w,
    c = rowsum((P^T R_held) * q), G = (P^T P) * (q q^T).
    """
    m, width = z.shape
    if m < MIN_TOKENS:
        return torch.zeros(residual.shape[1], width, dtype=z.dtype, device=z.device)
    half = m // 2
    errors = torch.zeros(len(RIDGE_GRID) + 1, dtype=torch.float64)  # the last: no update
    for fit, held in ((slice(0, half), slice(half, m)), (slice(half, m), slice(0, half))):
        s, left, q = basis(z[fit], residual[fit])
        p = z[held] @ left
        c = ((p.T @ residual[held]) * q).sum(dim=1)
        g = (p.T @ p) * (q @ q.T)
        total = residual[held].square().sum()
        for i, factor in enumerate(RIDGE_GRID):
            w = 1 / (s + factor * s.mean() + 1e-300)
            errors[i] += (total - 2 * (w @ c) + w @ g @ w).item()
        errors[-1] += total.item()
    best = min(range(len(errors)), key=lambda i: (errors[i], -i))  # ties to the larger ridge, then to no update
    if best == len(RIDGE_GRID):
        return torch.zeros(residual.shape[1], width, dtype=z.dtype, device=z.device)
    s, left, q = basis(z, residual)
    return (left @ (q / (s + RIDGE_GRID[best] * s.mean() + 1e-300)[:, None])).T


def basis(z: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s [k], L [I, k], q [k, H]) such that the ridge solution of ||residual - z D^T||^2 + lam ||D||^2 is
    D^T = L diag(1 / (s + lam)) q for every lam, from one eigendecomposition of the smaller Gram matrix: the dual
    z z^T = U diag(s) U^T (k = m; L = z^T U, q = U^T residual) when m < I, else the primal z^T z = V diag(s) V^T
    (k = I; L = V, q = V^T z^T residual). s is the Gram matrix's eigenvalues, so s.mean() scales the ridge."""
    m, width = z.shape
    if m < width:
        s, u = torch.linalg.eigh(z @ z.T)
        return s.clamp_min(0), z.T @ u, u.T @ residual
    s, v = torch.linalg.eigh(z.T @ z)
    return s.clamp_min(0), v, v.T @ (z.T @ residual)


def weighted_outputs(
    gated,
    experts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    x: torch.Tensor,
) -> torch.Tensor:
    """[t, H] float64 sum over experts j of weights[:, j] x E_j(x) for hidden states ``x`` [t, H], routing
    ``weights`` [t, e] from :func:`routing_weights` and ``experts`` (gate, up [e, I, H], down [e, H, I]); each
    expert runs on the tokens routed to it only."""
    gate, up, down = experts
    out = torch.zeros(len(x), down.shape[1], dtype=torch.float64, device=x.device)
    for j in range(len(gate)):
        rows = weights[:, j].nonzero().squeeze(1)
        if len(rows):
            h = intermediate_activations(gate[j], up[j], gated, x[rows]).double()
            out[rows] += weights[rows, j, None].double() * (h @ down[j].double().T)
    return out


def routing_weights(
    routing: RoutingRule,
    router: tuple[torch.Tensor, torch.Tensor | None],
    x: torch.Tensor,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """[t, num_experts] float32 routing weight of each expert on hidden states ``x`` [t, H] (0 where not chosen).

    ``router`` (weight, selection bias or None) routes over its rows; with ``expert_map`` [n] (grouped routing)
    each chosen expert's weight goes to its group, of ``num_experts`` = r.
    """
    weight, bias = router
    scores, ids = routing.route(x.float() @ weight.float().T, bias)
    if expert_map is not None:
        ids = expert_map[ids]
    out = torch.zeros(len(x), num_experts, dtype=torch.float32, device=x.device)
    return out.scatter_add_(1, ids, scores)
