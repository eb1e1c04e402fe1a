"""The whole HC-SMoE pipeline on a model in memory, calibration -> statistics -> grouping -> merging -> routing ->
checkpoint (:func:`reduce_in_memory`); ``moemerge reduce`` runs it one layer at a time (:mod:`moemerge.streaming`).

The steps are public functions too (:func:`prepare`, :func:`plan`, :func:`write_reduced`, which recipes reuse;
:func:`plan_groups`, :func:`apply_groups`) so that a loaded model can be reduced in memory, e.g. in tests.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from moemerge.adapters import MoEFamily, MoELayerView
from moemerge.budget_search import layer_errors, searched_budgets
from moemerge.calibration import CalibrationSet, check_calibration_size, check_spec, load_calibration
from moemerge.checkpoint import inspect_source, load_source, write_checkpoint
from moemerge.checkpoint.identity import model_identity
from moemerge.checkpoint.model_files import is_compact
from moemerge.checkpoint.source import (
    FACTORS,
    LOWRANK_FILE,
    SIDECAR,
    SourceModel,
    factor_key,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    stored_expert_counts,
)
from moemerge.checkpoint.writer import copied_files
from moemerge.distributed import barrier, is_writer
from moemerge.errors import MoemergeError
from moemerge.grouping import BUDGETS, SoftGroups, layer_budgets
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
from moemerge.options import ReduceOptions
from moemerge.output_files import atomic_output, check_output
from moemerge.precision import compute_dtype, describe, dtype_name, model_dtype, to_compute, to_storage
from moemerge.progress import log, phase
from moemerge.registry import check_choice, resolve
from moemerge.routing import router_rows as build_router_rows
from moemerge.routing.grouped import KeptRouter, dropped_experts
from moemerge.statistics import LayerStatistics, collect_statistics

# the LayerStatistics field [n] a non-uniform budget shares the experts by
BUDGET_SCORES = {"frequency": "counts", "probability": "prob_sum"}


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
    options: ReduceOptions | str | None = None,
    **settings,
) -> dict[int, list[list[int]]]:
    """Groups of original expert ids per decoder layer by ``options.method``: r per layer, or r on average with a
    non-uniform ``options.budget`` (:mod:`moemerge.grouping.budgets`).

    ``options``: a :class:`ReduceOptions`, or its fields as keyword ``settings`` (e.g. ``method="f-prune"``; the
    method's name may also stand in ``options``' place). A layer whose budget keeps all its experts gets one-member
    groups.
    """
    if isinstance(options, str):
        options, settings = None, {"method": options} | settings
    if options is None:
        options = ReduceOptions.from_dict(settings)
    elif settings:
        raise TypeError("give options or their fields as keywords, not both")
    choose, effective = resolve("method", options.method), options.effective()
    kept = experts_per_layer(stats, family, config, r, options.budget, options.router)
    n = family.num_experts(config)
    plan = {}
    for layer, layer_stats in stats.items():
        if kept[layer] == n:
            plan[layer] = [[j] for j in range(n)]
            continue
        blocks = family.partitions(config, kept[layer], check_top_k=options.router == "reduce")
        parts = [choose(layer_stats, ids, share, effective) for ids, share in blocks]
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
    top_k = family.routing_rule(config).top_k
    if budget == "search":
        if any(s.budget_errors is None for s in stats.values()):
            raise MoemergeError(
                "--budget search needs every layer's budget_errors, which moemerge reduce computes "
                "(moemerge.budget_search.layer_errors)"
            )
        return searched_budgets({layer: s.budget_errors for layer, s in stats.items()}, r, top_k)
    score = {layer: getattr(s, BUDGET_SCORES[budget]) for layer, s in stats.items()}
    return layer_budgets(score, r, top_k)


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


def check_method(family: MoEFamily, config, r: int, options: ReduceOptions) -> None:
    """Raise MoemergeError if ``options.method`` cannot reduce every layer to r experts (its ``check``; uniform
    budgets only: other budgets' counts are known after calibration, where the method checks them itself)."""
    check = resolve("method", options.method).check
    if check is not None and options.budget == "uniform":
        check(family.partitions(config, r, check_top_k=options.router == "reduce"), options)


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
    refit: str = "none",
    router: str = "reduce",
) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Merge every MoE layer of ``model`` in place to its groups and give it an r-row router (``refit`` and
    ``router``: see :func:`merge_layer`).

    ``router_rows_rule`` defaults to "frequency" here because "lse" (the default of :func:`reduce_in_memory`)
    needs the router_inputs statistic, as do the merges fix-dom and zipit.
    ``align``: permute every member of a group to match its dominant member before merging (see
    :mod:`moemerge.merging.alignment`). Layers may have different group counts (``budget``); the
    config records the largest.

    Returns the original routers, per decoder layer (weight [n, H], selection bias [n] or None),
    which grouped routing keeps.
    """
    originals = {}
    for view in tqdm(family.moe_layers(model), desc="merging", unit="layer", disable=not progress):
        originals[view.layer] = merge_layer(
            view, groups[view.layer], stats[view.layer], merge, router_rows_rule, align, refit, router
        )
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
    refit: str = "none",
    router: str = "reduce",
) -> KeptRouter:
    """Merge one MoE layer in place to ``groups``, give it a router with a row per group (see
    :func:`apply_groups`), and ``refit`` its down projections for the ``router`` mode the output will route
    with (:mod:`moemerge.merging.refit`). Returns what grouped routing keeps: its original router, and with
    ``router`` grouped the novices of the experts in no group (their ``routed_mean_output``)."""
    rule = resolve("merge", merge)
    bias = view.selection_bias
    dropped = dropped_experts(groups, view.num_experts) if router == "grouped" else []
    novices = None
    if dropped:
        if stats.routed_mean_output is None:
            raise ValueError(
                f"grouped routing sends the tokens of experts {dropped} (in no group) to their novices, which need "
                "the routed_mean_output statistic: only a pruning method leaves experts out"
            )
        novices = stats.routed_mean_output[dropped].to(view.router_weight)
    original = KeptRouter(view.router_weight.detach().clone(), None if bias is None else bias.clone(), novices)
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
            raise ValueError(f"--merge {merge} needs router inputs sampled during calibration (router_inputs)")
        if rule.all_tokens:
            routed = torch.ones(len(inputs), view.num_experts, dtype=torch.bool)
        else:
            routed = routed_tokens(view.routing, view.router_weight, bias, inputs)
        units = match_groups(rule.match, weights, groups, alphas, view.gating, inputs, routed)
    merged = merge_experts(weights, groups, alphas, units)
    weight, new_bias = build_router_rows(router_rows_rule, view.router_weight, bias, groups, stats)
    view.set_experts(*merged)
    view.set_router(weight, new_bias)
    resolve("refit", refit)(view, weights, original, groups, router == "grouped", stats.router_inputs)
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
                key = factor_key(view.layer, e, name)
                factors |= {f"{key}.{part}": t for part, t in zip(FACTORS, (left, right, indices, values), strict=True)}
                saved += weights[e].numel() - factor_count(left, right, values)
            rebuilt.append(out)
        view.set_experts(*rebuilt)
    return factors, saved


def statistics_needs(variants: list[ReduceOptions]) -> frozenset[str]:
    """The optional statistics (:func:`collect_statistics`'s ``needs``) that ``variants`` read
    (:meth:`ReduceOptions.statistics`)."""
    return frozenset().union(*(options.statistics() for options in variants))


def check_uniform_source(path: Path) -> None:
    """Raise MoemergeError for a model whose layers hold different expert counts (a ``--budget`` output)."""
    if stored_expert_counts(path) is not None:
        raise MoemergeError(
            f"{path} has a different number of experts in each layer (a --budget output); reduce the "
            "original model instead"
        )


def compression_rank(view: MoELayerView, rank: int | None, sparsity: float, param_budget: float | None) -> int:
    """MC-SMoE's rank: ``rank``, the largest within ``param_budget``, or by default I/4."""
    shape = tuple(view.down.shape[1:])  # [H, I]; gate and up are [I, H]: same size and a + b
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
    calibration statistics. ``sequential``: each layer's statistics come from the already-reduced layers (set by
    the streaming driver)."""

    model_arg: str | Path
    options: ReduceOptions
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
    sequential: bool = False


def prepare(
    model: str | Path,
    out: str | Path | None,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    load: bool = True,
    options: ReduceOptions | None = None,
    **settings,
) -> Prepared:
    """Check every option (and ``out``, unless None), load the model and collect its calibration statistics.

    ``options``: a :class:`ReduceOptions`, or its fields as keyword ``settings`` (:func:`reduce_in_memory`'s); a
    recipe records them. ``load=False`` stops after the checks and the calibration tokens (``loaded`` None, no
    layers or statistics, ``rank`` unresolved): the streaming path loads one layer at a time itself.
    """
    if options is None:
        options = ReduceOptions.from_dict(settings)
    elif settings:
        raise TypeError("give options or their fields as keywords, not both")
    o = options
    start = time.perf_counter()
    storage_option, dev = resolve_dtype(o.dtype), resolve_device(o.device)
    check_spec(o.calib)
    source = inspect_source(model, allow_pickle=allow_pickle)
    if out is not None:
        check_output(out, force, reads=(model, o.calib))
        copied_files(source.path)
    check_uniform_source(source.path)
    config = AutoConfig.from_pretrained(source.path)
    n = source.family.num_experts(config)
    r = target_experts(n, o.experts, o.ratio)
    check_budget(source.family, config, r, o.budget, o.router)
    check_method(source.family, config, r, o)
    check_calibration_size(o.calib_samples, o.calib_seq_len, config.max_position_embeddings)
    identity = model_identity(source, config)
    storage = model_dtype(config, storage_option)
    compute = compute_dtype(storage, dev)
    log.info(describe(storage, compute))

    if not load:
        vocab_size = config.get_text_config().vocab_size
        calibration = load_calibration(
            o.calib, load_tokenizer(source), o.calib_samples, o.calib_seq_len, o.seed, vocab_size
        )
        return Prepared(model, o, source, identity, config, None, calibration, [], {}, r, o.rank, compute, {}, start)
    with phase(f"loading {source.path}"):
        loaded, tokenizer = load_source(source, dtype=o.dtype, device=o.device)
        stored = to_compute(loaded, compute)
    vocab_size = loaded.get_input_embeddings().num_embeddings
    calibration = load_calibration(o.calib, tokenizer, o.calib_samples, o.calib_seq_len, o.seed, vocab_size)
    layers = source.family.moe_layers(loaded)
    if not layers:
        raise MoemergeError(f"{source.path} has no MoE layers (every layer is dense): nothing to reduce")
    rank = o.rank
    if resolve("method", o.method).compresses:
        rank = compression_rank(layers[0], o.rank, o.sparsity, o.param_budget)
    needs = statistics_needs([o])
    with phase(f"statistics of {len(layers)} MoE layers on {calibration.num_tokens:,} calibration tokens"):
        stats = collect_statistics(loaded, layers, calibration.sequences, needs, progress=progress)
    if o.budget == "search":
        with phase(f"--budget search: every MoE layer reduced to every count from top-k to {n - 1}"):
            for view in layers:
                stats[view.layer].budget_errors = layer_errors(view, stats[view.layer], source.family, config, o)
    return Prepared(
        model, o, source, identity, config, loaded, calibration, layers, stats, r, rank, compute, stored, start
    )


def plan(run: Prepared) -> dict[int, list[list[int]]]:
    """The groups per decoder layer that :func:`reduce_in_memory` would use for a prepared run."""
    with phase(f"grouping ({run.options.method})"):
        return plan_groups(run.stats, run.source.family, run.config, run.r, run.options)


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
    params_before = sum(p.numel() for p in loaded.parameters())
    with phase(f"merging ({o.merging[0]})"):
        originals = apply_groups(loaded, source.family, stats, groups, *o.merging, progress, o.align, o.refit, o.router)
        to_storage(loaded, run.stored_dtypes)

    stored_params = compression = None
    if resolve("method", o.method).compresses:
        with phase(f"compressing (rank {run.rank}, sparsity {o.sparsity})"):
            lowrank, saved = compress_experts(layers, run.rank, o.sparsity, progress)
        stored_params = sum(p.numel() for p in loaded.parameters()) - saved
        compression = compression_record(run, stored_params)

    tensor_files = {LOWRANK_FILE: lowrank} if compression else {}
    if o.router == "grouped":
        tensor_files[SIDECAR] = router_tensors(
            {view.layer: stored_router(originals[view.layer], view) for view in layers}
        )
    meta = reduction_metadata(run, groups, stats, compression)
    if is_writer():
        with atomic_output(out, force) as tmp:
            with phase(f"writing {out}"):
                write_checkpoint(loaded, source.path, tmp, meta, tensor_files, dense_experts=not is_compact(meta))
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
    return {
        "rank": run.rank,
        "sparsity": run.options.sparsity,
        "param_budget": run.options.param_budget,
        "stored_parameters": stored_params,
        "file": LOWRANK_FILE,
        "dense": run.options.mc_smoe_dense,  # false: the experts are only in the file (a compact output)
    }


def stored_router(original: KeptRouter, view: MoELayerView) -> KeptRouter:
    """A kept router in the dtypes of the view's router once it is back in its storage dtypes
    (:func:`moemerge.precision.to_storage`); novices as the router weight."""
    weight, bias, novices = original
    dtype = view.router_weight.dtype
    return KeptRouter(
        weight.to(dtype),
        None if bias is None else bias.to(view.selection_bias.dtype),
        None if novices is None else novices.to(dtype),
    )


def router_tensors(originals: dict[int, KeptRouter]) -> dict[str, torch.Tensor]:
    """What ``--router grouped`` keeps, as the tensors of its sidecar file: per layer the original router's
    ``weight`` and ``e_score_correction_bias``, and the ``novices``."""
    tensors = {}
    for layer, kept in originals.items():
        names = ("weight", "e_score_correction_bias", "novices")
        tensors |= {f"layers.{layer}.{name}": t for name, t in zip(names, kept, strict=True) if t is not None}
    return tensors


def reduction_metadata(
    run: Prepared, groups: dict[int, list[list[int]]], stats: dict[int, LayerStatistics], compression: dict | None
) -> dict:
    """``moemerge.json``: method, options, source, calibration, package versions and the layers' groups."""
    o, source = run.options, run.source
    parameters = o.effective().as_dict() | {"experts": run.r, "rank": run.rank, "sequential": run.sequential}
    del parameters["method"], parameters["router"]  # recorded beside the parameters
    meta = {
        "format_version": 1,
        "method": o.method,
        "router": o.router,
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

    title = f"moemerge reduce ({run.options.method}, {run.r} of {run.source.family.num_experts(run.config)} experts)"
    with phase("report"):
        calibrated = {run.calibration.spec: stats}
        write_report(out / "report", original, calibrated, groups, run.options.linkage, title, progress)


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
