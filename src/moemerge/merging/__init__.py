"""Merging: expert weights and groups in, one expert per group out."""

from moemerge.merging.alignment import align_groups, match_neurons, permute_expert
from moemerge.merging.low_rank import factor_count, low_rank_plus_sparse, reconstruct
from moemerge.merging.weighted_average import member_weights, merge_experts

__all__ = [
    "align_groups",
    "factor_count",
    "low_rank_plus_sparse",
    "match_neurons",
    "member_weights",
    "merge_experts",
    "permute_expert",
    "reconstruct",
]
