"""Every option of a reduction, each default written once, checked once when the options are built.

``reduce``, ``plan``, ``apply`` (a recipe's recorded options), ``compare`` (one :class:`ReduceOptions` per grid
variant) and the CLI (one flag per field, its default read from here) all hold a :class:`ReduceOptions`. Building
one checks every value that does not need the model: types, names (against the registries of methods, clusters,
metrics, merges and router rows), ranges and combinations; what needs the model (r against its expert count and
router, calibration length against its context) is checked by :func:`moemerge.pipeline.prepare`.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, fields

# importing these registers every method, cluster, metric, merge, router-rows rule and refit
import moemerge.merging
import moemerge.merging.refit
import moemerge.methods
import moemerge.routing  # noqa: F401
from moemerge.defaults import CALIB_SAMPLES, CALIB_SEQ_LEN, OPRUNE_BUDGET
from moemerge.errors import MoemergeError
from moemerge.grouping import BUDGETS, GROUP_SIZE, KMEANS_INITS, check_linkage
from moemerge.registry import check_choice, needs, resolve

ROUTER_MODES = ("reduce", "grouped")

# the reduce options a compare --methods variant may set
VARIANT_KEYS = (
    "metric",
    "distance",
    "cluster",
    "linkage",
    "kmeans_init",
    "ream_group_size",
    "oprune_budget",
    "merge",
    "align",
    "budget",
    "router_rows",
    "refit",
)


@dataclass(frozen=True)
class ReduceOptions:
    """The options of a reduction (see ``moemerge reduce --help`` for each).

    experts / ratio: r, or the fraction of experts kept (exactly one, checked with the model's expert count).
    method: the registered method; metric, distance, cluster, linkage, kmeans_init: how hc-smoe compares and
        clusters experts (a method's preset may fix some: :meth:`effective`).
    merge, align: how a group becomes one expert; rank, sparsity, param_budget: mc-smoe's compression;
        mc_smoe_dense: write mc-smoe's experts also as dense matrices (:mod:`moemerge.checkpoint.compressed`).
    router, router_rows: the router mode and how reduced router rows are built (grouped routing with a pruning
        method gives the dropped experts novices: :mod:`moemerge.routing.grouped`).
    refit: what is refit in closed form after merging (:mod:`moemerge.merging.refit`).
    ream_group_size: ream's C, the most experts one group takes; oprune_budget: o-prune's subset budget.
    budget: experts per layer (uniform, by a global score, or searched: :mod:`moemerge.budget_search`).
    calib, calib_samples, calib_seq_len: calibration text and size; device, dtype: where and in what the model is
        loaded; seed: calibration sample, k-means and o-prune's random subsets.
    """

    experts: int | None = None
    ratio: float | None = None
    method: str = "hc-smoe"
    metric: str = "expert-output"
    distance: str = "euclidean"
    cluster: str = "hierarchical"
    linkage: str = "average"
    kmeans_init: str = "first"
    ream_group_size: int = GROUP_SIZE
    merge: str = "frequency"
    align: bool = False
    rank: int | None = None
    sparsity: float = 0.9
    param_budget: float | None = None
    mc_smoe_dense: bool = False
    router: str = "reduce"
    router_rows: str = "lse"
    refit: str = "none"
    oprune_budget: int = OPRUNE_BUDGET
    budget: str = "uniform"
    calib: str | None = None
    calib_samples: int = CALIB_SAMPLES
    calib_seq_len: int = CALIB_SEQ_LEN
    dtype: str = "auto"
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self):
        self._check_types()
        self._check_values()

    @classmethod
    def from_dict(cls, values: dict) -> ReduceOptions:
        """Options from a dict of field names (a recipe's, keyword arguments); unknown names raise MoemergeError,
        missing ones take their defaults."""
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise MoemergeError(f"unknown option {key!r}")
        return cls(**values)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> ReduceOptions:
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)

    def effective(self) -> ReduceOptions:
        """The options the method runs with: these, with the method's preset applied."""
        return self.replace(**resolve("method", self.method).preset)

    def effective_option(self, name: str):
        """Option ``name`` as the method runs with it (its preset's value, if it fixes one)."""
        return resolve("method", self.method).preset.get(name, getattr(self, name))

    @property
    def merging(self) -> tuple[str, str]:
        """(merge, router_rows) as the method runs with them."""
        return self.effective_option("merge"), self.effective_option("router_rows")

    @property
    def prunes(self) -> bool:
        """Whether the method keeps whole experts (and drops the others)."""
        return resolve("method", self.method).prunes

    @property
    def novices(self) -> bool:
        """Whether the dropped experts become novices: a pruning method with grouped routing."""
        return self.prunes and self.router == "grouped"

    @property
    def soft_groups(self) -> bool:
        """Whether the method groups experts by memberships (fuzzy c-means)."""
        return self.effective_option("cluster") == "fcm" and resolve("method", self.method).clusters

    def _check_types(self) -> None:
        """``True`` is not a number, 2 is a float."""
        hints = _type_hints()
        for f in fields(self):
            value = getattr(self, f.name)
            allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
            if not any(type(value) is t or (t is float and type(value) is int) for t in allowed):
                names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
                raise MoemergeError(f"option {f.name} is {value!r}, not {names}")

    def _check_values(self) -> None:
        for kind, name in (("method", self.method), ("cluster", self.cluster), ("metric", self.metric)):
            resolve(kind, name)
        resolve("merge", self.merge)
        resolve("router-rows", self.router_rows)
        resolve("refit", self.refit)
        if "distance" not in resolve("method", self.method).preset:  # a preset's own grouping has no linkage
            check_linkage(self.linkage, self.distance)
        check_choice("k-means init", self.kmeans_init, KMEANS_INITS)
        check_choice("budget", self.budget, BUDGETS)
        if self.router not in ROUTER_MODES:
            raise MoemergeError(f"unknown router mode {self.router!r}; choose one of: {', '.join(ROUTER_MODES)}")
        if self.ream_group_size < 1:
            raise MoemergeError(f"--ream-group-size {self.ream_group_size} must be at least 1")
        if self.oprune_budget < 1:
            raise MoemergeError(f"--oprune-budget {self.oprune_budget} must be at least 1")
        if (self.rank is not None and self.rank < 1) or not 0 <= self.sparsity <= 1:
            raise MoemergeError(
                f"--rank ({self.rank}) must be at least 1 and --sparsity ({self.sparsity}) between 0 and 1"
            )
        if self.param_budget is not None and (self.rank is not None or not 0 < self.param_budget <= 1):
            raise MoemergeError(
                f"--param-budget {self.param_budget} must be a fraction in (0, 1] of each merged matrix's size, and "
                "replaces --rank: give one of them"
            )
        self._check_combination()

    def _check_combination(self) -> None:
        """A router mode, ``align`` or ``mc_smoe_dense`` that the method (with its options) cannot use."""
        if self.mc_smoe_dense and not resolve("method", self.method).compresses:
            raise MoemergeError(
                f"--mc-smoe-dense chooses how mc-smoe stores its compressed experts, and --method {self.method} "
                "compresses none; drop it, or use --method mc-smoe"
            )
        needed = resolve("method", self.method).router
        if needed is not None and self.router != needed:
            raise MoemergeError(
                f"--method {self.method} replaces the dropped experts by novices, which the original router sends "
                f"tokens to; add --router {needed} (the output then loads with moemerge.load_model)"
            )
        if self.soft_groups and self.router == "grouped":
            raise MoemergeError(
                "--cluster fcm puts every expert in every group by a membership, and grouped routing needs each "
                "expert in one group; use --router reduce"
            )
        if self.soft_groups and self.merging[1] == "saliency":
            raise MoemergeError(
                "--router-rows saliency keeps each group's most salient member's row, but --cluster fcm puts every "
                "expert in every group, so every row would be the same; use --router-rows lse or frequency"
            )
        if self.soft_groups and self.align:
            raise MoemergeError(
                "--align permutes each expert towards its one group's dominant expert, but --cluster fcm puts every "
                "expert in every group; drop --align (fix-dom and zipit match neurons per group by themselves)"
            )

    def statistics(self) -> frozenset[str]:
        """The optional calibration statistics (fields of :class:`moemerge.statistics.LayerStatistics`) that the
        method, its metric (unless it prunes), the merge, the router rows and the refit declared they read."""
        merge, rows = self.merging
        needed = needs("method", self.method) | needs("merge", merge) | needs("router-rows", rows)
        needed |= needs("refit", self.refit)
        if self.budget == "search":
            needed |= {"router_inputs"}
        if not self.prunes:
            needed |= needs("metric", self.effective_option("metric"))
        if self.novices:
            needed |= {"routed_mean_output"}
        return needed


@functools.cache
def _type_hints() -> dict:
    return typing.get_type_hints(ReduceOptions)
