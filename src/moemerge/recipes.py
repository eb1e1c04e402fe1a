"""Recipes: a reduction planned once (calibration and groups, no weights written) and applied later.

A recipe is a small JSON file (``SCHEMA``)::

    {"schema": "moemerge.recipe/1",
     "model": {"model_type", "num_experts", "config_sha256", "weights_sha256"},
     "options": {reduce's keyword arguments, e.g. "experts": 4, "method": "hc-smoe", "calib": null, ...},
     "calibration": {"spec", "tokens", "sha256"},
     "layers": [{"layer": 0, "groups": [[0, 3], [1], ...]}, ...]}   (plus "memberships" for fcm)

:func:`apply_recipe` first checks that the model is the one the plan was made for (config and weights
fingerprints), then calibrates again with the recorded options (the merge needs the frequencies and router
samples, which are too large for a readable file), checks that the calibration tokens are the plan's, and
merges to the recorded groups. Calibration is deterministic, so the output is byte-identical to a direct
``reduce`` with the same options.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig

from moemerge.adapters import MoEFamily
from moemerge.budget_search import SEARCH_IN_REDUCE_ONLY
from moemerge.checkpoint import inspect_source
from moemerge.checkpoint.identity import model_identity
from moemerge.errors import MoemergeError
from moemerge.grouping import SoftGroups
from moemerge.grouping.groups import groups_problem, layers_problem
from moemerge.input_files import check_regular_file
from moemerge.options import ReduceOptions
from moemerge.output_files import check_output, write_json
from moemerge.pipeline import (
    ReduceResult,
    check_layer_groups,
    plan,
    prepare,
    write_reduced,
)
from moemerge.routing.grouped import dropped_experts
from moemerge.streaming.calibrate import statistics_layer_by_layer
from moemerge.streaming.driver import reduce_prepared

SCHEMA = "moemerge.recipe/1"


def plan_recipe(
    model: str | Path, recipe: str | Path, *, force: bool = False, progress: bool = True, **options
) -> dict:
    """Calibrate and group like :func:`moemerge.reduce` with the same ``options``, one decoder layer in memory at a
    time, and write the plan to the JSON file ``recipe`` (not replaced without ``force``). Returns the recipe."""
    if options.get("budget") == "search":
        raise MoemergeError(SEARCH_IN_REDUCE_ONLY)
    check_recipe_path(recipe, force, reads=(model, options.get("calib")))
    recipe = Path(recipe)
    whole = inspect_source(model, allow_pickle=options.get("allow_pickle", False)).uses_pickle
    run = prepare(model, None, progress=progress, load=whole, **options)
    if not whole:  # one decoder layer in memory at a time (pickle weights cannot be read so)
        run.stats = statistics_layer_by_layer(run, progress)
    groups = plan(run)
    layers = []
    for layer, layer_groups in groups.items():
        entry = {"layer": layer, "groups": [list(g) for g in layer_groups]}
        if isinstance(layer_groups, SoftGroups):
            entry["memberships"] = [u.tolist() for u in layer_groups.memberships]
        layers.append(entry)
    content = {
        "schema": SCHEMA,
        "model": run.identity,
        "options": run.options.as_dict(),
        "calibration": {
            "spec": run.calibration.spec,
            "tokens": run.calibration.num_tokens,
            "sha256": run.calibration.sha256(),
        },
        "layers": layers,
    }
    write_json(content, recipe, force)
    return content


def apply_recipe(
    recipe: str | Path,
    model: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
    report: bool = True,
    resume: bool = False,
) -> ReduceResult:
    """Reduce ``model`` to the groups planned in ``recipe`` and write it to ``out`` (with ``report/``, as reduce),
    one decoder layer in memory at a time (``resume``: continue an interrupted run). ``device`` and ``dtype``
    replace the recorded ones when given. Raises MoemergeError, before any model is loaded, when ``model``
    is not the model the recipe was planned for."""
    check_output(out, force, reads=(recipe, model))
    content = read_recipe(recipe)
    source = inspect_source(model, allow_pickle=allow_pickle)
    config = AutoConfig.from_pretrained(source.path)
    identity = model_identity(source, config)
    check_identity(content["model"], identity, Path(recipe), source.path)
    options = content["options"] | {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    groups = recipe_groups(content, source.family, config, recipe)
    whole = source.uses_pickle  # pickle weights cannot be read one decoder layer at a time
    run = prepare(model, out, force=force, allow_pickle=allow_pickle, progress=progress, load=whole, **options)
    if run.calibration.sha256() != content["calibration"]["sha256"]:
        raise MoemergeError(
            f"the calibration tokens of {content['calibration']['spec']} differ from those {recipe} was planned on "
            "(the text or the tokenizer changed); give the same calibration text or plan again"
        )
    common = dict(force=force, progress=progress, report=report)
    if not whole:
        return reduce_prepared(run, out, resume=resume, planned=groups, **common)
    if resume:
        raise MoemergeError(f"--resume works one decoder layer at a time, but {model} holds pickle weights; drop it")
    if sorted(groups) != sorted(run.stats):
        raise MoemergeError(
            f"the recipe plans MoE layers {sorted(groups)} but the model has {sorted(run.stats)}; plan again for it"
        )
    return write_reduced(run, groups, out, force, progress, report)


def read_recipe(path: str | Path) -> dict:
    """The recipe in ``path``, checked completely but for what needs the model (expert ids below its count,
    the router's rules, which :func:`recipe_groups` checks): schema, model identity, option names and types,
    calibration record, and every layer's number, groups and memberships (MoemergeError otherwise)."""
    path = Path(path)
    check_regular_file(path, "give the recipe JSON file written by moemerge plan", "recipe ")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoemergeError(f"recipe {path} is not valid JSON ({err}); make it again with moemerge plan") from None
    if not isinstance(content, dict) or content.get("schema") != SCHEMA:
        found = content.get("schema") if isinstance(content, dict) else None
        raise MoemergeError(f"{path} is not a moemerge recipe of schema {SCHEMA} (schema: {found!r})")
    problem = _recipe_problem(content)
    if problem is not None:
        raise MoemergeError(f"recipe {path}: {problem}; make it again with moemerge plan")
    return content


def _recipe_problem(content: dict) -> str | None:
    """What is wrong with a recipe's contents (beyond its schema), or None."""
    for key, kind in (("model", dict), ("options", dict), ("calibration", dict), ("layers", list)):
        if not isinstance(content.get(key), kind):
            return f"it has no valid {key!r}"
    model, calibration = content["model"], content["calibration"]
    fields = [(model, "model", key, str) for key in ("model_type", "config_sha256", "weights_sha256")]
    fields += [(model, "model", "num_experts", int), (calibration, "calibration", "sha256", str)]
    for record, name, key, kind in fields:
        if type(record.get(key)) is not kind:
            return f"{name}.{key} is {record.get(key)!r}, not a {kind.__name__}"
    try:
        ReduceOptions.from_dict(content["options"])
    except MoemergeError as err:
        return str(err)
    if not content["layers"]:
        return "it plans no layers"
    return layers_problem(content["layers"])


def check_identity(planned: dict, found: dict, recipe: Path, model: Path) -> None:
    """Raise a one-line MoemergeError naming what differs between the planned model and ``model``."""
    if planned.get("config_sha256") != found["config_sha256"]:
        details = [
            f"{key} {planned.get(key)} vs {found[key]}"
            for key in ("model_type", "num_experts")
            if planned.get(key) != found[key]
        ]
        detail = f" ({', '.join(details)})" if details else ""
        raise MoemergeError(
            f"{model} is not the model {recipe} was planned for: its config.json differs{detail}; "
            "apply the recipe to that model or plan again for this one"
        )
    if planned.get("weights_sha256") != found["weights_sha256"]:
        raise MoemergeError(
            f"{model} is not the model {recipe} was planned for: same config but different weights (fingerprint "
            f"{found['weights_sha256'][:12]} vs {str(planned.get('weights_sha256'))[:12]}); plan again for this model"
        )


def recipe_groups(content: dict, family: MoEFamily, config, recipe) -> dict[int, list[list[int]]]:
    """The recorded groups per decoder layer of a read recipe, checked against the model (``family``, ``config``)
    as :func:`moemerge.reduce` checks its own: expert ids below the expert count, group counts and routing
    blocks the router allows (:func:`moemerge.pipeline.check_layer_groups`), and memberships exactly when the
    recorded options make soft groups (``--cluster fcm``)."""
    n = family.num_experts(config)
    options = ReduceOptions.from_dict(content["options"])
    soft = options.soft_groups
    groups = {}
    for entry in content["layers"]:
        layer, memberships = entry["layer"], entry.get("memberships")
        problem = groups_problem(entry["groups"], memberships, n)
        if problem is None and (memberships is not None) != soft:
            problem = (
                "memberships without --cluster fcm" if memberships is not None else "no memberships for --cluster fcm"
            )
        if problem is not None:
            raise MoemergeError(f"recipe {recipe}: layer {layer}: {problem}; plan again")
        if soft:
            u = [torch.tensor(m, dtype=torch.float64) for m in memberships]
            groups[layer] = SoftGroups([list(g) for g in entry["groups"]], u)
        else:
            groups[layer] = [list(g) for g in entry["groups"]]
    try:
        check_layer_groups(family, config, groups, options.router)
    except MoemergeError as err:
        raise MoemergeError(f"recipe {recipe}: {err}") from None
    if options.router == "grouped" and not options.prunes:
        for layer, layer_groups in groups.items():
            left_out = dropped_experts(layer_groups, n)
            if left_out:
                raise MoemergeError(
                    f"recipe {recipe}: layer {layer}: experts {left_out} are in no group, but --router grouped with "
                    f"--method {options.method} sends each expert's tokens to its group; plan again"
                )
    return groups


def check_recipe_path(path: str | Path, force: bool, reads: tuple) -> None:
    """Raise MoemergeError unless ``path`` may become the recipe file (see :func:`check_output`), in a folder
    that exists."""
    check_output(path, force, reads, file=True)
    path = Path(path)
    if path.suffix != ".json":
        raise MoemergeError(f"recipe path {path} must end in .json")
    if not path.absolute().parent.is_dir():
        raise MoemergeError(f"the folder of recipe {path} does not exist; create it first")
