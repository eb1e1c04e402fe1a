"""Compare an original model with its reduced version, loaded with plain transformers.

Usage: python demo/compare.py ORIGINAL REDUCED. Prints, for each: experts per MoE layer,
parameters, bytes of weights on disk, perplexity on demo/heldout.txt (text neither model was
trained or calibrated on), and a greedy continuation of a fixed prompt.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HELDOUT = Path(__file__).with_name("heldout.txt")
PROMPT = "It is a truth universally acknowledged, that"
WINDOW = 256


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor) -> float:
    """exp of the mean next-token loss over non-overlapping windows of ``WINDOW`` tokens."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, WINDOW):
        chunk = ids[start : start + WINDOW + 1]
        logits = model(input_ids=chunk[None, :-1]).logits[0].float()
        total += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(total / count)


def describe(path: str, tokenizer, ids: torch.Tensor) -> None:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    experts = [layer.mlp.experts.gate_up_proj.shape[0] for layer in model.model.layers]
    params = sum(p.numel() for p in model.parameters())
    disk = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    prompt = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    print(f"== {path}")
    print(f"experts per layer: {experts}")
    print(f"parameters: {params:,}   weights on disk: {disk:,} bytes")
    print(f"held-out perplexity ({len(ids):,} tokens of Emma): {perplexity(model, ids):.2f}")
    print(f"greedy: {tokenizer.decode(out[0], skip_special_tokens=True)}\n")


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    ids = torch.tensor(tokenizer(HELDOUT.read_text(encoding="utf-8"))["input_ids"])
    for path in sys.argv[1:]:
        describe(path, tokenizer, ids)


if __name__ == "__main__":
    main()
