"""Every private transformers API moemerge uses, and nothing else.

transformers changes these between minor releases without notice. Keeping them here means one file to read when
an upgrade breaks us, and ``tests/test_transformers_internals.py`` checks each by name, so a failure says which
API moved. The rest of moemerge uses transformers' public API only.

- ``AutoModelForCausalLM._model_mapping``: config class -> model class (to subclass it for per-layer expert
  counts).
- ``PreTrainedModel._can_set_attn_implementation`` / ``_can_set_experts_implementation``: classmethods that read
  the source file of the class's ``__module__`` to decide whether fast kernels apply, so a subclass made here
  claims its base's module.
- ``transformers.integrations.moe._default_apply_gate`` and the experts modules' ``_apply_gate``: how an experts
  module turns its gate and up pre-activations into activations (the default act_fn(gate) * up, or a family's
  own, such as a clamped SwiGLU).
- ``transformers.conversion_mapping.get_model_conversion_mapping``,
  ``transformers.core_model_loading.convert_and_load_state_dict_in_model`` / ``revert_weight_conversion`` and
  ``transformers.modeling_utils.LoadStateDictConfig``: the on-disk <-> in-memory tensor conversions
  (per-expert tensors fused into ``gate_up_proj`` / ``down_proj``, renamed modules) that ``from_pretrained``
  and ``save_pretrained`` apply, used here one decoder layer at a time (with the loading info's
  ``mismatched_keys``: tensors whose shape differs from the model's).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model, revert_weight_conversion
from transformers.integrations.moe import _default_apply_gate
from transformers.modeling_utils import LoadStateDictConfig


def causal_lm_class(config) -> type:
    """The ``*ForCausalLM`` class ``AutoModelForCausalLM`` builds for ``config``."""
    return AutoModelForCausalLM._model_mapping[type(config)]


def subclass_with_init(base: type, init) -> type:
    """A subclass of the model class ``base`` with ``__init__`` replaced by ``init``, which keeps the base's name,
    module and so its kernel choices."""
    return type(base.__name__, (base,), {"__init__": init, "__module__": base.__module__})


def own_gating(experts: nn.Module):
    """The experts module's own ``_apply_gate`` (gate and up pre-activations side by side [.., 2I] -> activations
    [.., I]) where its family defines one (GLM-5-Next's and Hunyuan-V4's clamped SwiGLU, Beam's float32 SiLU), or
    None where it gates as transformers' default, act_fn(gate) * up."""
    apply = getattr(type(experts), "_apply_gate", None)
    return None if apply is None or apply is _default_apply_gate else experts._apply_gate


def load_converted(
    model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> list[tuple[str, list[int], list[int]]]:
    """Load on-disk ``tensors`` (names and layout as in the safetensors files) into ``model`` as
    ``from_pretrained`` would, converting them to the in-memory layout and ``dtype`` (tensors transformers keeps in
    float32 stay so). Returns the tensors left unloaded because their shape differs from the model's:
    (in-memory name, shape in ``tensors``, shape in ``model``), sorted."""
    config = LoadStateDictConfig(dtype=dtype, weight_mapping=get_model_conversion_mapping(model))
    info, _ = convert_and_load_state_dict_in_model(model, tensors, config)
    return sorted((name, list(stored), list(built)) for name, stored, built in info.mismatched_keys)


def to_disk_layout(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (in-memory names and layout, a subset of ``model``'s) as ``save_pretrained`` writes it."""
    return revert_weight_conversion(model, state)
