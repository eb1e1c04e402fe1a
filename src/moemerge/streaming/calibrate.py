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

from moemerge.checkpoint.source import SourceModel, resolve_device, resolve_dtype
from moemerge.errors import MoemergeError
from moemerge.pipeline import method_options_of, statistics_needs
from moemerge.precision import compute_dtype, model_dtype, to_compute, to_storage
from moemerge.progress import phase
from moemerge.statistics import LayerAccumulator, LayerStatistics, sequence_offsets
from moemerge.streaming.layers import SourceTensors, layer_inputs, load_layer, load_outside, run_layer, skeleton, unload


class LayerStream:
    """The model of ``source`` (config ``config``) read one decoder layer at a time, stored in ``dtype`` ("auto":
    the config's) and computed in :func:`moemerge.precision.compute_dtype` of it on ``device``."""

    def __init__(self, source: SourceModel, config, dtype: str, device: str):
        self.device = resolve_device(device)
        self.storage = model_dtype(config, resolve_dtype(dtype))
        self.compute = compute_dtype(self.storage, self.device)
        self.skeleton = skeleton(copy.deepcopy(config), self.storage)
        self.tensors = SourceTensors(source.weight_files)

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
        """(decoder layer ``index`` filled and in the compute dtype, its tensors' stored dtypes); emptied after."""
        layer = load_layer(self.skeleton, self.tensors, index, self.storage).to(self.device)
        try:
            yield layer, to_compute(layer, self.compute)
        finally:
            unload(layer)


def collect(layer: nn.Module, view, index: int, hidden: dict, calls: dict, total: int, offsets: dict, needs: dict):
    """(decoder layer ``index``'s statistics, its outputs {s: [1, T, H]}) on the hidden states ``hidden`` of the
    calibration sequences s (``offsets[s]``: where s starts among the ``total`` tokens); ``needs``: the optional
    statistics (:func:`moemerge.pipeline.statistics_needs`)."""
    accumulator = LayerAccumulator(view, total, **needs)
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
    """The statistics of every MoE layer that grouping needs (not merging: no router samples for it) for a run
    prepared by :func:`moemerge.pipeline.prepare` with ``load=False``, one decoder layer in memory at a time."""
    o = run.options
    stream = LayerStream(run.source, run.config, o["dtype"], o["device"])
    views = {view.layer: view for view in run.source.family.moe_layers(stream.skeleton)}
    if not views:
        raise MoemergeError(f"{run.source.path} has no MoE layers (every layer is dense): nothing to reduce")
    needs = statistics_needs([(o["method"], method_options_of(o), "frequency", "frequency")])
    tokens = run.calibration.num_tokens
    with phase(f"statistics of {len(views)} MoE layers on {tokens:,} calibration tokens, one decoder layer at a time"):
        return layer_statistics(stream, views, [run.calibration.sequences], needs, progress)[0]


def _to(obj, device: torch.device):
    """``obj`` (tensors in tuples, lists and dicts) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj
