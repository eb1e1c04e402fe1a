"""Grouping: expert features in, groups of expert ids out."""

from moemerge.grouping.budgets import BUDGETS, layer_budgets
from moemerge.grouping.features import METRICS, expert_features
from moemerge.grouping.fuzzy import fcm_memberships
from moemerge.grouping.groups import SoftGroups, labels_to_groups
from moemerge.grouping.hierarchical import DISTANCES, LINKAGES, check_linkage, hierarchical_labels
from moemerge.grouping.kmeans import KMEANS_INITS, kmeans_labels
from moemerge.grouping.ream import GROUP_SIZE, check_capacity, pseudo_groups, ream_similarity
from moemerge.grouping.single_shot import single_shot_labels

__all__ = [
    "BUDGETS",
    "DISTANCES",
    "GROUP_SIZE",
    "KMEANS_INITS",
    "LINKAGES",
    "METRICS",
    "SoftGroups",
    "check_capacity",
    "check_linkage",
    "expert_features",
    "fcm_memberships",
    "hierarchical_labels",
    "kmeans_labels",
    "labels_to_groups",
    "layer_budgets",
    "pseudo_groups",
    "ream_similarity",
    "single_shot_labels",
]
