"""The whole HC-SMoE pipeline on a model in memory, calibration -> statistics -> grouping -> merging -> routing ->
checkpoint (:func:`reduce_in_memory`); ``moemerge reduce`` runs it one layer at a time (:mod:`moemerge.streaming`).

The steps are public functions too (:func:`prepare`, :func:`plan`, :func:`write_reduced`, which recipes reuse;
:func:`plan_groups`, :func:`apply_groups`) so that a loaded model can be reduced in memory, e.g. in tests.
"""

from __future__ import annotations

import inspect
import platform
import time
import typing
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from moemerge.adapters import MoEFamily, MoELayerView
from moemerge.calibration import CalibrationSet, check_calibration_size, check_spec, load_calibration
from moemerge.checkpoint import inspect_source, load_source, write_checkpoint
from moemerge.checkpoint.identity import model_identity
from moemerge.checkpoint.source import (
    LOWRANK_FILE,
    SIDECAR,
    SourceModel,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    stored_expert_counts,
)
from moemerge.checkpoint.writer import copied_files
from moemerge.defaults import CALIB_SAMPLES, CALIB_SEQ_LEN, OPRUNE_BUDGET
from moemerge.distributed import barrier, is_writer
from moemerge.errors import MoemergeError
from moemerge.grouping import BUDGETS, KMEANS_INITS, METRICS, SoftGroups, check_linkage, layer_budgets
from moemerge.merging import (
    align_groups,
    factor_count,
    low_rank_plus_sparse,
    match_groups,
    member_weights,
    merge_experts,
    rank_for_budget,
    reconstruct,
    routed_tokens,
)
from moemerge.methods import (
    COMPRESSING_METHODS,
    NEEDS_EXPERT_OUTPUTS,
    PRUNING_METHODS,
    MethodOptions,
    method_options,
)
from moemerge.output_files import atomic_output, check_output
from moemerge.precision import compute_dtype, describe, dtype_name, model_dtype, to_compute, to_storage
from moemerge.progress import log, phase
from moemerge.registry import check_choice, resolve
from moemerge.routing import router_rows as build_router_rows
from moemerge.statistics import LayerStatistics, collect_statistics

ROUTER_MODES = ("reduce", "grouped")
ROUTER_SAMPLE_TOKENS = 8192
OUTPUT_SAMPLE_TOKENS = 512
DEFAULT_SPARSITY = 0.9  # MC-SMoE: share of each compressed matrix's low-rank residual set to zero
# the LayerStatistics field [n] a non-uniform budget shares the experts by
BUDGET_SCORES = {"frequency": "counts", "probability": "prob_sum"}
NOT_OPTIONS = ("model", "out", "force", "allow_pickle", "progress", "load")  # prepare's arguments a recipe omits


@dataclass
class ReduceResult:
    """What a reduction did: where, which groups per decoder layer, and the size change.

    stored_params: for mc-smoe, the parameters if the compressed experts are kept as their
    low-rank and sparse factors (params_after counts them as the dense matrices written).
    """

    out: Path
    groups: dict[int, list[list[int]]]
    num_experts: int
    experts: int
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    calibration_tokens: int
    seconds: float
    stored_params: int | None = None


def target_experts(n: int, experts: int | None, ratio: float | None) -> int:
    """r from ``--experts R`` or ``--ratio F`` (fraction kept, rounded); 1 <= r < n."""
    if (experts is None) == (ratio is None):
        raise MoemergeError("give exactly one of --experts R or --ratio F")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise MoemergeError(f"--ratio {ratio} must be a fraction of experts kept, between 0 and 1")
        experts = max(1, round(ratio * n))
        if experts >= n:
            raise MoemergeError(f"--ratio {ratio} keeps all {n} experts per layer (rounded): nothing to reduce")
    if experts < 1:
        raise MoemergeError(f"--experts {experts} must be at least 1")
    if experts >= n:
        raise MoemergeError(f"--experts {experts} must be below the model's {n} experts per layer: nothing to reduce")
    return experts


def plan_groups(
    stats: dict[int, LayerStatistics],
    family: MoEFamily,
    config,
    r: int,
    method: str = "hc-smoe",
    linkage: str = "average",
    router: str = "reduce",
    oprune_budget: int = OPRUNE_BUDGET,
    seed: int = 0,
    options: MethodOptions | None = None,
    budget: str = "uniform",
) -> dict[int, list[list[int]]]:
    """Groups of original expert ids per decoder layer by the method named ``method``: r per layer, or
    r on average with a non-uniform ``budget`` (:mod:`moemerge.grouping.budgets`).

    ``options`` gives every method option at once; without it, ``linkage``, ``oprune_budget`` and
    ``seed`` are used with the other defaults. A layer whose budget keeps all its experts gets
    one-member groups.
    """
    choose = resolve("method", method)
    options = options or MethodOptions(linkage=linkage, oprune_budget=oprune_budget, seed=seed)
    kept = experts_per_layer(stats, family, config, r, budget, router)
    n = family.num_experts(config)
    plan = {}
    for layer, layer_stats in stats.items():
        if kept[layer] == n:
            plan[layer] = [[j] for j in range(n)]
            continue
        blocks = family.partitions(config, kept[layer], check_top_k=router == "reduce")
        parts = [choose(layer_stats, ids, share, options) for ids, share in blocks]
        if isinstance(parts[0], SoftGroups):
            plan[layer] = SoftGroups.concat(parts)
        else:
            plan[layer] = sorted(g for part in parts for g in part)
    return plan


def experts_per_layer(
    stats: dict[int, LayerStatistics], family: MoEFamily, config, r: int, budget: str, router: str = "reduce"
) -> dict[int, int]:
    """How many experts each MoE layer keeps under ``budget`` (r each for ``uniform``)."""
    check_budget(family, config, r, budget, router)
    if budget == "uniform":
        return dict.fromkeys(stats, r)
    score = {layer: getattr(s, BUDGET_SCORES[budget]) for layer, s in stats.items()}
    return layer_budgets(score, r, family.routing_rule(config).top_k)


def check_budget(family: MoEFamily, config, r: int, budget: str, router: str = "reduce") -> None:
    """Raise MoemergeError unless the family's router allows r experts per layer under ``budget``."""
    check_choice("budget", budget, BUDGETS)
    if budget == "uniform":
        family.partitions(config, r, check_top_k=router == "reduce")
        return
    top_k = family.routing_rule(config).top_k
    if len(family.partitions(config, family.num_experts(config), check_top_k=False)) > 1:
        raise MoemergeError(
            f"--budget {budget} would give DeepSeek's routing groups different expert counts, which group-limited "
            "routing (n_group > 1) cannot hold; use --budget uniform"
        )
    if r < top_k:
        raise MoemergeError(
            f"--budget {budget} keeps at least top-k ({top_k}) experts in every layer, so --experts {r} (the average) "
            f"must be at least {top_k}; use --budget uniform for fewer"
        )


def check_layer_groups(family: MoEFamily, config, groups: dict[int, list[list[int]]], router: str = "reduce") -> None:
    """Raise MoemergeError unless every layer's groups (e.g. a recipe's) are ones :func:`plan_groups` could have
    made: a count the family's router allows (the rule :func:`check_budget` applies to r), and no group that
    mixes two of the family's routing blocks, each block holding its share of the groups."""
    for layer, layer_groups in groups.items():
        try:
            blocks = family.partitions(config, len(layer_groups), check_top_k=router == "reduce")
        except MoemergeError as err:
            raise MoemergeError(f"layer {layer} has {len(layer_groups)} groups, which reduce refuses: {err}") from None
        block_of = {e: b for b, (ids, _) in enumerate(blocks) for e in ids}
        shares = [0] * len(blocks)
        for group in layer_groups:
            members = {block_of[e] for e in group}
            if len(members) > 1:
                raise MoemergeError(f"layer {layer}: group {list(group)} mixes routing blocks {sorted(members)}")
            shares[members.pop()] += 1
        if shares != [share for _, share in blocks]:
            raise MoemergeError(
                f"layer {layer} has {shares} groups in its routing blocks; the router needs {[s for _, s in blocks]}"
            )


def makes_soft_groups(method: str, options: MethodOptions) -> bool:
    """Whether ``method`` with ``options`` groups experts by memberships (fuzzy c-means)."""
    return method_options(method, options).cluster == "fcm" and method not in PRUNING_METHODS


def default_options() -> dict:
    """The defaults of :func:`prepare`'s options (its keyword arguments but NOT_OPTIONS)."""
    parameters = inspect.signature(prepare).parameters.values()
    return {p.name: p.default for p in parameters if p.name not in NOT_OPTIONS}


def check_option_types(options: dict) -> None:
    """Raise MoemergeError for an unknown option or one given a value of the wrong type (``options``: keyword
    arguments of :func:`prepare` but NOT_OPTIONS, e.g. a recipe's; ``True`` is not a number, 2 is a float)."""
    hints = typing.get_type_hints(prepare)
    for key, value in options.items():
        if key not in hints or key in NOT_OPTIONS:
            raise MoemergeError(f"unknown option {key!r}")
        allowed = typing.get_args(hints[key]) or (hints[key],)
        if not any(type(value) is t or (t is float and type(value) is int) for t in allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise MoemergeError(f"option {key} is {value!r}, not {names}")


@torch.no_grad()
def apply_groups(
    model: torch.nn.Module,
    family: MoEFamily,
    stats: dict[int, LayerStatistics],
    groups: dict[int, list[list[int]]],
    merge: str = "frequency",
    router_rows_rule: str = "frequency",
    progress: bool = False,
    align: bool = False,
) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Merge every MoE layer of ``model`` in place to its groups and give it an r-row router.

    ``router_rows_rule`` defaults to "frequency" here because "lse" (the default of :func:`reduce_in_memory`)
    needs statistics collected with ``router_sample > 0``, as do the merges fix-dom and zipit.
    ``align``: permute every member of a group to match its dominant member before merging (see
    :mod:`moemerge.merging.alignment`). Layers may have different group counts (``budget``); the
    config records the largest.

    Returns the original routers, per decoder layer (weight [n, H], selection bias [n] or None),
    which grouped routing keeps.
    """
    originals = {}
    for view in tqdm(family.moe_layers(model), desc="merging", unit="layer", disable=not progress):
        originals[view.layer] = merge_layer(view, groups[view.layer], stats[view.layer], merge, router_rows_rule, align)
    family.set_num_experts(model, max(len(g) for g in groups.values()))
    return originals


@torch.no_grad()
def merge_layer(
    view: MoELayerView,
    groups: list[list[int]],
    stats: LayerStatistics,
    merge: str = "frequency",
    router_rows_rule: str = "frequency",
    align: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge one MoE layer in place to ``groups`` and give it a router with a row per group (see
    :func:`apply_groups`). Returns its original router: weight [n, H] and selection bias [n] or None."""
    rule = resolve("merge", merge)
    bias = view.selection_bias
    original = (view.router_weight.detach().clone(), None if bias is None else bias.clone())
    weights = view.expert_weights()
    if align:
        if isinstance(groups, SoftGroups):
            raise ValueError("alignment permutes each expert towards one group; soft groups share every expert")
        weights = align_groups(*weights, groups, stats.counts)
    alphas = member_weights(merge, stats, groups)
    units = None
    if rule.match is not None:
        inputs = stats.router_inputs
        if inputs is None:
            raise ValueError(f"--merge {merge} needs router inputs sampled during calibration (router_sample > 0)")
        routed = routed_tokens(view.routing, view.router_weight, bias, inputs)
        units = match_groups(rule.match, weights, groups, alphas, view.act_fn, inputs, routed)
    merged = merge_experts(weights, groups, alphas, units)
    weight, new_bias = build_router_rows(router_rows_rule, view.router_weight, bias, groups, stats)
    view.set_experts(*merged)
    view.set_router(weight, new_bias)
    return original


@torch.no_grad()
def compress_experts(
    layers: list[MoELayerView], rank: int, sparsity: float, progress: bool = False
) -> tuple[dict[str, torch.Tensor], int]:
    """Replace every expert matrix of ``layers`` by its low-rank plus sparse reconstruction, in place.

    Returns the factors (for ``moemerge_lowrank.safetensors``, keyed ``layers.{l}.experts.{e}.{gate|up|down}.{left|right|indices|values}``)
    and by how many numbers the factors are smaller than the dense matrices they replace.
    """
    factors, saved = {}, 0
    for view in tqdm(layers, desc="compressing", unit="layer", disable=not progress):
        rebuilt = []
        for name, weights in zip(("gate", "up", "down"), view.expert_weights(), strict=True):
            out = torch.empty_like(weights)
            for e in range(view.num_experts):
                # stored in the model's dtype (indices as int32), and the dense matrix rebuilt from what is stored
                left, right, indices, values = low_rank_plus_sparse(weights[e], rank, sparsity)
                left, right, values = (t.to(weights.dtype) for t in (left, right, values))
                indices = indices.to(torch.int32)
                out[e] = reconstruct(left, right, indices.long(), values, tuple(weights[e].shape)).to(out)
                key = f"layers.{view.layer}.experts.{e}.{name}"
                factors |= {
                    f"{key}.left": left,
                    f"{key}.right": right,
                    f"{key}.indices": indices,
                    f"{key}.values": values,
                }
                saved += weights[e].numel() - factor_count(left, right, values)
            rebuilt.append(out)
        view.set_experts(*rebuilt)
    return factors, saved


def statistics_needs(variants: list[tuple[str, MethodOptions, str, str]]) -> dict:
    """The optional parts of :func:`collect_statistics` that the (method, options, merge, router rows) of
    ``variants`` use, as its keyword arguments: sampled router inputs (lse rows, fix-dom / zipit, o-prune),
    sampled expert outputs (o-prune), all router logits or the weight Gram matrix (clustering metrics)."""
    outputs = any(method in NEEDS_EXPERT_OUTPUTS for method, *_ in variants)
    sample = outputs or any(rows == "lse" or resolve("merge", merge).match is not None for *_, merge, rows in variants)
    metrics = {method_options(m, o).metric for m, o, *_ in variants if m not in PRUNING_METHODS}
    return {
        "router_sample": ROUTER_SAMPLE_TOKENS if sample else 0,
        "output_sample": OUTPUT_SAMPLE_TOKENS if outputs else 0,
        "keep_router_logits": "router-logits" in metrics,
        "weight_gram": "weight" in metrics,
    }


def check_combination(method: str, options: MethodOptions, router: str, align: bool) -> None:
    """Raise MoemergeError for a router mode or ``align`` that the method (with its options) cannot use."""
    if router not in ROUTER_MODES:
        raise MoemergeError(f"unknown router mode {router!r}; choose one of: {', '.join(ROUTER_MODES)}")
    if router == "grouped" and method in PRUNING_METHODS:
        raise MoemergeError(
            f"--method {method} keeps whole experts, and --router reduce already routes exactly as the pruned "
            "model (dropped experts masked out); use --router reduce"
        )
    soft = makes_soft_groups(method, options)
    if soft and router == "grouped":
        raise MoemergeError(
            "--cluster fcm puts every expert in every group by a membership, and grouped routing needs each expert "
            "in one group; use --router reduce"
        )
    if soft and align:
        raise MoemergeError(
            "--align permutes each expert towards its one group's dominant expert, but --cluster fcm puts every "
            "expert in every group; drop --align (fix-dom and zipit match neurons per group by themselves)"
        )


def check_uniform_source(path: Path) -> None:
    """Raise MoemergeError for a model whose layers hold different expert counts (a ``--budget`` output)."""
    if stored_expert_counts(path) is not None:
        raise MoemergeError(
            f"{path} has a different number of experts in each layer (a --budget output); reduce the "
            "original model instead"
        )


def compression_rank(view: MoELayerView, rank: int | None, sparsity: float, param_budget: float | None) -> int:
    """MC-SMoE's rank: ``rank``, the largest within ``param_budget``, or by default I/4."""
    shape = tuple(view.block.experts.down_proj.shape[1:])  # [H, I]; gate and up are [I, H]: same size and a + b
    if param_budget is None:
        return rank or shape[1] // 4
    fitting = rank_for_budget(shape, sparsity, param_budget)
    if fitting < 1:
        raise MoemergeError(
            f"--param-budget {param_budget} is too small: at --sparsity {sparsity} the residual alone takes "
            f"{1 - sparsity:.3g} of each matrix and rank 1 another {sum(shape) / (shape[0] * shape[1]):.3g}; raise "
            "--param-budget or --sparsity"
        )
    return fitting


@dataclass
class Prepared:
    """Everything :func:`reduce_in_memory` knows after calibration, before it groups experts: the checked options, the
    source model and its identity (:func:`moemerge.checkpoint.identity.model_identity`), the loaded model (held in
    ``compute_dtype``; ``stored_dtypes`` are its tensors' dtypes on disk, see :mod:`moemerge.precision`) and its
    calibration statistics."""

    model_arg: str | Path
    options: dict
    source: SourceModel
    identity: dict
    config: PretrainedConfig
    loaded: torch.nn.Module | None
    calibration: CalibrationSet
    layers: list[MoELayerView]
    stats: dict[int, LayerStatistics]
    r: int
    rank: int | None
    compute_dtype: torch.dtype
    stored_dtypes: dict[str, torch.dtype]
    start: float


def prepare(
    model: str | Path,
    out: str | Path | None,
    *,
    experts: int | None = None,
    ratio: float | None = None,
    method: str = "hc-smoe",
    metric: str = "expert-output",
    distance: str = "euclidean",
    cluster: str = "hierarchical",
    linkage: str = "average",
    kmeans_init: str = "first",
    merge: str = "frequency",
    align: bool = False,
    rank: int | None = None,
    sparsity: float = DEFAULT_SPARSITY,
    param_budget: float | None = None,
    router: str = "reduce",
    router_rows: str = "lse",
    oprune_budget: int = OPRUNE_BUDGET,
    budget: str = "uniform",
    calib: str | None = None,
    calib_samples: int = CALIB_SAMPLES,
    calib_seq_len: int = CALIB_SEQ_LEN,
    device: str = "cpu",
    dtype: str = "auto",
    seed: int = 0,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    load: bool = True,
) -> Prepared:
    """Check every option (and ``out``, unless None), load the model and collect its calibration statistics.

    The keyword arguments are :func:`reduce_in_memory`'s; they are kept (without force, allow_pickle, progress, load) as
    ``Prepared.options``, which is what a recipe records. ``load=False`` stops after the checks and the
    calibration tokens (``loaded`` None, no layers or statistics, ``rank`` unresolved): the streaming path
    loads one layer at a time itself.
    """
    recorded = {k: v for k, v in locals().items() if k not in NOT_OPTIONS}
    check_option_types(recorded)
    start = time.perf_counter()
    for kind, name in (("method", method), ("cluster", cluster), ("merge", merge), ("router-rows", router_rows)):
        resolve(kind, name)
    check_linkage(linkage, distance)
    check_choice("metric", metric, METRICS)
    check_choice("k-means init", kmeans_init, KMEANS_INITS)
    options = method_options_of(recorded)
    check_combination(method, options, router, align)
    if oprune_budget < 1:
        raise MoemergeError(f"--oprune-budget {oprune_budget} must be at least 1")
    if (rank is not None and rank < 1) or not 0 <= sparsity <= 1:
        raise MoemergeError(f"--rank ({rank}) must be at least 1 and --sparsity ({sparsity}) between 0 and 1")
    if param_budget is not None and (rank is not None or not 0 < param_budget <= 1):
        raise MoemergeError(
            f"--param-budget {param_budget} must be a fraction in (0, 1] of each merged matrix's size, and replaces "
            "--rank: give one of them"
        )
    storage_option, dev = resolve_dtype(dtype), resolve_device(device)
    check_spec(calib)
    source = inspect_source(model, allow_pickle=allow_pickle)
    if out is not None:
        check_output(out, force, reads=(model, calib))
        copied_files(source.path)
    check_uniform_source(source.path)
    config = AutoConfig.from_pretrained(source.path)
    n = source.family.num_experts(config)
    r = target_experts(n, experts, ratio)
    check_budget(source.family, config, r, budget, router)
    check_calibration_size(calib_samples, calib_seq_len, config.max_position_embeddings)
    identity = model_identity(source, config)
    storage = model_dtype(config, storage_option)
    compute = compute_dtype(storage, dev)
    log.info(describe(storage, compute))

    if not load:
        calibration = load_calibration(
            calib, load_tokenizer(source), calib_samples, calib_seq_len, seed, config.get_text_config().vocab_size
        )
        return Prepared(
            model, recorded, source, identity, config, None, calibration, [], {}, r, rank, compute, {}, start
        )
    with phase(f"loading {source.path}"):
        loaded, tokenizer = load_source(source, dtype=dtype, device=device)
        stored = to_compute(loaded, compute)
    vocab_size = loaded.get_input_embeddings().num_embeddings
    calibration = load_calibration(calib, tokenizer, calib_samples, calib_seq_len, seed, vocab_size)
    layers = source.family.moe_layers(loaded)
    if not layers:
        raise MoemergeError(f"{source.path} has no MoE layers (every layer is dense): nothing to reduce")
    if method in COMPRESSING_METHODS:
        rank = compression_rank(layers[0], rank, sparsity, param_budget)
    needs = statistics_needs([(method, options, merge, router_rows)])
    with phase(f"statistics of {len(layers)} MoE layers on {calibration.num_tokens:,} calibration tokens"):
        stats = collect_statistics(loaded, layers, calibration.sequences, progress=progress, **needs)
    return Prepared(
        model, recorded, source, identity, config, loaded, calibration, layers, stats, r, rank, compute, stored, start
    )


def plan(run: Prepared) -> dict[int, list[list[int]]]:
    """The groups per decoder layer that :func:`reduce_in_memory` would use for a prepared run."""
    o = run.options
    with phase(f"grouping ({o['method']})"):
        return plan_groups(
            run.stats,
            run.source.family,
            run.config,
            run.r,
            o["method"],
            router=o["router"],
            options=method_options_of(o),
            budget=o["budget"],
        )


def method_options_of(options: dict) -> MethodOptions:
    """The :class:`MethodOptions` in a dict of :func:`prepare`'s keyword arguments."""
    return MethodOptions(**{f.name: options[f.name] for f in fields(MethodOptions)})


def reduce_in_memory(
    model: str | Path, out: str | Path, *, force: bool = False, progress: bool = True, report: bool = True, **options
) -> ReduceResult:
    """Reduce every MoE layer of the model in directory ``model``, loaded whole, to r experts and write it to
    ``out`` (what :func:`moemerge.streaming.reduce` does for pickle weights, which cannot be read one layer at a
    time).

    Give ``experts`` (r) or ``ratio`` (fraction kept); with a non-uniform ``budget`` r is the average
    over layers and the output needs :func:`moemerge.load_model` (a standard config holds one count).
    The options are :func:`prepare`'s (see ``moemerge reduce --help``); all input is checked before any
    work, and ``out`` appears only when complete. ``report``: also write ``out/report/`` (see
    :func:`moemerge.report.write_report`), with the chosen groups on the dendrograms.
    """
    run = prepare(model, out, force=force, progress=progress, **options)
    return write_reduced(run, plan(run), out, force, progress, report)


def write_reduced(
    run: Prepared,
    groups: dict[int, list[list[int]]],
    out: str | Path,
    force: bool = False,
    progress: bool = True,
    report: bool = True,
) -> ReduceResult:
    """Merge a prepared run's model to ``groups`` (compress, keep grouped routers) and write it to ``out``, with
    a report of the original model and the groups in ``out/report/`` when ``report``."""
    o, loaded, layers, stats, source = run.options, run.loaded, run.layers, run.stats, run.source
    if report:
        from moemerge.report import architecture

        original = architecture(str(run.model_arg), loaded, source.family, run.config)
    method, sparsity = o["method"], o["sparsity"]
    params_before = sum(p.numel() for p in loaded.parameters())
    with phase(f"merging ({o['merge']})"):
        originals = apply_groups(
            loaded, source.family, stats, groups, o["merge"], o["router_rows"], progress, o["align"]
        )
        to_storage(loaded, run.stored_dtypes)

    stored_params = compression = None
    if method in COMPRESSING_METHODS:
        with phase(f"compressing (rank {run.rank}, sparsity {sparsity})"):
            lowrank, saved = compress_experts(layers, run.rank, sparsity, progress)
        stored_params = sum(p.numel() for p in loaded.parameters()) - saved
        compression = compression_record(run, stored_params)

    tensor_files = {LOWRANK_FILE: lowrank} if compression else {}
    if o["router"] == "grouped":
        tensor_files[SIDECAR] = router_tensors(
            {view.layer: stored_router(originals[view.layer], view) for view in layers}
        )
    meta = reduction_metadata(run, groups, stats, compression)
    if is_writer():
        with atomic_output(out, force) as tmp:
            with phase(f"writing {out}"):
                write_checkpoint(loaded, source.path, tmp, meta, tensor_files)
            if report:
                write_reduce_report(tmp, run, original, groups, stats, progress)
    barrier()
    return ReduceResult(
        out=Path(out),
        groups=groups,
        num_experts=source.family.num_experts(run.config),
        experts=run.r,
        params_before=params_before,
        params_after=sum(p.numel() for p in loaded.parameters()),
        bytes_before=sum(f.stat().st_size for f in source.weight_files),
        bytes_after=sum(f.stat().st_size for f in Path(out).glob("*.safetensors")),
        calibration_tokens=run.calibration.num_tokens,
        seconds=time.perf_counter() - run.start,
        stored_params=stored_params,
    )


def compression_record(run: Prepared, stored_params: int) -> dict:
    """What ``moemerge.json`` says about mc-smoe's low-rank compression."""
    o = run.options
    return {
        "rank": run.rank,
        "sparsity": o["sparsity"],
        "param_budget": o["param_budget"],
        "stored_parameters": stored_params,
        "file": LOWRANK_FILE,
    }


def stored_router(original: tuple[torch.Tensor, torch.Tensor | None], view: MoELayerView) -> tuple:
    """An original router (weight, selection bias or None) in the dtypes of the view's router once it is back in
    its storage dtypes (:func:`moemerge.precision.to_storage`)."""
    weight, bias = original
    return weight.to(view.router_weight.dtype), None if bias is None else bias.to(view.selection_bias.dtype)


def router_tensors(originals: dict[int, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """The original routers that ``--router grouped`` keeps, as the tensors of its sidecar file."""
    routers = {f"layers.{layer}.weight": w for layer, (w, _) in originals.items()}
    return routers | {
        f"layers.{layer}.e_score_correction_bias": b for layer, (_, b) in originals.items() if b is not None
    }


def reduction_metadata(
    run: Prepared, groups: dict[int, list[list[int]]], stats: dict[int, LayerStatistics], compression: dict | None
) -> dict:
    """``moemerge.json``: method, options, source, calibration, package versions and the layers' groups."""
    o, source = run.options, run.source
    effective = method_options(o["method"], method_options_of(o))
    parameters = {
        "experts": run.r,
        "ratio": o["ratio"],
        "metric": effective.metric,
        "distance": effective.distance,
        "cluster": effective.cluster,
        "linkage": o["linkage"],
        "kmeans_init": o["kmeans_init"],
        "merge": o["merge"],
        "align": o["align"],
        "rank": run.rank,
        "sparsity": o["sparsity"],
        "param_budget": o["param_budget"],
        "router_rows": o["router_rows"],
        "oprune_budget": o["oprune_budget"],
        "budget": o["budget"],
        "calib": o["calib"],
        "calib_samples": o["calib_samples"],
        "calib_seq_len": o["calib_seq_len"],
        "dtype": o["dtype"],
        "device": o["device"],
        "seed": o["seed"],
    }
    meta = {
        "format_version": 1,
        "method": o["method"],
        "router": o["router"],
        "parameters": parameters,
        "compute_dtype": dtype_name(run.compute_dtype),
        "source": {
            "path": str(run.model_arg),
            "model_type": run.config.model_type,
            "num_experts": source.family.num_experts(run.config),
            "top_k": source.family.routing_rule(run.config).top_k,
            "config_sha256": run.identity["config_sha256"],
            "weights_sha256": run.identity["weights_sha256"],
        },
        "calibration": {
            "spec": run.calibration.spec,
            "sequences": len(run.calibration.sequences),
            "tokens": run.calibration.num_tokens,
            "sha256": run.calibration.sha256(),
        },
        "versions": package_versions(),
        "layers": [layer_record(layer, groups[layer], stats[layer]) for layer in groups],
    }
    if compression:
        meta["compression"] = compression
    return meta


def write_reduce_report(
    out: Path, run: Prepared, original: dict, groups: dict, stats: dict[int, LayerStatistics], progress: bool
) -> None:
    """``out/report/``: the report of the original model (``original`` is its :func:`architecture`) with
    the chosen groups."""
    from moemerge.report import write_report

    title = f"moemerge reduce ({run.options['method']}, {run.r} of {run.source.family.num_experts(run.config)} experts)"
    with phase("report"):
        calibrated = {run.calibration.spec: stats}
        write_report(out / "report", original, calibrated, groups, run.options["linkage"], title, progress)


def layer_record(layer: int, groups: list[list[int]], stats: LayerStatistics) -> dict:
    """What ``moemerge.json`` says about one MoE layer: its groups, (for fcm) memberships, and expert frequencies."""
    record = {"layer": layer, "groups": [list(g) for g in groups], "frequency": stats.frequency.tolist()}
    if isinstance(groups, SoftGroups):
        record["memberships"] = [u.tolist() for u in groups.memberships]
    return record


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that shape the output."""
    names = ("moemerge", "torch", "transformers", "safetensors", "scipy", "scikit-learn", "scikit-fuzzy", "numpy")
    return {"python": platform.python_version()} | {name: metadata.version(name) for name in names}
