"""Merging: expert weights and groups in, one expert per group out."""

from moemerge.merging.weighted_average import member_weights, merge_experts

__all__ = ["member_weights", "merge_experts"]
