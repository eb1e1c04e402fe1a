"""The model families moemerge supports: one declarative :class:`MoEFamily` entry each.

Each entry was checked against transformers' own modelling code (``../shared/families.md`` surveys them), and
``tests/test_families.py`` proves that the canonical view of a tiny random model of each reproduces its MoE
block's own forward, and that a reduction of each loads and runs as a standard model.

Shared experts (Qwen2-MoE's gated ``shared_expert``, DeepSeek-V3's ``shared_experts``) are not routed: they
are kept as they are.
"""

from __future__ import annotations

from moemerge.adapters.base import MoEFamily

_DEEPSEEK_V3 = {  # sigmoid scores, selection bias, group-limited top-k, routed scaling, shared experts
    "expert_count_field": "n_routed_experts",
    "scoring": "sigmoid",
    "scale": "routed_scaling_factor",
    "group_limited": True,
}

ENTRIES = (
    MoEFamily("mixtral", "num_local_experts", normalize=True, checkpoints="Mixtral-8x7B, Mixtral-8x22B"),
    MoEFamily("minimax", "num_local_experts", normalize=True, checkpoints="MiniMax-Text-01, MiniMax-M1"),
    MoEFamily("mellum", "num_local_experts"),
    MoEFamily(
        "minimax_m2",
        "num_local_experts",
        bias_on_block=True,
        scoring="sigmoid",
        normalize=True,
        norm_eps=0.0,
        checkpoints="MiniMax-M2",
    ),
    MoEFamily(
        "hy_v3", "num_experts", bias_on_block=True, scoring="sigmoid", normalize=True, scale="router_scaling_factor"
    ),
    MoEFamily(
        "lfm2_moe",
        "num_experts",
        block="feed_forward",
        selection_bias="expert_bias",
        bias_on_block=True,
        scoring="sigmoid",
        scale="routed_scaling_factor",
        norm_eps=1e-6,
        checkpoints="LFM2-8B-A1B",
    ),
    MoEFamily(
        "afmoe",
        "num_experts",
        router="router",
        router_weight="gate.weight",
        selection_bias="expert_bias",
        bias_on_block=True,
        router_takes_batch=True,
        scoring="sigmoid",
        normalize=True,
        scale="route_scale",
    ),
    MoEFamily("qwen2_moe", "num_experts", checkpoints="Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B"),
    MoEFamily("qwen3_moe", "num_experts", checkpoints="Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B"),
    MoEFamily("qwen3_next", "num_experts", checkpoints="Qwen3-Next-80B-A3B"),
    MoEFamily("qwen3_5_moe_text", "num_experts", normalize=True),
    MoEFamily("flint", "num_experts", scoring="sigmoid", norm_eps=0.0),
    MoEFamily("lara_mini", "num_experts"),
    MoEFamily("olmoe", "num_experts", checkpoints="OLMoE-1B-7B"),
    MoEFamily("flex_olmo", "num_experts", checkpoints="FlexOlmo-7x7B"),
    MoEFamily(
        "granitemoe",
        "num_local_experts",
        block="block_sparse_moe",
        router="router",
        normalize=True,
        checkpoints="granite-3.x-1b-a400m, granite-3.x-3b-a800m, PowerMoE-3B",
    ),
    MoEFamily("granitemoeshared", "num_local_experts", block="block_sparse_moe", router="router", normalize=True),
    MoEFamily("granitemoe_swa", "num_local_experts", block="block_sparse_moe", router="router", normalize=True),
    MoEFamily(
        "granitemoehybrid",
        "num_local_experts",
        block="block_sparse_moe",
        router="router",
        normalize=True,
        checkpoints="Granite-4.0-H-Small, Granite-4.0-H-Tiny",
    ),
    MoEFamily(
        "jamba",
        "num_experts",
        block="feed_forward",
        router="router",
        normalize=False,
        checkpoints="Jamba-v0.1, Jamba-1.5-Mini, Jamba-1.5-Large",
    ),
    MoEFamily("aria_text", "moe_num_experts", top_k_field="moe_topk", router="router", normalize=True),
    MoEFamily("hunyuan_v1_moe", "num_experts", router_weight="wg.weight", normalize=True, checkpoints="Hunyuan-A13B"),
    MoEFamily(
        "ernie4_5_moe",
        "moe_num_experts",
        selection_bias="moe_statics.e_score_correction_bias",
        normalize=True,
        checkpoints="ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B",
    ),
    MoEFamily(
        "deepseek_v2",
        "n_routed_experts",
        normalize=False,
        scale="routed_scaling_factor",
        group_limited=("topk_method", "group_limited_greedy"),
        group_score="max",
        checkpoints="DeepSeek-V2, DeepSeek-V2-Lite, DeepSeek-Coder-V2",
    ),
    MoEFamily("deepseek_v3", **_DEEPSEEK_V3, checkpoints="DeepSeek-V3, DeepSeek-R1, Kimi-K2, Moonlight"),
    MoEFamily("deepseek_v32", **_DEEPSEEK_V3, checkpoints="DeepSeek-V3.2-Exp"),
    MoEFamily("glm4_moe", **_DEEPSEEK_V3, checkpoints="GLM-4.5, GLM-4.5-Air, GLM-4.6"),
    MoEFamily("glm4_moe_lite", **_DEEPSEEK_V3),
    MoEFamily("sarvam_mla", **_DEEPSEEK_V3),
    MoEFamily("sarvam_moe", **_DEEPSEEK_V3),
    MoEFamily(
        "kimi_linear", **(_DEEPSEEK_V3 | {"expert_count_field": "num_experts"}), checkpoints="Kimi-Linear-48B-A3B"
    ),
    MoEFamily("bailing_hybrid", **(_DEEPSEEK_V3 | {"expert_count_field": "num_experts"})),
    MoEFamily("mimo_v2_flash", **_DEEPSEEK_V3, checkpoints="MiMo-V2-Flash"),
    MoEFamily("solar_open", **_DEEPSEEK_V3),
    MoEFamily("dots1", **_DEEPSEEK_V3, checkpoints="dots.llm1"),
    MoEFamily("beam", **(_DEEPSEEK_V3 | {"expert_count_field": "num_experts"})),
    MoEFamily(
        "laguna",
        "num_experts",
        scoring="sigmoid",
        normalize=True,
        scale="moe_routed_scaling_factor",
        softcap="moe_router_logit_softcapping",
    ),
    MoEFamily("exaone_moe", **(_DEEPSEEK_V3 | {"expert_count_field": "num_experts"})),
)

REFUSED = {  # model types whose MoE layers do not fit the canonical view: why, as the one-line error says it
    "longcat_flash": "its routers also pick identity ('zero') experts, which have no weights to merge",
    "ernie4_5_vl_moe": "each layer has separate text and vision experts, routed by modality",
    "zaya": "its router carries state from one layer to the next",
    "doge": "its experts are product-key rank-1 vectors, not feed-forward experts",
    "deepseek_v4": "its first MoE layers route by token id (hash routing), not by a learned router",
    "glm_moe_dsa": "each decoder layer hands the next its attention indexer's choices, which moemerge's "
    "layer-at-a-time pipeline does not carry",
    "hy_v4": "each decoder layer hands the next its attention indexer's choices, which moemerge's "
    "layer-at-a-time pipeline does not carry",
    "diffusion_gemma": "it is a diffusion language model; moemerge calibrates and evaluates causal language models",
    "jetmoe": "its attention is itself a mixture of experts, and its experts carry output biases",
    "switch_transformers": "encoder-decoder models with expert capacity are not supported yet",
    "nllb-moe": "encoder-decoder models with expert capacity are not supported yet",
}
