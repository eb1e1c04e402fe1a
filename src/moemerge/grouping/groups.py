"""The canonical form of a grouping: a list of groups, each a sorted list of expert ids."""

from __future__ import annotations

from collections.abc import Sequence


def labels_to_groups(labels: Sequence[int], ids: Sequence[int] | None = None) -> list[list[int]]:
    """Groups from cluster labels [n]: members sorted, groups ordered by their smallest member.

    ``ids`` renames position i to expert id ``ids[i]`` (for clustering a subset of experts).
    """
    ids = list(range(len(labels))) if ids is None else list(ids)
    by_label: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_label.setdefault(int(label), []).append(ids[position])
    return sorted(sorted(g) for g in by_label.values())
