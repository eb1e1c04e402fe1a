"""Perplexity and fidelity of models larger than memory, one decoder layer at a time (``eval`` and ``compare``).

The reference (the original model, or for ``eval`` without ``--reference`` the evaluated model itself) is a
:class:`~moemerge.streaming.calibrate.LayerStream`. Each measured model, a :class:`Candidate`, makes its decoder
layer i next to the reference's: ``eval`` reads the reduced model's own layer from its checkpoint, ``compare``
reduces a copy of the original's. Every model carries the hidden states of the evaluation windows from layer to
layer; each of a candidate's MoE blocks is also fed the reference's inputs to that block, so that its error is its
own (as :func:`moemerge.evaluation.fidelity.fidelity` measures it). After the last layer, each model's own forward
turns its hidden states into the final norm's output and logits (:func:`moemerge.streaming.layers.final_outputs`).

Peak memory: the reference's decoder layer and one candidate's, the weights outside the decoder layers of one
model, and (candidates + 3) x evaluation tokens x hidden size activations in the compute dtype (each model's hidden
states, and the inputs and outputs of the reference's MoE block, kept for one layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moemerge.adapters import MoEFamily
from moemerge.evaluation.fidelity import FidelitySums
from moemerge.evaluation.perplexity import perplexity_of, summed_nll
from moemerge.statistics import LayerAccumulator, LayerStatistics, sequence_offsets
from moemerge.streaming.calibrate import LayerStream
from moemerge.streaming.layers import final_outputs, run_layer

# (decoder layer index i, the reference's layer i in the compute dtype, its tensors' stored dtypes) -> a context
# manager giving (the candidate's layer i in the compute dtype, its MoE block or None)
LayerMaker = Callable[[int, nn.Module, dict], AbstractContextManager[tuple[nn.Module, nn.Module | None]]]


@dataclass
class Candidate:
    """A model measured against the reference, one decoder layer at a time.

    layer: makes its decoder layer i (see :data:`LayerMaker`); None: its stream's own layer i, as stored.
    stream: the stream it is read from, whose embeddings, final norm and output head it uses; None: it is made
        from the reference's layers and uses the reference's.
    """

    layer: LayerMaker | None = None
    stream: LayerStream | None = None

    @contextmanager
    def make(self, index: int, original: nn.Module, stored: dict) -> Iterator[tuple[nn.Module, nn.Module | None]]:
        """(its decoder layer ``index`` in the compute dtype, the layer's MoE block or None)."""
        if self.layer is not None:
            with self.layer(index, original, stored) as made:
                yield made
            return
        with self.stream.layer(index) as (layer, _):
            view = self.stream.views.get(index)
            yield layer, None if view is None else view.block


@dataclass
class _Carried:
    """One measured model's state between decoder layers."""

    hidden: dict[int, torch.Tensor]  # window -> [1, T, H]
    calls: dict[int, list]  # window -> the arguments of every decoder layer
    sums: FidelitySums
    parameters: int


@torch.inference_mode()
def measure_layer_by_layer(
    reference: LayerStream,
    family: MoEFamily,
    chunks: list[torch.Tensor],
    candidates: dict[str, Candidate],
    statistics: bool = False,
    progress: bool = True,
) -> tuple[dict, dict[str, dict], dict[int, LayerStatistics] | None]:
    """Measure the reference and every candidate on the token windows ``chunks`` (1-D, at least 2 tokens each).

    Returns (the reference's {"perplexity", "parameters"}; each candidate's {"perplexity", "fidelity",
    "parameters"}, the first two as :func:`moemerge.evaluation.evaluate.measure` gives them; with ``statistics``
    the reference's expert statistics of every MoE layer on the windows' tokens, else None).
    """
    views = {view.layer: view for view in family.moe_layers(reference.skeleton)}
    for stream in [reference] + [c.stream for c in candidates.values() if c.stream is not None]:
        with stream.outside():  # a missing or broken head is found now, not after the last layer
            pass
    windows = dict(enumerate(chunks))
    hidden, calls = reference.inputs(windows)
    ref_parameters = reference.outside_parameters()
    carried = {}
    for name, candidate in candidates.items():
        own = candidate.stream
        sums, outside = FidelitySums(list(views)), (own or reference).outside_parameters()
        if own is None:
            carried[name] = _Carried(dict(hidden), calls, sums, outside)
        else:
            carried[name] = _Carried(*own.inputs(windows), sums, outside)
    total, offsets = sum(len(c) for c in chunks), sequence_offsets(chunks)
    found = {} if statistics else None
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []  # the reference MoE block's (inputs, outputs) per window
    for i in tqdm(range(len(reference.skeleton.model.layers)), desc="layers", unit="layer", disable=not progress):
        with reference.layer(i) as (layer, stored):
            ref_parameters += sum(p.numel() for p in layer.parameters())
            view = views.get(i)
            handles = []
            try:
                if view is not None:
                    capture = view.block.register_forward_hook(lambda m, args, out: captured.append((args[0], out)))
                    handles.append(capture)
                    if statistics:
                        accumulator = LayerAccumulator(view, total)
                        handles.append(view.block.register_forward_pre_hook(accumulator.hook))
                for w in windows:
                    if statistics and view is not None:
                        accumulator.seen = offsets[w]
                    hidden[w] = run_layer(layer, hidden[w], calls[w][i])
            finally:
                for handle in handles:
                    handle.remove()
            if statistics and view is not None:
                found[i] = accumulator.result()
            for name, candidate in candidates.items():
                state = carried[name]
                with candidate.make(i, layer, stored) as (own, block):
                    state.parameters += sum(p.numel() for p in own.parameters())
                    if block is not None:
                        for x, y_ref in captured:
                            state.sums.add_layer(i, block(x), y_ref)
                    for w in state.hidden:  # in place: each window's input is let go as its output comes
                        state.hidden[w] = run_layer(own, state.hidden[w], state.calls[w][i])
            captured.clear()
    return (*_finish(reference, chunks, hidden, ref_parameters, candidates, carried), found)


def _finish(reference: LayerStream, chunks, hidden: dict, parameters: int, candidates: dict, carried: dict):
    """(the reference's result, each candidate's) from the hidden states after the last decoder layer; each
    model's hidden states are let go once its tail is computed."""
    results = {}
    with reference.outside():
        ref_last, ref_nll = _tail(reference.skeleton, chunks, hidden)
        hidden.clear()
        for name, candidate in candidates.items():
            if candidate.stream is None:
                results[name] = _result(reference.skeleton, chunks, carried.pop(name), ref_last)
    for name, candidate in candidates.items():
        if candidate.stream is not None:
            with candidate.stream.outside():
                results[name] = _result(candidate.stream.skeleton, chunks, carried.pop(name), ref_last)
    reference_result = {"perplexity": perplexity_of(ref_nll, chunks), "parameters": parameters}
    return reference_result, {name: results[name] for name in candidates}


def _result(model: nn.Module, chunks, state: _Carried, ref_last: dict) -> dict:
    """A candidate's {"perplexity", "fidelity", "parameters"} from its state after the last decoder layer."""
    last, nll = _tail(model, chunks, state.hidden)
    state.hidden.clear()
    for w, h_ref in ref_last.items():
        state.sums.add_hidden(last[w], h_ref)
    return {"perplexity": perplexity_of(nll, chunks), "fidelity": state.sums.result(), "parameters": state.parameters}


def _tail(model: nn.Module, chunks: list[torch.Tensor], hidden: dict) -> tuple[dict, float]:
    """({window: last hidden state [T, H] after the final norm}, summed next-token NLL) from the hidden states
    ``hidden`` after the last decoder layer."""
    last, nll = {}, 0.0
    for w, ids in enumerate(chunks):
        ids = ids.to(hidden[w].device)
        last[w], logits = final_outputs(model, ids, hidden[w])
        nll += summed_nll(logits, ids)
    return last, nll
