"""Synthetic random-weight MoE checkpoints with real layer shapes, for speed and memory benchmarks.

Usage: ``python benchmarks/speed/synthetic.py --shape qwen1.5-moe-a2.7b --layers 24 --out DIR
[--experts N] [--vocab V] [--seed S]``

Writes what ``save_pretrained`` would write for a model of that class and size, and what
``AutoModelForCausalLM.from_pretrained(DIR)`` loads with no missing and no unexpected keys, without ever building
the model: ``config.json`` (``dtype`` bfloat16), one safetensors shard per decoder layer
(``model-00001-of-000NN.safetensors`` holds layer 0, ...), one last shard with the rest (embeddings, final norm,
``lm_head``), and ``model.safetensors.index.json``. Peak memory is about one layer's shard (bfloat16:
Qwen1.5-MoE-A2.7B 1.14 GB, Mixtral-8x7B 2.8 GB) plus a 64 MB sampling buffer, so a 28 GB checkpoint (Qwen1.5-MoE,
24 layers) is written on a machine with far less memory.

Tensor names and shapes are not written by hand: the model class is built with the full configuration on the
``meta`` device (no memory) and ``transformers.core_model_loading.revert_weight_conversion`` turns its state dict
into the on-disk layout (transformers 5 fuses the experts in memory but saves one tensor per expert, e.g.
``model.layers.0.mlp.experts.3.gate_proj.weight`` of shape (moe_intermediate_size, hidden_size)).

Values, as transformers' initialisation: normal(0, ``initializer_range``) = N(0, 0.02) for matrices, ones for
norm weights (the only 1-D weights of these models), zeros for biases. Each tensor is drawn from its own
``torch.Generator`` seeded by (seed, tensor name) through blake2b, so every expert differs from the others (the
benchmark clusters them) and two writes with the same seed (and the same torch version) are byte-identical. Plain
normal sampling is kept, not a cheaper tiled or integer scheme: sampling in float32 and rounding to bfloat16 runs
at about 100 M values/s on one core. Measured on 2 busy CPU cores: a Qwen1.5-MoE layer (570 M parameters, 1.14 GB)
takes about 10 s, 6 s sampling and 3.5 s writing, so the 24-layer 28 GB checkpoint takes about 4 to 5 minutes; a
cheaper fill would save at most about 2 minutes and give experts less realistic statistics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion

# transformers config kwargs of the real models (their config.json on the Hub), less num_hidden_layers.
SHAPES: dict[str, dict] = {
    "qwen1.5-moe-a2.7b": {
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "qkv_bias": True,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 21,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "router_aux_loss_coef": 0.001,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    "mixtral-8x7b": {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "sliding_window": None,
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.02,
        "router_aux_loss_coef": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}
EXPERTS_KEY = {"qwen2_moe": "num_experts", "mixtral": "num_local_experts"}  # config key of the routed experts
CHUNK = 1 << 24  # values sampled at a time (float32: 64 MB)
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def build_config(shape: str, num_layers: int, *, num_experts=None, vocab_size=None, overrides=None):
    """The transformers config: ``SHAPES[shape]`` updated with ``overrides`` (e.g. small sizes for tests), the
    expert count and vocabulary, ``num_hidden_layers=num_layers`` and ``dtype`` bfloat16 (bos / eos ids that do
    not fit a smaller vocabulary become None)."""
    kwargs = {**SHAPES[shape], **(overrides or {}), "num_hidden_layers": num_layers}
    if num_experts is not None:
        kwargs[EXPERTS_KEY[kwargs["model_type"]]] = num_experts
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    for key in ("bos_token_id", "eos_token_id"):  # the real ids do not fit a small test vocabulary
        if isinstance(kwargs.get(key), int) and kwargs[key] >= kwargs["vocab_size"]:
            kwargs[key] = None
    config = AutoConfig.for_model(**kwargs)
    if config.tie_word_embeddings:
        raise ValueError("tied embeddings are not supported (transformers would not save lm_head.weight)")
    config.dtype = torch.bfloat16
    return config


def disk_layout(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor that ``save_pretrained`` writes for this config, e.g. for Qwen1.5-MoE
    ``model.layers.0.mlp.experts.0.down_proj.weight`` -> (2048, 1408) and ``lm_head.weight`` -> (151936, 2048).

    Built on the ``meta`` device (no memory, a fraction of a second), then reverted to the on-disk names."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = revert_weight_conversion(model, model.state_dict())
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, name), stable across runs and machines (not Python's ``hash``)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def synthetic_tensor(name: str, shape: tuple[int, ...], *, seed: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape``: zeros for a ``*.bias``, ones for another 1-D tensor (norm weights), otherwise
    N(0, std) sampled in float32 in chunks of at most ``CHUNK`` values and rounded to ``dtype``."""
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    buffer = torch.empty(min(CHUNK, flat.numel()))
    for start in range(0, flat.numel(), CHUNK):
        part = buffer[: min(CHUNK, flat.numel() - start)]
        flat[start : start + part.numel()].copy_(part.normal_(0.0, std, generator=generator))
    return out


def shard_plan(layout: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Tensor names per shard: one shard per decoder layer (in layer order), then one with the rest."""
    layers: dict[int, list[str]] = {}
    rest = []
    for name in layout:
        match = LAYER.match(name)
        if match:
            layers.setdefault(int(match.group(1)), []).append(name)
        else:
            rest.append(name)
    return [sorted(layers[i]) for i in sorted(layers)] + [sorted(rest)]


def write_synthetic_checkpoint(
    out: Path,
    shape: str,
    num_layers: int,
    *,
    num_experts: int | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    progress: bool = True,
    overrides: dict | None = None,
) -> dict:
    """Write a random-weight checkpoint of ``shape`` with ``num_layers`` decoder layers to ``out`` (created; it
    must not exist or be empty) and return a summary: files (shards), bytes (tensor data), parameters, seconds.

    ``overrides`` updates the config kwargs of ``SHAPES[shape]`` (e.g. ``{"hidden_size": 64}``). The config
    records ``dtype`` bfloat16 whatever ``dtype`` the tensors are written in."""
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    config = build_config(shape, num_layers, num_experts=num_experts, vocab_size=vocab_size, overrides=overrides)
    layout = disk_layout(config)
    plan = shard_plan(layout)
    parameters = sum(torch.Size(s).numel() for s in layout.values())
    total_size = parameters * dtype.itemsize
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < total_size * 1.01:
        raise OSError(f"{out}: {total_size / 1e9:.1f} GB to write, {free / 1e9:.1f} GB free")
    config.save_pretrained(out)

    weight_map = {}
    files = [f"model-{i:05d}-of-{len(plan):05d}.safetensors" for i in range(1, len(plan) + 1)]
    for index, (filename, names) in enumerate(zip(files, plan, strict=True)):
        shard_started = time.perf_counter()
        tensors = {
            n: synthetic_tensor(n, layout[n], seed=seed, std=config.initializer_range, dtype=dtype) for n in names
        }
        save_file(tensors, out / filename, metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, filename))
        if progress:
            print(
                f"{filename}: {'layer ' + str(index) if index < num_layers else 'embeddings, norm, lm_head'}, "
                f"{(out / filename).stat().st_size / 1e9:.2f} GB in {time.perf_counter() - shard_started:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    index_json = {"metadata": {"total_parameters": parameters, "total_size": total_size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2, sort_keys=True) + "\n")
    return {
        "out": str(out),
        "shape": shape,
        "layers": num_layers,
        "experts": getattr(config, EXPERTS_KEY[config.model_type]),
        "files": len(files),
        "bytes": total_size,
        "parameters": parameters,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--layers", required=True, type=int, help="decoder layers")
    parser.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--experts", type=int, help="routed experts per layer (default: the real model's)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default: the real model's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"error: {args.out} exists and is not an empty folder", file=sys.stderr)
        return 2
    summary = write_synthetic_checkpoint(
        args.out, args.shape, args.layers, num_experts=args.experts, vocab_size=args.vocab, seed=args.seed
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
