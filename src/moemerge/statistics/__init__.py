"""Per-layer calibration statistics: what every method is computed from."""

from moemerge.statistics.expert_stats import LayerStatistics, collect_statistics

__all__ = ["LayerStatistics", "collect_statistics"]
