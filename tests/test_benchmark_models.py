"""The committed benchmark models (benchmarks/models/) and the quality benchmark's smoke run.

Each model is loaded with vanilla transformers, and on the first windows of the committed validation splits
(benchmarks/data/validation/; the card's "check" says how many per domain and what the training script measured
there) an independent perplexity loop must give at most the card's figure (+2 %) and far less than a unigram
model fitted to that same text; expert usage, recounted from the router logits, must match the card and leave
no expert with most of a layer's tokens.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import runpy
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "benchmarks" / "models"
DATA = REPO / "benchmarks" / "data"
DOMAINS = ("austen", "bible", "lambada", "wiki", "pydocs")
EXPECTED = {  # name: (transformers class, routed experts, top-k, shared expert attribute, dense first layers)
    "mixtral-upcycled": ("MixtralForCausalLM", 8, 2, None, 0),
    "qwen2moe-upcycled": ("Qwen2MoeForCausalLM", 32, 4, "shared_expert", 0),
    "olmoe-scratch": ("OlmoeForCausalLM", 16, 2, None, 0),
    "deepseek-scratch": ("DeepseekV3ForCausalLM", 32, 4, "shared_experts", 1),
    "qwen3moe-scratch": ("Qwen3MoeForCausalLM", 64, 8, None, 0),
}
MAX_BYTES = 25 * 1024 * 1024


def documents(split: str, domain: str) -> list[str]:
    with gzip.open(DATA / split / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def token_ids(tokenizer, docs: list[str]) -> list[int]:
    ids = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def test_evaluation_splits_and_calibration_sets_share_no_document():
    """Splits are by document: no validation document is a test one, and no calibration document (drawn from the
    train splits) is either."""
    held_out = {}
    for split in ("validation", "test"):
        held_out[split] = {doc for d in DOMAINS for doc in documents(split, d)}
        assert all(documents(split, d) for d in DOMAINS)
    assert not held_out["validation"] & held_out["test"]
    for name in ("general", "prose", "code"):
        with gzip.open(DATA / f"calib_{name}.jsonl.gz", "rt", encoding="utf-8") as f:
            calib = {json.loads(line)["text"] for line in f}
        assert calib and not calib & (held_out["validation"] | held_out["test"])


def summed_nll(logits: torch.Tensor, window: torch.Tensor) -> float:
    """Sum of -log p(next token) over a window [L] from its logits [L, V], by a plain float64 log-softmax gather."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return -logp.gather(1, window[1:, None]).sum().item()


def windows(stream: list[int], seq_len: int, batch: int) -> list[torch.Tensor]:
    """The stream's non-overlapping windows of ``seq_len`` tokens (the last may be shorter; one of a single token
    predicts nothing and is left out), stacked ``batch`` at a time into [B, L] tensors of equal-length windows."""
    cut = [stream[s : s + seq_len] for s in range(0, len(stream), seq_len)]
    full, last = [w for w in cut if len(w) == seq_len], [w for w in cut if 1 < len(w) < seq_len]
    return [torch.tensor(full[i : i + batch]) for i in range(0, len(full), batch)] + [torch.tensor(last)] * bool(last)


def selection_biases(path: Path) -> list[torch.Tensor]:
    """The selection biases stored in the checkpoint (DeepSeek-V3's ``e_score_correction_bias``, read from the
    safetensors file rather than the loaded model), in layer order; empty for a softmax family."""
    with safe_open(path / "model.safetensors", framework="pt") as f:
        found = {int(k.split(".")[2]): f.get_tensor(k) for k in f.keys() if k.endswith("e_score_correction_bias")}  # noqa: SIM118
    return [found[i] for i in sorted(found)]


def selected(logits: torch.Tensor, bias: torch.Tensor | None, k: int) -> torch.Tensor:
    """[T, k] experts a router picks from its logits [T, n]: the top-k logits (softmax is monotone), or for a
    selection bias, DeepSeek-V3's rule with one group: the top-k of sigmoid(logits) + bias."""
    return logits.topk(k, dim=-1).indices if bias is None else (logits.float().sigmoid() + bias).topk(k).indices


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def trained(request):
    """(name, card, model in float32, {domain: (validation token ids, NLL sum, predicted tokens)}, [layers, experts]
    top-k counts, tokens routed): one pass over the card's check windows (the first N windows of the card's length
    of each domain), 16 windows a batch."""
    name = request.param
    path = MODELS / name
    card = json.loads((path / "card.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    seq_len, k = card["seq_len"], model.config.num_experts_per_tok
    check_tokens = card["check"]["windows_per_domain"] * seq_len
    scores, counts, tokens = {}, 0, 0
    biases = selection_biases(path) or [None] * sum(hasattr(layer.mlp, "experts") for layer in model.model.layers)
    with torch.inference_mode():
        for domain in DOMAINS:
            stream, nll, predicted = token_ids(tokenizer, documents("validation", domain)), 0.0, 0
            assert len(stream) > check_tokens, (name, domain)
            stream = stream[:check_tokens]
            for batch in windows(stream, seq_len, 16):
                out = model(input_ids=batch, output_router_logits=True)
                nll += sum(summed_nll(logits, window) for logits, window in zip(out.logits, batch, strict=True))
                predicted += batch.numel() - len(batch)
                chosen = [selected(lg, b, k).flatten() for lg, b in zip(out.router_logits, biases, strict=True)]
                counts = counts + torch.stack(
                    [torch.bincount(c, minlength=out.router_logits[0].shape[-1]) for c in chosen]
                )
                tokens += batch.numel()
            scores[domain] = (stream, nll, predicted)
    return name, card, model, scores, counts, tokens


def test_model_is_the_promised_architecture_in_bf16_under_25_mb(trained):
    name, _, model, *_ = trained
    cls, experts, top_k, shared, dense = EXPECTED[name]
    assert type(model).__name__ == cls
    config = model.config
    fields = [f for f in ("num_local_experts", "num_experts", "n_routed_experts") if hasattr(config, f)]
    assert fields and {getattr(config, f) for f in fields} == {experts}
    assert config.num_experts_per_tok == top_k
    layers = [layer.mlp for layer in model.model.layers]
    assert not any(hasattr(mlp, "experts") for mlp in layers[:dense]), f"{name}: first {dense} layers are dense"
    for mlp in layers[dense:]:
        assert mlp.experts.gate_up_proj.shape[0] == experts
        assert hasattr(mlp, shared or "no shared expert") == bool(shared)
    files = list((MODELS / name).glob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) <= MAX_BYTES
    for file in files:
        with safe_open(file, framework="pt") as f:
            dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            assert dtypes == {"BF16"}, (file, dtypes)


def test_eager_attention_gives_the_default_attention_logits(trained):
    """The config describes the weights: transformers' eager attention (which reads every head count literally,
    as llama.cpp's converter does) runs and agrees with the default kernel. deepseek-scratch once said 2 key/value
    heads for its 4 MLA heads, which only SDPA tolerated."""
    name, _, model, scores, *_ = trained
    ids = torch.tensor([scores["wiki"][0][:64]])
    eager = AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32, attn_implementation="eager")
    with torch.inference_mode():
        torch.testing.assert_close(eager.eval()(ids).logits, model(ids).logits, rtol=0, atol=1e-4)


def test_validation_perplexity_at_most_the_card_and_far_below_unigram(trained):
    """Per domain: exp(mean NLL) from a plain log-softmax gather, against the card and a unigram model."""
    name, card, model, scores, *_ = trained
    seq_len = card["seq_len"]
    for domain, (stream, nll, predicted) in scores.items():
        ppl = math.exp(nll / predicted)
        assert ppl <= card["check"]["validation_perplexity"][domain] * 1.02, (name, domain, ppl)
        # unigram with add-one smoothing, fitted to the very tokens it is scored on (so it is optimistic)
        targets = [t for s in range(0, len(stream), seq_len) for t in stream[s + 1 : s + seq_len]]
        assert len(targets) == predicted
        freq, vocab = Counter(targets), model.config.vocab_size
        unigram = math.exp(-sum(math.log((freq[t] + 1) / (len(targets) + vocab)) for t in targets) / len(targets))
        assert ppl < unigram / 3, (name, domain, ppl, unigram)


def test_expert_usage_matches_the_card_and_no_expert_takes_most_tokens(trained):
    name, card, _, _, counts, tokens = trained
    shares = counts.double() / counts.sum(dim=1, keepdim=True)
    assert torch.allclose(shares, torch.tensor(card["check"]["expert_usage"], dtype=torch.float64), atol=0.002)
    assert (counts.double() / tokens).max() < 0.5, f"{name}: an expert takes most tokens of a layer"
    assert (counts > 0).all(), f"{name}: an expert is never used"


def test_deepseek_selection_bias_was_trained_by_the_balancing_rule():
    """deepseek-scratch's selection biases (one per MoE layer, read from the checkpoint) are far from their zero
    start: the aux-loss-free balancing moved them (largest |bias| above 0.01, spread above 0.001 in every layer)."""
    config = json.loads((MODELS / "deepseek-scratch" / "config.json").read_text())
    biases = selection_biases(MODELS / "deepseek-scratch")
    assert len(biases) == config["num_hidden_layers"] - config["first_k_dense_replace"]
    for layer, bias in enumerate(biases):
        assert bias.abs().max() > 0.01 and bias.float().std() > 0.001, (layer, bias)


def test_quality_benchmark_smoke_run(tmp_path):
    """The smoke variant writes its table, CSV and plot; its original row's perplexity on the first 512 test tokens
    of each domain equals an independent computation, and its fidelity to itself is perfect. A results CSV already
    there keeps another model's rows and loses the measured model's earlier ones."""
    out = tmp_path / "quality"
    out.mkdir()
    name = sorted(p.parent.name for p in MODELS.glob("*/card.json"))[0]  # the smoke run's model
    earlier = {"model": "", "calibration": "", "router": "", "method": "original", "removed": 0.0, "experts": 4}
    earlier |= {f"ppl_{d}": 7.0 for d in DOMAINS} | {"ppl_mean": 7.0, "hidden_l2": 0.0, "hidden_cosine": 1.0}
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*earlier, "seconds"])
        writer.writeheader()
        writer.writerows(
            [earlier | {"model": "other-model", "seconds": 60.0}, earlier | {"model": name, "seconds": 0.0}]
        )
    benchmark = runpy.run_path(str(REPO / "benchmarks" / "quality" / "run.py"), run_name="quality_benchmark")
    with pytest.raises(SystemExit):
        benchmark["main"](["--smoke"])  # would replace the committed results
    began = time.perf_counter()
    benchmark["main"](["--smoke", "--out", str(out)])
    wall = time.perf_counter() - began
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows[:1]] == ["other-model"] and float(rows[0]["ppl_mean"]) == 7.0
    assert (
        "## other-model (4 experts; original mean test ppl 7.00; benchmark 1 min)" in (out / "results.md").read_text()
    )
    rows = rows[1:]
    assert [(r["router"], r["method"]) for r in rows] == [
        ("", "original"),
        ("reduce", "hc-smoe"),
        ("reduce", "f-prune"),
        ("grouped", "hc-smoe"),
    ]
    original = rows[0]
    assert {r["removed"] for r in rows[1:]} == {"0.5"}
    assert {r["experts"] for r in rows[1:]} == {str(int(original["experts"]) // 2)}
    assert float(original["hidden_cosine"]) == pytest.approx(1.0, abs=1e-6)
    assert float(original["hidden_l2"]) == pytest.approx(0.0, abs=1e-6)
    assert original["model"] == name
    model = AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODELS / name)
    for domain in DOMAINS:
        stream = token_ids(tokenizer, documents("test", domain))[:512]
        nll, count = 0.0, 0
        with torch.inference_mode():
            for start in range(0, 512, 256):
                window = torch.tensor(stream[start : start + 256])
                nll += summed_nll(model(input_ids=window[None]).logits[0], window)
                count += len(window) - 1
        assert float(original[f"ppl_{domain}"]) == pytest.approx(math.exp(nll / count), rel=1e-4)
    for row in rows[1:]:
        assert float(row["ppl_mean"]) > 0 and 0 < float(row["hidden_cosine"]) <= 1
    # the original's row times the model's whole benchmark: most of the run, all but loading and writing files
    assert 0.5 * wall < float(original["seconds"]) < wall
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| reduce | hc-smoe |" in (out / "results.md").read_text()


def test_quality_benchmark_measure_equals_perplexity_and_fidelity():
    """The benchmark's one-forward measure gives what the package's perplexity and fidelity compute separately,
    for a model that differs from the reference (one MoE layer's experts perturbed)."""
    from moemerge.checkpoint import inspect_source, load_source
    from moemerge.evaluation.fidelity import fidelity
    from moemerge.evaluation.perplexity import perplexity

    benchmark = runpy.run_path(str(REPO / "benchmarks" / "quality" / "run.py"), run_name="quality_benchmark")
    source = inspect_source(MODELS / "olmoe-scratch")
    original, tokenizer = load_source(source, dtype="float32")
    changed, _ = load_source(source, dtype="float32")
    view = source.family.moe_layers(changed)[1]
    down = view.expert_weights()[2]  # a view: changed in place
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        down.mul_(1 + 0.5 * torch.randn(down.shape, generator=generator))
    chunks = benchmark["test_windows"](tokenizer, original.get_input_embeddings().num_embeddings, 512)
    row = benchmark["measure"](changed, benchmark["last_hidden"](original, chunks), chunks)
    for domain, chunk in chunks.items():
        assert row[f"ppl_{domain}"] == pytest.approx(perplexity(changed, chunk)["perplexity"], rel=1e-6)
    expected = fidelity(changed, original, source.family, [w for c in chunks.values() for w in c])["last_hidden"]
    assert 0.5 < expected["cosine"] < 0.9999
    assert row["hidden_cosine"] == pytest.approx(expected["cosine"], rel=1e-6)
    assert row["hidden_l2"] == pytest.approx(expected["l2"], rel=1e-6)
