"""Qwen1.5-MoE / Qwen2-MoE: softmax router plus a shared expert with a sigmoid gate.

The shared expert and its gate are not routed experts: they are kept as they are.
"""

from moemerge.adapters.base import MoEFamily


class Qwen2MoeFamily(MoEFamily):
    model_type = "qwen2_moe"
    expert_count_field = "num_experts"
