"""Tiny random-weight models of every supported family, built from configs inside the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "demo" / "model"  # the demo model's BPE tokenizer (4096 tokens)
VOCAB = 4096
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
# The config field of each family that counts routed experts, as transformers names it.
EXPERT_FIELD = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
    "olmoe": "num_experts",
    "deepseek_v3": "n_routed_experts",
}
NUM_EXPERTS = 8
TOP_K = 2


def tiny_config(family: str, num_experts: int = NUM_EXPERTS, top_k: int = TOP_K, **overrides):
    """A 2-MoE-layer config of ``family`` (DeepSeek-V3 adds one dense first layer and 2 routing groups);
    ``overrides`` replace any config field (e.g. ``num_hidden_layers``)."""
    if family == "mixtral":
        return _config(
            MixtralConfig,
            overrides,
            **COMMON,
            num_key_value_heads=2,
            intermediate_size=16,
            num_hidden_layers=2,
            num_local_experts=num_experts,
            num_experts_per_tok=top_k,
        )
    if family == "qwen2_moe":
        return _config(
            Qwen2MoeConfig,
            overrides,
            **COMMON,
            num_key_value_heads=2,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_hidden_layers=2,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=False,
        )
    if family == "qwen3_moe":
        return _config(
            Qwen3MoeConfig,
            overrides,
            **COMMON,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=True,
        )
    if family == "olmoe":
        return _config(
            OlmoeConfig,
            overrides,
            **COMMON,
            num_key_value_heads=2,
            intermediate_size=16,
            num_hidden_layers=2,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
        )
    if family == "deepseek_v3":
        return _config(
            DeepseekV3Config,
            overrides,
            **COMMON,
            num_key_value_heads=4,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=num_experts,
            n_shared_experts=1,
            num_experts_per_tok=top_k,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
    raise ValueError(family)


def run_cli(argv: list, capture) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``moemerge`` run in-process (pytest capture fixture ``capture``); argparse's
    SystemExit becomes the code. Output from before the call (a fixture's progress bars) is not the command's."""
    from moemerge.cli import main

    capture.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capture.readouterr()
    return code, out, err


def layer_stats(layer: int, mean_output: torch.Tensor, counts: torch.Tensor, num_tokens: int, **fields):
    """LayerStatistics from hand-made tensors; router sums and REAP saliency default to zeros, the rule to top-2."""
    from moemerge.adapters import RoutingRule
    from moemerge.statistics import LayerStatistics

    n = len(counts)
    defaults = dict(prob_sum=torch.zeros(n, dtype=torch.float64), reap=torch.zeros(n, dtype=torch.float64))
    defaults["routing"] = RoutingRule(top_k=TOP_K)
    return LayerStatistics(layer, mean_output, counts, num_tokens, **(defaults | fields))


def _config(config_class, overrides: dict, **fields):
    return config_class(**(fields | overrides))


def tiny_model(family: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A random-weight float32 model of ``family`` in eval mode; router weights scaled up so routing is decisive."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs), dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.gate.weight.normal_(0, 0.5)
                if hasattr(layer.mlp.gate, "e_score_correction_bias"):
                    layer.mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model


def save_with_tokenizer(model: torch.nn.Module, path: Path) -> Path:
    """Write ``model`` as a checkpoint directory with the demo tokenizer beside it; returns ``path``."""
    model.save_pretrained(path)
    for file in TOKENIZER_DIR.glob("tokenizer*"):
        shutil.copyfile(file, path / file.name)
    return path


def save_tiny(family: str, path: Path, seed: int = 0, tokenizer: bool = True, **kwargs) -> Path:
    """Write a tiny model of ``family`` as a checkpoint directory (with the demo tokenizer) and return its path."""
    if tokenizer:
        return save_with_tokenizer(tiny_model(family, seed, **kwargs), path)
    tiny_model(family, seed, **kwargs).save_pretrained(path)
    return path


def pickle_copy(source: Path, path: Path) -> Path:
    """A copy of the single-file checkpoint ``source`` in ``path`` with its weights as pickle (pytorch_model.bin,
    the same tensors); returns ``path``."""
    shutil.copytree(source, path)
    (path / "model.safetensors").unlink()
    torch.save(load_file(source / "model.safetensors"), path / "pytorch_model.bin")
    return path


# The test files that take longest (about 25-60 s each on 2 cores), run first: pytest-xdist hands out one file
# at a time in collection order, so a long file collected last would leave the other worker idle at the end.
LONGEST_FIRST = (
    "test_benchmark_models.py",
    "test_streaming_processes.py",
    "test_streaming.py",
    "test_streaming_resume.py",
    "test_compare.py",
    "test_evaluation.py",
    "test_recipes.py",
    "test_cli.py",
    "test_zero_shot.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: one intra-op thread beats thread hand-offs, above all on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def plant_permuted_copies(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make routed expert 2i + 1 of every MoE layer a copy of expert 2i with its intermediate neurons in a random
    order (gate and up rows, down columns: the same function), in place; router rows stay distinct."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            if not hasattr(layer.mlp, "experts"):
                continue
            experts = layer.mlp.experts
            inter = experts.down_proj.shape[2]
            for a in range(0, experts.gate_up_proj.shape[0], 2):
                order = torch.randperm(inter, generator=g)
                gate, up = experts.gate_up_proj[a][:inter], experts.gate_up_proj[a][inter:]  # gate rows first
                experts.gate_up_proj[a + 1] = torch.cat([gate[order], up[order]])
                experts.down_proj[a + 1] = experts.down_proj[a][:, order]
    return model


def save_permuted_copies(family: str, path: Path, seed: int = 0, **kwargs) -> Path:
    """:func:`save_tiny`'s checkpoint with :func:`plant_permuted_copies` applied (the demo tokenizer included)."""
    return save_with_tokenizer(plant_permuted_copies(tiny_model(family, seed, **kwargs), seed), path)
