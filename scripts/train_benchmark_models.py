"""Train the three benchmark MoEs of ``benchmarks/models/`` on the text of ``scripts/benchmark_text.py``.

Run: ``python scripts/train_benchmark_models.py MODEL [--cache DIR] [--out DIR] [--seed S]`` with MODEL one of
``mixtral-upcycled``, ``qwen2moe-upcycled``, ``olmoe-scratch``. Deterministic for a given seed and thread
count (torch uses 2 threads here): fixed step counts, seeded sampling, no data-loader workers.

All three share one byte-level BPE tokenizer (8192 tokens) trained on the train splits of all five domains,
6 decoder layers, hidden 256, tied embeddings, sequences of 256 tokens, batches of 16. A training sequence
comes from one domain, drawn with probability proportional to the square root of the domain's train size (so
the 11 MB of Python documentation does not drown the 1.4 MB of LAMBADA), at a random offset.

- ``mixtral-upcycled``: Mixtral-class, 8 experts of width 224, top-2. A dense Mistral-architecture model (MLP
  width 224) is trained first; each MoE layer's experts are copies of its dense MLP plus Gaussian noise of
  1 % of each matrix's standard deviation, the router starts random, and training goes on as an MoE with
  a load-balancing loss on every MoE layer (``balance_loss``), as Mixtral was made.
- ``qwen2moe-upcycled``: Qwen2-MoE-class (Qwen1.5-MoE), 32 routed experts of width 48, top-4, plus a shared
  expert of width 192. A dense Qwen2 model with MLP width 192 is trained first; for each of 8 replica sets its
  MLP neurons are shuffled and cut into 4 segments of 48, giving 32 experts (plus the same 1 % noise), and
  the shared expert is the whole dense MLP, as Qwen1.5-MoE was upcycled from Qwen-1.8B.
- ``olmoe-scratch``: OLMoE-class, 16 experts of width 112, top-2, trained from random weights (no common
  origin for the experts).

Each output folder gets the weights (bf16), the tokenizer, ``card.json`` (data, steps, tokens seen,
per-domain validation perplexity of the saved bf16 weights, per-layer expert usage) and a ``README.md``
model card made from it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch
from benchmark_text import DOMAINS  # scripts/ is on sys.path
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from moemerge.evaluation.perplexity import perplexity, windows

REPO = Path(__file__).resolve().parents[1]
VOCAB = 8192
SEQ_LEN = 256
BATCH = 16
NOISE = 0.01
BALANCE = 0.01  # per MoE layer, as in the Switch Transformer
COMMON = dict(
    hidden_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
RECIPES = {
    "mixtral-upcycled": "Upcycled as Mixtral was: a dense model trained first, its MLP copied into 8 experts "
    "(plus 1 % noise), then trained on as an MoE (top-2) with the load-balancing loss.",
    "qwen2moe-upcycled": "Upcycled as Qwen1.5-MoE was: a dense model trained first, its MLP neurons shuffled and "
    "cut into segments that are replicated into 32 fine-grained experts (top-4), the whole dense MLP kept as the "
    "shared expert, then trained on as an MoE with the load-balancing loss.",
    "olmoe-scratch": "Trained from random weights, as OLMoE was: 16 experts (top-2) with no common origin.",
}
# (dense steps, MoE steps): each model trains in 20-30 minutes on 2 CPU cores (the limit is 60).
STEPS = {"mixtral-upcycled": (400, 650), "qwen2moe-upcycled": (300, 500), "olmoe-scratch": (0, 700)}
CHECK_WINDOWS = 12  # validation windows per domain that the test suite re-scores


def read_split(cache: Path, domain: str, split: str) -> list[str]:
    lines = (cache / domain / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def build_tokenizer(cache: Path) -> PreTrainedTokenizerFast:
    """The shared BPE tokenizer, trained once on every domain's train split and kept in the cache."""
    path = cache / "tokenizer.json"
    if not path.exists():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator((doc for d in DOMAINS for doc in read_split(cache, d, "train")), trainer=trainer)
        tok.save(str(path))
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """[L] ids of the documents, each followed by the end-of-text token."""
    ids: list[int] = []
    for row in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids += [*row, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


class Sampler:
    """Batches [BATCH, SEQ_LEN]: each row from a domain drawn with p ~ sqrt(train tokens), at a random offset."""

    def __init__(self, streams: dict[str, torch.Tensor], seed: int):
        self.streams = [streams[d] for d in DOMAINS]
        sizes = torch.tensor([len(s) for s in self.streams], dtype=torch.float64)
        self.weights = sizes.sqrt() / sizes.sqrt().sum()
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self) -> torch.Tensor:
        domains = torch.multinomial(self.weights, BATCH, replacement=True, generator=self.gen)
        rows = []
        for d in domains.tolist():
            stream = self.streams[d]
            start = torch.randint(0, len(stream) - SEQ_LEN, (1,), generator=self.gen).item()
            rows.append(stream[start : start + SEQ_LEN])
        return torch.stack(rows)


def train(model, sampler: Sampler, steps: int, lr: float, label: str) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    start = time.time()
    for step in range(steps):
        batch = sampler.batch()
        out = model(input_ids=batch, labels=batch)
        loss = out.loss
        if getattr(out, "router_logits", None):
            loss = loss + BALANCE * sum(balance_loss(lg, model.config.num_experts_per_tok) for lg in out.router_logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{label} step {step} loss {out.loss.item():.3f} total {loss.item():.3f} {time.time() - start:.0f}s")
    model.eval()


def balance_loss(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Switch Transformer's load-balancing loss of one MoE layer, router logits [tokens, n]: n * sum_i f_i P_i with
    f_i the share of top-k slots and P_i the mean router probability of expert i; 1 when balanced.

    transformers' own ``aux_loss`` concatenates all layers first, so it is satisfied by layers that are each
    unbalanced in different directions; this one is applied to every layer.
    """
    probs = logits.float().softmax(dim=-1)
    slots = torch.nn.functional.one_hot(probs.topk(k, dim=-1).indices, probs.shape[-1]).sum(dim=1).float()
    return probs.shape[-1] * (slots.mean(dim=0) / k * probs.mean(dim=0)).sum()


def noisy(weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return weight + NOISE * weight.std() * torch.randn(weight.shape, generator=gen)


def copy_shared(dense, moe) -> None:
    """Copy every dense tensor whose name and shape exist in the MoE (embeddings, attention, norms)."""
    target = moe.state_dict()
    shared = {k: v for k, v in dense.state_dict().items() if k in target and target[k].shape == v.shape}
    moe.load_state_dict(shared, strict=False)


@torch.no_grad()
def upcycle_mixtral(dense, moe, gen: torch.Generator) -> None:
    copy_shared(dense, moe)
    for dense_layer, layer in zip(dense.model.layers, moe.model.layers, strict=True):
        mlp, experts = dense_layer.mlp, layer.mlp.experts
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # [2I, H]
        for e in range(experts.gate_up_proj.shape[0]):
            experts.gate_up_proj[e] = noisy(gate_up, gen)
            experts.down_proj[e] = noisy(mlp.down_proj.weight, gen)


@torch.no_grad()
def upcycle_qwen2moe(dense, moe, gen: torch.Generator) -> None:
    copy_shared(dense, moe)
    for dense_layer, layer in zip(dense.model.layers, moe.model.layers, strict=True):
        mlp, experts = dense_layer.mlp, layer.mlp.experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp.shared_expert, name).weight.copy_(getattr(mlp, name).weight)
        n, width = experts.gate_up_proj.shape[0], experts.down_proj.shape[2]
        segments = mlp.gate_proj.weight.shape[0] // width
        for replica in range(n // segments):
            order = torch.randperm(mlp.gate_proj.weight.shape[0], generator=gen)
            for s in range(segments):
                e, rows = replica * segments + s, order[s * width : (s + 1) * width]
                gate_up = torch.cat([mlp.gate_proj.weight[rows], mlp.up_proj.weight[rows]])
                experts.gate_up_proj[e] = noisy(gate_up, gen)
                experts.down_proj[e] = noisy(mlp.down_proj.weight[:, rows], gen)


def build(name: str, vocab: dict):
    """(dense model or None, MoE model, upcycling function or None) for one benchmark model."""
    moe_common = dict(COMMON, **vocab, router_aux_loss_coef=0.0, output_router_logits=True)  # see balance_loss
    if name == "mixtral-upcycled":
        dense = MistralForCausalLM(MistralConfig(**COMMON, **vocab, intermediate_size=224))
        moe = MixtralForCausalLM(
            MixtralConfig(**moe_common, intermediate_size=224, num_local_experts=8, num_experts_per_tok=2)
        )
        return dense, moe, upcycle_mixtral
    if name == "qwen2moe-upcycled":
        dense = Qwen2ForCausalLM(Qwen2Config(**COMMON, **vocab, intermediate_size=192))
        config = Qwen2MoeConfig(
            **moe_common,
            intermediate_size=192,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=192,
            num_experts=32,
            num_experts_per_tok=4,
            norm_topk_prob=False,
        )
        return dense, Qwen2MoeForCausalLM(config), upcycle_qwen2moe
    if name == "olmoe-scratch":
        config = OlmoeConfig(**moe_common, intermediate_size=112, num_experts=16, num_experts_per_tok=2)
        return None, OlmoeForCausalLM(config), None
    raise SystemExit(f"unknown model {name!r}; choose one of {', '.join(STEPS)}")


def card_figures(saved, streams: dict[str, torch.Tensor]) -> dict:
    """The card's measurements of the saved model on the validation ``streams`` ([L] ids per domain): perplexity
    per domain and expert usage on all of it, and the same two on the first ``CHECK_WINDOWS`` windows of each
    domain, which the test suite recomputes independently (the whole split would cost it a minute per model)."""

    def measured(part: dict[str, torch.Tensor]) -> dict:
        return {
            "validation_perplexity": {
                d: round(perplexity(saved, windows(s, SEQ_LEN))["perplexity"], 3) for d, s in part.items()
            },
            "expert_usage": expert_usage(saved, part),
        }

    first = {d: s[: CHECK_WINDOWS * SEQ_LEN] for d, s in streams.items()}
    return measured(streams) | {"check": {"windows_per_domain": CHECK_WINDOWS, **measured(first)}}


@torch.inference_mode()
def expert_usage(model, streams: dict[str, torch.Tensor]) -> list[list[float]]:
    """[layers][experts] share of the top-k routing slots each expert got on all validation tokens."""
    counts = None
    k = model.config.num_experts_per_tok
    for stream in streams.values():
        for chunk in windows(stream, SEQ_LEN):
            logits = model(input_ids=chunk[None], output_router_logits=True).router_logits
            layer_counts = torch.stack(
                [torch.bincount(lg.topk(k, dim=-1).indices.flatten(), minlength=lg.shape[-1]) for lg in logits]
            )
            counts = layer_counts if counts is None else counts + layer_counts
    shares = counts.double() / counts.sum(dim=1, keepdim=True)
    return [[round(v, 4) for v in row] for row in shares.tolist()]


def model_card(name: str, card: dict) -> str:
    ppl, check = card["validation_perplexity"], card["check"]["validation_perplexity"]
    usage = "\n".join(
        f"| {i} | {' '.join(f'{100 * v:.1f}' for v in row)} | {100 * max(row):.1f} |"
        for i, row in enumerate(card["expert_usage"])
    )
    return f"""---
license: cc0-1.0
library_name: transformers
---
# {name}

A small {card["architecture"]} trained by `scripts/train_benchmark_models.py {name}` (seed {card["seed"]},
{card["training_minutes"]:.0f} min on 2 CPU cores) for moemerge's quality benchmark. {RECIPES[name]}

- Parameters: {card["parameters"]:,} ({card["expert_parameters"]:,} in routed experts), stored in bf16.
- Data: the train splits of `scripts/benchmark_text.py` (Austen, KJV Bible, LAMBADA passages, BoolQ's
  Wikipedia passages, Python 3.11 documentation), sequences of {SEQ_LEN} tokens, {BATCH} per step.
- Steps: {card["dense_steps"]} dense + {card["moe_steps"]} MoE; tokens seen: {card["tokens_seen"]:,}.

## Validation perplexity (bf16 weights, windows of {SEQ_LEN} tokens)

| domain | {" | ".join(ppl)} |
|---|{"---|" * len(ppl)}
| perplexity | {" | ".join(f"{v:.2f}" for v in ppl.values())} |
| first {card["check"]["windows_per_domain"]} windows (re-scored by the tests) | {" | ".join(f"{v:.2f}" for v in check.values())} |

## Expert usage on the validation text (% of top-{card["top_k"]} routing slots, per layer)

| layer | experts 0..{len(card["expert_usage"][0]) - 1} | max |
|---|---|---|
{usage}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=sorted(STEPS))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "moemerge" / "benchmark_text")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/models/MODEL")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--card-only",
        action="store_true",
        help="re-measure the card of the model already in --out on the committed validation splits, without "
        "training (its training facts are kept)",
    )
    args = ap.parse_args()
    out = args.out or REPO / "benchmarks" / "models" / args.model
    if args.card_only:
        remeasure_card(args.model, out)
        return
    torch.manual_seed(args.seed)
    start = time.time()

    tokenizer = build_tokenizer(args.cache)
    streams = {d: token_stream(tokenizer, read_split(args.cache, d, "train")) for d in DOMAINS}
    print({d: len(s) for d, s in streams.items()}, flush=True)
    sampler = Sampler(streams, args.seed)
    vocab = dict(vocab_size=VOCAB, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    dense, moe, upcycle = build(args.model, vocab)
    dense_steps, moe_steps = STEPS[args.model]
    if dense is not None:
        train(dense, sampler, dense_steps, 3e-3, "dense")
        upcycle(dense, moe, torch.Generator().manual_seed(args.seed + 1))
    train(moe, sampler, moe_steps, 2e-3 if dense is not None else 3e-3, "moe")
    minutes = (time.time() - start) / 60

    moe.config.output_router_logits = False
    moe.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    validation = {d: token_stream(tokenizer, read_split(args.cache, d, "validation")) for d in DOMAINS}
    experts = sum(p.numel() for n, p in saved.named_parameters() if ".experts." in n)
    card = {
        "architecture": type(saved).__name__,
        "seed": args.seed,
        "training_minutes": round(minutes, 1),
        "parameters": sum(p.numel() for p in saved.parameters()),
        "expert_parameters": experts,
        "dense_steps": dense_steps,
        "moe_steps": moe_steps,
        "tokens_seen": (dense_steps + moe_steps) * BATCH * SEQ_LEN,
        "train_tokens": {d: len(s) for d, s in streams.items()},
        "seq_len": SEQ_LEN,
        "top_k": saved.config.num_experts_per_tok,
        **card_figures(saved, validation),
    }
    write_card(args.model, out, card)
    print(json.dumps(card["validation_perplexity"]), f"{minutes:.1f} min", flush=True)


def write_card(name: str, out: Path, card: dict) -> None:
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(model_card(name, card))


def remeasure_card(name: str, out: Path) -> None:
    """Rewrite ``out``'s card with :func:`card_figures` measured on the committed validation splits
    (``benchmarks/data/validation/``, the documents ``scripts/benchmark_text.py`` wrote to the cache)."""
    card = json.loads((out / "card.json").read_text())
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    validation = {}
    for d in DOMAINS:
        with gzip.open(REPO / "benchmarks" / "data" / "validation" / f"{d}.jsonl.gz", "rt", encoding="utf-8") as f:
            validation[d] = token_stream(tokenizer, [json.loads(line)["text"] for line in f])
    figures = card_figures(saved, validation)
    write_card(name, out, card | figures)
    print("was", json.dumps(card["validation_perplexity"]), flush=True)
    print("now", json.dumps(figures["validation_perplexity"]), flush=True)


if __name__ == "__main__":
    main()
