"""The canonical form of a grouping: a list of groups, each a sorted list of expert ids."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

import torch


def labels_to_groups(labels: Sequence[int], ids: Sequence[int] | None = None) -> list[list[int]]:
    """Groups from cluster labels [n]: members sorted, groups ordered by their smallest member.

    ``ids`` renames position i to expert id ``ids[i]`` (for clustering a subset of experts).
    """
    ids = list(range(len(labels))) if ids is None else list(ids)
    by_label: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_label.setdefault(int(label), []).append(ids[position])
    return sorted(sorted(g) for g in by_label.values())


class SoftGroups(list):
    """Groups with memberships (fuzzy c-means): a list of groups like any grouping, plus ``memberships``,
    one float64 tensor [m] per group giving each member's membership u_ij in it.

    Every member of a soft group is in every group of its clustering problem; a member's
    memberships across the groups sum to 1.
    """

    def __init__(self, groups: list[list[int]], memberships: list):
        super().__init__(groups)
        self.memberships = memberships

    @classmethod
    def from_matrix(cls, u, ids: Sequence[int]) -> SoftGroups:
        """From memberships ``u`` [n, r] of experts ``ids`` [n]: r groups of all of them."""
        u = torch.as_tensor(u, dtype=torch.float64)
        return cls([list(ids) for _ in range(u.shape[1])], list(u.T))

    @classmethod
    def concat(cls, parts: list[SoftGroups]) -> SoftGroups:
        """The soft groups of several clustering problems (DeepSeek routing blocks) side by side."""
        return cls([g for p in parts for g in p], [u for p in parts for u in p.memberships])


def layers_problem(layers: list) -> str | None:
    """What is wrong with the per-layer entries of a recipe or ``moemerge.json`` (each an object with its own
    ``layer`` number and its ``groups``, and ``memberships`` for soft groups), or None."""
    seen = set()
    for entry in layers:
        layer = entry.get("layer") if isinstance(entry, dict) else None
        if type(layer) is not int or layer < 0 or layer in seen:
            return f"layer entry {json.dumps(entry)[:60]} has no layer number (a whole number >= 0) of its own"
        seen.add(layer)
        problem = groups_problem(entry.get("groups"), entry.get("memberships"))
        if problem is not None:
            return f"layer {layer}: {problem}"
    return None


def groups_problem(groups, memberships=None, n: int | None = None) -> str | None:
    """What is wrong with one layer's grouping as read from a file, or None.

    ``groups``: a non-empty list of non-empty lists of expert ids (whole numbers >= 0, below ``n`` when
    given), no expert in two groups. ``memberships`` (soft groups): one list per group with one value in
    (0, 1] per member; an expert may then be in several groups (once in each), its memberships summing to 1.
    """
    if not isinstance(groups, list) or not groups or not all(isinstance(g, list) and g for g in groups):
        return f"groups {str(groups)[:60]} are not a non-empty list of non-empty lists of expert ids"
    below = "" if n is None else f" below {n}"
    for group in groups:
        bad = next((e for e in group if type(e) is not int or e < 0 or (n is not None and e >= n)), None)
        if bad is not None:
            return f"group {group} holds {bad!r}, not an expert id (a whole number >= 0{below})"
    members = [e for g in groups for e in g]
    if memberships is None:
        twice = min((e for e, times in Counter(members).items() if times > 1), default=None)
        if twice is not None:
            return f"the groups hold an expert twice (expert {twice}), which only fcm groups with memberships may"
        return None
    if any(len(set(g)) != len(g) for g in groups):
        return "a soft group holds an expert twice"
    sizes = [len(g) for g in groups]
    if not isinstance(memberships, list) or [len(u) if isinstance(u, list) else None for u in memberships] != sizes:
        return f"memberships must be one list per group with one value per member (group sizes {sizes})"
    totals = dict.fromkeys(members, 0.0)
    for group, values in zip(groups, memberships, strict=True):
        if not all(type(u) in (int, float) and 0 < u <= 1 for u in values):
            return f"memberships {values} of group {group} are not numbers in (0, 1]"
        for e, u in zip(group, values, strict=True):
            totals[e] += u
    off = next((e for e, total in totals.items() if abs(total - 1) > 1e-6), None)
    return None if off is None else f"the memberships of expert {off} sum to {totals[off]:.6g}, not 1"
