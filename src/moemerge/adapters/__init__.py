"""Model families moemerge supports, found by ``config.model_type``. A new family is one entry of
:mod:`moemerge.adapters.families`."""

from __future__ import annotations

from moemerge.adapters.base import MoEFamily, MoELayerView, RoutingRule
from moemerge.adapters.families import ENTRIES, REFUSED
from moemerge.errors import MoemergeError

FAMILIES: dict[str, MoEFamily] = {f.model_type: f for f in ENTRIES}

_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _names_experts(config: dict) -> bool:
    """Whether a config, or a config nested in it (DBRX ``ffn_config``, Llama 4 ``text_config``), counts experts."""
    for key, value in config.items():
        if key in _EXPERT_COUNT_KEYS and type(value) is int and value > 0:
            return True
        if isinstance(value, dict) and _names_experts(value):
            return True
    return False


def family_for(config: dict) -> MoEFamily:
    """The adapter for a model's ``config.json`` contents; a clear error for dense or unknown models."""
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in REFUSED:
        raise MoemergeError(f"model family {model_type!r} is not supported: {REFUSED[model_type]}")
    if _names_experts(config):
        raise MoemergeError(
            f"model family {model_type!r} is not supported; supported Mixture-of-Experts families: {', '.join(FAMILIES)}"
        )
    raise MoemergeError(
        f"{model_type!r} is a dense model (its config names no experts): nothing to reduce; "
        f"moemerge works on Mixture-of-Experts models ({', '.join(FAMILIES)})"
    )


__all__ = ["FAMILIES", "REFUSED", "MoEFamily", "MoELayerView", "RoutingRule", "family_for"]
