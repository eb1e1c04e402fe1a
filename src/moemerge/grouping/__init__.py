"""Grouping: expert features in, groups of expert ids out."""

from moemerge.grouping.groups import labels_to_groups
from moemerge.grouping.hierarchical import LINKAGES, check_linkage, hierarchical_labels

__all__ = ["LINKAGES", "check_linkage", "hierarchical_labels", "labels_to_groups"]
