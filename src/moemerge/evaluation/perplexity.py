"""Perplexity of a causal language model on a token stream, in non-overlapping windows."""

from __future__ import annotations

import math

import torch
from torch.nn import functional


def windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Non-overlapping windows [<= seq_len] of the 1-D stream ``ids``; a last window of one token is dropped
    (it predicts nothing)."""
    return [w for w in ids.split(seq_len) if len(w) > 1]


@torch.inference_mode()
def perplexity(model, chunks: list[torch.Tensor]) -> dict:
    """:func:`perplexity_of` the next-token negative log-likelihood over every position but the first of each
    window in ``chunks`` (each window starts without context)."""
    device = next(model.parameters()).device
    total = 0.0
    for chunk in chunks:
        chunk = chunk.to(device)
        total += summed_nll(model(input_ids=chunk[None]).logits[0], chunk)  # the last logit predicts nothing
    return perplexity_of(total, chunks)


def summed_nll(logits: torch.Tensor, chunk: torch.Tensor) -> float:
    """Next-token negative log-likelihood (nats) of the window ``chunk`` [T], summed over its last T - 1 tokens,
    from ``logits`` [>= T - 1, V] (the first T - 1 rows are used)."""
    return functional.cross_entropy(logits[: len(chunk) - 1].float(), chunk[1:], reduction="sum").item()


def perplexity_of(total: float, chunks: list[torch.Tensor]) -> dict:
    """{"perplexity", "mean_nll", "tokens"}: exp of the mean of the summed NLL ``total`` over the predicted tokens
    of ``chunks``."""
    count = sum(len(chunk) - 1 for chunk in chunks)
    return {"perplexity": math.exp(total / count), "mean_nll": total / count, "tokens": count}
