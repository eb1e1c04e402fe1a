"""Every registered family (``moemerge.adapters.FAMILIES``) on a tiny random model built from its own config class.

The oracles are the models' own forwards: the canonical view (router rows, selection bias, routing rule, experts
as gate / up / down) reproduces each MoE block's routed output, a reduction to all n experts leaves every logit as
it was, a reduction loads with transformers alone, merging experts that are exact copies under grouped routing
changes no logit, statistics equal a loop through the block's own experts module, and the streamed reduce equals
the in-memory one. Every method runs on one family of each layout (``LAYOUTS``); the richer method tests run on
the five families of ``conftest.FAMILIES``; these prove that each entry describes its family.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch
from conftest import TOKENIZER_DIR, run_cli, save_with_tokenizer
from test_streaming import check_streaming_equals_in_memory
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moemerge import apply_groups, load_model, plan_groups
from moemerge.adapters import FAMILIES, REFUSED, MoELayerView
from moemerge.errors import MoemergeError
from moemerge.routing.grouped import grouped_routing
from moemerge.statistics import collect_statistics
from moemerge.streaming import reduce_streaming

N, TOP_K, LAYERS = 8, 2, 3
SIZES = {  # applied where the family's config has the field
    "vocab_size": 4096,  # the demo tokenizer's
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 24,
    "max_position_embeddings": 256,
    "num_hidden_layers": LAYERS,
    "num_experts_per_tok": TOP_K,
    "moe_topk": TOP_K,  # Aria
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "router_scaling_factor": 2.5,  # Hy-V3
    "route_scale": 2.5,  # AFMoE
    "norm_topk_prob": False,  # families that always renormalise ignore it; the others must not renormalise
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "index_n_heads": 2,
    "index_head_dim": 8,
    "index_topk": 4,
    "sliding_window": 16,
    "use_mamba_kernels": False,  # Jamba: the CUDA kernels
    "attn_layer_period": 2,
    "attn_layer_offset": 1,
    "moe_layer_start_index": 1,  # ERNIE-4.5: the first layer dense
    "moe_num_shared_experts": 1,
    "num_dense_layers": 1,  # LFM2-MoE
    "moe_router_logit_softcapping": 2.0,  # Laguna: small enough to bend the scaled-up router logits
    "moe_routed_scaling_factor": 2.5,
    "mamba_n_heads": 8,  # Granite-4.0-H: must divide mamba_expand x hidden_size
    "mamba_d_state": 8,
    "mamba_chunk_size": 16,
    "topk_method": "group_limited_greedy",  # DeepSeek-V2: the group-limited of its two rules ("greedy" below)
}
HYBRID = {t: ["linear_attention", "full_attention"] for t in ("minimax", "qwen3_next", "qwen3_5_moe_text", "lara_mini")}
HYBRID |= {t: ["full_attention", "linear_attention"] for t in ("kimi_linear", "bailing_hybrid")}
HYBRID["lfm2_moe"] = ["conv", "full_attention"]  # short convolutions between attention layers
HYBRID["granitemoehybrid"] = ["linear_attention", "full_attention"]  # Mamba-2 mixers between attention layers
CALIB = ["--calib-samples", "2", "--calib-seq-len", "32", "--quiet", "--no-report"]


def tiny_config(model_type: str, **overrides):
    """A 3-layer config of ``model_type`` with 8 experts, top-2 (2 routing groups where the config has them), the first
    layer dense where the family has dense layers, and both attention kinds where it is a hybrid; ``overrides``
    replace any field."""
    family, config_class = FAMILIES[model_type], type(CONFIG_MAPPING[model_type]())
    defaults = config_class()
    fields = {k: v for k, v in SIZES.items() if hasattr(defaults, k)} | {family.expert_count_field: N}
    if hasattr(defaults, "kv_lora_rank"):  # multi-head latent attention: one kv head per query head
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    if hasattr(defaults, "n_group"):  # from the config class, not the entry under test
        fields |= {"n_group": 2, "topk_group": 1}
    if model_type in HYBRID:
        fields["layer_types"] = [HYBRID[model_type][i % 2] for i in range(LAYERS)]
    elif getattr(defaults, "layer_types", None) and not isinstance(
        getattr(config_class, "layer_types", None), property
    ):
        fields["layer_types"] = [defaults.layer_types[0]] * LAYERS  # (Jamba derives its list from layer periods)
    if getattr(defaults, "mlp_layer_types", None) is not None:
        fields["mlp_layer_types"] = ["dense"] + ["sparse"] * (LAYERS - 1)
    return config_class(**(fields | overrides))


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A float32 random model of ``model_type``; router rows scaled up so that routing is decisive, and every bias
    of the block outside its experts (a selection bias) random."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():
        for view in FAMILIES[model_type].moe_layers(model):
            view.router_weight.normal_(0, 0.5)
            tensors = [*view.block.named_parameters(), *view.block.named_buffers()]
            for name, tensor in tensors:  # found by name, not through the entry under test
                if "bias" in name and not name.startswith(("experts.", "shared")):
                    tensor.uniform_(-0.1, 0.1)
    return model


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.fixture(params=sorted(FAMILIES))
def model_type(request) -> str:
    return request.param


def test_canonical_view_reproduces_the_moe_block(model_type):
    """On random hidden states, the routed part of each MoE block's output (the block's output less what it gives
    with every expert's down projection zeroed: its shared experts) equals the canonical view's
    sum over the rule's top-k of weight x down(act(gate x) * up x). Routing is not degenerate: tokens pick
    different experts, and with group-limited routing the groups change some token's choice."""
    assert_view_reproduces_the_blocks(model_type, tiny_model(model_type))


def test_deepseek_v2_greedy_routing_is_reproduced():
    """DeepSeek-V2's other rule (``topk_method: greedy``, the default): plain top-k, the groups ignored."""
    model = tiny_model("deepseek_v2", topk_method="greedy")
    assert FAMILIES["deepseek_v2"].routing_rule(model.config).n_group == 1
    assert_view_reproduces_the_blocks("deepseek_v2", model)


@torch.no_grad()
def assert_view_reproduces_the_blocks(model_type: str, model) -> None:
    family = FAMILIES[model_type]
    views = family.moe_layers(model)
    with_experts = [
        i for i, layer in enumerate(model.model.layers) if any(n.endswith("experts") for n, _ in layer.named_modules())
    ]
    assert views and [v.layer for v in views] == with_experts
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    for view in views:
        full = view.block(x[None])
        gate, up, down = view.expert_weights()
        kept = down.clone()
        down.zero_()
        shared = view.block(x[None])
        down.copy_(kept)
        full, shared = (out[0] if isinstance(out, tuple) else out for out in (full, shared))
        weights, ids = view.routing.route(x @ view.router_weight.T, view.selection_bias)
        expected = torch.zeros_like(x)
        for slot in range(ids.shape[1]):
            j = ids[:, slot]
            h = view.gating(torch.einsum("th,tih->ti", x, gate[j]), torch.einsum("th,tih->ti", x, up[j]))
            expected += weights[:, slot, None] * torch.einsum("ti,thi->th", h, down[j])
        torch.testing.assert_close((full - shared).reshape(x.shape), expected, rtol=1e-4, atol=1e-5)
        assert len({tuple(sorted(row)) for row in ids.tolist()}) > 3
        if view.routing.n_group > 1:
            ungrouped = type(view.routing)(top_k=view.routing.top_k, scoring=view.routing.scoring)
            assert not torch.equal(
                ungrouped.route(x @ view.router_weight.T, view.selection_bias)[1].sort()[0], ids.sort()[0]
            )


def test_statistics_equal_a_loop_through_the_familys_own_experts(model_type):
    """Each MoE layer's statistics against an independent count: the (tokens, top-k ids, top-k weights) the block
    itself hands its experts module (hooked there, so the family's own routing), and each expert's output from
    that experts module's own forward with every token sent to that expert alone. Checks the counts, the mean
    routing weight, the mean output over all tokens, the mean output over routed tokens and the REAP saliency."""
    model = tiny_model(model_type)
    views = FAMILIES[model_type].moe_layers(model)
    needs = ("routing_weight_mean", "routed_mean_output")
    seen = {v.layer: [] for v in views}
    hooks = [
        v.block.experts.register_forward_pre_hook(lambda _, args, layer=v.layer: seen[layer].append(args))
        for v in views
    ]
    stats = collect_statistics(model, views, calibration(), needs=needs, progress=False)
    for hook in hooks:
        hook.remove()
    for view in views:
        x = torch.cat([a[0] for a in seen[view.layer]])
        ids, weights = torch.cat([a[1] for a in seen[view.layer]]), torch.cat([a[2] for a in seen[view.layer]])
        with torch.no_grad():
            outputs = torch.stack(
                [
                    view.block.experts(x, torch.full_like(ids[:, :1], j), torch.ones_like(weights[:, :1]))
                    for j in range(N)
                ]
            ).double()  # [n, T, H]
        chosen = torch.stack([(ids == j).any(1) for j in range(N)])  # [n, T]
        weight_of = torch.stack([(weights * (ids == j)).sum(1) for j in range(N)]).double()  # [n, T]
        share = weight_of / weights.sum(1).double()  # REAP's weight: the top-k weights renormalised
        routed = chosen.sum(1).clamp(min=1)[:, None]
        got = stats[view.layer]
        assert got.num_tokens == len(x) and torch.equal(got.counts, chosen.sum(1))
        assert chosen.sum(1).gt(0).sum() > 2
        close = dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.routing_weight_mean.double(), weight_of.mean(1), **close)
        torch.testing.assert_close(got.mean_output.double(), outputs.mean(1), **close)
        routed_mean = (outputs * chosen[..., None]).sum(1) / routed
        torch.testing.assert_close(got.routed_mean_output.double(), routed_mean, **close)
        reap = (share * outputs.norm(dim=-1) * chosen).sum(1) / routed[:, 0]
        torch.testing.assert_close(got.reap.double(), reap, **close)


def calibration() -> list[torch.Tensor]:
    return [torch.randint(0, 4096, (24,), generator=torch.Generator().manual_seed(s)) for s in range(2)]


def test_reduce_to_every_expert_leaves_the_logits(model_type):
    """Planning and applying n groups of one expert each (reduce mode, frequency router rows) keeps every logit."""
    model = tiny_model(model_type)
    family = FAMILIES[model_type]
    before = logits(model)
    stats = collect_statistics(model, family.moe_layers(model), calibration(), progress=False)
    groups = plan_groups(stats, family, model.config, N)
    assert all(g == [[j] for j in range(N)] for g in groups.values())
    apply_groups(model, family, stats, groups, router_rows_rule="frequency")
    assert torch.equal(logits(model), before)


def test_grouped_routing_over_every_expert_leaves_the_logits(model_type):
    """n groups of one expert each with ``--router grouped`` (the original router kept, its ids mapped through
    the groups, as a loaded grouped output routes) keeps every logit."""
    model = tiny_model(model_type)
    family = FAMILIES[model_type]
    before = logits(model)
    stats = collect_statistics(model, family.moe_layers(model), calibration(), progress=False)
    groups = plan_groups(stats, family, model.config, N)
    kept = apply_groups(model, family, stats, groups, router="grouped")
    with ExitStack() as routed:
        for view in family.moe_layers(model):
            routed.enter_context(grouped_routing(view, kept[view.layer], groups[view.layer], view.routing.top_k))
        assert torch.equal(logits(model), before)


def test_a_reduced_model_in_memory_runs_as_its_saved_checkpoint(model_type, tmp_path):
    """A model reduced in memory to n/2 experts (no copy of the old counts left in a block) gives the logits of
    the same model saved and loaded again by transformers."""
    model = tiny_model(model_type)
    family = FAMILIES[model_type]
    stats = collect_statistics(model, family.moe_layers(model), calibration(), progress=False)
    apply_groups(model, family, stats, plan_groups(stats, family, model.config, N // 2))
    model.save_pretrained(tmp_path / "reduced")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "reduced", dtype=torch.float32).eval()
    assert torch.equal(logits(model), logits(loaded))


def test_reduce_writes_a_standard_checkpoint(model_type, tmp_path, capfd):
    """``reduce --experts n/2`` (HC-SMoE, router reduce) writes a checkpoint that transformers alone loads, with
    n/2 experts in every MoE layer and the config saying so, and that runs."""
    source = save_with_tokenizer(tiny_model(model_type), tmp_path / "source")
    code, _, err = run_cli(["reduce", source, "--experts", N // 2, "--out", tmp_path / "out", *CALIB], capfd)
    assert code == 0, err
    reduced = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    family = FAMILIES[model_type]
    assert family.num_experts(reduced.config) == N // 2
    assert {v.num_experts for v in family.moe_layers(reduced)} == {N // 2}
    assert logits(reduced).isfinite().all()
    prompt = torch.tensor([[11, 402, 97, 1500]])
    assert reduced.generate(prompt, max_new_tokens=3, do_sample=False).shape == (1, 7)


LAYOUTS = {  # one type per way a family stores or calls its experts and router
    "aria_text": "experts stored transposed",
    "afmoe": "router called on [B, T, H], selection bias on the block, rows at router.gate.weight",
    "ernie4_5_moe": "selection bias at gate.moe_statics, stored [1, n]",
    "hunyuan_v1_moe": "router rows at gate.wg.weight",
    "deepseek_v2": "group-limited routing scored by the group's best",
    "beam": "experts with a gate function of their own (a float32 SiLU)",
}
METHODS = [
    {"method": "mc-smoe"},
    {"method": "mc-smoe", "mc_smoe_dense": True, "router": "grouped"},
    {"cluster": "fcm"},
    {"merge": "zipit", "align": True},
    {"method": "o-prune", "oprune_budget": 50},
    {"method": "reap", "refit": "down"},
    {"method": "mone", "router": "grouped", "refit": "down"},
]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("options", METHODS, ids=["-".join(map(str, o.values())) for o in METHODS])
def test_every_method_runs_on_every_layout(layout, options, tmp_path):
    """Each method (merging, alignment, pruning, novices, the refit, MC-SMoE compact and dense) reduces a
    family of each layout, streamed exactly as in memory, to a checkpoint that loads (test_streaming's oracle)."""
    source = save_with_tokenizer(tiny_model(layout), tmp_path / "src")
    check_streaming_equals_in_memory(tmp_path, source, options | {"report": False})


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_ream_runs_on_every_layout(layout, tmp_path):
    """REAM (layer-sequential: each layer's statistics from the already-reduced layers, so no in-memory twin)
    writes a checkpoint that transformers alone loads, with n/2 experts in every MoE layer, and that runs."""
    source = save_with_tokenizer(tiny_model(layout), tmp_path / "src")
    reduce_streaming(source, tmp_path / "out", method="ream", experts=N // 2, calib_samples=3, calib_seq_len=24)
    reduced = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert {v.num_experts for v in FAMILIES[layout].moe_layers(reduced)} == {N // 2}
    assert logits(reduced).isfinite().all()


def test_streamed_reduce_equals_in_memory(model_type, tmp_path):
    """The layer-at-a-time reduce writes what the in-memory one writes, bit for bit (test_streaming's oracle)."""
    source = save_with_tokenizer(tiny_model(model_type), tmp_path / "src")
    check_streaming_equals_in_memory(tmp_path, source, {"report": False})


def test_merging_copies_under_grouped_routing_changes_no_logit(model_type, tmp_path, capfd):
    """Experts 2i and 2i + 1 made exact copies (router rows distinct): ``reduce --experts n/2 --router grouped``
    merges each pair (their mean outputs are equal) and the output, loaded by moemerge, gives the original logits;
    its standard view (r router rows) loads with transformers alone and has n/2 experts per MoE layer."""
    model = tiny_model(model_type)
    with torch.no_grad():
        for view in FAMILIES[model_type].moe_layers(model):
            for tensor in view.expert_weights():
                tensor[1::2] = tensor[0::2]
    source = save_with_tokenizer(model, tmp_path / "source")
    out = tmp_path / "out"
    code, _, err = run_cli(["reduce", source, "--experts", N // 2, "--router", "grouped", "--out", out, *CALIB], capfd)
    assert code == 0, err
    torch.testing.assert_close(logits(load_model(out, dtype="float32")), logits(model), rtol=1e-5, atol=1e-6)
    standard = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert [v.num_experts for v in FAMILIES[model_type].moe_layers(standard)] == [N // 2] * len(
        FAMILIES[model_type].moe_layers(model)
    )
    assert logits(standard).isfinite().all()


@pytest.mark.parametrize("heading,registered", [("Supported model types", FAMILIES), ("Refused model types", REFUSED)])
def test_readme_tables_list_exactly_the_registered_model_types(heading, registered):
    """The README's tables of supported and of refused model types name every registered type once, and no
    other."""
    readme = (TOKENIZER_DIR.parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split(f"### {heading}", 1)[1].split("\n### ", 1)[0]
    listed = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")][1:]  # past the header
    assert sorted(listed) == sorted(registered)
    assert heading != "Supported model types" or f"Supported: {len(FAMILIES)} model types" in readme


@pytest.mark.parametrize("cap", [-1.0, float("nan"), float("inf")])
def test_a_router_softcap_that_is_no_number_at_least_0_is_refused(cap):
    """Laguna's router-logit soft cap must be a number >= 0; anything else is a one-line config error naming it."""
    config = tiny_config("laguna")
    config.moe_router_logit_softcapping = cap
    with pytest.raises(MoemergeError, match=r"moe_router_logit_softcapping is .* a number >= 0"):
        FAMILIES["laguna"].check_config(config, "config.json")


def test_input_embeddings_stored_under_their_in_memory_name_stream(tmp_path):
    """A BailingHybrid checkpoint whose embeddings are stored as ``model.embed_tokens`` (which transformers loads as
    well as its own ``model.word_embeddings``) streams to a checkpoint that transformers loads to the same tensors as
    the reduction of the checkpoint transformers saved."""
    from safetensors.torch import load_file, save_file

    saved = save_with_tokenizer(tiny_model("bailing_hybrid"), tmp_path / "saved")
    renamed = save_with_tokenizer(tiny_model("bailing_hybrid"), tmp_path / "renamed")
    tensors = load_file(renamed / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors.pop("model.word_embeddings.weight")
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})
    for source in (saved, renamed):
        reduce_streaming(source, tmp_path / f"out-{source.name}", experts=N // 2, calib_samples=2, calib_seq_len=24)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / f"out-{n}").state_dict() for n in ("saved", "renamed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_experts_with_interleaved_gate_up_rows_and_biases_are_refused():
    """gpt-oss's experts interleave their gate and up rows and carry biases (transformers' own layout flags): a view
    of them is a one-line error naming the experts class, never a silently wrong reading."""
    config = CONFIG_MAPPING["gpt_oss"]()
    config = type(config)(**{k: v for k, v in SIZES.items() if hasattr(config, k)}, num_local_experts=N)
    torch.manual_seed(0)
    block = AutoModelForCausalLM.from_config(config).model.layers[0].mlp
    rule = FAMILIES["mixtral"].routing_rule(config)
    with pytest.raises(MoemergeError, match=r"layer 0: GptOssExperts interleaves its gate and up rows"):
        MoELayerView(0, block, rule, router_name="router")
