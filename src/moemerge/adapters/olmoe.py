"""OLMoE: softmax router (optionally renormalised top-k), no shared expert."""

from moemerge.adapters.base import MoEFamily


class OlmoeFamily(MoEFamily):
    model_type = "olmoe"
    expert_count_field = "num_experts"
