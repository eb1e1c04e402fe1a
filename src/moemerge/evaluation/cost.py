"""What a model costs: parameters, bytes on disk, compute per token, memory and speed.

Memory and speed are measured in a fresh Python process that loads only the model (so the
reference model or earlier work does not count), on a fixed prompt set, batch size 1, greedy.
GFLOPs per token are counted, not timed: 2 x the weights a token multiplies by (attention and
other projections, the router, top-k routed experts, shared experts, the output projection),
without the context-dependent attention scores. With grouped routing two selected members of
one group share a merged expert, so this is then an upper bound.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from moemerge.adapters import MoEFamily
from moemerge.errors import MoemergeError

PROMPTS = (
    "The history of the city begins with a small settlement on the river, where",
    "To install the package, first create a virtual environment and then",
    "She had not expected the letter to arrive so soon, and when she opened it",
    "In mathematics, a prime number is a natural number greater than one that",
)
NEW_TOKENS = 32


def parameter_counts(model, family: MoEFamily) -> dict:
    """{"parameters", "expert_parameters", "active_parameters", "gflops_per_token"} of a loaded model."""
    views = family.moe_layers(model)
    expert_ids = {id(p) for view in views for p in view.block.experts.parameters()}
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings().weight
    active = sum(p.numel() for p in model.parameters() if p.ndim >= 2 and id(p) not in expert_ids | {id(embedding)})
    if output is embedding:  # tied: the output projection is still a matmul per token
        active += output.numel()
    for view in views:  # one expert's parameters (dense matrices, or mc-smoe's factors) per selected expert
        active += view.routing.top_k * sum(p.numel() for p in view.block.experts.parameters()) // view.num_experts
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "expert_parameters": sum(p.numel() for view in views for p in view.block.experts.parameters()),
        "active_parameters": active,
        "gflops_per_token": 2 * active / 1e9,
    }


@torch.inference_mode()
def speed(model, tokenizer) -> dict:
    """{"prefill_latency_s", "decode_tokens_per_s"}: mean over :data:`PROMPTS` after one warm-up, batch size 1."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    prompts = [
        tokenizer(p, return_tensors="pt")["input_ids"] if tokenizer is not None else torch.arange(16)[None] % vocab
        for p in PROMPTS
    ]
    run = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    model.generate(prompts[0].to(device), **run)  # warm-up
    prefill = decode = 0.0
    for ids in prompts:
        ids = ids.to(device)
        start = time.perf_counter()
        model(input_ids=ids)
        _sync(device)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, **run)
        _sync(device)
        prefill += first
        decode += max(time.perf_counter() - start - first, 1e-9)
    return {"prefill_latency_s": prefill / len(prompts), "decode_tokens_per_s": NEW_TOKENS * len(prompts) / decode}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bytes_on_disk(path: str | Path) -> int:
    """Bytes of every safetensors file in the model directory (moemerge's own files included)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def measure_in_fresh_process(
    path: str | Path, dtype: str = "auto", device: str = "cpu", allow_pickle: bool = False
) -> dict:
    """:func:`speed` and peak memory of the model at ``path``, loaded alone in a new Python process (which accepts
    pickle weights only with ``allow_pickle``).

    peak_memory_bytes: the process's peak resident set on CPU (including Python and torch, whose
    share is baseline_memory_bytes), or torch's peak allocated GPU memory on CUDA.
    """
    command = [sys.executable, "-m", "moemerge.evaluation.cost", str(path), dtype, device, str(allow_pickle)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise MoemergeError(f"the memory and speed measurement failed ({last}); rerun with --no-cost to skip it")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def _peak_resident_bytes() -> int:
    """This process's peak resident set: VmHWM, not getrusage's ru_maxrss, which Linux carries over fork and exec
    and so reports the parent's size when the parent was larger."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def _main(path: str, dtype: str, device: str, allow_pickle: str) -> None:
    from transformers import AutoTokenizer

    from moemerge.checkpoint.loader import load_model

    baseline = _resident_bytes()
    model = load_model(path, dtype=dtype, device=device, allow_pickle=allow_pickle == "True")
    tokenizer = AutoTokenizer.from_pretrained(path) if any(Path(path).glob("tokenizer*")) else None
    result = speed(model, tokenizer)
    if model.device.type == "cuda":
        result |= {"peak_memory_bytes": torch.cuda.max_memory_allocated(model.device), "baseline_memory_bytes": 0}
    else:
        result |= {"peak_memory_bytes": _peak_resident_bytes(), "baseline_memory_bytes": baseline}
    print(json.dumps(result))


if __name__ == "__main__":
    _main(*sys.argv[1:5])
