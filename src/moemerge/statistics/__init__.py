"""Per-layer calibration statistics: what every method is computed from."""

from moemerge.statistics.expert_stats import LayerAccumulator, LayerStatistics, collect_statistics, sequence_offsets

__all__ = ["LayerAccumulator", "LayerStatistics", "collect_statistics", "sequence_offsets"]
