"""Train the bundled demo model: a small Mixtral-class MoE on Jane Austen's novels.

Run: ``python scripts/train_demo_model.py TEXT_DIR OUT_DIR [--minutes M]`` where TEXT_DIR
is the output of ``scripts/offline_text.py``. Deterministic for a given seed and thread count
(it trains for a fixed number of steps; ``--minutes`` only sizes that number up front).

The model: byte-level BPE tokenizer (4096 tokens) trained on the same text, 4 decoder layers,
hidden 256, 8 experts of width 256 with top-2 routing and transformers' load-balancing loss,
trained from scratch on five of the six novels (Emma is held out). It is a demo, not a benchmark model (see the benchmark-models issue).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from offline_text import paragraphs  # scripts/ is on sys.path when this file runs
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

HELD_OUT = "emma"  # never trained on: demo/heldout.txt is taken from it
SEQ_LEN = 256
BATCH = 16


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("text_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    paras = []
    for path in sorted(Path(args.text_dir, "austen").glob("*.txt")):
        if path.stem != HELD_OUT:
            paras += paragraphs(path.read_text(encoding="utf-8"))
    tokenizer = build_tokenizer(paras)
    eos = tokenizer.eos_token_id
    ids = []
    for p in paras:
        ids += tokenizer(p)["input_ids"] + [eos]
    data = torch.tensor(ids, dtype=torch.long)
    print(f"{len(paras)} paragraphs, {len(data)} tokens")

    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.02,
        output_router_logits=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = MixtralForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    model.train()
    for step in range(args.steps):
        offsets = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH,), generator=gen)
        batch = torch.stack([data[o : o + SEQ_LEN] for o in offsets])
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 50 == 0:
            print(
                f"step {step} loss {out.loss.item():.3f} aux {out.aux_loss.item():.3f} {time.time() - start:.0f}s",
                flush=True,
            )

    model.config.output_router_logits = False
    model.eval()
    out = Path(args.out_dir)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    card = {
        "tokens_seen": args.steps * BATCH * SEQ_LEN,
        "corpus_tokens": len(data),
        "steps": args.steps,
        "seed": args.seed,
    }
    (out / "training.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
