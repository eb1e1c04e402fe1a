"""Load a moemerge output: a plain transformers model, with the original routers put back for ``grouped``."""

from __future__ import annotations

from pathlib import Path

import safetensors
from safetensors.torch import load_file

from moemerge.checkpoint.model_files import read_record
from moemerge.checkpoint.source import SIDECAR, inspect_source, load_source
from moemerge.errors import MoemergeError
from moemerge.routing.grouped import KeptRouter, dropped_experts, install_grouped_routers


def load_model(path: str | Path, dtype: str = "auto", device: str = "cpu", allow_pickle: bool = False):
    """Load a reduced model (or any supported model) from ``path`` in eval mode.

    For ``--router grouped`` outputs, each MoE layer gets back its original n-way router, and a
    token routed to any member of a group goes to the group's merged expert (to a dropped expert: its novice,
    :mod:`moemerge.routing.grouped`). Other outputs
    are exactly what ``AutoModelForCausalLM.from_pretrained(path)`` gives. ``allow_pickle``: accept pickle
    weights from a trusted source.
    """
    source = inspect_source(path, allow_pickle=allow_pickle)
    model, _ = load_source(source, dtype=dtype, device=device)
    grouped = grouped_routers(source)
    if grouped is not None:
        install_grouped_routers(source.family.moe_layers(model), *grouped)
    return model


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
