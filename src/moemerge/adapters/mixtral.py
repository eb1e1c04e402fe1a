"""Mixtral (8x7B, 8x22B): softmax router, top-2, no shared expert."""

from moemerge.adapters.base import MoEFamily


class MixtralFamily(MoEFamily):
    model_type = "mixtral"
    expert_count_field = "num_local_experts"
