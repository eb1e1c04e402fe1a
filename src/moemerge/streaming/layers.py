"""One decoder layer at a time: a model skeleton on the meta device, whose layers are filled from the
safetensors shards when their turn comes and emptied afterwards.

transformers' own loading code turns a layer's on-disk tensors into its in-memory form (per-expert tensors
fused into ``experts.gate_up_proj`` / ``down_proj``, renamed modules), and its saving code turns them back,
so the streamed output has exactly the tensors ``save_pretrained`` writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from moemerge.checkpoint.load_errors import size_mismatch, transformers_call
from moemerge.errors import MoemergeError
from moemerge.heap import trim_heap
from moemerge.precision import runnable_experts_kernel
from moemerge.transformers_internals import load_converted, to_disk_layout

LAYERS = "model.layers."


class SourceTensors:
    """The tensors of a checkpoint's safetensors files by name, read on demand from the memory-mapped files."""

    def __init__(self, files: list[Path]):
        self.file_of: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                self.file_of.update(dict.fromkeys(f.keys(), file))

    def names(self, prefix: str = "") -> list[str]:
        return [name for name in self.file_of if name.startswith(prefix)]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        tensors = {}
        for file in sorted({self.file_of[name] for name in names}):
            with safe_open(file, framework="pt") as f:
                tensors |= {name: f.get_tensor(name) for name in names if self.file_of[name] == file}
        return tensors


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The ``*ForCausalLM`` model of ``config`` with every weight on the meta device (no memory), in eval mode.

    Buffers (the rotary embeddings' frequencies, selection biases) are real: they are computed from the
    config, and the checkpoint's own values replace those it stores. None of the supported families' grows with
    the context; MiniMax's linear-attention decay tables are the largest (about 0.6 GB for MiniMax-Text-01).
    """
    with init_empty_weights(include_buffers=False):
        model = transformers_call(
            "transformers could not build the model of this config.json",
            lambda: AutoModelForCausalLM.from_config(config, dtype=dtype),
        )
    model.tie_weights()  # init_empty_weights re-creates every parameter it registers, so a tied head came apart
    runnable_experts_kernel(model)
    return model.eval()


@contextmanager
def _quiet_transformers():
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_into(
    model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, filled: Callable[[str], bool]
) -> None:
    """Load on-disk ``tensors`` into ``model`` as from_pretrained would; every parameter whose name ``filled``
    accepts must then be real."""
    with _quiet_transformers():
        mismatched = transformers_call(
            "transformers could not load the weights", lambda: load_converted(model, tensors, dtype)
        )
    if mismatched:
        raise MoemergeError(size_mismatch(*mismatched[0]))
    model.tie_weights()  # loading replaced the input embeddings' parameter, which a tied head shared
    missing = [name for name, p in model.named_parameters() if filled(name) and p.is_meta]
    if missing:
        raise MoemergeError(
            f"the checkpoint has no tensors that load into {', '.join(missing[:3])} (missing, or shaped for another "
            "model); it is incomplete or damaged"
        )


def load_layer(model: nn.Module, source: SourceTensors, index: int, dtype: torch.dtype) -> nn.Module:
    """Decoder layer ``index`` of the skeleton, filled with its weights from ``source``."""
    prefix = f"{LAYERS}{index}."
    load_into(model, source.read(source.names(prefix)), dtype, lambda name: name.startswith(prefix))
    return model.model.layers[index]


def unload(module: nn.Module) -> None:
    """Give a module's memory back: its tensors become meta tensors of the same shapes."""
    module.to("meta")
    trim_heap()


def layer_tensors(model: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Decoder layer ``index``'s tensors as ``save_pretrained`` writes them (on-disk names and layout)."""
    layer = model.model.layers[index]
    state = {f"{LAYERS}{index}.{name}": t for name, t in layer.state_dict().items()}
    return {name: t.contiguous().cpu() for name, t in to_disk_layout(model, state).items()}


def outside_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder layers (embeddings, final norm, output head) as ``save_pretrained``
    writes them: a tied output head is left out."""
    state = {name: t for name, t in model.state_dict().items() if not name.startswith(LAYERS)}
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        state = {name: t for name, t in state.items() if not name.startswith(_module_name(model, head) + ".")}
    return {name: t.contiguous() for name, t in to_disk_layout(model, state).items()}


def load_outside(model: nn.Module, source: SourceTensors, dtype: torch.dtype, only_input: bool = False) -> None:
    """Fill the weights outside the decoder layers (with ``only_input``: the input embeddings alone)."""
    if only_input:
        prefix = _module_name(model, model.get_input_embeddings()) + "."
        state = {prefix + name: t for name, t in model.get_input_embeddings().state_dict().items()}
        saved_as = [name for name in to_disk_layout(model, state) if name in source.file_of]  # BailingHybrid's
        names = saved_as or source.names(prefix)  # ``model.word_embeddings``, or the in-memory name
        load_into(model, source.read(names), dtype, lambda name: name.startswith(prefix))
    else:
        names = [name for name in source.file_of if not name.startswith(LAYERS)]
        load_into(model, source.read(names), dtype, lambda name: not name.startswith(LAYERS))


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


class _Recorded(Exception):
    """Raised by the last recorder to stop the forward once every layer's arguments are known."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the arguments the model passes it, returns its input."""

    def __init__(self, calls: list, index: int, last: bool):
        super().__init__()
        self.calls, self.index, self.last = calls, index, last

    def forward(self, hidden_states, *args, **kwargs):
        self.calls[self.index] = (args, kwargs)
        if self.last:
            raise _Recorded
        return hidden_states


@contextmanager
def _stand_ins(model: nn.Module, layers: list[nn.Module]) -> Iterator[None]:
    """The model's decoder layers replaced by ``layers`` for the duration."""
    decoder = model.model
    real = decoder.layers
    decoder.layers = nn.ModuleList(layers)
    try:
        yield
    finally:
        decoder.layers = real


@torch.no_grad()
def layer_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """(hidden states [1, T, H] entering decoder layer 0, the other arguments each decoder layer gets) for one
    sequence ``input_ids`` [T], exactly as the model's own forward computes them (masks, rotary embeddings).

    Only the input embeddings need to be loaded.
    """
    count = len(model.model.layers)
    calls: list = [None] * count
    embedded = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: embedded.append(out))
    try:
        with _stand_ins(model, [_Recorder(calls, i, i == count - 1) for i in range(count)]):
            model.model(input_ids=input_ids[None], use_cache=False)
    except _Recorded:
        pass
    finally:
        handle.remove()
    return embedded[0], calls


class _Replay(nn.Module):
    """Stands in for a decoder layer: returns ``final`` if given (the last layer), else its input."""

    def __init__(self, final: torch.Tensor | None):
        super().__init__()
        self.final = final

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.final is None else self.final


@torch.no_grad()
def final_outputs(model: nn.Module, input_ids: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state [T, H], after the final norm; logits [T, V]) that the model's own forward gives for
    ``input_ids`` [T] when its last decoder layer outputs ``hidden`` [1, T, H].

    Only the weights outside the decoder layers need to be loaded. The load-balancing loss a config may ask for
    (``output_router_logits``) is not computed: the stand-in layers run no router.
    """
    count = len(model.model.layers)
    last = []
    handle = model.model.register_forward_hook(lambda m, a, out: last.append(out.last_hidden_state))
    asked = getattr(model.config, "output_router_logits", None)
    try:
        if asked:
            model.config.output_router_logits = False
        with _stand_ins(model, [_Replay(hidden if i == count - 1 else None) for i in range(count)]):
            logits = model(input_ids=input_ids[None], use_cache=False, return_dict=True).logits
    finally:
        handle.remove()
        if asked:
            model.config.output_router_logits = asked
    return last[0][0], logits[0]


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    """The decoder layer's output hidden states for input ``hidden`` and its recorded arguments."""
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    trim_heap()
    return out[0] if isinstance(out, tuple) else out
