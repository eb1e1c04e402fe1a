"""Merging: expert weights and groups in, one expert per group out."""

from moemerge.merging.alignment import align_groups, match_neurons, permute_expert
from moemerge.merging.low_rank import factor_count, low_rank_plus_sparse, rank_for_budget, reconstruct
from moemerge.merging.neuron_matching import correlation, fix_dom_units, match_groups, routed_tokens, zipit_units
from moemerge.merging.saliency_merge import hungarian_units, saliency_weights
from moemerge.merging.weighted_average import MergeRule, member_weights, merge_experts

__all__ = [
    "MergeRule",
    "align_groups",
    "correlation",
    "factor_count",
    "fix_dom_units",
    "hungarian_units",
    "low_rank_plus_sparse",
    "match_groups",
    "match_neurons",
    "member_weights",
    "merge_experts",
    "permute_expert",
    "rank_for_budget",
    "reconstruct",
    "routed_tokens",
    "saliency_weights",
    "zipit_units",
]
