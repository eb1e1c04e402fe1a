"""hc-smoe's grouping options: metrics, distances, ward linkage and k-means, against independent oracles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FAMILIES, layer_stats, save_tiny, tiny_config, tiny_model
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from moemerge import plan_groups
from moemerge.adapters import FAMILIES as ADAPTERS
from moemerge.cli import main
from moemerge.errors import MoemergeError
from moemerge.grouping import expert_features, hierarchical_labels, kmeans_labels, labels_to_groups
from moemerge.options import ReduceOptions
from moemerge.statistics import collect_statistics


def partition(labels) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(np.asarray(labels) == c).tolist()) for c in np.unique(labels)}


def statistics(family: str, needs=()):
    model = tiny_model(family)
    adapter = ADAPTERS[model.config.model_type]
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 4096, (24,), generator=g) for _ in range(2)]
    return model, adapter, collect_statistics(model, adapter.moe_layers(model), sequences, needs, progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_features_keep_the_distances_of_the_flattened_weights(family):
    """The weight metric's n-dimensional embedding has the pairwise Euclidean and cosine distances of the
    flattened (gate, up, down) weights, computed directly with scipy."""
    model, adapter, stats = statistics(family, needs={"weight_gram"})
    for view in adapter.moe_layers(model):
        flat = torch.cat([w.detach().reshape(view.num_experts, -1) for w in view.expert_weights()], 1).double().numpy()
        embedded = expert_features(stats[view.layer], "weight")
        for metric in ("euclidean", "cosine"):
            np.testing.assert_allclose(pdist(embedded, metric), pdist(flat, metric), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_logit_features_are_every_tokens_logits(family):
    """router-logits features [n, T] equal x W_router^T over the captured MoE-block inputs of every token."""
    model, adapter, stats = statistics(family, needs={"router_logit_features"})
    captured = {}
    hooks = [
        v.block.register_forward_pre_hook(
            lambda m, args, i=v.layer: captured.setdefault(i, []).append(
                args[0].detach().reshape(-1, args[0].shape[-1])
            )
        )
        for v in adapter.moe_layers(model)
    ]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for seq in [torch.randint(0, 4096, (24,), generator=g) for _ in range(2)]:
            model(input_ids=seq[None])
    for hook in hooks:
        hook.remove()
    for view in adapter.moe_layers(model):
        x = torch.cat(captured[view.layer]).double()
        expected = (x @ view.router_weight.detach().double().T).T.numpy()
        np.testing.assert_allclose(expert_features(stats[view.layer], "router-logits"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["single", "complete", "average"])
def test_cosine_hierarchical_equals_scipy_on_cosine_distances(method):
    """Cosine-distance clustering equals scipy fcluster(maxclust) on the condensed cosine distances."""
    x = np.random.default_rng(4).normal(size=(12, 5))
    for r in range(1, 13):
        oracle = fcluster(linkage(pdist(x, "cosine"), method=method), r, criterion="maxclust")
        assert partition(hierarchical_labels(x, r, method, "cosine")) == partition(oracle)


def test_ward_needs_euclidean_distance():
    """Ward with cosine distance is refused with a MoemergeError that says what to use."""
    with pytest.raises(MoemergeError, match="--distance euclidean"):
        hierarchical_labels(np.zeros((4, 2)), 2, "ward", "cosine")


def lloyd(x: np.ndarray, centres: np.ndarray, steps: int = 100) -> np.ndarray:
    """Plain Lloyd iterations from ``centres`` until the assignment stops changing."""
    labels = None
    for _ in range(steps):
        new = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        assert len(np.unique(labels)) == len(centres), "an empty cluster: this oracle has no rule for it"
        centres = np.stack([x[labels == c].mean(0) for c in range(len(centres))])
    return labels


def test_kmeans_first_init_starts_from_the_first_r_experts():
    """'first' init gives the partition of Lloyd's algorithm started at experts 0..r-1 (independent numpy code),
    whatever the seed. scikit-learn relocates a cluster that empties and the oracle has no such rule, so the data
    are noisy blobs in which none empties (the oracle asserts it); the first r experts lie in different blobs,
    and in some trial the iterations move points away from their nearest initial centre (asserted)."""
    rng = np.random.default_rng(0)
    moved = 0
    for trial in range(5):
        r = 3 + trial % 3
        centres = rng.normal(scale=3, size=(r, 3))
        x = np.concatenate(
            [centres + rng.normal(size=(r, 3)), centres[rng.integers(0, r, 12)] + rng.normal(size=(12, 3))]
        )
        final = lloyd(x, x[:r].copy())
        moved += int((final != ((x[:, None] - x[None, :r]) ** 2).sum(-1).argmin(1)).sum())
        expected = partition(final)
        for seed in (0, 1, 7):
            assert partition(kmeans_labels(x, r, "first", seed=seed)) == expected
    assert moved > 0


@pytest.mark.parametrize("init", ["random", "k-means++"])
def test_kmeans_is_deterministic_for_a_seed(init):
    """Seeded inits give identical labels on repeated runs, and r distinct clusters."""
    x = np.random.default_rng(2).normal(size=(20, 4))
    for seed in range(4):
        first = kmeans_labels(x, 5, init, seed=seed)
        assert np.array_equal(first, kmeans_labels(x, 5, init, seed=seed))
        assert len(labels_to_groups(first)) == 5


def test_kmeans_random_init_depends_on_the_seed():
    """Different seeds of the random init reach different partitions on structureless data (some pair differs)."""
    x = np.random.default_rng(3).normal(size=(30, 2))
    partitions = {frozenset(partition(kmeans_labels(x, 6, "random", seed=seed))) for seed in range(8)}
    assert len(partitions) > 1


def direction_blobs() -> tuple[np.ndarray, set[frozenset[int]]]:
    """8 features [8, 4]: experts 0, 2, 5, 7 point along one axis and 1, 3, 4, 6 along another (small noise), each
    direction with short (norm 1) and long (norm 10) members. Returns (features, partition by direction)."""
    rng = np.random.default_rng(5)
    direction = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    length = np.array([1.0, 10.0, 10.0, 1.0, 1.0, 1.0, 10.0, 10.0])
    x = np.eye(4)[direction] + rng.normal(scale=0.05, size=(8, 4))
    x = x / np.linalg.norm(x, axis=1, keepdims=True) * length[:, None]
    return x, partition(direction)


def test_cosine_kmeans_clusters_directions_not_magnitudes():
    """--distance cosine k-means clusters the L2-normalised features: on planted features whose cosine and Euclidean
    clusterings differ, it gives Lloyd's partition of the normalised features (numpy oracle, started from the first
    r), which is the direction partition, for every init and seed, and plan_groups passes the distance on; Euclidean
    k-means gives Lloyd's partition of the raw features, which is not the direction partition."""
    x, by_direction = direction_blobs()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert partition(lloyd(unit, unit[:2].copy())) == by_direction
    euclidean = partition(lloyd(x, x[:2].copy()))
    assert euclidean != by_direction  # the planted case separates the two distances
    for init in ("first", "random", "k-means++"):
        for seed in (0, 1, 2):
            assert partition(kmeans_labels(x, 2, init, "cosine", seed)) == by_direction, (init, seed)
    assert partition(kmeans_labels(x, 2, "first", "euclidean")) == euclidean
    stats = {1: layer_stats(1, torch.from_numpy(x).float(), torch.arange(1, 9), 16)}
    for distance, expected in (("cosine", by_direction), ("euclidean", euclidean)):
        options = ReduceOptions(cluster="kmeans", distance=distance)
        groups = plan_groups(stats, ADAPTERS["mixtral"], tiny_config("mixtral"), 2, options=options)[1]
        assert {frozenset(g) for g in groups} == expected, distance


@pytest.mark.parametrize(
    "options",
    [
        ["--metric", "router-logits"],
        ["--metric", "weight", "--linkage", "ward"],
        ["--cluster", "kmeans", "--kmeans-init", "k-means++", "--distance", "cosine"],
    ],
)
def test_options_run_end_to_end(tmp_path, options):
    """Each grouping option writes r groups per layer that partition the experts, and records itself."""
    src = save_tiny("qwen2_moe", tmp_path / "src")
    out = tmp_path / "out"
    argv = ["reduce", str(src), "--experts", "4", "--out", str(out), "--quiet", "--calib-samples", "2"]
    assert main([*argv, "--calib-seq-len", "32", *options]) == 0
    meta = json.loads((out / "moemerge.json").read_text())
    for entry in meta["layers"]:
        assert len(entry["groups"]) == 4 and sorted(j for g in entry["groups"] for j in g) == list(range(8))
    for flag, value in zip(options[::2], options[1::2], strict=True):
        assert meta["parameters"][flag[2:].replace("-", "_")] == value


def test_ward_with_cosine_is_a_one_line_error(tmp_path, capfd):
    """--linkage ward --distance cosine exits 2 with one error line and writes nothing."""
    src = save_tiny("mixtral", tmp_path / "src")
    argv = ["reduce", str(src), "--experts", "4", "--out", str(tmp_path / "out"), "--linkage", "ward"]
    assert main([*argv, "--distance", "cosine"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def single_shot_oracle(x: np.ndarray, counts: np.ndarray, r: int, distance: str) -> set[frozenset[int]]:
    """Loops: dominants = r largest counts (ties: lower id); each other expert joins its nearest dominant."""
    order = sorted(range(len(x)), key=lambda j: (-counts[j], j))
    dominant = sorted(order[:r])
    groups = {d: {d} for d in dominant}
    for j in range(len(x)):
        if j in groups:
            continue
        dist = [pdist(np.stack([x[j], x[d]]), distance)[0] for d in dominant]
        groups[dominant[int(np.argmin(dist))]].add(j)
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_single_shot_equals_a_loop_oracle(distance):
    """single-shot labels equal the loop oracle, on random features and counts with ties, for every r."""
    from moemerge.grouping import single_shot_labels

    rng = np.random.default_rng(8)
    for _ in range(5):
        x = rng.normal(size=(10, 4))
        counts = rng.integers(0, 4, size=10)
        for r in range(1, 11):
            assert partition(single_shot_labels(x, counts, r, distance)) == single_shot_oracle(x, counts, r, distance)


@pytest.mark.parametrize("family", FAMILIES)
def test_m_smoe_groups_by_router_logit_cosine_around_the_most_used(family):
    """m-smoe's groups are the single-shot oracle applied to the counts and to x W_router^T computed here."""
    import moemerge

    model, adapter, stats = statistics(family, needs={"router_logit_features"})
    plan = moemerge.plan_groups(stats, adapter, model.config, 4, method="m-smoe")
    blocks = [list(range(4)), list(range(4, 8))] if family == "deepseek_v3" else [list(range(8))]
    for view in adapter.moe_layers(model):
        s = stats[view.layer]
        features = s.router_logit_features.double().numpy()
        expected = set()
        for block in blocks:
            share = 4 // len(blocks)
            inside = single_shot_oracle(features[block], s.counts[block].numpy(), share, "cosine")
            expected |= {frozenset(block[i] for i in g) for g in inside}
        assert {frozenset(g) for g in plan[view.layer]} == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_sub_moe_is_cosine_kmeans_then_the_joint_svd_merge(family):
    """sub-moe's groups are scikit-learn's k-means++ (seeded, one run) on the unit-normalised mean outputs of each
    routing block; each merged expert equals Sub-MoE's joint-SVD merge computed here with numpy: the members'
    matrices side by side, [W_1 ... W_m] = U S [V_1 ... V_m]^T, merged as U S (sum_i f_i V_i)^T, f_i the members'
    shares of the group's routed tokens."""
    from sklearn.cluster import KMeans

    import moemerge

    model, adapter, stats = statistics(family)
    original = {
        v.layer: [w.detach().clone().double().numpy() for w in v.expert_weights()] for v in adapter.moe_layers(model)
    }
    plan = moemerge.plan_groups(stats, adapter, model.config, 4, method="sub-moe")
    blocks = [list(range(4)), list(range(4, 8))] if family == "deepseek_v3" else [list(range(8))]
    for layer, groups in plan.items():
        expected = set()
        for block in blocks:
            x = stats[layer].mean_output.double().numpy()[block]
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
            fit = KMeans(4 // len(blocks), init="k-means++", n_init=1, random_state=ReduceOptions().seed).fit(x)
            expected |= {frozenset(block[i] for i in np.flatnonzero(fit.labels_ == c)) for c in set(fit.labels_)}
        assert {frozenset(g) for g in groups} == expected
    moemerge.apply_groups(model, adapter, stats, plan, merge=ReduceOptions(method="sub-moe").effective().merge)
    for view in adapter.moe_layers(model):
        merged = [w.detach().double().numpy() for w in view.expert_weights()]
        counts = stats[view.layer].counts.double().numpy()
        for g, members in enumerate(plan[view.layer]):
            shares = counts[members] / counts[members].sum()
            for w, (m, before) in enumerate(zip(merged, original[view.layer], strict=True)):
                u, s, vt = np.linalg.svd(np.concatenate([before[i] for i in members], axis=1), full_matrices=False)
                blocks_v = np.split(vt, len(members), axis=1)
                joint = u @ np.diag(s) @ sum(f * v for f, v in zip(shares, blocks_v, strict=True))
                np.testing.assert_allclose(m[g], joint, rtol=1e-4, atol=1e-6, err_msg=f"layer {view.layer} {w}")
