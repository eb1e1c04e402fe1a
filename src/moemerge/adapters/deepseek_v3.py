"""DeepSeek-V3: sigmoid scores, selection-only ``e_score_correction_bias``, group-limited top-k,
``routed_scaling_factor``, shared experts, and the first ``first_k_dense_replace`` layers dense.

Group-limited routing splits the n experts into ``n_group`` contiguous blocks, scores each block
by the sum of its two best scores, keeps the best ``topk_group`` blocks and picks top-k inside
them. A reduced router stays valid when every block keeps the same number of experts (at least
two) and no merged expert mixes blocks, so :meth:`partitions` makes each block its own
clustering problem; r must then be a multiple of ``n_group``.
"""

import math

from moemerge.adapters.base import MoEFamily, RoutingRule, config_count
from moemerge.errors import MoemergeError


class DeepseekV3Family(MoEFamily):
    model_type = "deepseek_v3"
    expert_count_field = "n_routed_experts"

    def routing_rule(self, config) -> RoutingRule:
        return RoutingRule(
            top_k=config.num_experts_per_tok,
            scoring="sigmoid",
            normalize=config.norm_topk_prob,
            scale=config.routed_scaling_factor,
            n_group=config.n_group,
            topk_group=config.topk_group,
        )

    def check_config(self, config, file) -> None:
        """The base checks, and group-limited routing that can run: ``n_group`` splits the experts into blocks
        of at least two, ``topk_group`` of them hold at least top-k experts, ``routed_scaling_factor`` > 0."""
        super().check_config(config, file)
        n, top_k = config.n_routed_experts, config.num_experts_per_tok
        groups = config_count(config, "n_group", file, (n, "n_routed_experts"))
        config_count(config, "topk_group", file, (groups, "n_group"))
        if n % groups or n // groups < 2 or config.topk_group * (n // groups) < top_k:
            raise MoemergeError(
                f"{file}: n_group {groups} and topk_group {config.topk_group} do not fit n_routed_experts {n} and "
                f"num_experts_per_tok {top_k} (n_group must split the experts into equal blocks of at least 2, and "
                "topk_group blocks must hold top-k experts); fix config.json"
            )
        scale = config.routed_scaling_factor
        if type(scale) not in (int, float) or not 0 < scale < math.inf:
            raise MoemergeError(
                f"{file}: routed_scaling_factor is {scale!r}; it must be a number above 0; fix config.json"
            )

    def partitions(self, config, r: int, check_top_k: bool = True) -> list[tuple[list[int], int]]:
        rule = self.routing_rule(config)
        if rule.n_group == 1:
            return super().partitions(config, r, check_top_k)
        # r >= topk_group * r / n_group >= top-k, so the base check is implied by the one below
        n = self.num_experts(config)
        per_block, rest = divmod(r, rule.n_group)
        reaches_top_k = rule.topk_group * per_block >= rule.top_k
        if rest or per_block < 2 or (check_top_k and not reaches_top_k):
            valid = [
                m * rule.n_group
                for m in range(2, n // rule.n_group)
                if not check_top_k or rule.topk_group * m >= rule.top_k
            ]
            routing = f"n_group={rule.n_group}, topk_group={rule.topk_group}, top-k={rule.top_k}"
            if rest or per_block < 2:
                raise MoemergeError(
                    f"--experts {r} breaks DeepSeek group-limited routing ({routing}): each of the {rule.n_group} "
                    f"routing groups must keep the same number (>= 2) of experts; use --experts in {valid}"
                )
            raise MoemergeError(
                f"--experts {r} leaves {rule.topk_group * per_block} experts in the routing groups a token may use "
                f"({routing}), fewer than top-k; use --experts in {valid}, or --router grouped"
            )
        size = n // rule.n_group
        return [(list(range(g * size, (g + 1) * size)), per_block) for g in range(rule.n_group)]
