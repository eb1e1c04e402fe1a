"""Load a moemerge output: a plain transformers model, with the original routers put back for ``grouped``."""

from __future__ import annotations

from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file
from transformers import GenerationConfig
from transformers.utils import GENERATION_CONFIG_NAME

from moemerge.checkpoint.compressed import CompactExperts
from moemerge.checkpoint.model_files import is_compact, read_record
from moemerge.checkpoint.source import (
    SIDECAR,
    inspect_source,
    load_config,
    load_source,
    resolve_device,
    resolve_dtype,
)
from moemerge.errors import MoemergeError
from moemerge.precision import model_dtype
from moemerge.routing.grouped import KeptRouter, dropped_experts, install_grouped_routers


def load_model(path: str | Path, dtype: str = "auto", device: str = "cpu", allow_pickle: bool = False):
    """Load a reduced model (or any supported model) from ``path`` in eval mode.

    For ``--router grouped`` outputs, each MoE layer gets back its original n-way router, and a
    token routed to any member of a group goes to the group's merged expert (to a dropped expert: its novice,
    :mod:`moemerge.routing.grouped`). Other outputs
    are exactly what ``AutoModelForCausalLM.from_pretrained(path)`` gives. ``allow_pickle``: accept pickle
    weights from a trusted source.
    """
    source = inspect_source(path, allow_pickle=allow_pickle, compact=True)
    if is_compact(read_record(source.path)):
        model = load_compact(source, dtype, device)
    else:
        model, _ = load_source(source, dtype=dtype, device=device)
    grouped = grouped_routers(source)
    if grouped is not None:
        install_grouped_routers(source.family.moe_layers(model), *grouped)
    return model


def load_compact(source, dtype: str, device: str):
    """A compact mc-smoe output (checked source ``source``) in eval mode on ``device``: built on the meta device
    from its config, its experts :class:`~moemerge.checkpoint.compressed.CompressedExperts` filled from the
    factor file, every other weight from the model files as ``from_pretrained`` loads them; no dense expert
    matrix is ever formed."""
    from moemerge.streaming.layers import SourceTensors, load_into, skeleton  # moemerge.streaming imports this module

    config = load_config(source.path)
    storage = model_dtype(config, resolve_dtype(dtype))
    model = skeleton(config, storage)
    experts = CompactExperts(source)
    experts.install(model)
    for layer in experts.modules:
        experts.fill(layer, storage, torch.device("cpu"))
    tensors = SourceTensors(source.weight_files)
    load_into(model, tensors.read(list(tensors.file_of)), storage, lambda name: True)
    if (source.path / GENERATION_CONFIG_NAME).exists():
        model.generation_config = GenerationConfig.from_pretrained(source.path)
    return model.to(resolve_device(device)).eval()


def grouped_routers(source) -> tuple[dict, dict, int] | None:
    """For a ``--router grouped`` output (a checked source): (every MoE layer's :class:`KeptRouter`; every layer's
    groups; top-k), the arguments of
    :func:`moemerge.routing.grouped.install_grouped_routers` but the layers; None for other models."""
    meta = read_record(source.path)
    if meta is None or meta["router"] != "grouped":
        return None
    sidecar = source.path / SIDECAR
    damaged = f"{sidecar}, which holds the original routers of this --router grouped output,"
    try:
        tensors = load_file(sidecar)
    except (OSError, safetensors.SafetensorError) as err:
        raise MoemergeError(f"{damaged} cannot be read ({err}); reduce the original model again") from None
    groups = {entry["layer"]: entry["groups"] for entry in meta["layers"]}
    routers = {}
    for layer, layer_groups in groups.items():
        weight = tensors.get(f"layers.{layer}.weight")
        if weight is None or weight.ndim != 2:
            raise MoemergeError(f"{damaged} has no router for layer {layer}; reduce the original model again")
        novices = tensors.get(f"layers.{layer}.novices")
        dropped = len(dropped_experts(layer_groups, len(weight)))
        if (novices is None and dropped) or (novices is not None and novices.shape != (dropped, weight.shape[1])):
            found = "none" if novices is None else list(novices.shape)
            raise MoemergeError(
                f"{damaged} has novices {found} for layer {layer}, whose groups leave {dropped} experts "
                f"of {len(weight)} out (each needs a novice of size {weight.shape[1]}); reduce the original model again"
            )
        routers[layer] = KeptRouter(weight, tensors.get(f"layers.{layer}.e_score_correction_bias"), novices)
    return routers, groups, meta["source"]["top_k"]
