"""``moemerge compare``: a grid of methods x expert counts from one calibration pass, side by side.

Each cell reduces an in-memory copy of the model (nothing is written but the results) and is
measured on the same evaluation tokens: perplexity, fidelity to the original, zero-shot
accuracy. The output directory holds ``results.csv``, ``results.md`` (a table shaped like the
HC-SMoE paper's tables 2-3) and PNG plots against the fraction of experts kept (its figure 1).
"""

from __future__ import annotations

import copy
import csv
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from matplotlib.figure import Figure
from transformers import AutoConfig

from moemerge.adapters import MoELayerView
from moemerge.budget_search import SEARCH_IN_REDUCE_ONLY
from moemerge.calibration import check_calibration_size, check_spec, load_calibration
from moemerge.checkpoint import inspect_source, load_source
from moemerge.checkpoint.source import load_tokenizer
from moemerge.defaults import CALIB_SAMPLES, CALIB_SEQ_LEN, EVAL_MAX_TOKENS, EVAL_SEQ_LEN
from moemerge.errors import MoemergeError
from moemerge.evaluation.evaluate import (
    check_evaluation,
    check_tokenizer_for_tasks,
    evaluation_windows,
    measure,
    whole_model_reason,
)
from moemerge.options import VARIANT_KEYS, ReduceOptions
from moemerge.output_files import atomic_output, check_output
from moemerge.pipeline import (
    apply_groups,
    check_budget,
    check_method,
    check_uniform_source,
    compress_experts,
    compression_rank,
    merge_layer,
    plan_groups,
    statistics_needs,
    stored_router,
    target_experts,
)
from moemerge.precision import compute_in_fastest, to_compute, to_storage
from moemerge.progress import log, phase
from moemerge.registry import resolve
from moemerge.routing.grouped import install_grouped_routers
from moemerge.statistics import collect_statistics
from moemerge.streaming.calibrate import LayerStream, layer_statistics
from moemerge.streaming.measure import Candidate, measure_layer_by_layer


@dataclass(frozen=True)
class Variant:
    """One row family of the grid: ``--methods NAME[:KEY=VALUE,...]`` (keys: VARIANT_KEYS) and the options it
    reduces with."""

    spec: str
    options: ReduceOptions


def parse_variant(spec: str, seed: int = 0, router: str = "reduce") -> Variant:
    """A :class:`Variant` from ``NAME[:KEY=VALUE,...]``, with ``seed`` and the grid's ``router``; unknown names,
    keys and values and impossible combinations raise MoemergeError."""
    name, _, settings = spec.partition(":")
    resolve("method", name)
    values = {"method": name, "seed": seed, "router": router}
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise MoemergeError(f"--methods {spec}: {item!r} is not KEY=VALUE")
        if key not in VARIANT_KEYS:
            raise MoemergeError(f"--methods {spec}: unknown key {key!r}; use one of: {', '.join(sorted(VARIANT_KEYS))}")
        if key == "align":
            if value not in ("true", "false"):
                raise MoemergeError(f"--methods {spec}: align must be true or false, not {value!r}")
            values[key] = value == "true"
        elif key in ("oprune_budget", "ream_group_size"):
            if not value.isdigit() or int(value) < 1:
                raise MoemergeError(f"--methods {spec}: {key} must be a whole number of at least 1")
            values[key] = int(value)
        else:
            values[key] = value
    if values.get("budget") == "search":
        raise MoemergeError(f"--methods {spec}: {SEARCH_IN_REDUCE_ONLY}")
    try:
        return Variant(spec, ReduceOptions(**values))
    except MoemergeError as err:
        raise MoemergeError(f"--methods {spec}: {err}") from None


def compare(
    model: str | Path,
    out: str | Path,
    methods: list[str],
    experts: list[int],
    data: str | None = None,
    max_tokens: int = EVAL_MAX_TOKENS,
    seq_len: int = EVAL_SEQ_LEN,
    tasks: tuple[str, ...] = (),
    limit: int | None = None,
    tasks_source: str = "local",
    batch_size: int = 8,
    router: str = "reduce",
    calib: str | None = None,
    calib_samples: int = CALIB_SAMPLES,
    calib_seq_len: int = CALIB_SEQ_LEN,
    dtype: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Reduce the model in directory ``model`` by every variant in ``methods`` to every count in ``experts``,
    measure each, and write results.csv, results.md and plots to ``out``. Returns the rows (the
    original model first)."""
    variants = [parse_variant(spec, seed, router) for spec in methods]
    if not variants or not experts:
        raise MoemergeError("give at least one --methods variant and one --experts count")
    check_evaluation(data, max_tokens, seq_len, tasks, limit, tasks_source, batch_size)
    check_spec(calib)
    check_output(out, force, reads=(model, calib, data))
    out = Path(out)
    source = inspect_source(model, allow_pickle=allow_pickle)
    check_tokenizer_for_tasks(source, tasks)
    check_uniform_source(source.path)
    config = AutoConfig.from_pretrained(source.path)
    check_calibration_size(calib_samples, calib_seq_len, config.max_position_embeddings)
    n = source.family.num_experts(config)
    for r in experts:
        target_experts(n, r, None)
        for v in variants:
            check_budget(source.family, config, r, v.options.budget, router)
            check_method(source.family, config, r, v.options)
    calibrating = (calib, calib_samples, calib_seq_len, seed)
    windows = (data, max_tokens, seq_len)
    whole = whole_model_reason([source], tasks)
    with atomic_output(out, force) as tmp:
        if whole is None:
            rows, text = _grid_layer_by_layer(
                source, config, variants, experts, calibrating, windows, dtype, device, progress
            )
        else:
            log.info("%s: loading the whole model", whole)
            evaluation = (tasks, limit, tasks_source, batch_size)
            rows, text = _grid_whole(
                source, config, variants, experts, calibrating, windows, evaluation, dtype, device, progress
            )
        write_csv(rows, tmp / "results.csv")
        (tmp / "results.md").write_text(
            markdown_table(rows, model, text.spec, text.num_tokens, router), encoding="utf-8"
        )
        plot(rows, "perplexity", "perplexity", tmp / "perplexity.png", log=True)
        if "average_accuracy" in rows[0]:
            plot(rows, "average_accuracy", "average zero-shot accuracy", tmp / "accuracy.png")
    return rows


def _tokens(model, tokenizer, calibrating: tuple, windows: tuple):
    """(the calibration set, the evaluation text, its windows) for ``model`` (loaded, or a skeleton): ``calibrating``
    is (calib, samples, seq_len, seed), ``windows`` (data, max_tokens, seq_len)."""
    calib, samples, seq_len, seed = calibrating
    vocab = model.get_input_embeddings().num_embeddings
    calibration = load_calibration(calib, tokenizer, samples, seq_len, seed, vocab)
    text, _, chunks = evaluation_windows(model, tokenizer, *windows)
    return calibration, text, chunks


def _grid_layer_by_layer(source, config, variants, experts, calibrating, windows, dtype, device, progress):
    """(the grid's rows, the evaluation tokens), reading the model one decoder layer at a time: one pass collects
    the calibration statistics, a second measures the original and every cell, each cell's layer reduced from the
    original's as the pass reaches it (:mod:`moemerge.streaming.measure`)."""
    family, n = source.family, source.family.num_experts(config)
    stream = LayerStream(source, config, dtype, device)
    calibration, text, chunks = _tokens(stream.skeleton, load_tokenizer(source), calibrating, windows)
    needs = statistics_needs([v.options for v in variants])
    with phase(f"statistics of {len(stream.views)} MoE layers on {calibration.num_tokens:,} calibration tokens"):
        stats = layer_statistics(stream, stream.views, [calibration.sequences], needs, progress)[0]
    cells, timing = {}, {}
    for r in experts:
        for variant in variants:
            start = time.perf_counter()
            groups = plan_groups(stats, family, config, r, variant.options)
            cell = ReducedLayers(stream, stats, groups, variant.options)
            cells[variant.spec, r] = Candidate(layer=cell.make)
            timing[variant.spec, r] = (cell, time.perf_counter() - start)
    hidden = stream.skeleton.get_input_embeddings().embedding_dim
    per_pass = cells_per_pass(sum(len(c) for c in chunks), hidden, stream.compute, len(cells))
    names, measured = list(cells), {}
    passes = range(0, len(names), per_pass)
    if len(passes) > 1:
        log.info(
            "the evaluation activations of %d reductions do not fit in memory at once: measuring them in %d passes "
            "over the layers, %d at a time",
            len(names),
            len(passes),
            per_pass,
        )
    for first in passes:
        batch = {name: cells[name] for name in names[first : first + per_pass]}
        with phase(f"measuring the original and {len(batch)} reductions, one decoder layer at a time"):
            original, part, _ = measure_layer_by_layer(stream, family, chunks, batch, progress=progress)
        measured |= part
    rows = [row_of("original", n, n, [n] * len(stream.views), original, original["parameters"], 0)]
    for (spec, r), result in measured.items():
        cell, planning = timing[spec, r]
        counts = [len(cell.groups[layer]) for layer in sorted(stream.views)]
        rows.append(row_of(spec, r, n, counts, result, result["parameters"], planning + cell.seconds))
    return rows, text


def _grid_whole(source, config, variants, experts, calibrating, windows, evaluation, dtype, device, progress):
    """(the grid's rows, the evaluation tokens), the model loaded whole and each cell a reduced copy of it."""
    family, n = source.family, source.family.num_experts(config)
    loaded, tokenizer = load_source(source, dtype=dtype, device=device)
    stored = compute_in_fastest(loaded)
    layers = family.moe_layers(loaded)
    calibration, text, chunks = _tokens(loaded, tokenizer, calibrating, windows)
    needs = statistics_needs([v.options for v in variants])
    stats = collect_statistics(loaded, layers, calibration.sequences, needs, progress=progress)
    baseline = measure(loaded, tokenizer, family, chunks, None, *evaluation)
    rows = [row_of("original", n, n, [n] * len(layers), baseline, sum(p.numel() for p in loaded.parameters()), 0)]
    for r in experts:
        for variant in variants:
            start = time.perf_counter()
            reduced, groups = reduce_variant(loaded, family, config, stats, variant.options, r, stored)
            seconds = time.perf_counter() - start
            result = measure(reduced, tokenizer, family, chunks, loaded, *evaluation, False)
            counts = [len(groups[view.layer]) for view in layers]
            params = sum(p.numel() for p in reduced.parameters())
            rows.append(row_of(variant.spec, r, n, counts, result, params, seconds))
            del reduced
    return rows, text


def cells_per_pass(tokens: int, hidden: int, dtype: torch.dtype, cells: int) -> int:
    """How many grid cells one pass over the layers measures: each carries ``tokens`` x ``hidden`` activations in
    ``dtype`` beside the reference's three (:mod:`moemerge.streaming.measure`), within half of the memory available
    now; at least one."""
    each = tokens * hidden * dtype.itemsize
    budget = psutil.virtual_memory().available // 2
    return max(1, min(cells, budget // each - 3))


class ReducedLayers:
    """A compare cell read one decoder layer at a time: each MoE layer a copy of the original's reduced to its
    groups, as :func:`reduce_variant` reduces the whole model (merged, rounded to the stored dtypes, compressed for
    mc-smoe, the ``router`` mode installed); :meth:`make` is a :data:`moemerge.streaming.measure.LayerMaker`.
    ``seconds``: the time spent reducing so far."""

    def __init__(self, stream: LayerStream, stats: dict, groups: dict, options: ReduceOptions):
        self.stream, self.stats, self.groups, self.options = stream, stats, groups, options
        self.seconds = 0.0

    @contextmanager
    def make(self, index: int, original, stored: dict):
        """(a reduced copy of the original decoder layer ``index``, its MoE block or None)."""
        view = self.stream.views.get(index)
        if view is None:
            yield original, None
            return
        start = time.perf_counter()
        layer = copy.deepcopy(original)
        path = next(name for name, module in original.named_modules() if module is view.block)
        own = MoELayerView(index, layer.get_submodule(path), view.routing)
        o, groups = self.options, self.groups[index]
        router = merge_layer(own, groups, self.stats[index], *o.merging, o.align, o.refit, o.router)
        to_storage(layer, stored)
        router = stored_router(router, own)  # the novices too, as reduce stores them
        if resolve("method", o.method).compresses:
            compress_experts([own], compression_rank(own, o.rank, o.sparsity, o.param_budget), o.sparsity)
        to_compute(layer, self.stream.compute)
        if o.router == "grouped":
            top_k = self.stream.family.routing_rule(self.stream.skeleton.config).top_k
            install_grouped_routers([own], {index: router}, {index: groups}, top_k)
        self.seconds += time.perf_counter() - start
        yield layer, own.block


def reduce_variant(model, family, config, stats: dict, options: ReduceOptions, r: int, stored_dtypes=None):
    """(a reduced deep copy of ``model``, its groups): reduced with ``options`` to ``r`` experts per layer (on
    average, for a non-uniform budget) from the calibration statistics ``stats``, its router mode installed.

    ``stored_dtypes``: the dtypes the model's tensors are stored in, when it computes in another
    (:func:`moemerge.precision.compute_in_fastest`): the reduced weights are rounded to them, as ``reduce`` writes
    them, and the copy computes in the model's dtype again."""
    compute = model.dtype
    reduced = copy.deepcopy(model)
    groups = plan_groups(stats, family, config, r, options)
    o = options
    originals = apply_groups(reduced, family, stats, groups, *o.merging, align=o.align, refit=o.refit, router=o.router)
    layers = family.moe_layers(reduced)
    if stored_dtypes:
        to_storage(reduced, stored_dtypes)
        originals = {view.layer: stored_router(originals[view.layer], view) for view in layers}
    if resolve("method", options.method).compresses:
        rank = compression_rank(layers[0], options.rank, options.sparsity, options.param_budget)
        compress_experts(layers, rank, options.sparsity)
    if stored_dtypes:
        to_compute(reduced, compute)
    if options.router == "grouped":
        install_grouped_routers(layers, originals, groups, family.routing_rule(config).top_k)
    return reduced, groups


def row_of(method: str, r: int, n: int, counts: list[int], result: dict, params: int, seconds: float) -> dict:
    """One flat results row."""
    row = {
        "method": method,
        "experts": r,
        "fraction_kept": r / n,
        "experts_per_layer": "/".join(map(str, counts)),
        "perplexity": result["perplexity"]["perplexity"],
    }
    if "fidelity" in result:
        fid = result["fidelity"]
        errors = [e["relative_error"] for e in fid["moe_layers"]]
        row |= {
            "hidden_relative_l2": fid["last_hidden"]["relative_l2"],
            "hidden_cosine": fid["last_hidden"]["cosine"],
            "moe_relative_error_mean": sum(errors) / len(errors),
        }
    else:
        row |= {"hidden_relative_l2": 0.0, "hidden_cosine": 1.0, "moe_relative_error_mean": 0.0}
    scores = result.get("zero_shot", {})
    row |= {task: s["acc"] for task, s in scores.items() if task != "average"}
    if "average" in scores:
        row["average_accuracy"] = scores["average"]["acc"]
    return row | {"parameters": params, "seconds": seconds}


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], model, spec: str, tokens: int, router: str) -> str:
    """Rows grouped by expert count, zero-shot accuracies then their average, perplexity and fidelity."""
    tasks = [k for k in rows[0] if k not in ROW_KEYS]
    average = "average_accuracy" in rows[0]
    head = ["method", "experts", *tasks, *(["average"] if average else []), "perplexity", "hidden cos", "MoE rel. err"]
    lines = [
        f"Model {model}; perplexity and fidelity on {tokens:,} tokens of {spec}; router {router}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        uniform = len(set(row["experts_per_layer"].split("/"))) == 1
        cells = [row["method"], str(row["experts"]) if uniform else f"{row['experts']} ({row['experts_per_layer']})"]
        cells += [f"{row[t]:.4f}" for t in tasks] + ([f"{row['average_accuracy']:.4f}"] if average else [])
        cells += [f"{row['perplexity']:.2f}", f"{row['hidden_cosine']:.4f}", f"{row['moe_relative_error_mean']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


ROW_KEYS = (
    "method",
    "experts",
    "fraction_kept",
    "experts_per_layer",
    "perplexity",
    "hidden_relative_l2",
    "hidden_cosine",
    "moe_relative_error_mean",
    "average_accuracy",
    "parameters",
    "seconds",
)


def plot(rows: list[dict], key: str, label: str, path: Path, log: bool = False) -> None:
    """``key`` against the fraction of experts kept, one line per method, the original as a reference line."""
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    original = rows[0]
    for method in dict.fromkeys(row["method"] for row in rows[1:]):
        points = sorted((row["fraction_kept"], row[key]) for row in rows[1:] if row["method"] == method)
        ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.axhline(original[key], color="black", linestyle="--", linewidth=1, label="original")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("fraction of experts kept")
    ax.set_ylabel(label)
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
