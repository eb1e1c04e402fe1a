"""``moemerge reduce``: reduce a model one decoder layer at a time, never holding all of it.

For each decoder layer in turn: read its tensors from the memory-mapped shards, run the calibration hidden
states through it with the statistics hook on its MoE block, group and merge its experts, write its final
shard, and free it. Peak memory is about one layer plus the calibration hidden states, whatever the depth.

The statistics of layer l come, as in the paper, from the original model's hidden states (the original
layer l's output is carried on), or with ``sequential`` from the already-reduced layers' (the reduced
layer l's output is carried on, so each layer's merge sees the errors of the ones before it).
Groups and weights equal the whole-model :func:`moemerge.pipeline.reduce_in_memory`'s bit for bit (same calibration forward,
same statistics, same merge). An output up to the shard size (2 GB) is one ``model.safetensors``, byte-identical
to the in-memory one; a larger one has a shard per decoder layer, then one for the embeddings, final norm and head.

:func:`reduce` is the ``reduce`` command: this path, or the whole model in memory
(:func:`moemerge.pipeline.reduce_in_memory`) where a layer cannot be read alone (pickle weights). A non-uniform
``--budget`` takes two passes: statistics of every layer (recorded on disk), then the merges.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moemerge.budget_search import layer_errors, searched_budgets
from moemerge.checkpoint import writer
from moemerge.checkpoint.model_files import DTYPE_BITS
from moemerge.checkpoint.source import inspect_source
from moemerge.checkpoint.writer import routed_expert, write_extras
from moemerge.distributed import barrier, is_writer, my_share, rank_and_world
from moemerge.errors import MoemergeError
from moemerge.grouping import layer_budgets
from moemerge.output_files import clear_stale, publish, writing
from moemerge.pipeline import (
    BUDGET_SCORES,
    LOWRANK_FILE,
    SIDECAR,
    Prepared,
    ReduceResult,
    compress_experts,
    compression_rank,
    compression_record,
    merge_layer,
    plan_groups,
    prepare,
    reduce_in_memory,
    reduction_metadata,
    router_tensors,
    statistics_needs,
    stored_router,
    write_reduce_report,
)
from moemerge.precision import dtype_name, to_compute, to_storage
from moemerge.progress import log, phase
from moemerge.registry import resolve
from moemerge.routing.grouped import grouped_routing
from moemerge.statistics import sequence_offsets
from moemerge.streaming.calibrate import LayerStream, collect
from moemerge.streaming.layers import SourceTensors, layer_tensors, load_outside, outside_tensors, run_layer, unload
from moemerge.streaming.state import RunState, partial_dir


def reduce(
    model: str | Path,
    out: str | Path,
    *,
    sequential: bool = False,
    resume: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    report: bool = True,
    **options,
) -> ReduceResult:
    """Reduce every MoE layer of the model in directory ``model`` to r experts and write it to ``out``.

    One decoder layer at a time (:func:`reduce_streaming`: memory of about one layer, whatever the depth), except
    for pickle weights, which cannot be read one layer at a time: those load the whole model
    (:func:`moemerge.pipeline.reduce_in_memory`) and the phase log says why. Give ``experts`` (r) or
    ``ratio`` (fraction kept); the other options are :func:`moemerge.pipeline.prepare`'s (see ``moemerge reduce
    --help``). All input is checked before any work, and ``out`` appears only when complete. ``report``: also
    write ``out/report/`` (see :func:`moemerge.report.write_report`).
    """
    if not inspect_source(model, allow_pickle=allow_pickle).uses_pickle:
        return reduce_streaming(
            model,
            out,
            sequential=sequential,
            resume=resume,
            force=force,
            allow_pickle=allow_pickle,
            progress=progress,
            report=report,
            **options,
        )
    whole = f"{model} holds pickle weights, which cannot be read one layer at a time"
    if sequential or resume:
        flag = "--sequential" if sequential else "--resume"
        raise MoemergeError(f"{flag} works one decoder layer at a time, but {whole}; drop {flag}")
    log.info("%s: loading the whole model", whole)
    return reduce_in_memory(
        model, out, force=force, allow_pickle=allow_pickle, progress=progress, report=report, **options
    )


@torch.no_grad()
def reduce_streaming(
    model: str | Path,
    out: str | Path,
    *,
    sequential: bool = False,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    report: bool = True,
    **options,
) -> ReduceResult:
    """Reduce the model in directory ``model`` layer by layer into ``out`` (see the module docstring).

    ``options`` are :func:`moemerge.pipeline.prepare`'s. A non-uniform ``budget`` takes two passes: the first
    runs the calibration tokens through every layer and records its statistics, the second sets each layer's
    expert count from all of them and merges layer by layer. ``resume``: continue the unfinished run of this
    ``out`` (same model and options) from its last finished step; the result is byte-identical to an
    uninterrupted run's.
    """
    run = prepare(model, out, force=force, progress=progress, load=False, **options)
    return reduce_prepared(run, out, sequential, resume, force, progress, report)


@torch.no_grad()
def reduce_prepared(
    run: Prepared,
    out: str | Path,
    sequential: bool = False,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    report: bool = True,
    planned: dict[int, list[list[int]]] | None = None,
) -> ReduceResult:
    """:func:`reduce_streaming` of a run already prepared with ``load=False`` (its options and ``out`` checked);
    ``planned``: merge every MoE layer to these groups (a recipe's, checked by the caller) instead of grouping it."""
    o, family, config = run.options, run.source.family, run.config
    compresses = resolve("method", o.method).compresses
    if run.source.uses_pickle:
        raise MoemergeError(
            f"streaming reads safetensors shards, and {run.source.path} holds pickle weights; convert them to "
            "safetensors"
        )
    two_pass = o.budget != "uniform" and planned is None
    method_sequential = resolve("method", o.method).sequential and planned is None
    if two_pass and (sequential or method_sequential):
        which = f"--method {o.method}" if method_sequential else "--sequential"
        raise MoemergeError(
            f"--budget {o.budget} sets every layer's expert count from the original model's statistics before the "
            f"first merge, and {which} collects each layer's statistics after the layers before it are reduced; "
            f"use --budget uniform{'' if method_sequential else ' or drop --sequential'}"
        )
    sequential = run.sequential = sequential or method_sequential
    rank_id, world = rank_and_world()
    out = Path(out)
    stream = LayerStream(run.source, config, o.dtype, o.device)
    skel, source, dtype = stream.skeleton, stream.tensors, stream.storage
    views = {view.layer: view for view in family.moe_layers(skel)}
    if not views:
        raise MoemergeError(f"{run.source.path} has no MoE layers (every layer is dense): nothing to reduce")
    if planned is not None and sorted(planned) != sorted(views):
        raise MoemergeError(
            f"the recipe plans MoE layers {sorted(planned)} but the model has {sorted(views)}; plan again for it"
        )
    if compresses:
        run.rank = compression_rank(next(iter(views.values())), o.rank, o.sparsity, o.param_budget)
    num_layers = config.num_hidden_layers
    identity = {
        "options": o.as_dict(),
        "sequential": sequential,
        "model": run.identity,
        "calibration": run.calibration.sha256(),
        "processes": world,
        "compute_dtype": dtype_name(stream.compute),
        "num_layers": num_layers,
        "passes": 2 if two_pass else 1,
        "planned": None if planned is None else {str(k): [list(g) for g in v] for k, v in sorted(planned.items())},
    }
    clear_stale(out)
    state = RunState.open(partial_dir(out), identity, resume, force)
    with state.errors_say_what_stays():
        if report:
            from moemerge.report import architecture

            original = architecture(str(run.model_arg), skel, family, config)
        params_before = sum(p.numel() for p in skel.parameters())
        sequences = run.calibration.sequences
        mine, offsets = my_share(len(sequences)), sequence_offsets(sequences)
        start, steps = state.next_layer, num_layers * identity["passes"]
        hidden = calls = None
        if start < num_layers:  # a step that runs the calibration tokens through a layer is still to come
            with phase(f"layer inputs of {len(mine)} calibration sequences"):
                hidden, calls = stream.inputs({s: sequences[s] for s in mine})
            if start:
                hidden = {s: h.to(stream.device) for s, h in state.load_hidden(start, rank_id).items()}
        done = {int(layer): record for layer, record in state.state["layers"].items()}  # same on every process
        reduced = {layer: record["groups"] for layer, record in done.items()}
        saved_params = sum(record["saved"] for record in done.values())
        for layer, groups in reduced.items():
            views[layer].keep_first(len(groups))  # shapes only (meta)

        needs = statistics_needs([o])
        total = run.calibration.num_tokens
        routing = family.routing_rule(config)
        shards = num_layers + 1
        kept = None

        what = "statistics, then merging," if two_pass else "streaming"
        with writing(out), phase(f"{what} {num_layers - start % num_layers} of {num_layers} decoder layers"):
            for step in tqdm(range(start, steps), desc="layers", unit="layer", disable=not progress):
                i, merging = step % num_layers, step >= steps - num_layers
                if merging and two_pass and kept is None:
                    kept = _budget_counts(state, views, routing, run.r, o.budget)
                with stream.layer(i) as (layer, stored):
                    view = views.get(i)
                    forward = not (merging and two_pass)  # the calibration tokens go through this layer
                    if view is None:
                        if forward:
                            hidden = {s: run_layer(layer, hidden[s], calls[s][i]) for s in mine}
                    elif not merging:
                        stats, hidden = collect(layer, view, i, hidden, calls, total, offsets, needs)
                        if o.budget == "search":
                            stats.budget_errors = layer_errors(view, stats, family, config, o)
                        if is_writer():
                            state.save_statistics(i, stats)
                    else:
                        if two_pass:
                            stats, count = state.load_statistics(i, routing), kept[i]
                        else:
                            stats, outputs = collect(layer, view, i, hidden, calls, total, offsets, needs)
                            count = run.r
                        if planned is not None:
                            groups = planned[i]
                        else:
                            groups = plan_groups({i: stats}, family, config, count, o.replace(budget="uniform"))[i]
                        router = merge_layer(view, groups, stats, *o.merging, o.align, o.refit, o.router)
                        to_storage(layer, stored)
                        router = stored_router(router, view)
                        factors, saved = {}, 0
                        if compresses:
                            factors, saved = compress_experts([view], run.rank, o.sparsity)
                        if sequential:  # the next layer sees this one as it is stored, and routes once loaded
                            to_compute(layer, stream.compute)
                            as_loaded = nullcontext()
                            if o.router == "grouped":
                                as_loaded = grouped_routing(view, router, groups, routing.top_k)
                            with as_loaded:
                                outputs = {s: run_layer(layer, hidden[s], calls[s][i]) for s in mine}
                        if not two_pass:
                            hidden = outputs
                        reduced[i], saved_params = groups, saved_params + saved
                        if is_writer():
                            state.save_layer(i, groups, stats, router, factors, saved)
                    to_storage(layer, stored)
                    if merging and is_writer():
                        tensors = layer_tensors(skel, i)
                        if compresses and not o.mc_smoe_dense:  # a compact output: the experts are only factors
                            tensors = {name: t for name, t in tensors.items() if not routed_expert(name)}
                        save_file(tensors, state.partial / _shard(i + 1, shards), metadata={"format": "pt"})
                    if forward:
                        state.save_hidden(step + 1, rank_id, hidden)
                    barrier()
                    if is_writer():
                        state.advance(step + 1)
                    barrier()

        if is_writer():
            with writing(out), phase(f"writing {out}"):
                groups, stats = _finish(run, state, skel, source, dtype, views, shards)
                if report:
                    write_reduce_report(state.partial, run, original, groups, stats, progress)
                state.discard()
                _drop_joined_shards(state.partial, shards)
                publish(state.partial, out.absolute(), force)
    barrier()
    skel.tie_weights()  # moving the embeddings to meta untied a tied output head; count it once
    params_after = sum(p.numel() for p in skel.parameters())
    return ReduceResult(
        out=out,
        groups=dict(sorted(reduced.items())),
        num_experts=family.num_experts(config),
        experts=run.r,
        params_before=params_before,
        params_after=params_after,
        bytes_before=sum(f.stat().st_size for f in run.source.weight_files),
        bytes_after=sum(f.stat().st_size for f in out.glob("*.safetensors")),
        calibration_tokens=total,
        seconds=time.perf_counter() - run.start,
        stored_params=params_after - saved_params if compresses else None,
    )


def _budget_counts(state: RunState, views: dict, routing, r: int, budget: str) -> dict[int, int]:
    """Experts kept per MoE layer under a non-uniform ``budget``, from the one statistic of the statistics pass's
    records that it shares the experts by (``search``: the error proxy recorded beside them)."""
    if budget == "search":
        errors = {layer: state.load_statistic(layer, "budget_errors") for layer in sorted(views)}
        return searched_budgets(errors, r, routing.top_k)
    scores = {layer: state.load_statistic(layer, BUDGET_SCORES[budget]) for layer in sorted(views)}
    return layer_budgets(scores, r, routing.top_k)


def _finish(run, state: RunState, skel, source: SourceTensors, dtype, views, shards: int) -> tuple[dict, dict]:
    """Write the last shard, the index, config, tokenizer files and ``moemerge.json`` into the partial output;
    returns the groups and statistics of every MoE layer."""
    o, family = run.options, run.source.family
    compresses = resolve("method", o.method).compresses
    groups, stats, routers, factors, saved = state.finished_layers(family.routing_rule(run.config), sorted(views))
    load_outside(skel, source, dtype)
    family.set_num_experts(skel, max(len(g) for g in groups.values()))
    save_file(outside_tensors(skel), state.partial / _shard(shards, shards), metadata={"format": "pt"})
    unload(skel)
    skel.tie_weights()
    _write_weight_files(state.partial, shards)
    skel.config.architectures = [type(skel).__name__]
    skel.config.save_pretrained(state.partial)
    if skel.can_generate() and skel.generation_config is not None:
        skel.generation_config.save_pretrained(state.partial)
    compression = None
    if compresses:
        compression = compression_record(run, sum(p.numel() for p in skel.parameters()) - saved)
    tensor_files = {LOWRANK_FILE: factors} if compression else {}
    if o.router == "grouped":
        tensor_files[SIDECAR] = router_tensors(routers)
    write_extras(run.source.path, state.partial, reduction_metadata(run, groups, stats, compression), tensor_files)
    return groups, stats


def _shard(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def _write_weight_files(folder: Path, shards: int) -> None:
    """Up to MAX_SHARD_SIZE in all, join the per-layer shards into one ``model.safetensors`` (what
    ``save_pretrained`` writes; :func:`_drop_joined_shards` removes them once the run state is gone, so that a run
    killed before then still resumes); above, write ``model.safetensors.index.json`` as transformers does."""
    files = [folder / _shard(number, shards) for number in range(1, shards + 1)]
    weight_map, size, params = {}, 0, 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                tensor = f.get_slice(name)
                weight_map[name] = file.name
                params += math.prod(tensor.get_shape())
                size += math.prod(tensor.get_shape()) * DTYPE_BITS[tensor.get_dtype()] // 8
    if size <= writer.MAX_SHARD_SIZE:
        tensors = {}
        for file in files:
            tensors |= load_file(file)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    index = {
        "metadata": {"total_parameters": params, "total_size": size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _drop_joined_shards(folder: Path, shards: int) -> None:
    """Remove the per-layer shards :func:`_write_weight_files` joined into ``model.safetensors``, if it did."""
    if (folder / "model.safetensors").exists():
        for number in range(1, shards + 1):
            (folder / _shard(number, shards)).unlink(missing_ok=True)
