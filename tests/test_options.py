"""ReduceOptions: one typed object, checked when built; registered choices declare the statistics they read.

The declarations are checked against what the code really reads: with the statistics a choice declares, the whole
grouping and merge run; with any one of them left out of the calibration pass, they fail.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from moemerge import MoemergeError, apply_groups, plan_groups
from moemerge.adapters import FAMILIES as ADAPTERS
from moemerge.options import ReduceOptions
from moemerge.pipeline import statistics_needs
from moemerge.registry import names, resolve
from moemerge.statistics import collect_statistics

# one option set per registered name of every kind that declares statistics (with the router mode a method needs),
# and pruning with grouped routing (novices); the rest default
CHOICES = (
    [
        {"method": m} | ({"router": resolve("method", m).router} if resolve("method", m).router else {})
        for m in names("method")
    ]
    + [{"method": "reap", "router": "grouped"}]
    + [{"metric": m} for m in names("metric")]
    + [{"merge": m} for m in names("merge")]
    + [{"router_rows": m} for m in names("router-rows")]
    + [{"refit": m} for m in names("refit")]
)


def run_choice(options: ReduceOptions, needs: frozenset[str]) -> None:
    """Calibrate a tiny Mixtral collecting the optional statistics ``needs``, then group and merge it with
    ``options``."""
    model = tiny_model("mixtral")
    family = ADAPTERS["mixtral"]
    sequences = [torch.arange(40) % 97, (torch.arange(40) * 7) % 101]
    stats = collect_statistics(model, family.moe_layers(model), sequences, needs, progress=False)
    groups = plan_groups(stats, family, model.config, 4, options)
    o = options
    apply_groups(copy.deepcopy(model), family, stats, groups, *o.merging, align=o.align, refit=o.refit, router=o.router)


@pytest.mark.parametrize("settings", CHOICES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_declared_statistics_are_exactly_what_each_choice_reads(settings):
    """Sufficient: with statistics_needs of the options, grouping and merging run. Necessary: leaving out any one
    optional statistic it asks for makes them fail (router rows default to frequency, which reads none, so each
    case isolates its own choice)."""
    options = ReduceOptions(**({"router_rows": "frequency"} | settings))
    needs = statistics_needs([options])
    run_choice(options, needs)
    if settings in ({"method": "o-prune"}, {"metric": "router-logits"}, {"metric": "weight"}, {"merge": "fix-dom"},
                    {"merge": "zipit"}, {"router_rows": "lse"}, {"refit": "down"},
                    {"method": "reap", "router": "grouped"}):  # fmt: skip
        assert needs, settings
    for name in needs:
        with pytest.raises(ValueError):
            run_choice(options, needs - {name})


@pytest.mark.parametrize(
    "values,named",
    [
        ({"experts": True}, "option experts is True, not int or null"),
        ({"experts": "4"}, "option experts is '4', not int or null"),
        ({"sparsity": None}, "option sparsity is None, not float"),
        ({"align": 1}, "option align is 1, not bool"),
        ({"method": "hc-smo"}, "unknown method 'hc-smo'"),
        ({"metric": "logits"}, "unknown metric 'logits'"),
        ({"router": "both"}, "unknown router mode 'both'"),
        ({"budget": "global"}, "unknown budget 'global'"),
        ({"oprune_budget": 0}, "--oprune-budget 0 must be at least 1"),
        ({"ream_group_size": 0}, "--ream-group-size 0 must be at least 1"),
        ({"method": "mone"}, "add --router grouped"),
        ({"cluster": "fcm", "router": "grouped"}, "--cluster fcm"),
        ({"cluster": "fcm", "align": True}, "drop --align"),
        ({"cluster": "fcm", "router_rows": "saliency"}, "--router-rows saliency"),
        ({"rank": 4, "param_budget": 0.5}, "give one of them"),
    ],
)
def test_bad_options_are_refused_when_built(values, named):
    """Each wrong type, unknown name, out-of-range value or impossible combination raises MoemergeError naming it,
    whether built directly or from a dict (a recipe's)."""
    for build in (lambda: ReduceOptions(**values), lambda: ReduceOptions.from_dict(values)):
        with pytest.raises(MoemergeError) as err:
            build()
        assert named in str(err.value)


def test_from_dict_refuses_unknown_names_and_fills_defaults():
    with pytest.raises(MoemergeError, match="unknown option 'colour'"):
        ReduceOptions.from_dict({"colour": "red"})
    assert ReduceOptions.from_dict({"experts": 3}) == ReduceOptions(experts=3)


def test_a_preset_overrides_what_its_method_fixes_only():
    """m-smoe fixes metric, distance and cluster (router logits, cosine, single-shot) whatever was asked; the other
    options pass through, and fcm asked of m-smoe makes no soft groups (the preset's single-shot wins)."""
    asked = ReduceOptions(method="m-smoe", metric="weight", cluster="fcm", linkage="complete", merge="average")
    effective = asked.effective()
    assert (effective.metric, effective.distance, effective.cluster) == ("router-logits", "cosine", "single-shot")
    assert (effective.linkage, effective.merge) == ("complete", "average")
    assert not asked.soft_groups and ReduceOptions(cluster="fcm").soft_groups
    assert not ReduceOptions(method="ream", cluster="fcm", router="grouped").soft_groups  # ream does not cluster


def test_every_declared_need_is_a_registered_statistic_of_the_statistics_record():
    """Whatever a registered choice declares it reads is a registered statistic, and every registered statistic
    fills a field of LayerStatistics."""
    from dataclasses import fields

    from moemerge.registry import needs
    from moemerge.statistics import LayerStatistics

    statistics = set(names("statistic"))
    declared = {n for kind in ("method", "metric", "merge", "router-rows") for c in names(kind) for n in needs(kind, c)}
    assert declared and declared <= statistics
    assert statistics <= {f.name for f in fields(LayerStatistics)}


@pytest.mark.parametrize("method", ["m-smoe", "mc-smoe"])
def test_a_preset_grouping_ignores_the_linkage(method):
    """m-smoe and mc-smoe group by their preset (single-shot on cosine router logits), so a --linkage that needs
    another distance (ward: Euclidean only) is no error for them, as for the version before ReduceOptions; for
    hc-smoe it still is."""
    assert ReduceOptions(method=method, linkage="ward").effective().linkage == "ward"
    with pytest.raises(MoemergeError, match="ward"):
        ReduceOptions(linkage="ward", distance="cosine")
