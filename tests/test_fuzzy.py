"""Fuzzy c-means grouping (--cluster fcm) and soft merging, each checked against an oracle written here.

Oracles: the FCM fixed-point equations recomputed in numpy, known well-separated clusters, closed-form membership
times frequency merge weights, the hard-group lse rows as memberships tend to 0/1, and numpy lstsq.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import layer_stats, save_tiny, tiny_config
from test_cli import SMALL_CALIB, assert_clean_error, run
from test_methods import ridge_fit
from transformers import AutoModelForCausalLM

from moemerge import plan_groups
from moemerge.adapters import FAMILIES as ADAPTERS
from moemerge.grouping import SoftGroups, fcm_memberships
from moemerge.merging import member_weights, merge_experts
from moemerge.options import ReduceOptions
from moemerge.routing import router_rows


def cosine_distance(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """[n, r] 1 - cos(x_i, c_j), written out here."""
    return 1 - (x @ c.T) / np.linalg.norm(x, axis=1)[:, None] / np.linalg.norm(c, axis=1)[None, :]


def fcm_step(x: np.ndarray, u: np.ndarray, distance: str) -> np.ndarray:
    """One FCM update (m = 2): c_j = sum_i u_ij^2 x_i / sum_i u_ij^2, then u_ij = 1 / sum_k (d_ij / d_ik)^2."""
    w = u**2
    centres = (w.T @ x) / w.sum(axis=0)[:, None]
    if distance == "cosine":
        d = cosine_distance(x, centres)
    else:
        d = np.linalg.norm(x[:, None, :] - centres[None, :, :], axis=2)
    return 1 / ((d[:, :, None] / d[:, None, :]) ** 2).sum(axis=2)


def partition_of(labels: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)}


# ----------------------------------------------------------------------------------------------------------------
# memberships


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_fcm_memberships_are_a_fixed_point_of_the_fcm_equations(distance):
    """Memberships are in [0, 1] with rows summing to 1, clusters ordered by their most typical expert, and one more
    FCM update (recomputed in numpy) leaves them unchanged to 1e-7."""
    rng = np.random.default_rng(0)
    for n, d, r in ((8, 5, 3), (12, 4, 4), (16, 8, 2)):
        x = rng.normal(size=(n, d)) + (3.0 if distance == "cosine" else 0.0)
        u = fcm_memberships(x, r, distance, seed=0)
        assert u.shape == (n, r) and u.dtype == np.float64
        assert (u >= 0).all() and (u <= 1).all()
        np.testing.assert_allclose(u.sum(axis=1), 1, rtol=0, atol=1e-12)
        typical = u.argmax(axis=0)
        assert (np.diff(typical) >= 0).all()
        np.testing.assert_allclose(fcm_step(x, u, distance), u, rtol=0, atol=1e-7)


def test_fcm_recovers_well_separated_clusters_whatever_the_seed():
    """Three tight blobs far apart, members shuffled: the argmax partition is the blobs, and every seed gives the same
    memberships (the cluster order does not depend on the random start); the same seed gives identical output."""
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0, 0], [50, 0, 0], [0, 50, 0]])
    blob_of = rng.permutation([0, 0, 0, 1, 1, 2, 2, 2, 2])
    x = centres[blob_of] + rng.normal(scale=0.5, size=(len(blob_of), 3))
    first = fcm_memberships(x, 3, seed=0)
    assert partition_of(first.argmax(axis=1)) == partition_of(blob_of)
    assert first.max(axis=1).min() > 0.9
    for seed in range(1, 5):
        np.testing.assert_allclose(fcm_memberships(x, 3, seed=seed), first, rtol=0, atol=1e-6)
    assert np.array_equal(fcm_memberships(x, 3, seed=0), first)
    random_x = rng.normal(size=(10, 4))
    assert np.array_equal(fcm_memberships(random_x, 3, seed=7), fcm_memberships(random_x, 3, seed=7))


def test_fcm_with_as_many_clusters_as_experts_is_the_identity():
    """r == n gives the identity memberships: every expert alone in its own group."""
    x = np.random.default_rng(2).normal(size=(6, 3))
    assert np.array_equal(fcm_memberships(x, 6), np.eye(6))


def test_fcm_groups_of_deepseek_stay_in_their_routing_blocks():
    """hc-smoe with --cluster fcm on DeepSeek-V3 (2 routing blocks): each block is clustered on its own, its r/2 soft
    groups hold exactly that block's experts, and their memberships [4, 2] (rows summing to 1, clusters ordered by
    their most typical expert) are a fixed point of the FCM update recomputed here on that block's features alone."""
    g = torch.Generator().manual_seed(3)
    stats = {1: layer_stats(1, torch.randn(8, 6, generator=g), torch.arange(1, 9), 16)}
    groups = plan_groups(
        stats, ADAPTERS["deepseek_v3"], tiny_config("deepseek_v3"), 4, options=ReduceOptions(cluster="fcm")
    )[1]
    assert isinstance(groups, SoftGroups)
    assert list(groups) == [[0, 1, 2, 3]] * 2 + [[4, 5, 6, 7]] * 2
    for block, ids in enumerate(([0, 1, 2, 3], [4, 5, 6, 7])):
        features = stats[1].mean_output[ids].double().numpy()
        got = torch.stack(groups.memberships[2 * block : 2 * block + 2], dim=1).numpy()
        np.testing.assert_allclose(got.sum(axis=1), 1, rtol=0, atol=1e-12)
        assert (np.diff(got.argmax(axis=0)) >= 0).all()
        assert got.max(axis=1).min() < 1 - 1e-3  # genuinely soft: the fixed-point check is not trivial
        np.testing.assert_allclose(fcm_step(features, got, "euclidean"), got, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# soft merging and router rows


N, R, INTER, HIDDEN = 6, 3, 5, 8


def soft_setup(seed: int = 0):
    """Random memberships u [N, R] (rows sum to 1), counts with a zero, expert weights, router rows and inputs."""
    rng = np.random.default_rng(seed)
    u = rng.dirichlet(np.ones(R), size=N)
    counts = torch.tensor([5, 0, 3, 9, 1, 4])
    g = torch.Generator().manual_seed(seed)
    experts = (
        torch.randn(N, INTER, HIDDEN, generator=g),
        torch.randn(N, INTER, HIDDEN, generator=g),
        torch.randn(N, HIDDEN, INTER, generator=g),
    )
    router = torch.randn(N, HIDDEN, generator=g, dtype=torch.float64)
    inputs = torch.randn(200, HIDDEN, generator=g)
    stats = layer_stats(0, torch.zeros(N, HIDDEN), counts, 20, router_inputs=inputs)
    return u, counts, experts, router, stats


def test_soft_member_weights_merged_experts_and_frequency_rows_follow_the_closed_form():
    """For SoftGroups.from_matrix(u): frequency weights are w_ij = c_i u_ij / sum_i c_i u_ij (average: u_ij / sum u),
    merged experts are sum_i w_ij E_i, frequency router rows and selection biases are sum_i w_ij of the rows/biases."""
    u, counts, experts, router, stats = soft_setup()
    groups = SoftGroups.from_matrix(u, list(range(N)))
    assert list(groups) == [list(range(N))] * R
    c, uu = counts.double().numpy(), u
    closed = [c * uu[:, j] / (c * uu[:, j]).sum() for j in range(R)]
    weights = member_weights("frequency", stats, groups)
    for got, want in zip(weights, closed, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=0)
    for got, j in zip(member_weights("average", stats, groups), range(R), strict=True):
        np.testing.assert_allclose(got.numpy(), uu[:, j] / uu[:, j].sum(), rtol=1e-12, atol=0)

    w = torch.from_numpy(np.stack(closed))  # [R, N]
    merged = merge_experts(experts, groups, weights)
    for got, tensor in zip(merged, experts, strict=True):
        torch.testing.assert_close(
            got.double(), torch.einsum("jn,n...->j...", w, tensor.double()), rtol=1e-6, atol=1e-6
        )

    bias = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    rows, new_bias = router_rows("frequency", router, bias, groups, stats)
    torch.testing.assert_close(rows, w @ router, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_bias, w @ bias, rtol=1e-12, atol=1e-12)


def test_soft_lse_rows_fit_the_membership_weighted_log_sum_exp():
    """lse rows of soft groups are the ridge least-squares fit of x . w to logsumexp_i(x . w_i + log u_ij) on the
    router inputs, pulled towards the closed-form frequency row sum_i w_ij w_i (the augmented system solved here by
    numpy lstsq); they fit that target better than the frequency row and within 0.1 % of the unregularised optimum."""
    u, counts, _, router, stats = soft_setup(1)
    groups = SoftGroups.from_matrix(u, list(range(N)))
    rows, _ = router_rows("lse", router, None, groups, stats)
    x = stats.router_inputs.double()
    c = counts.double().numpy()
    for j in range(R):
        weights = c * u[:, j] / (c * u[:, j]).sum()
        freq = torch.from_numpy(weights @ router.numpy())
        target = torch.logsumexp(x @ router.T + torch.from_numpy(np.log(u[:, j])), dim=1)
        torch.testing.assert_close(rows[j], torch.from_numpy(ridge_fit(x.numpy(), target.numpy(), freq.numpy())))
        optimum = torch.from_numpy(np.linalg.lstsq(x.numpy(), target.numpy(), rcond=None)[0])
        residual = {name: (x @ row - target).norm().item() for name, row in (("fit", rows[j]), ("freq", freq))}
        residual["opt"] = (x @ optimum - target).norm().item()
        assert residual["fit"] <= residual["opt"] * 1.001, residual
        assert residual["fit"] < residual["freq"], residual


def test_soft_lse_rows_approach_the_hard_rows_as_memberships_become_zero_or_one():
    """With memberships 1 - eps / eps of a hard grouping (groups of several members), soft lse and frequency router
    rows equal the hard-group rows to within 1e-8."""
    _, _, _, router, stats = soft_setup(2)
    hard = [[0, 2, 3], [1, 4, 5]]
    eps = 1e-12
    u = np.full((N, len(hard)), eps)
    for j, members in enumerate(hard):
        u[members, j] = 1.0
    u /= u.sum(axis=1, keepdims=True)
    soft = SoftGroups.from_matrix(u, list(range(N)))
    hard_rows = {rule: router_rows(rule, router, None, hard, stats)[0] for rule in ("lse", "frequency")}
    assert (hard_rows["lse"] - hard_rows["frequency"]).abs().max() > 1e-2  # the two rules differ: a real comparison
    for rule, rows in hard_rows.items():
        torch.testing.assert_close(router_rows(rule, router, None, soft, stats)[0], rows, rtol=0, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("src") / "mixtral")


def test_cli_fcm_writes_membership_weighted_experts(tmp_path, capfd, mixtral):
    """moemerge reduce --cluster fcm: the output loads with r experts per layer; moemerge.json has r groups of all
    experts with memberships summing to 1 per expert; each merged expert equals sum_i w_ij E_i with
    w_ij = f_i u_ij / sum_i f_i u_ij from the recorded frequencies and memberships."""
    out, r = tmp_path / "out", 3
    code, _, err = run(
        ["reduce", mixtral, "--out", out, "--experts", r, "--cluster", "fcm", *SMALL_CALIB, "--quiet"], capfd
    )
    assert code == 0, err
    meta = json.loads((out / "moemerge.json").read_text())
    assert meta["parameters"]["cluster"] == "fcm"
    source = AutoModelForCausalLM.from_pretrained(mixtral)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == r
    assert [rec["layer"] for rec in meta["layers"]] == [0, 1]
    for rec in meta["layers"]:
        assert rec["groups"] == [list(range(8))] * r
        u = np.array(rec["memberships"])  # [r, n]
        assert u.shape == (r, 8)
        np.testing.assert_allclose(u.sum(axis=0), 1, rtol=0, atol=1e-9)
        f = np.array(rec["frequency"])
        w = torch.from_numpy(f * u / (f * u).sum(axis=1, keepdims=True))
        experts = model.model.layers[rec["layer"]].mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            original = getattr(source.model.layers[rec["layer"]].mlp.experts, name).detach().double()
            assert getattr(experts, name).shape[0] == r
            expected = torch.einsum("jn,n...->j...", w, original)
            torch.testing.assert_close(getattr(experts, name).detach().double(), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(1, 9)[None], use_cache=False).logits).all()


@pytest.mark.parametrize("extra", [["--router", "grouped"], ["--align"]], ids=["grouped", "align"])
def test_cli_fcm_refuses_grouped_routing_and_alignment(tmp_path, capfd, mixtral, extra):
    """--cluster fcm with --router grouped or --align: exit 2, one `error:` line naming fcm, and no output."""
    out = tmp_path / "out"
    code, _, err = run(["reduce", mixtral, "--out", out, "--experts", "4", "--cluster", "fcm", *extra], capfd)
    assert "fcm" in assert_clean_error(code, err, out)
