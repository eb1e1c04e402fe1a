"""Qwen3-MoE: softmax router, fine-grained experts, no shared expert; dense layers by ``mlp_only_layers`` / ``decoder_sparse_step``."""

from moemerge.adapters.base import MoEFamily


class Qwen3MoeFamily(MoEFamily):
    model_type = "qwen3_moe"
    expert_count_field = "num_experts"
