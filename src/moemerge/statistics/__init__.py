"""Per-layer calibration statistics: what every method is computed from."""

from moemerge.statistics.expert_stats import (
    LayerAccumulator,
    LayerStatistics,
    Statistic,
    collect_statistics,
    sequence_offsets,
    statistic,
)

__all__ = ["LayerAccumulator", "LayerStatistics", "Statistic", "collect_statistics", "sequence_offsets", "statistic"]
