"""``moemerge compare`` and moemerge.compare, each number checked against an oracle written here.

Oracles: the variant spec text itself (parse_variant); for every grid row, the same variant reduced to disk by
``moemerge.reduce`` with the same calibration and seed, loaded with ``moemerge.load_model`` and measured on the
tokenizer's own token stream with a float64 per-token loss loop and numpy cosines of the last hidden states; the
group counts in that output's moemerge.json; csv / PNG readers for the written files.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import struct
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import NUM_EXPERTS, TOKENIZER_DIR, save_tiny
from PIL import Image
from safetensors.torch import load_file
from test_cli import SMALL_CALIB, TEXT, assert_clean_error, run
from transformers import AutoModelForCausalLM, AutoTokenizer

import moemerge
import moemerge.compare as compare_module
from moemerge import MoemergeError
from moemerge.compare import compare, parse_variant
from moemerge.evaluation import perplexity
from moemerge.options import ReduceOptions
from moemerge.routing.grouped import install_grouped_routers

N = NUM_EXPERTS
MAX_TOKENS, SEQ_LEN = 150, 64  # windows of 64, 64 and 22 tokens
CALIB_SAMPLES, CALIB_SEQ_LEN = 2, 32
SEED = 3  # not the default: the grid and the oracle must both pass it on (at r = 5 it gives frequency budgets 4/6)
EXPERTS = [3, 5]
# each grid variant and the keyword arguments of moemerge.reduce that mean the same thing (written out by hand)
VARIANTS = {
    "hc-smoe": {},
    "f-prune": {"method": "f-prune"},
    "hc-smoe:merge=fix-dom": {"merge": "fix-dom"},
    "hc-smoe:budget=frequency": {"budget": "frequency"},
    "o-prune:oprune_budget=20": {"method": "o-prune", "oprune_budget": 20},
    "reap:refit=down": {"method": "reap", "refit": "down"},
}
GROUPED_VARIANTS = {"hc-smoe": {}, "m-smoe": {"method": "m-smoe"}, "mone": {"method": "mone"}}
PPL_REL = 1e-6  # the float32 loss vs the float64 oracle loop differ by ~2e-7; grid rows differ by over 10x this
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_SIZE = (768, 504)  # the plots are 6.4 x 4.2 inches at 120 dpi


# ----------------------------------------------------------------------------------------------------------------
# oracles


def token_stream() -> torch.Tensor:
    """The evaluation tokens: the tokenizer's ids of the text file, its end-of-text token, cut to MAX_TOKENS."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    ids = tokenizer(TEXT * 2, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(ids) > MAX_TOKENS
    return torch.tensor(ids[:MAX_TOKENS])


def oracle_chunks() -> list[torch.Tensor]:
    """Consecutive SEQ_LEN slices of the stream (the last one shorter)."""
    ids = token_stream()
    return [ids[i : i + SEQ_LEN] for i in range(0, len(ids), SEQ_LEN)]


def oracle_perplexity(model, chunks: list[torch.Tensor]) -> float:
    """exp of the mean over positions t >= 1 of each window of -log p(x_t | x_<t), log-softmax taken in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            logits = model(input_ids=chunk[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            total -= float(logp[torch.arange(len(chunk) - 1), chunk[1:]].sum())
            count += len(chunk) - 1
    return math.exp(total / count)


def oracle_hidden(model, reference, chunks: list[torch.Tensor]) -> tuple[float, float]:
    """(mean relative L2, mean cosine) over all tokens of the final hidden states, per token in numpy float64."""
    relative, cosine = [], []
    with torch.no_grad():
        for chunk in chunks:
            h = model(input_ids=chunk[None], output_hidden_states=True).hidden_states[-1][0].double().numpy()
            h_ref = reference(input_ids=chunk[None], output_hidden_states=True).hidden_states[-1][0].double().numpy()
            for a, b in zip(h, h_ref, strict=True):
                relative.append(np.linalg.norm(a - b) / np.linalg.norm(b))
                cosine.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.mean(relative)), float(np.mean(cosine))


def oracle_moe_errors(model, reference, chunks: list[torch.Tensor]) -> list[float]:
    """Per MoE layer: sum ||y - y_ref||^2 / sum ||y_ref||^2 over all tokens in numpy float64, where y_ref is the
    reference's own MoE block output and y the reduced model's own block run on the reference's block inputs (both
    captured here with a forward hook that returns None)."""
    captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    blocks = {i: layer.mlp for i, layer in enumerate(reference.model.layers) if hasattr(layer.mlp, "experts")}

    def hook(module, args, output, i):
        captured.setdefault(i, []).append((args[0].detach().clone(), output.detach().clone()))

    handles = [block.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)) for i, block in blocks.items()]
    with torch.no_grad():
        for chunk in chunks:
            reference(input_ids=chunk[None])
    for handle in handles:
        handle.remove()
    errors = []
    with torch.no_grad():
        for i in blocks:
            error = norm = 0.0
            for x, y_ref in captured[i]:
                y = model.model.layers[i].mlp(x).double().numpy()
                y_ref = y_ref.double().numpy()
                error += float(((y - y_ref) ** 2).sum())
                norm += float((y_ref**2).sum())
            errors.append(error / norm)
    return errors


def reduce_to_disk(work: dict, out: Path, r: int, router: str = "reduce", **options) -> Path:
    """The variant reduced by moemerge.reduce with the grid's calibration settings and seed."""
    moemerge.reduce(
        work["src"],
        out,
        experts=r,
        router=router,
        calib=str(work["text"]),
        calib_samples=CALIB_SAMPLES,
        calib_seq_len=CALIB_SEQ_LEN,
        seed=SEED,
        progress=False,
        **options,
    )
    return out


def grid(work: dict, out: Path, methods, experts=EXPERTS, **kwargs) -> list[dict]:
    return compare(
        work["src"],
        out,
        list(methods),
        list(experts),
        data=str(work["text"]),
        max_tokens=MAX_TOKENS,
        seq_len=SEQ_LEN,
        calib=str(work["text"]),
        calib_samples=CALIB_SAMPLES,
        calib_seq_len=CALIB_SEQ_LEN,
        seed=SEED,
        progress=False,
        **kwargs,
    )


def cli_args(work: dict, out: Path, *extra) -> list:
    return [
        "compare", work["src"], "--out", out, "--data", work["text"], "--calib", work["text"], *SMALL_CALIB,
        "--max-tokens", MAX_TOKENS, "--seq-len", SEQ_LEN, "--quiet", *extra,
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """A tiny Mixtral with the demo tokenizer, a text file (calibration and evaluation), the original model loaded,
    and one compare grid of VARIANTS x EXPERTS (router reduce) in ``grid``."""
    root = tmp_path_factory.mktemp("compare")
    text = root / "text.txt"
    text.write_text(TEXT * 2, encoding="utf-8")
    paths = {"root": root, "text": text, "src": save_tiny("mixtral", root / "mixtral")}
    paths["original"] = AutoModelForCausalLM.from_pretrained(paths["src"]).eval()
    paths["chunks"] = oracle_chunks()
    paths["grid"] = root / "grid"
    paths["rows"] = grid(paths, paths["grid"], VARIANTS)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# parse_variant


def test_parse_variant_plain_name_has_defaults():
    """A bare method name gives that method, the spec itself, default options with the given seed, and the default
    merge, alignment, budget and router rows."""
    v = parse_variant("f-prune", seed=7)
    assert (v.spec, v.options.method) == ("f-prune", "f-prune")
    assert v.options == ReduceOptions(method="f-prune", seed=7)
    o = v.options
    assert (o.merge, o.align, o.budget, o.router_rows) == ("frequency", False, "uniform", "lse")


def test_parse_variant_reads_every_key():
    """Every key of the spec text lands in its field (hyphenated keys too); oprune_budget becomes an int."""
    spec = (
        "hc-smoe:metric=router-logits,distance=cosine,cluster=kmeans,linkage=complete,kmeans-init=k-means++,"
        "oprune_budget=17,merge=zipit,align=true,budget=probability,router-rows=frequency"
    )
    v = parse_variant(spec, seed=5)
    assert (v.spec, v.options.method) == (spec, "hc-smoe")
    assert v.options == ReduceOptions(
        metric="router-logits",
        distance="cosine",
        cluster="kmeans",
        linkage="complete",
        kmeans_init="k-means++",
        oprune_budget=17,
        merge="zipit",
        align=True,
        budget="probability",
        router_rows="frequency",
        seed=5,
    )
    assert isinstance(v.options.oprune_budget, int)
    assert parse_variant("hc-smoe:align=false,kmeans_init=random").options.align is False
    assert parse_variant("hc-smoe:align=false,kmeans_init=random").options.kmeans_init == "random"


def test_parse_variant_preset_method_keeps_its_preset():
    """m-smoe with other grouping options still groups by its preset (router logits, cosine, single-shot) in the
    grid, while options outside the preset (linkage) and merge are taken from the spec."""
    v = parse_variant("m-smoe:metric=weight,distance=euclidean,cluster=kmeans,linkage=complete,merge=average")
    effective = v.options.effective()
    assert (effective.metric, effective.distance, effective.cluster) == ("router-logits", "cosine", "single-shot")
    assert effective.linkage == "complete" and effective.merge == "average"


@pytest.mark.parametrize(
    "spec,named",
    [
        ("hc-smo", "hc-smo"),
        ("", "method"),
        ("hc-smoe:colour=red", "colour"),
        ("hc-smoe:seed=4", "seed"),
        ("hc-smoe:linkage", "'linkage'"),
        ("hc-smoe:linkage=wrd", "wrd"),
        ("hc-smoe:metric=logits", "logits"),
        ("hc-smoe:distance=manhattan", "manhattan"),
        ("hc-smoe:cluster=dbscan", "dbscan"),
        ("hc-smoe:kmeans_init=best", "best"),
        ("hc-smoe:align=maybe", "maybe"),
        ("hc-smoe:align=True", "True"),
        ("hc-smoe:budget=x", "budget"),
        ("hc-smoe:merge=x", "merge"),
        ("hc-smoe:router_rows=x", "router-rows"),
        ("o-prune:oprune_budget=0", "oprune_budget"),
        ("o-prune:oprune_budget=-5", "oprune_budget"),
        ("o-prune:oprune_budget=many", "oprune_budget"),
        ("hc-smoe:linkage=ward,distance=cosine", "ward"),
    ],
)
def test_parse_variant_rejects(spec, named):
    """An unknown method, key or value, a key without a value, or an impossible combination raises MoemergeError
    whose message names the problem."""
    with pytest.raises(MoemergeError) as err:
        parse_variant(spec)
    assert named in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# every grid row against reduce-to-disk + load_model


def test_grid_rows_in_order(work):
    """The rows are the original first, then for each expert count (in the order given) each variant (in order)."""
    expected = [("original", N)] + [(spec, r) for r in EXPERTS for spec in VARIANTS]
    assert [(row["method"], row["experts"]) for row in work["rows"]] == expected


def test_original_row_equals_the_original_model(work):
    """The original row: perplexity of the unreduced model by the oracle loop, zero fidelity error, all n experts in
    every MoE layer, its parameter count."""
    row, original = work["rows"][0], work["original"]
    assert row["perplexity"] == pytest.approx(oracle_perplexity(original, work["chunks"]), rel=PPL_REL)
    assert row["perplexity"] == pytest.approx(perplexity(original, work["chunks"])["perplexity"], rel=1e-9)
    assert (row["hidden_cosine"], row["hidden_relative_l2"], row["moe_relative_error_mean"]) == (1.0, 0.0, 0.0)
    assert row["experts_per_layer"] == f"{N}/{N}" and row["fraction_kept"] == 1.0
    assert row["parameters"] == sum(p.numel() for p in original.parameters())


@pytest.mark.parametrize("r", EXPERTS)
@pytest.mark.parametrize("spec", list(VARIANTS))
def test_grid_row_equals_reduce_to_disk(work, tmp_path, spec, r):
    """The grid row of (variant, r) equals the same variant reduced to disk by moemerge.reduce (same calibration,
    seed and options) and loaded with load_model: perplexity by the float64 loss loop, last-hidden cosine and relative
    L2 by numpy, mean per-layer MoE error (each reduced MoE block fed the original's block inputs, captured with hooks
    here) in numpy, experts per layer = len(groups) in moemerge.json,
    parameters; and the row is not the original model's."""
    row = next(row for row in work["rows"] if row["method"] == spec and row["experts"] == r)
    out = reduce_to_disk(work, tmp_path / "reduced", r, **VARIANTS[spec])
    meta = json.loads((out / "moemerge.json").read_text(encoding="utf-8"))
    reduced = moemerge.load_model(out)
    chunks = work["chunks"]

    expected = oracle_perplexity(reduced, chunks)
    assert row["perplexity"] == pytest.approx(expected, rel=PPL_REL)
    assert row["perplexity"] == pytest.approx(perplexity(reduced, chunks)["perplexity"], rel=1e-9)
    original = oracle_perplexity(work["original"], chunks)
    assert abs(expected - original) > 10 * PPL_REL * original  # the tolerance tells a reduced model from the original

    relative_l2, cosine = oracle_hidden(reduced, work["original"], chunks)
    assert row["hidden_cosine"] == pytest.approx(cosine, rel=1e-9)
    assert row["hidden_relative_l2"] == pytest.approx(relative_l2, rel=1e-9)
    errors = oracle_moe_errors(reduced, work["original"], chunks)
    assert row["moe_relative_error_mean"] == pytest.approx(np.mean(errors), rel=1e-9)
    assert min(errors) > 0

    counts = [len(entry["groups"]) for entry in meta["layers"]]
    assert row["experts_per_layer"] == "/".join(map(str, counts))
    assert sum(counts) == r * len(counts)
    assert row["fraction_kept"] == r / N
    assert row["parameters"] == sum(p.numel() for p in reduced.parameters())


def test_grid_has_a_non_uniform_budget_row(work):
    """The budget=frequency variant at r = 5 keeps different counts per layer (so the rows above check a per-layer
    budget, loaded through load_model), averaging r."""
    row = next(r for r in work["rows"] if r["method"] == "hc-smoe:budget=frequency" and r["experts"] == 5)
    counts = [int(c) for c in row["experts_per_layer"].split("/")]
    assert len(set(counts)) > 1 and sum(counts) == 5 * len(counts)


def test_grouped_router_rows_equal_reduce_to_disk(work, tmp_path):
    """--router grouped: each row's perplexity and last-hidden cosine equal the reduce(router="grouped") output
    loaded with load_model (which restores the n-way router), measured by the oracles."""
    rows = grid(work, tmp_path / "grouped", GROUPED_VARIANTS, router="grouped")
    assert [(row["method"], row["experts"]) for row in rows] == [("original", N)] + [
        (spec, r) for r in EXPERTS for spec in GROUPED_VARIANTS
    ]
    assert "router grouped" in (tmp_path / "grouped" / "results.md").read_text(encoding="utf-8").splitlines()[0]
    for row in rows[1:]:
        out = tmp_path / f"{row['method']}-{row['experts']}"
        reduce_to_disk(work, out, row["experts"], router="grouped", **GROUPED_VARIANTS[row["method"]])
        assert json.loads((out / "moemerge.json").read_text(encoding="utf-8"))["router"] == "grouped"
        reduced = moemerge.load_model(out)
        gate = work["original"].model.layers[0].mlp.gate.weight
        assert reduced.model.layers[0].mlp.gate.router.weight.shape == gate.shape  # the n-way router is back
        assert row["perplexity"] == pytest.approx(oracle_perplexity(reduced, work["chunks"]), rel=PPL_REL)
        _, cosine = oracle_hidden(reduced, work["original"], work["chunks"])
        assert row["hidden_cosine"] == pytest.approx(cosine, rel=1e-9)
        assert row["experts_per_layer"] == f"{row['experts']}/{row['experts']}"
    # grouped routing is not the reduced router: the same groups give another perplexity than the reduce grid's row
    reduce_row = next(r for r in work["rows"] if r["method"] == "hc-smoe" and r["experts"] == EXPERTS[0])
    assert abs(rows[1]["perplexity"] - reduce_row["perplexity"]) > 10 * PPL_REL * reduce_row["perplexity"]


# ----------------------------------------------------------------------------------------------------------------
# output files


def test_results_csv_equals_the_rows(work):
    """results.csv parses with csv: its header is the row keys, it has 1 + methods x experts rows, and every value
    reads back as the returned row's value (floats exactly)."""
    rows = work["rows"]
    assert sorted(p.name for p in work["grid"].iterdir()) == ["perplexity.png", "results.csv", "results.md"]
    with (work["grid"] / "results.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header, written = reader.fieldnames, list(reader)
    assert header == list(rows[0])
    assert len(written) == len(rows) == 1 + len(VARIANTS) * len(EXPERTS)
    for got, row in zip(written, rows, strict=True):
        assert set(got) == set(row)
        for key, value in row.items():
            if isinstance(value, str):
                assert got[key] == value
            elif isinstance(value, int):
                assert int(got[key]) == value
            else:
                assert float(got[key]) == value, key


def test_results_md_has_a_row_per_result(work):
    """results.md: a table with a header and one line per row, in order, whose method, experts (with the per-layer
    counts where they differ), perplexity, hidden cosine and MoE error cells read back as the row's values."""
    lines = (work["grid"] / "results.md").read_text(encoding="utf-8").splitlines()
    table = [line for line in lines if line.startswith("|")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head == ["method", "experts", "perplexity", "hidden cos", "MoE rel. err"]
    assert set(table[1]) <= set("|-")
    body = table[2:]
    assert len(body) == len(work["rows"])
    for line, row in zip(body, work["rows"], strict=True):
        method, experts, ppl, cos, err = (c.strip() for c in line.strip("|").split("|"))
        assert method == row["method"]
        counts = row["experts_per_layer"].split("/")
        assert experts == (str(row["experts"]) if len(set(counts)) == 1 else f"{row['experts']} ({'/'.join(counts)})")
        assert float(ppl) == pytest.approx(row["perplexity"], abs=0.005 + 1e-9)
        assert float(cos) == pytest.approx(row["hidden_cosine"], abs=5e-5 + 1e-12)
        assert float(err) == pytest.approx(row["moe_relative_error_mean"], abs=5e-5 + 1e-12)
    assert any("(" in line.split("|")[2] for line in body)  # the non-uniform budget row shows its counts
    assert str(MAX_TOKENS) in lines[0] and str(work["text"]) in lines[0]


def test_perplexity_png_is_valid(work):
    """perplexity.png starts with the PNG signature, its IHDR size is 768 x 504, and matplotlib and PIL read it back
    at that size."""
    path = work["grid"] / "perplexity.png"
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == PLOT_SIZE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == PLOT_SIZE[::-1]
    assert pixels.std() > 0  # something is drawn
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == PLOT_SIZE


def test_second_run_via_cli_is_identical(work, tmp_path, capfd):
    """The same grid through `moemerge compare` into an existing directory with --force: the stale content is
    replaced, results.md and perplexity.png are byte-identical to the first run, the CSV equal but for the timing
    column, and stdout prints results.md and a `wrote` line."""
    out = tmp_path / "again"
    out.mkdir()
    (out / "stale.txt").write_text("old", encoding="utf-8")
    argv = cli_args(work, out, "--methods", *VARIANTS, "--experts", *EXPERTS, "--seed", SEED, "--force")
    argv.remove("--quiet")
    code, stdout, _ = run(argv, capfd)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["perplexity.png", "results.csv", "results.md"]
    for name in ("results.md", "perplexity.png"):
        assert (out / name).read_bytes() == (work["grid"] / name).read_bytes(), name

    def without_seconds(path: Path) -> list[dict]:
        with path.open(newline="", encoding="utf-8") as f:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]

    assert without_seconds(out / "results.csv") == without_seconds(work["grid"] / "results.csv")
    md = (out / "results.md").read_text(encoding="utf-8")
    assert stdout.startswith(md)
    assert stdout[len(md) :].startswith(f"wrote {out}: ")


def test_failure_mid_grid_leaves_no_output(work, tmp_path, monkeypatch):
    """An error while writing the plots (after every row was measured) leaves neither the output directory nor a
    partial one behind."""
    import moemerge.compare as compare_module

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(compare_module, "plot", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="plot failed"):
        grid(work, out, ["f-prune"], [4])
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# CLI errors


@pytest.mark.parametrize(
    "case,named",
    [
        ("unknown-method", "hc-smo"),
        ("bad-key", "colour"),
        ("bad-value", "wrd"),
        ("experts-n", f"--experts {N}"),
        ("experts-0", "--experts 0"),
        ("novices-reduce", "mone"),
        ("missing-data", "absent.txt"),
    ],
)
def test_cli_errors(work, tmp_path, capfd, case, named):
    """Bad compare input exits 2 with one `error:` line naming the problem and leaves no output directory."""
    extra = {
        "unknown-method": ["--methods", "hc-smoe", "hc-smo", "--experts", "4"],
        "bad-key": ["--methods", "hc-smoe:colour=red", "--experts", "4"],
        "bad-value": ["--methods", "hc-smoe:linkage=wrd", "--experts", "4"],
        "experts-n": ["--methods", "hc-smoe", "--experts", "4", N],
        "experts-0": ["--methods", "hc-smoe", "--experts", "0", "4"],
        "novices-reduce": ["--methods", "hc-smoe", "mone", "--experts", "4"],
        "missing-data": ["--methods", "hc-smoe", "--experts", "4", "--data", tmp_path / "absent.txt"],
    }[case]
    out = tmp_path / "out"
    code, _, err = run([*cli_args(work, out), *extra], capfd)
    assert named in assert_clean_error(code, err, out)


def test_cli_existing_out_without_force(work, tmp_path, capfd):
    """An existing --out without --force exits 2 with one `error:` line, leaves the directory as it was, and leaves
    no partial directory."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    code, _, err = run(cli_args(work, out, "--methods", "hc-smoe", "--experts", "4"), capfd)
    assert "Traceback" not in err and code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "already exists" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_out_is_the_model(work, tmp_path, capfd):
    """--out naming the source model directory (with --force) is refused, exit 2, and the model is left intact."""
    model = tmp_path / "model"
    shutil.copytree(work["src"], model)
    before = sorted(p.name for p in model.iterdir())
    argv = [*cli_args(work, model, "--methods", "f-prune", "--experts", "4", "--force")]
    argv[1] = model
    code, _, err = run(argv, capfd)
    assert sorted(p.name for p in model.iterdir()) == before
    assert code == 2 and err.startswith("error: ")


def test_cli_fcm_with_grouped_router(work, tmp_path, capfd):
    """A fuzzy (fcm) variant with --router grouped is refused like `moemerge reduce` refuses it: exit 2, no output."""
    with pytest.raises(MoemergeError, match="fcm"):
        moemerge.reduce(work["src"], tmp_path / "r", experts=4, cluster="fcm", router="grouped", progress=False)
    out = tmp_path / "out"
    code, _, err = run(
        cli_args(work, out, "--methods", "hc-smoe:cluster=fcm", "--experts", "4", "--router", "grouped"), capfd
    )
    assert_clean_error(code, err, out)


def test_cli_fcm_with_align(work, tmp_path, capfd):
    """A fuzzy (fcm) variant with align=true is one `error:` line, exit 2, no output, as in `moemerge reduce`."""
    out = tmp_path / "out"
    code, _, err = run(cli_args(work, out, "--methods", "hc-smoe:cluster=fcm,align=true", "--experts", "4"), capfd)
    assert_clean_error(code, err, out)


@pytest.mark.parametrize("option", ["--seq-len", "--max-tokens"])
def test_cli_window_too_short(work, tmp_path, capfd, option):
    """--seq-len 1 or --max-tokens 1 (nothing to predict) is one `error:` line, exit 2, no output, as in eval."""
    out = tmp_path / "out"
    argv = cli_args(work, out, "--methods", "hc-smoe", "--experts", "4")
    argv[argv.index(option) + 1] = 1
    code, _, err = run(argv, capfd)
    assert option in assert_clean_error(code, err, out)


def test_cli_budget_output_as_source(work, tmp_path, capfd):
    """A --budget output (different expert counts per layer) as the model is one `error:` line, exit 2, no output,
    as `moemerge reduce` refuses it."""
    source = reduce_to_disk(work, tmp_path / "budget", 5, budget="frequency")
    counts = {len(entry["groups"]) for entry in json.loads((source / "moemerge.json").read_text())["layers"]}
    assert len(counts) > 1
    with pytest.raises(MoemergeError, match="budget"):
        moemerge.reduce(source, tmp_path / "r", experts=2, progress=False)
    out = tmp_path / "out"
    argv = cli_args(work, out, "--methods", "hc-smoe", "--experts", "2")
    argv[1] = source
    code, _, err = run(argv, capfd)
    assert "budget" in assert_clean_error(code, err, out)


@pytest.mark.parametrize("method,router", [("hc-smoe", "reduce"), ("mone", "grouped")])
def test_bf16_rows_on_a_cpu_without_bf16_measure_the_model_reduce_writes(work, tmp_path, monkeypatch, method, router):
    """A bf16 checkpoint on a CPU without native bf16 (detection forced): the grid computes in float32, but each
    row measures the reduced weights (and mone's novices) rounded to bf16, as reduce writes them. Oracle: the reduce
    output, loaded in float32 (by moemerge.load_model for grouped routing), through the float64 loss loop
    (measuring the unrounded merge misses it by about 2e-6)."""
    from moemerge import precision

    monkeypatch.setattr(precision, "native_cpu_dtypes", lambda: frozenset({torch.float32}))
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(work["src"], dtype=torch.bfloat16).save_pretrained(bf16)
    for file in work["src"].glob("tokenizer*"):
        (bf16 / file.name).write_bytes(file.read_bytes())
    installed = {}  # the novices the grid's reduced layers route to, per layer

    def install(layers, routers, groups, top_k):
        installed.update({view.layer: routers[view.layer].novices for view in layers})
        install_grouped_routers(layers, routers, groups, top_k)

    monkeypatch.setattr(compare_module, "install_grouped_routers", install)
    rows = grid({**work, "src": bf16}, tmp_path / "grid", [method], experts=[5], router=router)
    out = reduce_to_disk({**work, "src": bf16}, tmp_path / "reduced", 5, router=router, method=method)
    if router == "grouped":  # the sidecar's bf16 novices, bit for bit (perplexity alone would not tell)
        sidecar = load_file(out / "moemerge_router.safetensors")
        assert installed and all(sidecar[f"layers.{layer}.novices"].dtype == torch.bfloat16 for layer in installed)
        assert all(torch.equal(t, sidecar[f"layers.{layer}.novices"].float()) for layer, t in installed.items())
    stored = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in stored.parameters())
    loaded = moemerge.load_model(out, dtype="float32")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    expected = oracle_perplexity(loaded, work["chunks"])
    assert rows[1]["perplexity"] == pytest.approx(expected, rel=PPL_REL)
