"""``moemerge eval`` and moemerge.evaluation, each number checked against an oracle written here.

Oracles: per-token float64 log-softmax losses over the same windows, the closed form ppl = V of a model with a zero
output projection, a model compared with an identical copy (zero error, cosine 1), per-layer errors recomputed with
our own hooks on the reference, grouped routing with r = n (identical to the original), a numpy silhouette from its
a(i) / b(i) definition and a brute-force Dunn index, parameter counts in closed form from config fields, the
tokenizer's stream and its hash recomputed here, mean expert outputs recomputed from the expert weights, and the
safetensors file sizes on disk.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import EXPERT_FIELD, TOKENIZER_DIR, VOCAB, save_tiny, tiny_config, tiny_model
from test_cli import TEXT, assert_clean_error, run
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import moemerge
from moemerge import pipeline
from moemerge.adapters import FAMILIES as ADAPTERS
from moemerge.calibration import load_tokens
from moemerge.evaluation import (
    cluster_quality,
    evaluate,
    fidelity,
    group_labels,
    parameter_counts,
    perplexity,
    windows,
)

EVALUATE = importlib.import_module("moemerge.evaluation.evaluate")  # the module (the package re-exports the function)
MAX_TOKENS, SEQ_LEN = 193, 64  # 3 full windows of 64 and a 1-token tail that predicts nothing
TIMING_FIELDS = {"prefill_latency_s", "decode_tokens_per_s", "peak_memory_bytes", "baseline_memory_bytes"}


# ----------------------------------------------------------------------------------------------------------------
# oracles


def random_stream(length: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (length,), generator=g)


def oracle_mean_nll(model, chunks: list[torch.Tensor]) -> tuple[float, int]:
    """Mean over every position t >= 1 of each window of -log p(x_t | x_<t), one token at a time in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            logits = model(input_ids=chunk[None]).logits[0].double()  # the whole window, last logit unused
            for t in range(1, len(chunk)):
                total -= float(torch.log_softmax(logits[t - 1], dim=-1)[chunk[t]])
                count += 1
    return total / count, count


def moe_layer_ids(model) -> list[int]:
    """Decoder layers whose MLP holds routed experts, read off the module tree."""
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def pairwise(x: np.ndarray, metric: str) -> np.ndarray:
    """[n, n] Euclidean or cosine (1 - cos) distances, one pair at a time."""
    n = len(x)
    d = np.zeros((n, n))
    for i, j in itertools.product(range(n), repeat=2):
        if metric == "euclidean":
            d[i, j] = math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], x[j], strict=True)))
        else:
            d[i, j] = 1 - float(x[i] @ x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
    return d


def oracle_silhouette(x: np.ndarray, labels: np.ndarray, metric: str) -> float:
    """Mean over points of s(i) = (b(i) - a(i)) / max(a(i), b(i)); s(i) = 0 for a point alone in its cluster."""
    d = pairwise(x, metric)
    scores = []
    for i in range(len(x)):
        own = [j for j in range(len(x)) if labels[j] == labels[i] and j != i]
        if not own:
            scores.append(0.0)
            continue
        a = np.mean([d[i, j] for j in own])
        b = min(np.mean([d[i, j] for j in range(len(x)) if labels[j] == c]) for c in set(labels) - {labels[i]})
        scores.append((b - a) / max(a, b))
    return float(np.mean(scores))


def oracle_dunn(x: np.ndarray, labels: np.ndarray) -> float | None:
    """min distance between points of different clusters / max distance between points of one cluster."""
    separation, diameter = math.inf, 0.0
    for i, j in itertools.combinations(range(len(x)), 2):
        dist = float(np.linalg.norm(x[i] - x[j]))
        if labels[i] == labels[j]:
            diameter = max(diameter, dist)
        else:
            separation = min(separation, dist)
    return None if diameter == 0 or separation == math.inf else separation / diameter


def closed_form_counts(config) -> dict:
    """(parameters, expert_parameters, active_parameters) from config fields alone, for the tiny models of every
    family in conftest (untied or tied output projection; Qwen's dense layers by mlp_only_layers and
    decoder_sparse_step)."""
    kind = config.model_type
    h, v, heads = config.hidden_size, config.vocab_size, config.num_attention_heads
    n, k = getattr(config, EXPERT_FIELD[kind]), config.num_experts_per_tok
    layers = config.num_hidden_layers
    if kind == "deepseek_v3":
        q_lora, kv_lora, rope = config.q_lora_rank, config.kv_lora_rank, config.qk_rope_head_dim
        nope, v_dim = config.qk_nope_head_dim, config.v_head_dim
        attn = q_lora * h + heads * (nope + rope) * q_lora + (kv_lora + rope) * h + heads * (nope + v_dim) * kv_lora
        attn += h * heads * v_dim
        attn_1d = q_lora + kv_lora
        dense = config.first_k_dense_replace
        expert = 3 * config.moe_intermediate_size * h
        shared = 3 * h * config.moe_intermediate_size * config.n_shared_experts
        dense_mlp = 3 * h * config.intermediate_size
        moe_layers = layers - dense
        layer_2d = dense * (attn + dense_mlp) + moe_layers * (attn + n * h + shared)  # the bias is a buffer
    else:
        hd = getattr(config, "head_dim", None) or h // heads
        kv = config.num_key_value_heads
        attn = h * heads * hd + 2 * kv * hd * h + heads * hd * h
        attn_1d = {
            "qwen2_moe": heads * hd + 2 * kv * hd,  # q/k/v biases
            "qwen3_moe": 2 * hd,  # q_norm and k_norm over one head
            "olmoe": heads * hd + kv * hd,  # q_norm and k_norm over all heads
        }.get(kind, 0)
        qwen = kind in ("qwen2_moe", "qwen3_moe")
        expert = 3 * (config.moe_intermediate_size if qwen else config.intermediate_size) * h
        shared = 3 * h * config.shared_expert_intermediate_size + h if kind == "qwen2_moe" else 0  # + its 1xH gate
        if qwen:  # transformers' rule: a layer is MoE unless in mlp_only_layers, and only every sparse_step-th one
            dense_ids = set(config.mlp_only_layers or [])
            moe_ids = [i for i in range(layers) if i not in dense_ids and (i + 1) % config.decoder_sparse_step == 0]
        else:
            moe_ids = list(range(layers))
        moe_layers = len(moe_ids)
        dense_mlp = 3 * h * config.intermediate_size
        layer_2d = layers * attn + moe_layers * (n * h + shared) + (layers - moe_layers) * dense_mlp
    experts = moe_layers * n * expert
    norms = layers * (2 * h + attn_1d) + h
    embeddings = v * h if config.tie_word_embeddings else 2 * v * h
    return {
        "parameters": embeddings + layer_2d + experts + norms,
        "expert_parameters": experts,
        "active_parameters": layer_2d + v * h + moe_layers * k * expert,
    }


def strip_timings(result: dict) -> dict:
    """The result without wall-clock and memory numbers, as JSON would give it back."""
    result = json.loads(json.dumps(result))
    result.pop("seconds")
    if "cost" in result:
        result["cost"] = {key: value for key, value in result["cost"].items() if key not in TIMING_FIELDS}
    return result


def safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.name.endswith(".safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """A tiny Mixtral and Qwen2-MoE with the demo tokenizer, a text file, and hc-smoe / f-prune reductions (r = 4)."""
    root = tmp_path_factory.mktemp("eval")
    text = root / "text.txt"
    text.write_text(TEXT * 2, encoding="utf-8")
    paths = {"root": root, "text": text, "src": save_tiny("mixtral", root / "mixtral")}
    paths["qwen"] = save_tiny("qwen2_moe", root / "qwen2_moe")
    for method in ("hc-smoe", "f-prune"):
        paths[method] = root / method
        moemerge.reduce(
            paths["src"],
            paths[method],
            experts=4,
            method=method,
            calib=str(text),
            calib_samples=2,
            calib_seq_len=32,
            progress=False,
        )
    return paths


def eval_args(model, *extra) -> list:
    return ["eval", model, "--max-tokens", MAX_TOKENS, "--seq-len", SEQ_LEN, "--no-cost", "--quiet", *extra]


# ----------------------------------------------------------------------------------------------------------------
# perplexity


@pytest.mark.parametrize("length", [2, 15, 16, 17, 31, 32, 33, 48, 49, 50])
def test_windows_split_the_stream_exactly(length):
    """windows() are the consecutive seq_len slices (last one shorter), minus a 1-token tail; concatenated they give
    back the stream without that tail."""
    ids = random_stream(length)
    expected = [ids[i : i + 16] for i in range(0, length, 16)]
    expected = [w for w in expected if len(w) > 1]
    got = windows(ids, 16)
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    tail = 1 if length % 16 == 1 else 0
    assert torch.equal(torch.cat(got), ids[: length - tail])


def test_perplexity_is_exp_of_the_per_token_mean_loss():
    """perplexity() equals exp of the mean float64 per-token NLL over every position but the first of each window."""
    model = tiny_model("mixtral")
    chunks = windows(random_stream(16 * 3 + 7), 16)
    result = perplexity(model, chunks)
    nll, count = oracle_mean_nll(model, chunks)
    assert result["tokens"] == count == 3 * 15 + 6
    assert result["mean_nll"] == pytest.approx(nll, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["mean_nll"]), rel=1e-12)


def test_perplexity_of_a_uniform_predictor_is_the_vocabulary_size():
    """With the (untied) output projection zeroed every logit is 0: the perplexity is V (to float32 rounding)."""
    model = tiny_model("mixtral")
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    result = perplexity(model, windows(random_stream(40), 16))
    assert result["tokens"] == 2 * 15 + 7
    assert result["mean_nll"] == pytest.approx(math.log(VOCAB), rel=1e-6)  # the loss is taken in float32
    assert result["perplexity"] == pytest.approx(VOCAB, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# fidelity


def test_fidelity_of_a_model_with_itself_is_exact(family):
    """Against an identical copy (and against itself): l2, relative l2 and every MoE layer's error are exactly 0,
    cosine is 1, tokens count every window token, and there is one entry per MoE layer."""
    model, copy = tiny_model(family), tiny_model(family)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), copy.state_dict().values(), strict=True))
    chunks = windows(random_stream(12 * 2 + 5), 12)
    for reference in (copy, model):
        result = fidelity(model, reference, ADAPTERS[family], chunks)
        hidden = result["last_hidden"]
        assert hidden["tokens"] == 29
        assert hidden["l2"] == 0.0 and hidden["relative_l2"] == 0.0
        assert hidden["cosine"] == pytest.approx(1.0, abs=1e-12)
        assert [e["layer"] for e in result["moe_layers"]] == moe_layer_ids(model)
        assert all(e["relative_error"] == 0.0 for e in result["moe_layers"])


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_fidelity_equals_hooked_recomputation_and_isolates_layers(family):
    """With the first MoE layer's experts perturbed: hidden-state metrics equal a float64 recomputation from
    output_hidden_states, that layer's error equals sum ||y - y_ref||^2 / sum ||y_ref||^2 on inputs hooked from the
    reference, and every later MoE layer's error is exactly 0 (it is fed the reference's inputs)."""
    reference, model = tiny_model(family), tiny_model(family)
    first, *later = moe_layer_ids(model)
    with torch.no_grad():
        model.model.layers[first].mlp.experts.down_proj.mul_(1.5)
    chunks = windows(random_stream(12 * 2 + 5, seed=5), 12)
    result = fidelity(model, reference, ADAPTERS[family], chunks)

    inputs: list[torch.Tensor] = []
    hook = reference.model.layers[first].mlp.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    l2, relative, cosine, tokens, err, norm = [], [], [], 0, 0.0, 0.0
    try:
        with torch.no_grad():
            for chunk in chunks:
                h_ref = reference(input_ids=chunk[None], output_hidden_states=True).hidden_states[-1][0].double()
                h = model(input_ids=chunk[None], output_hidden_states=True).hidden_states[-1][0].double()
                for a, b in zip(h.numpy(), h_ref.numpy(), strict=True):
                    l2.append(np.linalg.norm(a - b))
                    relative.append(np.linalg.norm(a - b) / np.linalg.norm(b))
                    cosine.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
                tokens += len(chunk)
                x = inputs.pop()
                y_ref = reference.model.layers[first].mlp(x).double()
                y = model.model.layers[first].mlp(x).double()
                err += float(((y - y_ref) ** 2).sum())
                norm += float((y_ref**2).sum())
    finally:
        hook.remove()
    hidden = result["last_hidden"]
    assert hidden["tokens"] == tokens
    assert hidden["l2"] == pytest.approx(np.mean(l2), rel=1e-9)
    assert hidden["relative_l2"] == pytest.approx(np.mean(relative), rel=1e-9)
    assert hidden["cosine"] == pytest.approx(np.mean(cosine), rel=1e-12)
    assert hidden["l2"] > 0
    errors = {e["layer"]: e["relative_error"] for e in result["moe_layers"]}
    assert errors[first] == pytest.approx(err / norm, rel=1e-9) and errors[first] > 0
    assert all(errors[layer] == 0.0 for layer in later)


# ----------------------------------------------------------------------------------------------------------------
# grouped routing with r = n


def test_grouped_with_all_experts_equals_the_original(family, tmp_path, monkeypatch):
    """A --router grouped output keeping all n experts (built by reduce with the r < n check lifted): the same
    perplexity as the reference, zero fidelity error, cosine 1, undefined cluster quality (all singletons), the same
    parameter counts, and bytes on disk = its safetensors files (router sidecar included)."""
    src = save_tiny(family, tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    n = getattr(AutoConfig.from_pretrained(src), EXPERT_FIELD[family])
    monkeypatch.setattr(pipeline, "target_experts", lambda n_, experts, ratio: experts)
    out = tmp_path / "grouped"
    moemerge.reduce(
        src, out, experts=n, router="grouped", calib=str(text), calib_samples=2, calib_seq_len=32, progress=False
    )
    meta = json.loads((out / "moemerge.json").read_text())
    assert meta["router"] == "grouped" and all(e["groups"] == [[j] for j in range(n)] for e in meta["layers"])

    result = evaluate(out, reference=src, data=str(text), max_tokens=120, seq_len=48, cost=False, progress=False)
    assert result["perplexity"] == result["reference_perplexity"]
    hidden = result["fidelity"]["last_hidden"]
    assert hidden["l2"] == 0.0 and hidden["relative_l2"] == 0.0
    assert hidden["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert [e["layer"] for e in result["fidelity"]["moe_layers"]] == [e["layer"] for e in meta["layers"]]
    assert all(e["relative_error"] == 0.0 for e in result["fidelity"]["moe_layers"])
    quality = result["cluster_quality"]
    assert all(value is None for value in quality["mean"].values())
    assert all(entry[key] is None for entry in quality["layers"] for key in quality["mean"])

    original = AutoModelForCausalLM.from_pretrained(src)
    assert parameter_counts(moemerge.load_model(out), ADAPTERS[family]) == parameter_counts(original, ADAPTERS[family])
    cost_module = importlib.import_module("moemerge.evaluation.cost")
    assert len(list(out.glob("*.safetensors"))) == 2
    assert cost_module.bytes_on_disk(out) == safetensors_bytes(out)


# ----------------------------------------------------------------------------------------------------------------
# cluster quality


def blobs(rng, sizes: list[int], d: int = 5, spread: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(scale=3.0, size=(len(sizes), d)) + 1.0
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return centres[labels] + rng.normal(scale=spread, size=(len(labels), d)), labels


@pytest.mark.parametrize("sizes", [[3, 3, 2], [4, 1, 3, 4], [2, 6], [5, 5, 5], [1, 1, 1, 2]])
def test_cluster_quality_equals_numpy_silhouette_and_brute_force_dunn(sizes):
    """Silhouette (Euclidean and cosine) from the a(i) / b(i) definition and a brute-force Dunn index, with labels
    shuffled and relabelled to arbitrary ids."""
    rng = np.random.default_rng(sum(sizes))
    x, labels = blobs(rng, sizes)
    order = rng.permutation(len(labels))
    x, labels = x[order], np.array([7, 2, 11, 5])[labels[order]]
    result = cluster_quality(x, labels)
    assert set(result) == {"silhouette_euclidean", "silhouette_cosine", "dunn"}
    assert result["silhouette_euclidean"] == pytest.approx(oracle_silhouette(x, labels, "euclidean"), abs=1e-12)
    assert result["silhouette_cosine"] == pytest.approx(oracle_silhouette(x, labels, "cosine"), abs=1e-12)
    assert result["dunn"] == pytest.approx(oracle_dunn(x, labels), rel=1e-12)


def test_cluster_quality_rewards_separation():
    """Tight far-apart blobs score near the maximum (silhouette ~1, Dunn >> 1); the same points randomly labelled do not."""
    rng = np.random.default_rng(0)
    x, labels = blobs(rng, [4, 4, 4], spread=0.01)
    good, bad = cluster_quality(x, labels), cluster_quality(x, rng.permutation(labels))
    assert good["silhouette_euclidean"] > 0.95 and good["dunn"] > 10
    assert bad["silhouette_euclidean"] < good["silhouette_euclidean"] and bad["dunn"] < 1


@pytest.mark.parametrize(
    "labels,dunn_defined",
    [
        ([0, 0, 0, 0, 0], False),
        ([0, 1, 2, 3, 4], False),
        ([4, 3, 2, 1, 0], False),
        ([0], False),
        ([0, 0, 1, 2, 3], True),
    ],
    ids=["one-cluster", "n-clusters", "all-singletons-reordered", "one-point", "n-1-clusters"],
)
def test_cluster_quality_undefined_cases_are_none(labels, dunn_defined):
    """Silhouette is None for one cluster or as many clusters as points (defined for n - 1, where it matches the
    oracle); Dunn is None without two clusters or without a cluster of two members."""
    rng = np.random.default_rng(1)
    labels = np.array(labels)
    x = rng.normal(size=(len(labels), 4))
    result = cluster_quality(x, labels)
    if len(set(labels.tolist())) in (1, len(labels)):
        assert result["silhouette_euclidean"] is None and result["silhouette_cosine"] is None
    else:
        assert result["silhouette_euclidean"] == pytest.approx(oracle_silhouette(x, labels, "euclidean"), abs=1e-12)
        assert result["silhouette_cosine"] == pytest.approx(oracle_silhouette(x, labels, "cosine"), abs=1e-12)
    if dunn_defined:
        assert result["dunn"] == pytest.approx(oracle_dunn(x, labels), rel=1e-12)
    else:
        assert result["dunn"] is None


def test_group_labels():
    """Hard groups give each expert its group's index; a missing expert (pruning) gives None; fuzzy memberships give
    each expert the group of its largest membership (computed here by a loop)."""
    groups = [[2, 5], [0], [1, 3, 4, 6, 7]]
    expected = [next(g for g, members in enumerate(groups) if j in members) for j in range(8)]
    assert group_labels(groups, 8).tolist() == expected
    assert group_labels([[2, 5], [0], [1, 3, 4, 6]], 8) is None
    rng = np.random.default_rng(2)
    u = rng.dirichlet(np.ones(3), size=8)  # [n, r] memberships, rows summing to 1
    fuzzy = [list(range(8))] * 3
    memberships = [u[:, g].tolist() for g in range(3)]
    best = [max(range(3), key=lambda g, j=j: u[j, g]) for j in range(8)]
    assert group_labels(fuzzy, 8, memberships).tolist() == best


# ----------------------------------------------------------------------------------------------------------------
# cost


COUNT_CASES = [
    ("mixtral", False, {}),
    ("mixtral", True, {}),
    ("qwen2_moe", False, {}),
    ("qwen3_moe", False, {}),
    ("qwen3_moe", True, {"num_hidden_layers": 4, "mlp_only_layers": [1]}),  # layer 1 dense
    ("qwen3_moe", False, {"num_hidden_layers": 4, "decoder_sparse_step": 2}),  # layers 1 and 3 MoE
    ("olmoe", False, {}),
    ("olmoe", True, {}),
    ("deepseek_v3", False, {}),
]


@pytest.mark.parametrize("family,tied,overrides", COUNT_CASES, ids=[f"{f}-{t}-{o}" for f, t, o in COUNT_CASES])
def test_parameter_counts_equal_closed_form(family, tied, overrides):
    """parameters, expert_parameters and active parameters per token (attention, router, shared experts, dense MLPs,
    top-k routed experts, output projection once even if tied) from config fields, for every family (Qwen3 also with
    dense layers); GFLOPs = 2 x active / 1e9."""
    config = tiny_config(family, **overrides)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    expected = closed_form_counts(config)
    counts = parameter_counts(model, ADAPTERS[family])
    assert {key: counts[key] for key in expected} == expected
    assert counts["gflops_per_token"] == pytest.approx(2 * expected["active_parameters"] / 1e9, rel=1e-15)


# ----------------------------------------------------------------------------------------------------------------
# end to end


def test_load_tokens_cuts_the_stream(tmp_path):
    """Text: the tokenizer's stream (documents + end-of-text) cut to max_tokens; input_ids rows: concatenated in file
    order and cut; ids beyond the vocabulary are refused."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    stream = tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(stream) > 50
    text, rows = tmp_path / "t.txt", tmp_path / "r.jsonl"
    text.write_text(TEXT, encoding="utf-8")
    got = load_tokens(str(text), tokenizer, 50)
    assert got.sequences[0].tolist() == stream[:50] and got.num_tokens == 50 and got.spec == str(text)
    rows.write_text("\n".join(json.dumps({"input_ids": r}) for r in ([1, 2, 3], [4, 5], [6, 7, 8, 9])))
    assert load_tokens(str(rows), None, 6, VOCAB).sequences[0].tolist() == [1, 2, 3, 4, 5, 6]
    rows.write_text(json.dumps({"input_ids": [1, VOCAB]}))
    with pytest.raises(moemerge.MoemergeError, match="vocabulary"):
        load_tokens(str(rows), None, 6, VOCAB)


def oracle_features(reference, layer: int, chunks: list[torch.Tensor]) -> np.ndarray:
    """[n, H] mean over all tokens of every expert's output E_j(x), from the expert weights in float64."""
    inputs: list[torch.Tensor] = []
    block = reference.model.layers[layer].mlp
    hook = block.register_forward_pre_hook(lambda m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            for chunk in chunks:
                reference(input_ids=chunk[None])
    finally:
        hook.remove()
    x = torch.cat(inputs).double()
    gate_up, down = block.experts.gate_up_proj.detach().double(), block.experts.down_proj.detach().double()
    inter = down.shape[-1]
    outs = [(F.silu(x @ gu[:inter].T) * (x @ gu[inter:].T)) @ d.T for gu, d in zip(gate_up, down, strict=True)]
    return torch.stack([o.mean(0) for o in outs]).numpy()


def test_evaluate_end_to_end_and_cli_json(work, capfd, monkeypatch):
    """evaluate(hc-smoe output, reference): data = the tokenizer's first 193 tokens (hash recomputed), fidelity per
    MoE layer over 192 window tokens, perplexity over 3 x 63 predicted tokens, reference perplexity = the original
    evaluated alone, cluster quality = the numpy oracle on recomputed mean expert outputs, cost in closed form with
    bytes on disk = the safetensors sizes and peak > baseline > 0 memory; `moemerge eval --out` writes the same JSON
    (timings and memory aside), and its summary prints the perplexity."""
    out, src, text = work["hc-smoe"], work["src"], work["text"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the fresh process of the tiny model, like this one: one thread
    result = evaluate(out, reference=src, data=str(text), max_tokens=MAX_TOKENS, seq_len=SEQ_LEN, progress=False)

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    stream = (tokenizer(TEXT * 2, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:MAX_TOKENS]
    digest = hashlib.sha256(len(stream).to_bytes(8, "little") + np.array(stream, dtype="<i8").tobytes()).hexdigest()
    assert result["data"] == {"spec": str(text), "tokens": MAX_TOKENS, "seq_len": SEQ_LEN, "sha256": digest}
    assert result["model"] == str(out) and result["reference"] == str(src)
    assert result["perplexity"]["tokens"] == result["reference_perplexity"]["tokens"] == 3 * (SEQ_LEN - 1)
    assert result["fidelity"]["last_hidden"]["tokens"] == 3 * SEQ_LEN
    alone = evaluate(src, data=str(text), max_tokens=MAX_TOKENS, seq_len=SEQ_LEN, cost=False, progress=False)
    assert result["reference_perplexity"] == alone["perplexity"]
    assert "fidelity" not in alone and "cluster_quality" not in alone and "reference_perplexity" not in alone

    meta = json.loads((out / "moemerge.json").read_text())
    layers = [e["layer"] for e in meta["layers"]]
    assert [e["layer"] for e in result["fidelity"]["moe_layers"]] == layers == [0, 1]
    assert all(e["relative_error"] > 0 for e in result["fidelity"]["moe_layers"])  # 8 -> 4 merged experts

    quality = result["cluster_quality"]
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    chunks = windows(torch.tensor(stream), SEQ_LEN)
    assert [e["layer"] for e in quality["layers"]] == layers
    for entry, layer_meta in zip(quality["layers"], meta["layers"], strict=True):
        labels = np.array([next(g for g, m in enumerate(layer_meta["groups"]) if j in m) for j in range(8)])
        x = oracle_features(reference, entry["layer"], chunks)
        assert entry["silhouette_euclidean"] == pytest.approx(oracle_silhouette(x, labels, "euclidean"), abs=1e-5)
        assert entry["silhouette_cosine"] == pytest.approx(oracle_silhouette(x, labels, "cosine"), abs=1e-5)
        assert entry["dunn"] == pytest.approx(oracle_dunn(x, labels), rel=1e-5)
    for key, value in quality["mean"].items():
        assert value == pytest.approx(np.mean([e[key] for e in quality["layers"]]), rel=1e-12)

    cost = result["cost"]
    expected = closed_form_counts(AutoConfig.from_pretrained(out))
    assert {key: cost[key] for key in expected} == expected
    assert cost["bytes_on_disk"] == safetensors_bytes(out) > 0
    assert cost["peak_memory_bytes"] > cost["baseline_memory_bytes"] > 0
    assert cost["prefill_latency_s"] > 0 and cost["decode_tokens_per_s"] > 0

    # the CLI, with the (already checked, slow) fresh-process measurement replaced by fixed numbers
    stub = dict.fromkeys(TIMING_FIELDS, 1)
    monkeypatch.setattr(EVALUATE, "measure_in_fresh_process", lambda *args: dict(stub))
    file = work["root"] / "results" / "hc.json"
    argv = ["eval", out, "--reference", src, "--data", text, "--max-tokens", MAX_TOKENS, "--seq-len", SEQ_LEN]
    code, stdout, _ = run([*argv, "--out", file], capfd)
    assert code == 0
    written = json.loads(file.read_text(encoding="utf-8"))
    assert strip_timings(written) == strip_timings(result)
    assert {key: written["cost"][key] for key in TIMING_FIELDS} == stub
    assert f"perplexity {result['perplexity']['perplexity']:.3f}" in stdout.splitlines()[0]


def test_evaluate_pruned_output_has_no_cluster_quality(work):
    """f-prune output: perplexity, reference perplexity and one fidelity entry per MoE layer, but no cluster quality
    (some experts are in no group) and no cost with cost=False; --seq-len above max_position_embeddings (256) gives
    256-token windows."""
    result = evaluate(
        work["f-prune"], reference=work["src"], data=str(work["text"]), max_tokens=300, seq_len=1000, cost=False,
        progress=False,
    )  # fmt: skip
    assert "cluster_quality" not in result and "cost" not in result
    assert [e["layer"] for e in result["fidelity"]["moe_layers"]] == [0, 1]
    assert result["data"]["seq_len"] == 256 and result["data"]["tokens"] == 300
    assert result["perplexity"]["tokens"] == result["reference_perplexity"]["tokens"] == 255 + 43
    assert result["fidelity"]["last_hidden"]["tokens"] == 300


# ----------------------------------------------------------------------------------------------------------------
# CLI errors


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing-model", "nope"),
        ("other-family", "qwen2_moe"),
        ("max-tokens-1", "--max-tokens"),
        ("seq-len-1", "--seq-len"),
        ("limit-0", "--limit"),
        ("missing-data", "absent.txt"),
    ],
)
def test_cli_eval_errors(work, tmp_path, capfd, case, expect):
    """Bad eval input exits 2 with one `error:` line naming the problem, and writes no --out file (nor a temp one)."""
    model = work["src"]
    extra = {
        "missing-model": [],
        "other-family": ["--reference", work["qwen"]],
        "max-tokens-1": ["--max-tokens", "1"],
        "seq-len-1": ["--seq-len", "1"],
        "limit-0": ["--limit", "0"],
        "missing-data": ["--data", tmp_path / "absent.txt"],
    }[case]
    if case == "missing-model":
        model = tmp_path / "nope"
    out = tmp_path / "res.json"
    code, _, err = run([*eval_args(model), *extra, "--out", out], capfd)
    assert expect in assert_clean_error(code, err, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".res.json")]


def test_cli_eval_out_is_a_directory(work, tmp_path, capfd):
    """--out naming an existing directory exits 2 with one `error:` line and leaves the directory as it was."""
    out = tmp_path / "results"
    out.mkdir()
    code, _, err = run([*eval_args(work["src"], "--data", work["text"]), "--out", out], capfd)
    assert out.is_dir() and not list(out.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results")]
    assert "Traceback" not in err and code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")


def test_fresh_process_peak_memory_is_its_own(tmp_path):
    """The fresh process's peak memory is its own: with 1 GiB touched in this (parent) process, the child that loads
    a tiny model reports far less (getrusage's ru_maxrss would report the parent's 1 GiB and more), and at least the
    resident size it started from."""
    from moemerge.evaluation.cost import measure_in_fresh_process

    src = save_tiny("mixtral", tmp_path / "src")
    ballast = torch.ones(2**28)  # 1 GiB, every page written
    measured = measure_in_fresh_process(src)
    assert measured["baseline_memory_bytes"] <= measured["peak_memory_bytes"] < ballast.numel() * 4 // 2
