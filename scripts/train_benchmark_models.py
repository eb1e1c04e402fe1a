"""Train the five benchmark MoEs of ``benchmarks/models/`` on the text of ``scripts/benchmark_text.py``.

Run: ``python scripts/train_benchmark_models.py MODEL [--cache DIR] [--out DIR] [--seed S] [--threads N]
[--checkpoints DIR]`` with MODEL one of ``mixtral-upcycled``, ``qwen2moe-upcycled``, ``olmoe-scratch``,
``qwen3moe-scratch``, ``deepseek-scratch``. Deterministic for a given seed, thread count and CPU: fixed step
counts, seeded sampling, no data-loader workers, torch's deterministic algorithms. Training checkpoints go to
``--checkpoints`` every ``CHECKPOINT_EVERY`` steps; run the same command again after an interruption and it
goes on from the last one, to the same weights.

All five share one byte-level BPE tokenizer (8192 tokens, ``benchmarks/data/tokenizer.json``), 6 decoder
layers, hidden 256, tied embeddings, sequences of 256 tokens, batches of 16, and 2,500 steps (10.24 M tokens).
A training sequence comes from one domain, drawn with probability proportional to the square root of the
domain's train size (so the 11 MB of Python documentation does not drown the 1.4 MB of LAMBADA), at a random
offset.

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
- ``qwen3moe-scratch``: Qwen3-MoE-class (Qwen3-30B-A3B), 64 fine-grained experts of width 28, top-8 with the
  top-k weights renormalised, head dimension 64, from random weights, the load-balancing loss on every layer.
- ``deepseek-scratch``: DeepSeek-V3-class, a dense first layer (MLP width 256), then 32 routed experts of width
  64 with sigmoid routing, top-4 in one group, weights renormalised and scaled by 2.5, one shared expert of
  width 64, multi-head latent attention (KV rank 64); no balancing loss: the selection bias
  ``e_score_correction_bias`` is nudged after every step toward under-used experts (``SelectionBiasBalancer``).

Each output folder gets the weights (bf16), the tokenizer, ``card.json`` (data, steps, tokens seen, threads and
CPU, per-domain validation perplexity of the saved bf16 weights, per-layer expert usage, expert specialisation)
and a ``README.md`` model card made from it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import torch
from benchmark_text import DOMAINS  # scripts/ is on sys.path
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
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
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from moemerge.adapters import family_for
from moemerge.evaluation.perplexity import perplexity, windows
from moemerge.statistics.expert_stats import collect_statistics

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "benchmarks" / "data" / "tokenizer.json"
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
    "qwen3moe-scratch": "Trained from random weights, as Qwen3-30B-A3B was: 64 fine-grained experts, top-8 with "
    "the top-k weights renormalised, and the load-balancing loss on every layer.",
    "deepseek-scratch": "Trained from random weights, as DeepSeek-V3 was: sigmoid routing over 32 routed experts "
    "(top-4, one group) with a selection bias balanced without an auxiliary loss (after each step every layer's "
    "bias moves by BIAS_RATE toward its under-used experts), one shared expert, routed scaling 2.5, multi-head "
    "latent attention, and a dense first layer.",
}
# (dense steps, MoE steps): 2,500 steps of BATCH x SEQ_LEN tokens, 10.24 M tokens per model.
STEPS = {
    "mixtral-upcycled": (950, 1550),
    "qwen2moe-upcycled": (950, 1550),
    "olmoe-scratch": (0, 2500),
    "qwen3moe-scratch": (0, 2500),
    "deepseek-scratch": (0, 2500),
}
BIAS_RATE = 0.001  # DeepSeek-V3's bias update speed gamma
CHECKPOINT_EVERY = 100  # steps between training checkpoints (model, optimiser, schedule, sampler)
CHECK_WINDOWS = 12  # validation windows per domain that the test suite re-scores


def read_split(cache: Path, domain: str, split: str) -> list[str]:
    lines = (cache / domain / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def shipped_tokenizer() -> PreTrainedTokenizerFast:
    """The shared byte-level BPE tokenizer (``VOCAB`` tokens), shipped in ``benchmarks/data/tokenizer.json``.

    It was trained once by ``tokenizers``' ``BpeTrainer`` on every domain's train split; that trainer does not
    give the same merges twice, so the file is kept rather than rebuilt, and every benchmark model and every
    retraining reads the same one (perplexities stay comparable across models and retrainings).
    """
    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
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


def train(model, sampler: Sampler, steps: int, lr: float, label: str, checkpoint: Path) -> float:
    """Train ``steps`` steps; return the seconds spent, over every resumed run.

    Every ``CHECKPOINT_EVERY`` steps and at the end, the model, optimiser, schedule, sampler state and step go to
    ``checkpoint``; a run that finds it there goes on from it, so an interrupted run resumed gives the same
    weights as one that never stopped.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    first, spent = 0, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        sampler.gen.set_state(state["sampler"])
        first, spent = state["step"], state["seconds"]
        print(f"{label}: resumed at step {first} from {checkpoint}", flush=True)
    balancer = SelectionBiasBalancer(model) if model.config.model_type == "deepseek_v3" else None
    model.train()
    start = time.time() - spent
    for step in range(first, steps):
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
        if balancer is not None:
            balancer.step()
        if step % 100 == 0 or step == steps - 1:
            print(
                f"{label} step {step} loss {out.loss.item():.3f} total {loss.item():.3f} {time.time() - start:.0f}s",
                flush=True,
            )
        if (step + 1) % CHECKPOINT_EVERY == 0 or step == steps - 1:
            state = dict(model=model.state_dict(), optimizer=opt.state_dict(), schedule=sched.state_dict())
            state |= dict(sampler=sampler.gen.get_state(), step=step + 1, seconds=time.time() - start)
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").replace(checkpoint)
    if balancer is not None:
        balancer.remove()
    model.eval()
    return time.time() - start


class SelectionBiasBalancer:
    """DeepSeek-V3's auxiliary-loss-free load balancing: hooks count the experts each router selects during a
    step, and after the step every layer's ``e_score_correction_bias`` moves by ``BIAS_RATE`` up for experts
    below the layer's mean load and down for those above it."""

    def __init__(self, model):
        self.routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
        self.counts = [torch.zeros_like(r.e_score_correction_bias) for r in self.routers]
        self.hooks = [r.register_forward_hook(self._count(i)) for i, r in enumerate(self.routers)]

    def _count(self, i: int):
        def hook(module, args, output) -> None:
            indices = output[2]  # [tokens, top_k]
            self.counts[i] += torch.bincount(indices.flatten(), minlength=len(self.counts[i])).float()

        return hook

    @torch.no_grad()
    def step(self) -> None:
        for router, counts in zip(self.routers, self.counts, strict=True):
            router.e_score_correction_bias += BIAS_RATE * torch.sign(counts.mean() - counts)
            counts.zero_()

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


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
    if name == "qwen3moe-scratch":
        config = Qwen3MoeConfig(
            **moe_common,
            head_dim=64,
            moe_intermediate_size=28,
            num_experts=64,
            num_experts_per_tok=8,
            norm_topk_prob=True,
        )
        return None, Qwen3MoeForCausalLM(config), None
    if name == "deepseek-scratch":
        config = DeepseekV3Config(
            # MLA keeps one key/value head per query head, as DeepSeek-V3's own config does; transformers' eager
            # attention and llama.cpp's converter both read num_key_value_heads
            **dict(COMMON, num_key_value_heads=COMMON["num_attention_heads"]),
            **vocab,
            intermediate_size=256,  # the dense first layer
            first_k_dense_replace=1,
            moe_intermediate_size=64,
            n_routed_experts=32,
            num_experts_per_tok=4,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            q_lora_rank=None,
            kv_lora_rank=64,
            qk_rope_head_dim=32,
            qk_nope_head_dim=32,
            v_head_dim=64,
        )
        return None, DeepseekV3ForCausalLM(config), None
    raise SystemExit(f"unknown model {name!r}; choose one of {', '.join(STEPS)}")


def card_figures(saved, streams: dict[str, torch.Tensor]) -> dict:
    """The card's measurements of the saved model on the validation ``streams`` ([L] ids per domain): perplexity
    per domain, expert usage and specialisation on all of it, and perplexity and usage on the first
    ``CHECK_WINDOWS`` windows of each domain, which the test suite recomputes independently (the whole split would
    cost it a minute per model)."""
    first = {d: s[: CHECK_WINDOWS * SEQ_LEN] for d, s in streams.items()}
    check = {"windows_per_domain": CHECK_WINDOWS, **measured(saved, first)}
    return measured(saved, streams, specialisation=True) | {"check": check}


def measured(saved, streams: dict[str, torch.Tensor], specialisation: bool = False) -> dict:
    """Perplexity per domain and expert usage per layer over every domain's windows; with ``specialisation``
    also the :func:`specialisation_figures`."""
    per_domain = {d: routing_statistics(saved, s) for d, s in streams.items()}
    counts = torch.stack([torch.stack([st.counts for st in layers]) for layers in per_domain.values()])
    usage = counts.sum(dim=0).double()  # [layers, experts]
    figures = {
        "validation_perplexity": {
            d: round(perplexity(saved, windows(s, SEQ_LEN))["perplexity"], 3) for d, s in streams.items()
        },
        "expert_usage": rounded(usage / usage.sum(dim=1, keepdim=True)),
    }
    return figures | (specialisation_figures(per_domain) if specialisation else {})


def routing_statistics(saved, stream: torch.Tensor) -> list:
    """moemerge's calibration statistics (expert counts under the model's own routing rule, selection bias
    included, and each expert's mean output over all tokens) of every MoE layer on the windows of ``stream``."""
    views = family_for(saved.config.to_dict()).moe_layers(saved)
    stats = collect_statistics(saved, views, windows(stream, SEQ_LEN), progress=False)
    return [stats[view.layer] for view in views]


def specialisation_figures(per_domain: dict[str, list]) -> dict:
    """How far the experts are from identical copies and from noise.

    - ``expert_output_cosine``: per MoE layer, the mean over expert pairs of the cosine between two experts' mean
      outputs on all validation tokens (every expert applied to every token; 1 = identical experts);
    - ``usage_entropy``: per domain and MoE layer, the entropy of that domain's expert usage divided by log n
      (1 = every expert equally used; lower = the domain has experts of its own).
    """
    cosines = []
    for layer in zip(*per_domain.values(), strict=True):
        tokens = sum(st.num_tokens for st in layer)
        mean = sum(st.mean_output.double() * st.num_tokens for st in layer) / tokens  # [n, H]
        unit = torch.nn.functional.normalize(mean, dim=1)
        n = len(unit)
        cosines.append(((unit @ unit.T).sum() - n).item() / (n * (n - 1)))
    entropy = {}
    for domain, layers in per_domain.items():
        shares = torch.stack([st.counts.double() / st.counts.sum() for st in layers])  # [layers, n]
        h = -(shares * shares.clamp_min(1e-300).log()).sum(dim=1) / math.log(shares.shape[1])
        entropy[domain] = rounded(h)
    return {"expert_output_cosine": rounded(torch.tensor(cosines)), "usage_entropy": entropy}


def rounded(values: torch.Tensor) -> list:
    return [round(v, 4) for v in values.tolist()] if values.dim() == 1 else [rounded(row) for row in values]


def model_card(name: str, card: dict) -> str:
    ppl, check = card["validation_perplexity"], card["check"]["validation_perplexity"]
    cosine = card["expert_output_cosine"]
    where = f"with {card['threads']} torch thread(s) on {card['cpu']}" if "threads" in card else "on 2 CPU cores"
    entropy = "\n".join(
        f"| usage entropy, {d} | {' | '.join(f'{v:.3f}' for v in row)} |" for d, row in card["usage_entropy"].items()
    )
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
{card["training_minutes"]:.0f} min {where}) for moemerge's quality benchmark. {RECIPES[name]}

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

## Specialisation

How far these experts are from identical copies (an upcycled start) and from noise: the mean pairwise cosine of
the experts' mean outputs over all validation tokens (1 = identical experts), and per domain the entropy of the
expert usage divided by log n (1 = every expert used equally; lower = the domain has experts of its own).

| MoE layer | {" | ".join(str(i) for i in range(len(cosine)))} |
|---|{"---|" * len(cosine)}
| mean pairwise cosine of mean outputs | {" | ".join(f"{v:.3f}" for v in cosine)} |
{entropy}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=sorted(STEPS))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "moemerge" / "benchmark_text")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/models/MODEL")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument(
        "--checkpoints",
        type=Path,
        default=Path.home() / ".cache" / "moemerge" / "training",
        help="folder for resumable training checkpoints (MODEL-seedS-dense.pt, MODEL-seedS-moe.pt); a run that "
        "finds its checkpoints there goes on from them",
    )
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
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)  # DeepSeek-V3's backward is not reproducible without it
    torch.manual_seed(args.seed)

    tokenizer = shipped_tokenizer()
    streams = {d: token_stream(tokenizer, read_split(args.cache, d, "train")) for d in DOMAINS}
    print({d: len(s) for d, s in streams.items()}, flush=True)
    sampler = Sampler(streams, args.seed)
    vocab = dict(vocab_size=VOCAB, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    dense, moe, upcycle = build(args.model, vocab)
    dense_steps, moe_steps = STEPS[args.model]
    stem = args.checkpoints / f"{args.model}-seed{args.seed}"
    seconds = 0.0
    if dense is not None:
        seconds += train(dense, sampler, dense_steps, 3e-3, "dense", stem.with_name(stem.name + "-dense.pt"))
        upcycle(dense, moe, torch.Generator().manual_seed(args.seed + 1))
    lr = 2e-3 if dense is not None else 3e-3
    seconds += train(moe, sampler, moe_steps, lr, "moe", stem.with_name(stem.name + "-moe.pt"))
    minutes = seconds / 60

    moe.config.output_router_logits = False
    moe.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    validation = {d: token_stream(tokenizer, read_split(args.cache, d, "validation")) for d in DOMAINS}
    experts = sum(p.numel() for n, p in saved.named_parameters() if ".experts." in n)
    card = {
        "architecture": type(saved).__name__,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
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


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


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
