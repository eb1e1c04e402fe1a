"""The building blocks of the methods: clustering, canonical groups, DeepSeek routing blocks, lse router rows, registry."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import FAMILIES, layer_stats, tiny_config, tiny_model
from scipy.cluster.hierarchy import fcluster, linkage

from moemerge import MoemergeError, apply_groups, plan_groups
from moemerge.adapters import FAMILIES as ADAPTERS
from moemerge.grouping import LINKAGES, hierarchical_labels, labels_to_groups
from moemerge.registry import names, resolve
from moemerge.statistics import LayerStatistics, collect_statistics

DEEPSEEK = ADAPTERS["deepseek_v3"]


def partition(groups) -> set[frozenset[int]]:
    return {frozenset(int(i) for i in g) for g in groups}


def scipy_partition(features: np.ndarray, r: int, method: str) -> set[frozenset[int]]:
    """Oracle: scipy linkage cut by fcluster into at most r clusters."""
    labels = fcluster(linkage(features, method=method, metric="euclidean"), r, criterion="maxclust")
    return {frozenset(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)}


def synthetic_stats(n: int = 8, hidden: int = 6, seed: int = 0, layer: int = 1) -> dict[int, LayerStatistics]:
    g = torch.Generator().manual_seed(seed)
    return {layer: layer_stats(layer, torch.randn(n, hidden, generator=g), torch.arange(1, n + 1), 2 * n)}


def ridge_fit(x: np.ndarray, target: np.ndarray, start: np.ndarray, strength: float = 1e-3) -> np.ndarray:
    """The documented lse row: argmin_w ||x w - target||^2 + lam ||w - start||^2 with lam = strength times the mean
    eigenvalue of x^T x, solved by numpy lstsq on the stacked system [x; sqrt(lam) I] w = [target; sqrt(lam) start]."""
    lam = strength * np.trace(x.T @ x) / x.shape[1] + 1e-12
    a = np.concatenate([x, np.sqrt(lam) * np.eye(x.shape[1])])
    return np.linalg.lstsq(a, np.concatenate([target, np.sqrt(lam) * start]), rcond=None)[0]


# ----------------------------------------------------------------------------------------------------------------
# hierarchical clustering


@pytest.mark.parametrize("method", LINKAGES)
def test_extreme_cuts_give_singletons_and_one_group(method):
    """r = n gives n singletons and r = 1 one group of all experts, for every linkage."""
    x = np.random.default_rng(0).normal(size=(7, 4))
    assert labels_to_groups(hierarchical_labels(x, 7, method)) == [[i] for i in range(7)]
    assert labels_to_groups(hierarchical_labels(x, 1, method)) == [list(range(7))]


@pytest.mark.parametrize("method", LINKAGES)
def test_well_separated_blobs_are_recovered(method):
    """Three tight blobs 100 units apart, members shuffled, come back as exactly the three blobs."""
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0, 0], [100, 0, 0], [0, 100, 0]])
    blob_of = rng.permutation([0, 0, 0, 1, 1, 2, 2, 2, 2])
    x = centres[blob_of] + rng.normal(scale=0.1, size=(len(blob_of), 3))
    expected = {frozenset(np.flatnonzero(blob_of == b).tolist()) for b in range(3)}
    assert partition(labels_to_groups(hierarchical_labels(x, 3, method))) == expected


@pytest.mark.parametrize("method", LINKAGES)
def test_labels_match_scipy_fcluster_on_random_features(method):
    """For random features, every cut r = 1..n equals scipy linkage + fcluster(maxclust), with labels 0..r-1."""
    rng = np.random.default_rng(2)
    for n, d in ((8, 5), (16, 3), (40, 8)):
        for _ in range(3):
            x = rng.normal(size=(n, d))
            for r in range(1, n + 1):
                labels = hierarchical_labels(x, r, method)
                assert sorted(set(labels.tolist())) == list(range(r))
                assert partition(labels_to_groups(labels)) == scipy_partition(x, r, method), (n, r)


def test_unknown_linkage_and_impossible_r_are_rejected():
    """An unknown linkage is a MoemergeError naming the choices; r outside 1..n is a ValueError."""
    x = np.zeros((4, 2))
    for bad in ("nope", "median", "centroid"):
        with pytest.raises(MoemergeError, match="average") as err:
            hierarchical_labels(x, 2, bad)
        assert all(name in str(err.value) for name in LINKAGES)
    for r in (0, 5):
        with pytest.raises(ValueError):
            hierarchical_labels(x, r)


# ----------------------------------------------------------------------------------------------------------------
# canonical groups


def test_labels_to_groups_is_canonical():
    """Groups: a partition of the ids, members sorted, groups ordered by smallest member, equal to a brute-force
    regrouping, and unchanged when the label values are renamed."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(1, 12))
        labels = rng.integers(0, 5, size=n)
        groups = labels_to_groups(labels)
        brute = [[i for i in range(n) if labels[i] == c] for c in set(labels.tolist())]
        assert groups == sorted(brute, key=lambda g: g[0])
        assert sorted(i for g in groups for i in g) == list(range(n))
        assert all(g == sorted(g) for g in groups)
        assert [g[0] for g in groups] == sorted(g[0] for g in groups)
        renamed = rng.permutation(10)[labels]  # an injective renaming of the label values
        assert labels_to_groups(renamed) == groups


def test_labels_to_groups_renames_positions_to_ids():
    """With ids, position i becomes ids[i]; the result is canonical over the ids (also for unsorted ids)."""
    rng = np.random.default_rng(4)
    for _ in range(20):
        labels = rng.integers(0, 3, size=6)
        ids = rng.choice(100, size=6, replace=False).tolist()
        groups = labels_to_groups(labels, ids=ids)
        expected = sorted(sorted(ids[i] for i in g) for g in labels_to_groups(labels))
        assert groups == expected
        assert [g[0] for g in groups] == sorted(g[0] for g in groups)


# ----------------------------------------------------------------------------------------------------------------
# DeepSeek-V3 routing blocks


@pytest.mark.parametrize("router", ["reduce", "grouped"])
@pytest.mark.parametrize("r", [4, 6])
def test_deepseek_groups_stay_inside_routing_blocks(r, router):
    """With n_group = 2, no group mixes [0..3] with [4..7], each block gets r/2 groups, and each block's groups are
    scipy's clustering of that block alone."""
    config = tiny_config("deepseek_v3")
    assert DEEPSEEK.partitions(config, r) == [([0, 1, 2, 3], r // 2), ([4, 5, 6, 7], r // 2)]
    stats = synthetic_stats()
    groups = plan_groups(stats, DEEPSEEK, config, r, router=router)[1]
    assert len(groups) == r
    for block in (set(range(4)), set(range(4, 8))):
        inside = [g for g in groups if set(g) & block]
        assert all(set(g) <= block for g in inside)
        ids = sorted(block)
        oracle = scipy_partition(stats[1].mean_output[ids].double().numpy(), r // 2, "average")
        assert partition(inside) == {frozenset(ids[i] for i in g) for g in oracle}


@pytest.mark.parametrize("r", [1, 2, 3, 5, 7])
def test_deepseek_rejects_r_that_breaks_the_routing_blocks(r):
    """Odd r, or r leaving fewer than 2 experts per block, is a MoemergeError in either router mode (the saved
    standard view must stay valid), naming the valid counts."""
    for check_top_k in (True, False):
        with pytest.raises(MoemergeError, match=r"use --experts in \[4, 6\]"):
            DEEPSEEK.partitions(tiny_config("deepseek_v3"), r, check_top_k=check_top_k)
    with pytest.raises(MoemergeError):
        plan_groups(synthetic_stats(), DEEPSEEK, tiny_config("deepseek_v3"), r)


@pytest.mark.parametrize(("n", "top_k", "n_group"), [(8, 2, 2), (16, 3, 4), (16, 6, 2)])
def test_deepseek_error_lists_exactly_the_valid_r(n, top_k, n_group):
    """The '--experts in [...]' list of the error equals, by brute force over r = 1..n-1, the r it accepts."""
    config = tiny_config("deepseek_v3", num_experts=n, top_k=top_k)
    config.n_group = n_group
    accepted, suggested = [], set()
    for r in range(1, n):
        try:
            DEEPSEEK.partitions(config, r)
            accepted.append(r)
        except MoemergeError as err:
            listed = re.search(r"--experts in \[([\d, ]*)\]", str(err))
            if listed:
                suggested.add(tuple(int(v) for v in listed.group(1).split(",") if v.strip()))
    assert accepted, "the configuration admits some reduction"
    assert suggested == {tuple(accepted)}


def test_deepseek_suggestion_of_grouped_routing_is_actionable():
    """Every r whose error advises '--router grouped' is accepted when planning with grouped routing."""
    config = tiny_config("deepseek_v3")
    advised_but_still_rejected = []
    for r in range(1, 8):
        try:
            DEEPSEEK.partitions(config, r)
        except MoemergeError as err:
            if "--router grouped" not in str(err):
                continue
            try:
                DEEPSEEK.partitions(config, r, check_top_k=False)  # what plan_groups(..., router="grouped") calls
            except MoemergeError:
                advised_but_still_rejected.append(r)
    assert advised_but_still_rejected == []


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_r_below_top_k_needs_grouped_routing(family):
    """r < top-k is rejected for a standard router (reduce) and accepted with check_top_k=False (grouped)."""
    config = tiny_config(family)
    fam = ADAPTERS[family]
    with pytest.raises(MoemergeError, match="--router grouped"):
        fam.partitions(config, 1)
    assert fam.partitions(config, 1, check_top_k=False) == [(list(range(8)), 1)]
    stats = synthetic_stats(layer=0)
    with pytest.raises(MoemergeError):
        plan_groups(stats, fam, config, 1, router="reduce")
    assert plan_groups(stats, fam, config, 1, router="grouped") == {0: [list(range(8))]}


@pytest.mark.parametrize(("n", "top_k", "n_group", "r"), [(16, 6, 2, 4), (16, 3, 4, 8)])
def test_deepseek_r_below_top_k_needs_grouped_routing(n, top_k, n_group, r):
    """DeepSeek: when the kept blocks cannot offer top-k experts (topk_group * r/n_group < top-k), reduce mode
    refuses, and check_top_k=False accepts the same r, still split evenly over the blocks."""
    config = tiny_config("deepseek_v3", num_experts=n, top_k=top_k)
    config.n_group = n_group
    assert config.topk_group * (r // n_group) < top_k
    with pytest.raises(MoemergeError, match="--router grouped"):
        DEEPSEEK.partitions(config, r)
    size = n // n_group
    expected = [(list(range(b * size, (b + 1) * size)), r // n_group) for b in range(n_group)]
    assert DEEPSEEK.partitions(config, r, check_top_k=False) == expected


# ----------------------------------------------------------------------------------------------------------------
# lse router rows


@pytest.mark.parametrize("family", FAMILIES)
def test_lse_router_rows_fit_the_log_sum_exp_better_than_the_frequency_mean(family):
    """lse rows: one-member groups keep their row bit for bit; a merged group's row is the ridge least-squares fit
    of x . w to logsumexp_i(x . w_i) on the sampled router inputs, pulled towards the frequency-weighted mean row
    (recomputed here with numpy lstsq on the augmented system), approximates that target better than the frequency
    row, and nearly as well (within 0.1 %) as the unregularised optimum."""
    model = tiny_model(family)
    fam = ADAPTERS[model.config.model_type]
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 4096, (40,), generator=g) for _ in range(3)]
    stats = collect_statistics(model, fam.moe_layers(model), seqs, {"router_inputs"}, router_sample=120, progress=False)
    before = {v.layer: v.router_weight.detach().double().clone() for v in fam.moe_layers(model)}
    groups = [[0, 2, 3], [1], [4, 7], [5], [6]]
    apply_groups(model, fam, stats, dict.fromkeys(stats, groups), router_rows_rule="lse")
    for view in fam.moe_layers(model):
        w, s = before[view.layer], stats[view.layer]
        x = s.router_inputs.double()
        assert len(x) == 120 > x.shape[1]  # more samples than unknowns: the least-squares problem is determined
        rows = view.router_weight.double()
        for k, members in enumerate(groups):
            if len(members) == 1:
                assert torch.equal(view.router_weight[k], w[members[0]].float())
                continue
            target = torch.logsumexp(x @ w[members].T, dim=1)
            counts = s.counts[members].double()
            frequency_row = (counts / counts.sum()) @ w[members]
            optimum = torch.from_numpy(np.linalg.lstsq(x.numpy(), target.numpy(), rcond=None)[0])
            ridge = torch.from_numpy(ridge_fit(x.numpy(), target.numpy(), frequency_row.numpy()))
            torch.testing.assert_close(rows[k], ridge, rtol=1e-5, atol=1e-5)
            residual = {
                name: (x @ row - target).norm().item()
                for name, row in [("fit", rows[k]), ("freq", frequency_row), ("opt", optimum)]
            }
            assert residual["fit"] <= residual["opt"] * 1.001, residual
            assert residual["fit"] < residual["freq"], residual


# ----------------------------------------------------------------------------------------------------------------
# registry


@pytest.mark.parametrize("kind", ["merge", "method", "router-rows"])
def test_unknown_registry_name_is_an_error_listing_the_choices(kind):
    """resolve(kind, 'nope') raises MoemergeError that names 'nope' and every registered choice."""
    choices = names(kind)
    assert choices
    with pytest.raises(MoemergeError) as err:
        resolve(kind, "nope")
    message = str(err.value)
    assert "'nope'" in message
    assert all(name in message for name in choices)
    for name in choices:
        resolve(kind, name)  # every listed choice resolves


def test_the_documented_choices_are_registered():
    """The merge rules, router-row rules and the hc-smoe method the pipeline documents are all registered."""
    assert {"frequency", "average"} <= set(names("merge"))
    assert {"frequency", "lse"} <= set(names("router-rows"))
    assert "hc-smoe" in names("method")
