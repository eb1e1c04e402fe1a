"""The written checkpoint: a standard transformers model, described exactly by moemerge.json, reproducible."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors
import scipy
import torch
import transformers
from conftest import EXPERT_FIELD, FAMILIES, TOP_K, save_tiny
from transformers import AutoConfig, AutoModelForCausalLM

import moemerge
from moemerge.checkpoint.identity import weights_sha256

R = 4
SAMPLES, SEQ_LEN = 2, 32
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")
PROMPT = torch.tensor([[11, 402, 97, 1500, 33, 7, 2048, 64, 5, 300]])


def reduce_small(source: Path, out: Path, calibration, **options) -> moemerge.ReduceResult:
    """moemerge.reduce with the module's small input_ids calibration, no progress bars and no report (the report
    is test_report.py's, and byte-identical reruns are test_same_inputs_give_identical_files')."""
    options = {"report": False} | options
    return moemerge.reduce(
        source, out, calib=str(calibration[0]), calib_samples=SAMPLES, calib_seq_len=SEQ_LEN, progress=False, **options
    )


def write_calibration_rows(path: Path, seed: int = 0) -> list[list[int]]:
    """An input_ids .jsonl of SAMPLES rows, each longer than SEQ_LEN; returns the rows as written."""
    rng = random.Random(seed)
    rows = [[rng.randrange(1, 4096) for _ in range(SEQ_LEN + 5)] for _ in range(SAMPLES)]
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows), encoding="utf-8")
    return rows


def make_source(family: str, folder: Path) -> Path:
    """A tiny checkpoint plus a chat template (a file the output must carry over)."""
    path = save_tiny(family, folder / family)
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    return path


def moe_layer_ids(config) -> list[int]:
    """Decoder layers with routed experts, from the config alone."""
    first_dense = getattr(config, "first_k_dense_replace", 0) or 0
    assert not getattr(config, "mlp_only_layers", None) and getattr(config, "decoder_sparse_step", 1) == 1
    return list(range(first_dense, config.num_hidden_layers))


def moe_blocks(model) -> list:
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def capture_router_inputs(model, rows: list[list[int]]) -> dict[int, torch.Tensor]:
    """Per decoder layer, the float64 inputs [T, H] of its MoE block over the calibration rows used by reduce_small."""
    captured: dict[int, list[torch.Tensor]] = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda module, args, i=i: captured.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]).double())
        )
        for i, layer in enumerate(model.model.layers)
        if hasattr(layer.mlp, "experts")
    ]
    with torch.no_grad():
        for row in rows[:SAMPLES]:
            model(torch.tensor([row[:SEQ_LEN]]))
    for hook in hooks:
        hook.remove()
    return {i: torch.cat(xs) for i, xs in captured.items()}


def lse_fit(x: torch.Tensor, member_rows: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """argmin_w ||x w - logsumexp(x member_rows^T)||^2 + lam ||w - start||^2, lam = 1e-3 trace(x^T x) / H (+1e-12)."""
    gram = x.T @ x
    lam = 1e-3 * gram.trace() / len(gram) + 1e-12
    target = torch.logsumexp(x @ member_rows.T, dim=1)
    return torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), x.T @ target + lam * start)


def sha256_of_rows(rows: list[list[int]]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(struct.pack("<Q", len(row)) + struct.pack(f"<{len(row)}q", *row))
    return h.hexdigest()


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> tuple[Path, list[list[int]]]:
    path = tmp_path_factory.mktemp("calib") / "rows.jsonl"
    return path, write_calibration_rows(path)


@pytest.fixture(scope="module")
def reduced(tmp_path_factory, calibration) -> dict[str, tuple[Path, Path, moemerge.ReduceResult]]:
    """Every family reduced from 8 to R experts with the Python API: family -> (source dir, output dir, result)."""
    root = tmp_path_factory.mktemp("reduced")
    runs = {}
    for family in FAMILIES:
        source = make_source(family, root / "src")
        out = root / f"{family}-out"
        result = reduce_small(source, out, calibration, experts=R)
        runs[family] = (source, out, result)
    return runs


PLAIN_LOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    for case in json.loads(sys.argv[1]):
        config = AutoConfig.from_pretrained(case["out"])
        assert getattr(config, case["field"]) == case["r"], (case, getattr(config, case["field"]))
        model = AutoModelForCausalLM.from_pretrained(case["out"]).eval()
        blocks = [(i, l.mlp) for i, l in enumerate(model.model.layers) if hasattr(l.mlp, "experts")]
        assert [i for i, _ in blocks] == case["moe_layers"], (case, [i for i, _ in blocks])
        for _, block in blocks:
            assert block.experts.gate_up_proj.shape[0] == case["r"], block.experts.gate_up_proj.shape
            assert block.experts.down_proj.shape[0] == case["r"], block.experts.down_proj.shape
            assert block.gate.weight.shape[0] == case["r"], block.gate.weight.shape
            bias = getattr(block.gate, "e_score_correction_bias", None)
            assert bias is None or bias.shape == (case["r"],)
        prompt = torch.tensor([[11, 402, 97, 1500, 33]])
        with torch.no_grad():
            assert torch.isfinite(model(prompt).logits).all()
            tokens = model.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert tokens.shape == (1, 8) and torch.equal(tokens[:, :5], prompt), tokens
    assert "moemerge" not in sys.modules and not any(m.startswith("moemerge.") for m in sys.modules)
    print("checked", len(json.loads(sys.argv[1])))
    """
)


def test_outputs_load_and_generate_without_moemerge(reduced, tmp_path):
    """Every family's output loads with plain AutoModelForCausalLM (moemerge never imported): R experts, R router rows, generate runs."""
    cases = []
    for family, (_, out, _) in reduced.items():
        config = AutoConfig.from_pretrained(out)
        cases.append({"out": str(out), "field": EXPERT_FIELD[family], "r": R, "moe_layers": moe_layer_ids(config)})
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # nothing importable from the repository
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checked {len(FAMILIES)}" in proc.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_metadata_describes_the_run(reduced, calibration, family):
    """moemerge.json: required keys; source facts from the source config; calibration facts from the rows file; versions."""
    source, out, _ = reduced[family]
    meta = json.loads((out / "moemerge.json").read_text(encoding="utf-8"))
    config = AutoConfig.from_pretrained(source)
    # the config fingerprint, recomputed: sorted keys, without the keys that change with the writer's version
    raw_config = json.loads((source / "config.json").read_text())
    raw_config = {k: v for k, v in raw_config.items() if k not in ("transformers_version", "_name_or_path")}
    assert set(meta) >= {
        "format_version",
        "method",
        "router",
        "parameters",
        "source",
        "calibration",
        "versions",
        "layers",
    }
    assert meta["format_version"] == 1
    assert meta["method"] == "hc-smoe" and meta["router"] == "reduce"
    assert meta["parameters"]["experts"] == R
    assert meta["source"] == {
        "path": str(source),
        "model_type": family,
        "num_experts": getattr(config, EXPERT_FIELD[family]),
        "top_k": config.num_experts_per_tok,
        "config_sha256": hashlib.sha256(json.dumps(raw_config, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": weights_sha256(sorted(source.glob("*.safetensors"))),
    }
    path, rows = calibration
    used = [row[:SEQ_LEN] for row in rows[:SAMPLES]]
    assert meta["calibration"] == {
        "spec": str(path),
        "sequences": SAMPLES,
        "tokens": SAMPLES * SEQ_LEN,
        "sha256": sha256_of_rows(used),
    }
    versions = meta["versions"]
    assert versions["torch"] == torch.__version__
    assert versions["transformers"] == transformers.__version__
    assert versions["safetensors"] == safetensors.__version__
    assert versions["scipy"] == scipy.__version__
    assert [entry["layer"] for entry in meta["layers"]] == moe_layer_ids(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_partition_and_frequencies(reduced, calibration, family):
    """Per layer: the groups partition range(n) into exactly R; frequencies equal an independent count of the router's picks (sum top-k)."""
    source, out, _ = reduced[family]
    meta = json.loads((out / "moemerge.json").read_text(encoding="utf-8"))
    n, k = meta["source"]["num_experts"], TOP_K

    # independent count: run the source model with plain transformers, tally the routers' top-k picks
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    blocks = dict(zip(moe_layer_ids(model.config), moe_blocks(model), strict=True))
    counts = {layer: torch.zeros(n, dtype=torch.int64) for layer in blocks}

    def tally(layer):
        def hook(module, args, output):  # returns None: the forward is unchanged
            counts[layer].add_(torch.bincount(output[2].reshape(-1), minlength=n))

        return hook

    handles = [block.gate.register_forward_hook(tally(layer)) for layer, block in blocks.items()]
    with torch.no_grad():
        for row in calibration[1][:SAMPLES]:
            model(input_ids=torch.tensor([row[:SEQ_LEN]]), use_cache=False)
    for handle in handles:
        handle.remove()
    tokens = SAMPLES * SEQ_LEN

    for entry in meta["layers"]:
        groups, frequency = entry["groups"], entry["frequency"]
        assert len(groups) == R
        assert all(groups)
        assert sorted(e for g in groups for e in g) == list(range(n))
        assert len(frequency) == n
        assert min(frequency) >= 0
        assert sum(frequency) == pytest.approx(k, abs=1e-12)  # every token picks exactly k experts
        expected = (counts[entry["layer"]].double() / tokens).tolist()
        assert frequency == pytest.approx(expected, abs=1e-12)
        if family == "deepseek_v3":  # group-limited routing: no merged expert mixes the two routing groups
            assert all(max(g) < n // 2 or min(g) >= n // 2 for g in groups)
            assert sum(1 for g in groups if max(g) < n // 2) == R // 2


@pytest.mark.parametrize("rule", ["lse", "frequency"])
@pytest.mark.parametrize("family", FAMILIES)
def test_weights_are_the_recorded_merge(reduced, calibration, tmp_path, family, rule):
    """Output experts are the frequency-weighted means of the recorded groups; router rows are the frequency-weighted
    means (frequency) or the ridge least-squares fit of each group's log-sum-exp of member logits on the calibration
    router inputs, recomputed here (lse, the default); every other tensor is unchanged."""
    source, out, _ = reduced[family]
    if rule == "frequency":
        out = tmp_path / "frequency-out"
        reduce_small(source, out, calibration, experts=R, router_rows="frequency")
    meta = json.loads((out / "moemerge.json").read_text(encoding="utf-8"))
    before = AutoModelForCausalLM.from_pretrained(source).eval()
    after = AutoModelForCausalLM.from_pretrained(out).eval()
    assert meta["parameters"]["router_rows"] == rule
    entries = {entry["layer"]: entry for entry in meta["layers"]}
    router_inputs = capture_router_inputs(before, calibration[1])
    for layer, (old, new) in enumerate(zip(before.model.layers, after.model.layers, strict=True)):
        if layer not in entries:
            assert not hasattr(new.mlp, "experts")
            continue
        freq = torch.tensor(entries[layer]["frequency"], dtype=torch.float64)
        for g, members in enumerate(entries[layer]["groups"]):
            f = freq[members]
            alpha = f / f.sum() if f.sum() > 0 else torch.full_like(f, 1 / len(members))

            def mean(t, members=members, alpha=alpha):
                return torch.einsum("m,m...->...", alpha, t[members].double())

            for name in ("gate_up_proj", "down_proj"):
                expected = mean(getattr(old.mlp.experts, name))
                torch.testing.assert_close(getattr(new.mlp.experts, name)[g].double(), expected, atol=1e-6, rtol=0)
            row = new.mlp.gate.weight[g].double()
            if rule == "lse" and len(members) > 1:  # a float32 row from a float64 solve
                expected = lse_fit(
                    router_inputs[layer], old.mlp.gate.weight.double()[members], mean(old.mlp.gate.weight)
                )
                torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(row, mean(old.mlp.gate.weight), atol=1e-6, rtol=0)
            if hasattr(old.mlp.gate, "e_score_correction_bias"):
                expected = mean(old.mlp.gate.e_score_correction_bias)
                torch.testing.assert_close(
                    new.mlp.gate.e_score_correction_bias[g].double(), expected, atol=1e-6, rtol=0
                )
    routed = ("mlp.experts.", "mlp.gate.")
    old_state, new_state = before.state_dict(), after.state_dict()
    unchanged = [name for name in old_state if not any(part in name for part in routed)]
    assert set(new_state) == set(old_state)
    assert len(unchanged) > 10
    for name in unchanged:
        assert torch.equal(old_state[name], new_state[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_config_and_side_files(reduced, family):
    """config.json differs from the source's only in the expert count; tokenizer, generation and chat files are byte-identical copies."""
    source, out, _ = reduced[family]
    old = json.loads((source / "config.json").read_text())
    new = json.loads((out / "config.json").read_text())
    changed = {key for key in set(old) | set(new) if old.get(key) != new.get(key)}
    assert changed and changed <= set(EXPERT_KEYS)
    assert all(new[key] == R for key in changed)
    for name in COPIED:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize("family,router", [("mixtral", "reduce"), ("deepseek_v3", "grouped")])
def test_same_inputs_give_identical_files(tmp_path, family, router):
    """Two runs with the same source, text calibration and seed write byte-identical files (and the same file set)."""
    source = make_source(family, tmp_path)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"Line {i} of the calibration text, with words." for i in range(60)), encoding="utf-8")
    outs = []
    for name in ("a", "b"):
        outs.append(tmp_path / name)
        moemerge.reduce(
            source,
            outs[-1],
            experts=R,
            router=router,
            calib=str(text),
            calib_samples=3,
            calib_seq_len=16,
            seed=7,
            progress=False,
        )
    files_a = sorted(str(p.relative_to(outs[0])) for p in outs[0].rglob("*") if p.is_file())
    assert files_a == sorted(str(p.relative_to(outs[1])) for p in outs[1].rglob("*") if p.is_file())
    assert {"model.safetensors", "moemerge.json", "report/report.html", "report/usage.png"} <= set(files_a)
    for name in files_a:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def duplicated_expert_model(source: Path, out: Path, groups: dict[int, list[list[int]]]):
    """The oracle of grouped routing, built without moemerge: the source model (original routers) in which
    original expert j is replaced by the merged expert of its group, read from the output checkpoint."""
    oracle = AutoModelForCausalLM.from_pretrained(source).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    layers = moe_layer_ids(oracle.config)
    with torch.no_grad():
        for layer, block, merged_block in zip(layers, moe_blocks(oracle), moe_blocks(merged), strict=True):
            group_of = {j: g for g, members in enumerate(groups[layer]) for j in members}
            index = torch.tensor([group_of[j] for j in range(block.experts.gate_up_proj.shape[0])])
            block.experts.gate_up_proj.copy_(merged_block.experts.gate_up_proj[index])
            block.experts.down_proj.copy_(merged_block.experts.down_proj[index])
    return oracle, merged


@pytest.mark.parametrize("family,r", [(f, R) for f in FAMILIES] + [("mixtral", 1)])
def test_grouped_output_routes_through_original_router(tmp_path, calibration, family, r):
    """load_model of a --router grouped output equals the source model with each expert swapped for its group's merge."""
    source = make_source(family, tmp_path)
    out = tmp_path / "out"
    reduce_small(source, out, calibration, experts=r, router="grouped")
    meta = json.loads((out / "moemerge.json").read_text(encoding="utf-8"))
    groups = {entry["layer"]: entry["groups"] for entry in meta["layers"]}
    assert all(len(g) == r for g in groups.values())
    oracle, plain = duplicated_expert_model(source, out, groups)
    grouped = moemerge.load_model(out)
    with torch.no_grad():
        expected = oracle(PROMPT).logits
        got = grouped(PROMPT).logits
        standard = plain(PROMPT).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if r > 1:  # with one expert left every router sends all weight to it; otherwise the r-row router differs
        assert not torch.allclose(standard, expected, atol=1e-4)


def safetensors_dtypes(file: Path) -> dict[str, str]:
    raw = file.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    return {name: t["dtype"] for name, t in header.items() if name != "__metadata__"}


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_bfloat16_output_is_stored_in_bfloat16(tmp_path, calibration, family):
    """--dtype bfloat16: every tensor is stored, and loads back, in the dtype transformers itself gives it in a
    bfloat16 model (most parameters BF16; e.g. DeepSeek-V3's router and selection bias stay float32 from
    transformers 5.24 on)."""
    source = make_source(family, tmp_path)
    out = tmp_path / "out"
    reduce_small(source, out, calibration, experts=R, dtype="bfloat16")
    # oracle: the source loaded in bfloat16 and saved by transformers
    oracle = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    oracle.save_pretrained(tmp_path / "reference")
    reference = safetensors_dtypes(tmp_path / "reference" / "model.safetensors")
    written = safetensors_dtypes(out / "model.safetensors")
    assert written and set(written) <= set(reference)
    assert {name: reference[name] for name in written} == written
    assert "BF16" in written.values()
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    expected = {name: p.dtype for name, p in oracle.named_parameters()}
    assert {name: p.dtype for name, p in model.named_parameters()} == expected
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_sharded_source_and_output(tmp_path, calibration, monkeypatch):
    """A sharded source is read whole; above the shard size the output is sharded with an index that plain transformers loads."""
    from moemerge.checkpoint import writer

    source = make_source("olmoe", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(source)
    (source / "model.safetensors").unlink()
    model.save_pretrained(source, max_shard_size="300KB")
    source_shards = sorted(source.glob("model-*.safetensors"))
    assert len(source_shards) > 1
    monkeypatch.setattr(writer, "MAX_SHARD_SIZE", 300_000)  # bytes: stands in for the 2 GB limit
    out = tmp_path / "out"
    result = reduce_small(source, out, calibration, experts=R)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert result.bytes_before == sum(p.stat().st_size for p in source_shards)
    assert result.bytes_after == sum(p.stat().st_size for p in shards)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(block.experts.gate_up_proj.shape[0] == R for block in moe_blocks(reloaded))
    for shard in shards:  # the index names every tensor of every shard, in the shard that holds it
        raw = shard.read_bytes()
        names = set(json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])) - {"__metadata__"}
        assert names == {k for k, v in index["weight_map"].items() if v == shard.name}
