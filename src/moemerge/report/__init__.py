"""Reports: ``moemerge inspect`` and the report ``moemerge reduce`` writes (usage, distances, dendrograms)."""

from moemerge.report.inspection import architecture, inspect
from moemerge.report.page import write_report

__all__ = ["architecture", "inspect", "write_report"]
