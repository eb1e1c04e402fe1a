"""Calibration statistics one decoder layer at a time: the steps ``reduce`` (with its resumable state) and
``inspect`` share.

A :class:`LayerStream` is a model read one decoder layer at a time: its skeleton on the meta device (no memory), its
memory-mapped safetensors tensors, and the dtypes it is stored and computed in (:mod:`moemerge.precision`).
:func:`collect` runs calibration hidden states through one layer with the statistics hook on its MoE block.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from moemerge.checkpoint.compressed import CompactExperts
from moemerge.checkpoint.loader import grouped_routers
from moemerge.checkpoint.model_files import is_compact, read_record
from moemerge.checkpoint.source import SourceModel, resolve_device, resolve_dtype, stored_expert_counts
from moemerge.errors import MoemergeError
from moemerge.pipeline import statistics_needs
from moemerge.precision import compute_dtype, model_dtype, to_compute, to_storage
from moemerge.progress import phase
from moemerge.routing.grouped import KeptRouter, Novices, install_grouped_routers
from moemerge.statistics import LayerAccumulator, LayerStatistics, sequence_offsets
from moemerge.streaming.layers import (
    LAYERS,
    SourceTensors,
    layer_inputs,
    load_layer,
    load_outside,
    run_layer,
    skeleton,
    unload,
)


class LayerStream:
    """The model of ``source`` (config ``config``) read one decoder layer at a time, stored in ``dtype`` ("auto":
    the config's) and computed in :func:`moemerge.precision.compute_dtype` of it on ``device``.

    ``grouped``: give the MoE layers of a ``--router grouped`` output their original routers when loaded, as
    :func:`moemerge.load_model` does. A compact mc-smoe output's experts are computed from their factors, read with
    their layer (:mod:`moemerge.checkpoint.compressed`).
    """

    def __init__(self, source: SourceModel, config, dtype: str, device: str, grouped: bool = False):
        self.device = resolve_device(device)
        self.storage = model_dtype(config, resolve_dtype(dtype))
        self.compute = compute_dtype(self.storage, self.device)
        self.skeleton = skeleton(copy.deepcopy(config), self.storage)
        counts = stored_expert_counts(source.path)
        if counts is not None:  # a non-uniform --budget output: each MoE layer gets its own count
            for view in source.family.moe_layers(self.skeleton):
                view.keep_first(counts[view.layer])
        self.compact = CompactExperts(source) if is_compact(read_record(source.path)) else None
        if self.compact is not None:  # experts computed from mc-smoe's factors, read with their layer
            self.compact.install(self.skeleton)
        self.family = source.family
        self.views = {view.layer: view for view in source.family.moe_layers(self.skeleton)}
        self.grouped = grouped_routers(source) if grouped else None
        self.tensors = SourceTensors(source.weight_files)
        # counted before any loading: moving tensors to meta unties a tied output head
        self._outside = sum(p.numel() for name, p in self.skeleton.named_parameters() if not name.startswith(LAYERS))

    def outside_parameters(self) -> int:
        """Parameters outside the decoder layers (a tied output head counted once)."""
        return self._outside

    @contextmanager
    def outside(self) -> Iterator[None]:
        """The weights outside the decoder layers (embeddings, final norm, output head) filled and in the compute
        dtype; emptied after."""
        load_outside(self.skeleton, self.tensors, self.storage)
        filled = [
            module
            for name, module in self.skeleton.named_modules()
            if not f"{name}.".startswith(LAYERS) and next(module.parameters(recurse=False), None) is not None
        ]
        stored = [to_compute(module, self.compute) for module in filled]
        try:
            yield
        finally:
            for module, dtypes in zip(filled, stored, strict=True):
                to_storage(module, dtypes)
                unload(module)

    def inputs(self, sequences: dict[int, torch.Tensor]) -> tuple[dict, dict]:
        """({s: hidden states [1, T, H] entering decoder layer 0}, {s: the other arguments of every decoder
        layer}) for calibration sequences ``sequences`` (id -> token ids [T]), in the compute dtype."""
        load_outside(self.skeleton, self.tensors, self.storage, only_input=True)
        embeddings = self.skeleton.get_input_embeddings()
        stored = to_compute(embeddings, self.compute)
        hidden, calls = {}, {}
        for s, ids in sequences.items():
            hidden[s], calls[s] = _to(layer_inputs(self.skeleton, ids), self.device)
        to_storage(embeddings, stored)  # the skeleton keeps the storage dtypes, to be loaded into again
        unload(embeddings)
        return hidden, calls

    @contextmanager
    def layer(self, index: int) -> Iterator[tuple[nn.Module, dict[str, torch.dtype]]]:
        """(decoder layer ``index`` filled and in the compute dtype, its tensors' stored dtypes); emptied after, in
        its stored dtypes again so that it loads as stored next time."""
        if self.compact is not None:
            self.compact.fill(index, self.storage, torch.device("cpu"))
        layer = load_layer(self.skeleton, self.tensors, index, self.storage).to(self.device)
        view = self.views.get(index)
        gate = None if view is None else view.router
        as_stored = None if view is None else (view.router_weight.dtype, getattr(view.selection_bias, "dtype", None))
        stored = to_compute(layer, self.compute)
        try:
            if self.grouped is not None and view is not None:
                routers, groups, top_k = self.grouped
                weight, bias, novices = routers[index]
                # rounded as its layer's router is stored, as moemerge.load_model's model holds it, then computed
                weight = weight.to(as_stored[0]).to(view.router_weight)
                bias = None if bias is None else bias.to(as_stored[1]).to(view.selection_bias)
                novices = None if novices is None else novices.to(as_stored[0]).to(view.router_weight)
                install_grouped_routers([view], {index: KeptRouter(weight, bias, novices)}, groups, top_k)
            yield layer, stored
        finally:
            if gate is not None:
                view.router = gate
                Novices.detach(view.block.experts)
            to_storage(layer, stored)  # unloading keeps each tensor's dtype, which the next load takes
            unload(layer)

    def meta_model(self) -> nn.Module:
        """The whole model as :func:`moemerge.load_model` builds it, on the meta device (shapes, no memory);
        call before any layer is loaded."""
        model = copy.deepcopy(self.skeleton)
        if self.grouped is not None:
            install_grouped_routers(self.family.moe_layers(model), *self.grouped)
        return model


def collect(layer: nn.Module, view, index: int, hidden: dict, calls: dict, total: int, offsets: dict, needs: dict):
    """(decoder layer ``index``'s statistics, its outputs {s: [1, T, H]}) on the hidden states ``hidden`` of the
    calibration sequences s (``offsets[s]``: where s starts among the ``total`` tokens); ``needs``: the optional
    statistics (:func:`moemerge.pipeline.statistics_needs`)."""
    accumulator = LayerAccumulator(view, total, needs)
    handle = view.block.register_forward_pre_hook(accumulator.hook)
    outputs = {}
    try:
        for s in hidden:
            accumulator.seen = offsets[s]
            outputs[s] = run_layer(layer, hidden[s], calls[s][index])
    finally:
        handle.remove()
    return accumulator.result(), outputs


@torch.no_grad()
def layer_statistics(
    stream: LayerStream, views: dict, sequence_sets: list[list[torch.Tensor]], needs: dict, progress: bool = True
) -> list[dict[int, LayerStatistics]]:
    """Statistics of every MoE layer (``views``: decoder layer -> view of the stream's skeleton) for each set of
    calibration sequences, one decoder layer in memory at a time."""
    carried = [stream.inputs(dict(enumerate(sequences))) for sequences in sequence_sets]
    offsets = [sequence_offsets(sequences) for sequences in sequence_sets]
    totals = [sum(len(s) for s in sequences) for sequences in sequence_sets]
    found: list[dict[int, LayerStatistics]] = [{} for _ in sequence_sets]
    layers = stream.skeleton.config.num_hidden_layers
    for i in tqdm(range(layers), desc="layers", unit="layer", disable=not progress):
        with stream.layer(i) as (layer, _):
            for k, (hidden, calls) in enumerate(carried):
                if i in views:
                    found[k][i], hidden = collect(layer, views[i], i, hidden, calls, totals[k], offsets[k], needs)
                else:
                    hidden = {s: run_layer(layer, h, calls[s][i]) for s, h in hidden.items()}
                carried[k] = (hidden, calls)
    return found


def statistics_layer_by_layer(run, progress: bool = True) -> dict[int, LayerStatistics]:
    """The statistics of every MoE layer that grouping needs (not merging or refitting: no router samples for them) for a run
    prepared by :func:`moemerge.pipeline.prepare` with ``load=False``, one decoder layer in memory at a time."""
    o = run.options
    stream = LayerStream(run.source, run.config, o.dtype, o.device)
    views = {view.layer: view for view in run.source.family.moe_layers(stream.skeleton)}
    if not views:
        raise MoemergeError(f"{run.source.path} has no MoE layers (every layer is dense): nothing to reduce")
    needs = statistics_needs([o.replace(merge="frequency", router_rows="frequency", refit="none")])
    tokens = run.calibration.num_tokens
    with phase(f"statistics of {len(views)} MoE layers on {tokens:,} calibration tokens, one decoder layer at a time"):
        return layer_statistics(stream, views, [run.calibration.sequences], needs, progress)[0]


def _to(obj, device: torch.device, moved: dict | None = None):
    """``obj`` (tensors in tuples, lists and dicts) on ``device``; a tensor that appears several times (the rotary
    embeddings and mask every decoder layer gets) is moved once and shared, as it was."""
    moved = {} if moved is None else moved
    if isinstance(obj, torch.Tensor):
        if id(obj) not in moved:
            moved[id(obj)] = (obj, obj.to(device))  # the original is held so that its id stays its own
        return moved[id(obj)][1]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(x, device, moved) for x in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, moved) for k, v in obj.items()}
    return obj
