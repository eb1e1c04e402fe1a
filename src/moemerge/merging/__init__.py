"""Merging: expert weights and groups in, one expert per group out."""

from moemerge.merging.alignment import align_groups, match_neurons, permute_expert
from moemerge.merging.weighted_average import member_weights, merge_experts

__all__ = ["align_groups", "match_neurons", "member_weights", "merge_experts", "permute_expert"]
