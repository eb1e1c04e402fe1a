"""``eval`` and ``compare`` one decoder layer at a time (moemerge.streaming.measure), against the models' own forward.

Oracles (tests/test_compare.py): the float64 loss loop over the whole model's logits, final hidden states from the
whole model's ``output_hidden_states`` compared per token in numpy, each MoE block of the measured model run on the
reference block's inputs captured with hooks; parameter counts of the model ``moemerge.load_model`` builds. The
whole-model loaders are made to fail, so a passing test did read one layer at a time.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from conftest import FAMILIES, TOKENIZER_DIR, pickle_copy, save_tiny, save_with_tokenizer, tiny_model
from test_cli import TEXT, assert_clean_error, run
from test_compare import oracle_hidden, oracle_moe_errors, oracle_perplexity
from transformers import AutoModelForCausalLM, AutoTokenizer

import moemerge
from moemerge.adapters import FAMILIES as ADAPTERS
from moemerge.compare import compare
from moemerge.evaluation import evaluate, parameter_counts, windows

EVALUATE = importlib.import_module("moemerge.evaluation.evaluate")
COMPARE = importlib.import_module("moemerge.compare")
MAX_TOKENS, SEQ_LEN = 150, 64  # windows of 64, 64 and 22 tokens
REL = 1e-6  # layer by layer and the whole forward compute the same float32 operations; the oracles sum in float64


def no_whole_model(*args, **kwargs):
    raise AssertionError("the whole model was loaded")


@pytest.fixture
def layer_by_layer(monkeypatch):
    """Make every whole-model load of eval and compare fail."""
    monkeypatch.setattr(EVALUATE, "load_model", no_whole_model)
    monkeypatch.setattr(COMPARE, "load_source", no_whole_model)


def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT * 2, encoding="utf-8")
    return path


def evaluation_chunks() -> list[torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    ids = tokenizer(TEXT * 2, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return windows(torch.tensor(ids[:MAX_TOKENS]), SEQ_LEN)


def assert_measures(result: dict, model, reference) -> None:
    """Perplexity, reference perplexity, last-hidden fidelity and every MoE layer's error equal the oracles."""
    chunks = evaluation_chunks()
    assert result["perplexity"]["perplexity"] == pytest.approx(oracle_perplexity(model, chunks), rel=REL)
    assert result["perplexity"]["tokens"] == sum(len(c) - 1 for c in chunks)
    assert result["reference_perplexity"]["perplexity"] == pytest.approx(oracle_perplexity(reference, chunks), rel=REL)
    relative_l2, cosine = oracle_hidden(model, reference, chunks)
    hidden = result["fidelity"]["last_hidden"]
    assert hidden["relative_l2"] == pytest.approx(relative_l2, rel=REL) and relative_l2 > 0
    assert hidden["cosine"] == pytest.approx(cosine, rel=REL)
    assert hidden["tokens"] == sum(len(c) for c in chunks)
    errors = [e["relative_error"] for e in result["fidelity"]["moe_layers"]]
    assert errors == pytest.approx(oracle_moe_errors(model, reference, chunks), rel=REL)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_layer_by_layer_equals_the_whole_forward(family, tmp_path, layer_by_layer):
    """A copy of a tiny model with its first MoE layer's experts and its last router perturbed, evaluated against
    the original: every number equals the oracles on the two whole models, and only the perturbed layers have an
    error of their own (later layers are fed the original's inputs). For Mixtral, tied embeddings and a config asking
    for router logits (the load-balancing loss) too."""
    tied = {"tie_word_embeddings": True, "output_router_logits": True} if family == "mixtral" else {}
    src = save_tiny(family, tmp_path / "src", **tied)
    model = tiny_model(family, **tied)
    moe = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    with torch.no_grad():
        model.model.layers[moe[0]].mlp.experts.down_proj.mul_(1.5)
        model.model.layers[moe[-1]].mlp.gate.weight.mul_(-1.0)
    perturbed = save_with_tokenizer(model, tmp_path / "perturbed")
    result = evaluate(perturbed, reference=src, data=str(text_file(tmp_path)), max_tokens=MAX_TOKENS,
                      seq_len=SEQ_LEN, cost=False, progress=False)  # fmt: skip
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    assert_measures(result, AutoModelForCausalLM.from_pretrained(perturbed).eval(), reference)
    errors = [e["relative_error"] for e in result["fidelity"]["moe_layers"]]
    assert [e["layer"] for e in result["fidelity"]["moe_layers"]] == moe
    assert errors[0] > 0 and errors[-1] > 0 and all(e == 0.0 for e in errors[1:-1])


@pytest.mark.parametrize(
    "options",
    [
        {"router": "grouped"},
        {"router": "grouped", "method": "mone"},
        {"budget": "frequency", "experts": 5},
        {"method": "mc-smoe"},
        {"method": "mc-smoe", "router": "grouped"},
    ],
)
def test_eval_of_grouped_and_budget_outputs_equals_load_model(options, tmp_path, layer_by_layer, monkeypatch):
    """A --router grouped output (original routers, and for a pruning method novices, from its sidecar), a
    non-uniform --budget output (expert counts per layer) and mc-smoe's compact output (experts from their factors,
    read with their layer): every number equals the oracles on the model moemerge.load_model builds, and the cost's
    parameter counts equal parameter_counts of that model."""
    monkeypatch.setattr(EVALUATE, "measure_in_fresh_process", lambda *args: {})
    text = text_file(tmp_path)
    src = save_tiny("mixtral", tmp_path / "src")
    out = tmp_path / "out"
    moemerge.reduce(src, out, **({"experts": 4} | options), calib=str(text), calib_samples=2, calib_seq_len=32,
                    seed=3, progress=False)  # fmt: skip
    result = evaluate(out, reference=src, data=str(text), max_tokens=MAX_TOKENS, seq_len=SEQ_LEN, progress=False)
    monkeypatch.undo()
    loaded = moemerge.load_model(out)
    assert_measures(result, loaded, AutoModelForCausalLM.from_pretrained(src).eval())
    counts = parameter_counts(loaded, ADAPTERS["mixtral"])
    assert {key: result["cost"][key] for key in counts} == counts
    if "budget" in options:
        assert len({len(layer.mlp.experts.down_proj) for layer in loaded.model.layers}) > 1
    # as the reference, the output is measured as load_model builds it too
    swapped = evaluate(src, reference=out, data=str(text), max_tokens=MAX_TOKENS, seq_len=SEQ_LEN, cost=False,
                       progress=False)  # fmt: skip
    expected = oracle_perplexity(loaded, evaluation_chunks())
    assert swapped["reference_perplexity"]["perplexity"] == pytest.approx(expected, rel=REL)


def test_grouped_output_read_in_bf16_on_a_cpu_without_bf16_is_load_models(tmp_path, layer_by_layer, monkeypatch):
    """A float32 --router grouped output read with --dtype bfloat16 where bf16 is computed in float32: the original
    routers of its sidecar are rounded to bf16 like every other weight, as in the model load_model(dtype=bfloat16)
    builds (then computed in float32): the same numbers, to the float64 oracles' precision."""
    from moemerge import precision

    monkeypatch.setattr(precision, "native_cpu_dtypes", lambda: frozenset({torch.float32}))
    text = text_file(tmp_path)
    src = save_tiny("mixtral", tmp_path / "src")
    out = tmp_path / "out"
    moemerge.reduce(src, out, experts=4, router="grouped", calib=str(text), calib_samples=2, calib_seq_len=32,
                    progress=False)  # fmt: skip
    result = evaluate(out, reference=src, data=str(text), max_tokens=MAX_TOKENS, seq_len=SEQ_LEN, dtype="bfloat16",
                      cost=False, progress=False)  # fmt: skip
    monkeypatch.undo()
    loaded = moemerge.load_model(out, dtype="bfloat16").float()
    assert_measures(result, loaded, AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).float().eval())


def test_a_checkpoint_without_its_final_norm_fails_before_the_first_layer(tmp_path, capfd, monkeypatch):
    """A model folder whose weights lack the final norm: one error line naming the missing tensor, before any
    decoder layer runs (a real model's layers take hours)."""
    from safetensors.torch import load_file, save_file

    from moemerge.streaming import measure

    src = save_tiny("mixtral", tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(measure, "run_layer", no_whole_model)
    code, _, err = run(["eval", src, "--data", text_file(tmp_path), "--no-cost", "--quiet"], capfd)
    assert "model.norm.weight" in assert_clean_error(code, err, tmp_path / "no-output")


def test_pickle_weights_and_tasks_load_the_whole_model(tmp_path, caplog):
    """Pickle weights cannot be read one layer at a time: eval loads the whole model, says so, and measures what
    the layer-by-layer run of the same weights in safetensors measures (the whole forward as oracle)."""
    text = text_file(tmp_path)
    src = save_tiny("mixtral", tmp_path / "src")
    pickled = pickle_copy(src, tmp_path / "pickled")
    arguments = dict(data=str(text), max_tokens=MAX_TOKENS, seq_len=SEQ_LEN, cost=False, progress=False)
    with caplog.at_level("INFO", logger="moemerge"):
        whole = evaluate(pickled, allow_pickle=True, **arguments)
    assert "pickle weights, which cannot be read one layer at a time: loading the whole model" in caplog.text
    streamed = evaluate(src, **arguments)
    assert whole["perplexity"]["perplexity"] == pytest.approx(streamed["perplexity"]["perplexity"], rel=1e-9)
    assert EVALUATE.whole_model_reason([], ("arc_easy",)).startswith("zero-shot tasks")


def test_compare_reads_one_layer_at_a_time_and_its_original_row_is_the_model(tmp_path, layer_by_layer):
    """compare with the whole-model loader disabled: the original row is the whole model's perplexity and
    parameter count, and a qwen2_moe grid (shared experts) row equals its reduce output measured by the oracles."""
    text = text_file(tmp_path)
    src = save_tiny("qwen2_moe", tmp_path / "src")
    settings = dict(calib=str(text), calib_samples=2, calib_seq_len=32, seed=3, progress=False)
    rows = compare(src, tmp_path / "grid", ["hc-smoe"], [4], data=str(text), max_tokens=MAX_TOKENS,
                   seq_len=SEQ_LEN, **settings)  # fmt: skip
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    chunks = evaluation_chunks()
    assert rows[0]["perplexity"] == pytest.approx(oracle_perplexity(original, chunks), rel=REL)
    assert rows[0]["parameters"] == sum(p.numel() for p in original.parameters())
    moemerge.reduce(src, tmp_path / "reduced", experts=4, **settings)
    reduced = moemerge.load_model(tmp_path / "reduced")
    assert rows[1]["perplexity"] == pytest.approx(oracle_perplexity(reduced, chunks), rel=REL)
    assert rows[1]["hidden_cosine"] == pytest.approx(oracle_hidden(reduced, original, chunks)[1], rel=REL)
    errors = oracle_moe_errors(reduced, original, chunks)
    assert rows[1]["moe_relative_error_mean"] == pytest.approx(np.mean(errors), rel=REL)
    assert rows[1]["parameters"] == sum(p.numel() for p in reduced.parameters())


def test_moving_layer_inputs_keeps_shared_tensors_shared():
    """The rotary embeddings and mask that every decoder layer's recorded arguments share are moved to the device
    once, not once per layer."""
    from moemerge.streaming.calibrate import _to

    shared, other = torch.ones(3), torch.zeros(2)
    calls = [((shared,), {"position_embeddings": (shared, other)}) for _ in range(4)]
    moved = _to(calls, torch.device("meta"))
    tensors = [t for args, kwargs in moved for t in (*args, *kwargs["position_embeddings"])]
    assert all(t.is_meta for t in tensors) and len({id(t) for t in tensors}) == 2


@pytest.mark.parametrize("damage", ["drop-layer", "remove", "drop-novices", "cut-novices"])
def test_a_damaged_grouped_router_file_is_one_error_line(tmp_path, capfd, damage):
    """A --router grouped output whose router sidecar lacks a layer's router, or is gone, or (mone) lacks a layer's
    novices or holds too few: eval (and load_model) say so in one line, exit 2, instead of a KeyError,
    FileNotFoundError or shape-error traceback."""
    from safetensors.torch import load_file, save_file

    text = text_file(tmp_path)
    src = save_tiny("mixtral", tmp_path / "src")
    out = tmp_path / "out"
    method = "mone" if "novices" in damage else "hc-smoe"
    moemerge.reduce(src, out, experts=4, router="grouped", method=method, calib=str(text), calib_samples=2,
                    calib_seq_len=32, progress=False)  # fmt: skip
    sidecar = out / "moemerge_router.safetensors"
    tensors = load_file(sidecar)
    if damage == "remove":
        sidecar.unlink()
    elif damage == "drop-layer":
        save_file({k: t for k, t in tensors.items() if not k.startswith("layers.1.")}, sidecar)
    elif damage == "drop-novices":
        save_file({k: t for k, t in tensors.items() if k != "layers.1.novices"}, sidecar)
    else:
        save_file(tensors | {"layers.1.novices": tensors["layers.1.novices"][1:]}, sidecar)
    code, _, err = run(["eval", out, "--data", text, "--no-cost", "--quiet"], capfd)
    line = assert_clean_error(code, err, tmp_path / "no-output")
    assert "moemerge_router.safetensors" in line and ("layer 1" in line or "cannot be read" in line)
    with pytest.raises(moemerge.MoemergeError):
        moemerge.load_model(out)


def test_compare_takes_several_passes_when_the_activations_do_not_fit(tmp_path, layer_by_layer, monkeypatch, caplog):
    """With the memory available (psutil's, faked) holding the activations of the reference and one reduction, a
    grid of 4 cells is measured in 4 passes over the layers, the log says so, and every row equals the one-pass
    grid's (timings aside)."""
    import types

    from transformers import AutoConfig

    text = text_file(tmp_path)
    src = save_tiny("mixtral", tmp_path / "src")
    grid = dict(data=str(text), max_tokens=MAX_TOKENS, seq_len=SEQ_LEN, calib=str(text), calib_samples=2,
                calib_seq_len=32, seed=3, progress=False)  # fmt: skip
    one = compare(src, tmp_path / "one", ["hc-smoe", "f-prune"], [4, 6], **grid)
    tokens = sum(len(c) for c in evaluation_chunks())
    each = tokens * AutoConfig.from_pretrained(src).hidden_size * 4  # float32 activations of one model
    monkeypatch.setattr(COMPARE.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=2 * 4 * each))
    with caplog.at_level("INFO", logger="moemerge"):
        several = compare(src, tmp_path / "several", ["hc-smoe", "f-prune"], [4, 6], **grid)
    assert "measuring them in 4 passes over the layers, 1 at a time" in caplog.text
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in several] == [
        {k: v for k, v in row.items() if k != "seconds"} for row in one
    ]
