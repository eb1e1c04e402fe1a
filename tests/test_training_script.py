"""scripts/train_benchmark_models.py on shrunken shapes: resuming from a training checkpoint gives the weights of
a run that never stopped, and DeepSeek-V3's auxiliary-loss-free balancing moves each selection bias as its rule
says."""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = dict(vocab_size=64, bos_token_id=0, eos_token_id=0)


@pytest.fixture
def script(monkeypatch):
    """The training script with 32-wide models, batches of 2 x 16 tokens, a checkpoint every 2 steps, and torch's
    deterministic algorithms on (as its main() sets them)."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    module = importlib.import_module("train_benchmark_models")
    common = dict(module.COMMON, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)
    monkeypatch.setattr(module, "COMMON", common)
    monkeypatch.setattr(module, "BATCH", 2)
    monkeypatch.setattr(module, "SEQ_LEN", 16)
    monkeypatch.setattr(module, "CHECKPOINT_EVERY", 2)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield module
    torch.use_deterministic_algorithms(before)


def streams(module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {d: torch.randint(0, VOCAB["vocab_size"], (400,), generator=gen) for d in module.DOMAINS}


def fresh(module, name: str):
    """A new model and sampler, as a new process running the command builds them."""
    torch.manual_seed(0)
    _, model, _ = module.build(name, VOCAB)
    return model, module.Sampler(streams(module), 0)


def trained(module, name: str, checkpoint: Path, stop_after: int | None = None) -> dict[str, torch.Tensor]:
    """The state after 6 steps; with ``stop_after``, a first run dies when it asks for batch stop_after + 1, and
    the command runs again."""
    if stop_after:
        model, sampler = fresh(module, name)
        batch, calls = sampler.batch, itertools.count(1)

        def dying():
            if next(calls) > stop_after:
                raise KeyboardInterrupt
            return batch()

        sampler.batch = dying
        with pytest.raises(KeyboardInterrupt):
            module.train(model, sampler, 6, 3e-3, "test", checkpoint)
    model, sampler = fresh(module, name)
    module.train(model, sampler, 6, 3e-3, "test", checkpoint)
    return model.state_dict()


@pytest.mark.parametrize("name", ["olmoe-scratch", "deepseek-scratch", "mixtral-upcycled"])
def test_a_resumed_run_ends_with_the_weights_of_one_that_never_stopped(script, tmp_path, name):
    """Killed after step 5 (last checkpoint: step 4) and run again: every tensor, DeepSeek's selection biases
    included, equals the uninterrupted run's bit for bit."""
    straight = trained(script, name, tmp_path / "straight.pt")
    resumed = trained(script, name, tmp_path / "resumed.pt", stop_after=5)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_selection_bias_moves_toward_under_used_experts(script, tmp_path):
    """After one step from zero, each layer's e_score_correction_bias is BIAS_RATE x sign(mean load - load), the
    loads recounted from the router logits of that step's batch (top-k of sigmoid(logits) + the zero bias)."""
    torch.manual_seed(0)
    _, model, _ = script.build("deepseek-scratch", VOCAB)
    batch = script.Sampler(streams(script), 0).batch()
    with torch.no_grad():
        logits = model(input_ids=batch, output_router_logits=True).router_logits
    k = model.config.num_experts_per_tok
    loads = [torch.bincount(lg.float().sigmoid().topk(k).indices.flatten(), minlength=lg.shape[-1]) for lg in logits]
    script.train(model, script.Sampler(streams(script), 0), 1, 3e-3, "test", tmp_path / "one.pt")
    biases = [m.e_score_correction_bias for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    assert len(biases) == len(loads) == model.config.num_hidden_layers - model.config.first_k_dense_replace
    for bias, load in zip(biases, loads, strict=True):
        expected = script.BIAS_RATE * torch.sign(load.double().mean() - load.double())
        assert torch.allclose(bias.double(), expected, atol=1e-9)
        assert bias.abs().max() > 0
