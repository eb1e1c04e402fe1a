"""``reduce --stream``: the layer-by-layer path against the in-memory one (the oracle), and ``--sequential``
against an in-memory re-implementation. Resuming is in test_streaming_resume.py; what needs processes of its own
(memory against depth, torchrun) in test_streaming_processes.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moemerge
from moemerge.adapters import family_for
from moemerge.calibration import load_calibration
from moemerge.checkpoint.source import SIDECAR
from moemerge.pipeline import merge_layer, plan_groups, reduce_in_memory
from moemerge.statistics import collect_statistics
from moemerge.streaming import reduce_streaming

SMALL = dict(experts=4, calib_samples=3, calib_seq_len=24, progress=False)
PROMPT = torch.tensor([[11, 402, 97, 1500, 33, 7, 2048, 64, 5, 300]])


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("model*.safetensors")):
        tensors |= load_file(file)
    return tensors


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_model(a: Path, b: Path) -> None:
    """Same tensors (names, dtypes, bits), same config.json and moemerge.json text, same report files."""
    ta, tb = model_tensors(a), model_tensors(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    for name in ("config.json", "moemerge.json", "generation_config.json"):
        assert (a / name).read_text() == (b / name).read_text(), name
    assert (a / SIDECAR).is_file() == (b / SIDECAR).is_file()
    if (a / SIDECAR).is_file():
        assert load_file(a / SIDECAR).keys() == load_file(b / SIDECAR).keys()
        assert all(torch.equal(t, load_file(b / SIDECAR)[k]) for k, t in load_file(a / SIDECAR).items())
    assert all_files(a / "report") == all_files(b / "report")


CASES = [
    ("mixtral", {}),
    ("qwen2_moe", {}),
    ("qwen3_moe", {"method": "mc-smoe"}),
    ("olmoe", {"router": "grouped"}),
    ("deepseek_v3", {}),
    ("mixtral", {"cluster": "fcm"}),
    ("qwen2_moe", {"merge": "zipit", "align": True}),
    ("olmoe", {"method": "o-prune", "oprune_budget": 50}),
    ("deepseek_v3", {"refit": "down", "router": "grouped"}),
    ("qwen2_moe", {"method": "reap", "refit": "down"}),
    ("qwen3_moe", {"method": "mone", "router": "grouped", "refit": "down"}),
    ("deepseek_v3", {"method": "mc-smoe", "mc_smoe_dense": True, "router": "grouped"}),
]


@pytest.mark.parametrize(
    "family,options", CASES, ids=[f"{f}-{'-'.join(map(str, o.values())) or 'hc'}" for f, o in CASES]
)
def test_streaming_equals_in_memory(tmp_path, family, options):
    """The in-memory reduce is the oracle: the streamed output holds the same tensors bit for bit, the same config
    and moemerge.json, the same counts, and (first five cases; the figures are most of a tiny run's time) the same
    report; it loads with vanilla transformers (or load_model for grouped) to the same logits; and no partial
    folder is left."""
    report = CASES.index((family, options)) < 5
    check_streaming_equals_in_memory(tmp_path, save_tiny(family, tmp_path / "src"), options | {"report": report})


@pytest.mark.parametrize("options", [{}, {"method": "mc-smoe"}], ids=["hc", "mc-smoe-compact"])
def test_streaming_equals_in_memory_with_tied_embeddings(tmp_path, options):
    """The same with an output head tied to the input embeddings (the benchmark models'): not written twice, also
    when the in-memory path leaves the routed experts out (mc-smoe's compact output)."""
    source = save_tiny("olmoe", tmp_path / "src", tie_word_embeddings=True)
    check_streaming_equals_in_memory(tmp_path, source, options | {"report": False})
    assert "lm_head.weight" not in model_tensors(tmp_path / "stream")


def check_streaming_equals_in_memory(tmp_path: Path, source: Path, options: dict) -> None:
    memory = reduce_in_memory(source, tmp_path / "memory", **SMALL, **options)
    streamed = reduce_streaming(source, tmp_path / "stream", **SMALL, **options)
    assert_same_model(tmp_path / "memory", tmp_path / "stream")
    assert (tmp_path / "memory" / "model.safetensors").read_bytes() == (
        tmp_path / "stream" / "model.safetensors"
    ).read_bytes()
    assert (tmp_path / "stream" / "report" / "report.html").is_file() == options["report"]
    assert streamed.groups == memory.groups
    for field in ("num_experts", "experts", "params_before", "params_after", "stored_params", "calibration_tokens"):
        assert getattr(streamed, field) == getattr(memory, field), field
    with torch.no_grad():
        a = moemerge.load_model(tmp_path / "memory")(PROMPT).logits
        b = moemerge.load_model(tmp_path / "stream")(PROMPT).logits
    assert torch.equal(a, b)
    compact = options.get("method") == "mc-smoe" and not options.get("mc_smoe_dense")
    if options.get("router") != "grouped" and not compact:  # a compact output's experts are only factors
        AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "src", "stream"]


def test_output_above_the_shard_size_has_a_shard_per_layer(tmp_path, monkeypatch):
    """Above the shard size (2 GB; 1 byte here) the streamed output keeps one shard per decoder layer plus one for
    the rest, with an index (oracle: the shards' own headers) that vanilla transformers loads to the in-memory
    output's weights."""
    from moemerge.checkpoint import writer

    source = save_tiny("mixtral", tmp_path / "src")
    reduce_in_memory(source, tmp_path / "memory", **SMALL, report=False)
    monkeypatch.setattr(writer, "MAX_SHARD_SIZE", 1)
    reduce_streaming(source, tmp_path / "stream", **SMALL, report=False)
    out = tmp_path / "stream"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    files = [f"model-{i:05d}-of-{layers + 1:05d}.safetensors" for i in range(1, layers + 2)]
    assert sorted({*index["weight_map"].values()}) == files and not (out / "model.safetensors").exists()
    shards = {name: load_file(out / name) for name in files}
    assert index["weight_map"] == {t: name for name, tensors in shards.items() for t in tensors}
    tensors = {t: v for shard in shards.values() for t, v in shard.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in tensors.values())
    assert_same_model(tmp_path / "memory", out)
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "memory").state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_sequential_matches_reducing_layer_after_layer_in_memory(tmp_path, family):
    """Oracle for --sequential: in memory, reduce the MoE layers one at a time, each from statistics collected on
    the model whose earlier layers are already reduced. Bit-identical weights; and it differs from the default
    (statistics of the original model), so the option does something."""
    source = save_tiny(family, tmp_path / "src")
    streamed = reduce_streaming(source, tmp_path / "seq", sequential=True, **SMALL)
    reduce_streaming(source, tmp_path / "orig", **SMALL)

    model = AutoModelForCausalLM.from_pretrained(source).eval()
    fam = family_for(json.loads((source / "config.json").read_text()))
    calibration = load_calibration(None, moemerge_tokenizer(source), SMALL["calib_samples"], SMALL["calib_seq_len"])
    for view in fam.moe_layers(model):
        stats = collect_statistics(model, [view], calibration.sequences, {"router_inputs"}, progress=False)
        groups = plan_groups(stats, fam, model.config, SMALL["experts"])
        merge_layer(view, groups[view.layer], stats[view.layer], router_rows_rule="lse")
        assert groups[view.layer] == streamed.groups[view.layer]
    fam.set_num_experts(model, SMALL["experts"])
    model.save_pretrained(tmp_path / "oracle")
    expected, got = model_tensors(tmp_path / "oracle"), model_tensors(tmp_path / "seq")
    assert set(expected) == set(got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    original = model_tensors(tmp_path / "orig")
    assert any(not torch.equal(original[k], got[k]) for k in got)


def moemerge_tokenizer(source: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)
