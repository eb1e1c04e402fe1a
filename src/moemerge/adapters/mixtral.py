"""Mixtral (8x7B, 8x22B): softmax router, top-2, no shared expert."""

from moemerge.adapters.base import MoEFamily, RoutingRule


class MixtralFamily(MoEFamily):
    model_type = "mixtral"
    expert_count_field = "num_local_experts"

    def routing_rule(self, config) -> RoutingRule:
        """Mixtral always renormalises its top-k weights."""
        return RoutingRule(top_k=config.num_experts_per_tok, normalize=True)
