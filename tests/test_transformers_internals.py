"""Each private transformers API that ``moemerge.transformers_internals`` wraps, by name: still there, and still doing
what moemerge relies on, checked against transformers' public ``from_pretrained`` / ``save_pretrained`` as the
oracle. A failure here names the API that moved in a new transformers release."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import FAMILIES, save_tiny, tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moemerge import transformers_internals as internals

APIS = [
    ("transformers", "AutoModelForCausalLM._model_mapping"),
    ("transformers", "PreTrainedModel._can_set_attn_implementation"),
    ("transformers", "PreTrainedModel._can_set_experts_implementation"),
    ("transformers.conversion_mapping", "get_model_conversion_mapping"),
    ("transformers.core_model_loading", "convert_and_load_state_dict_in_model"),
    ("transformers.core_model_loading", "revert_weight_conversion"),
    ("transformers.modeling_utils", "LoadStateDictConfig"),
    ("transformers.integrations.moe", "_default_apply_gate"),
]


@pytest.mark.parametrize("module,name", APIS, ids=[f"{m}.{n}" for m, n in APIS])
def test_private_api_exists(module, name):
    """Every private API named in the module's docstring is still where moemerge looks for it."""
    obj = importlib.import_module(module)
    for part in name.split("."):
        assert hasattr(obj, part), f"transformers moved {module}.{name}: update moemerge/transformers_internals.py"
        obj = getattr(obj, part)
    assert f"{module}.{name}".split(".")[-1] in internals.__doc__, "document every private API in the module"


@pytest.mark.parametrize("family", FAMILIES)
def test_model_mapping_gives_the_class_from_config_builds(family):
    """``AutoModelForCausalLM._model_mapping``: the class ``causal_lm_class`` returns is the one the public
    ``AutoModelForCausalLM.from_config`` builds."""
    config = tiny_config(family)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config)
    assert internals.causal_lm_class(config) is type(built), "AutoModelForCausalLM._model_mapping changed"


def test_subclass_keeps_kernel_choices_and_loads(tmp_path):
    """``_can_set_attn_implementation`` / ``_can_set_experts_implementation``: a subclass made by
    ``subclass_with_init`` answers as its base, runs the given ``__init__``, and loads a checkpoint to the base's
    logits."""
    source = save_tiny("mixtral", tmp_path / "src", tokenizer=False)
    oracle = AutoModelForCausalLM.from_pretrained(source)
    base = internals.causal_lm_class(oracle.config)
    calls = []

    def init(self, config):
        calls.append(config)
        base.__init__(self, config)

    sub = internals.subclass_with_init(base, init)
    for name in ("_can_set_attn_implementation", "_can_set_experts_implementation"):
        assert getattr(sub, name)() == getattr(base, name)(), f"PreTrainedModel.{name} changed"
    assert sub.__name__ == base.__name__ and sub.__module__ == base.__module__
    model = sub.from_pretrained(source).eval()
    assert calls and isinstance(model, base)
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, oracle.eval()(ids).logits)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_load_converted_equals_from_pretrained(tmp_path, family, dtype):
    """``get_model_conversion_mapping`` + ``LoadStateDictConfig`` + ``convert_and_load_state_dict_in_model``:
    loading the on-disk tensors into a meta skeleton gives ``from_pretrained``'s parameters: names, dtypes (those
    transformers keeps in float32 included) and values."""
    source = save_tiny(family, tmp_path / "src", tokenizer=False)
    oracle = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(oracle.config, dtype=dtype)
    assert internals.load_converted(model, load_file(source / "model.safetensors"), dtype) == []
    model.tie_weights()
    expected = dict(oracle.named_parameters())
    loaded = dict(model.named_parameters())
    assert set(loaded) == set(expected), "convert_and_load_state_dict_in_model: other parameter names"
    for name, p in loaded.items():
        assert p.dtype == expected[name].dtype, f"LoadStateDictConfig(dtype=): {name} is {p.dtype}"
        assert torch.equal(p, expected[name]), f"convert_and_load_state_dict_in_model: {name} differs"


def test_load_converted_reports_tensors_of_another_shape(tmp_path):
    """``convert_and_load_state_dict_in_model``'s ``loading_info.mismatched_keys``: weights of 8 experts loaded into
    a model of 6 are named, with both shapes, and left unloaded."""
    source = save_tiny("mixtral", tmp_path / "src", tokenizer=False)
    config = AutoModelForCausalLM.from_pretrained(source).config
    config.num_local_experts = 6
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    mismatched = internals.load_converted(model, load_file(source / "model.safetensors"), torch.float32)
    names = {name for name, _, _ in mismatched}
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.gate.weight" in names
    for name, stored, built in mismatched:
        assert stored[0] == 8 and built[0] == 6 and model.get_parameter(name).is_meta, name


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_to_disk_layout_equals_save_pretrained(tmp_path, family):
    """``revert_weight_conversion``: the in-memory state dict converted back holds exactly the tensors
    ``save_pretrained`` writes (fused experts split into per-expert tensors, names as on disk)."""
    model = AutoModelForCausalLM.from_pretrained(save_tiny(family, tmp_path / "src", tokenizer=False))
    model.save_pretrained(tmp_path / "saved")
    written = load_file(tmp_path / "saved" / "model.safetensors")
    converted = internals.to_disk_layout(model, model.state_dict())
    assert set(converted) == set(written), "revert_weight_conversion: other tensor names than save_pretrained"
    for name, t in converted.items():
        assert torch.equal(t.contiguous(), written[name]), f"revert_weight_conversion: {name} differs"


def test_own_gating_is_a_familys_own_apply_gate_and_none_for_the_default():
    """``_apply_gate`` / ``_default_apply_gate``: Mixtral's experts gate as transformers' default (so moemerge
    computes act_fn(gate) * up itself), Beam's have their own float32 gate, which ``own_gating`` returns; on random
    pre-activations it equals SiLU(gate) * up computed here."""
    from test_families import tiny_model

    mixtral, beam = (tiny_model(t).model.layers[-1].mlp.experts for t in ("mixtral", "beam"))
    assert internals.own_gating(mixtral) is None
    own = internals.own_gating(beam)
    gate_up = torch.randn(5, 2 * beam.intermediate_dim, generator=torch.Generator().manual_seed(0))
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(own(gate_up), torch.nn.functional.silu(gate) * up)
