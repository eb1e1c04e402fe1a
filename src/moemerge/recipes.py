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

import hashlib
import json
import struct
from pathlib import Path

import torch
from transformers import AutoConfig

from moemerge.checkpoint import inspect_source
from moemerge.checkpoint.source import SourceModel
from moemerge.checkpoint.writer import write_json
from moemerge.errors import MoemergeError
from moemerge.grouping import SoftGroups
from moemerge.pipeline import ReduceResult, plan, prepare, write_reduced

SCHEMA = "moemerge.recipe/1"
SAMPLE_BYTES = 64
CONFIG_IGNORED = ("transformers_version", "_name_or_path")  # change without changing the model


def config_sha256(path: Path) -> str:
    """SHA-256 of ``config.json`` with sorted keys, without the keys in CONFIG_IGNORED."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    canonical = {k: v for k, v in config.items() if k not in CONFIG_IGNORED}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode("utf-8")).hexdigest()


def weights_sha256(files: list[Path]) -> str:
    """A fingerprint of the weight files read in milliseconds even for a 100 GB model: for every tensor (sorted by
    name) its name, dtype, shape and SAMPLE_BYTES bytes at its start, middle and end; for a file that is not
    safetensors, its size and samples at 16 evenly spaced offsets."""
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda f: f.name):
        with file.open("rb") as f:
            if file.suffix != ".safetensors":
                size = file.stat().st_size
                digest.update(f"{file.name}:{size}".encode())
                for k in range(16):
                    f.seek(k * max(size - SAMPLE_BYTES, 0) // 15)
                    digest.update(f.read(SAMPLE_BYTES))
                continue
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            for name in sorted(k for k in header if k != "__metadata__"):
                entry = header[name]
                begin, end = entry["data_offsets"]
                digest.update(f"{name}:{entry['dtype']}:{entry['shape']}".encode())
                for offset in (begin, (begin + end) // 2, max(end - SAMPLE_BYTES, begin)):
                    f.seek(8 + header_len + offset)
                    digest.update(f.read(min(SAMPLE_BYTES, end - offset)))
    return digest.hexdigest()


def model_identity(source: SourceModel, config) -> dict:
    return {
        "model_type": config.model_type,
        "num_experts": source.family.num_experts(config),
        "config_sha256": config_sha256(source.path),
        "weights_sha256": weights_sha256(source.weight_files),
    }


def plan_recipe(
    model: str | Path, recipe: str | Path, *, force: bool = False, progress: bool = True, **options
) -> dict:
    """Calibrate and group like :func:`moemerge.reduce` with the same ``options``, and write the plan to the JSON
    file ``recipe`` (not replaced without ``force``). Returns the recipe."""
    recipe = Path(recipe)
    check_recipe_path(recipe, force)
    run = prepare(model, None, progress=progress, **options)
    groups = plan(run)
    layers = []
    for layer, layer_groups in groups.items():
        entry = {"layer": layer, "groups": [list(g) for g in layer_groups]}
        if isinstance(layer_groups, SoftGroups):
            entry["memberships"] = [u.tolist() for u in layer_groups.memberships]
        layers.append(entry)
    content = {
        "schema": SCHEMA,
        "model": model_identity(run.source, run.config),
        "options": run.options,
        "calibration": {
            "spec": run.calibration.spec,
            "tokens": run.calibration.num_tokens,
            "sha256": run.calibration.sha256(),
        },
        "layers": layers,
    }
    write_json(content, recipe)
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
) -> ReduceResult:
    """Reduce ``model`` to the groups planned in ``recipe`` and write it to ``out`` (with ``report/``, as reduce). ``device`` and ``dtype``
    replace the recorded ones when given. Raises MoemergeError, before any model is loaded, when ``model``
    is not the model the recipe was planned for."""
    content = read_recipe(recipe)
    source = inspect_source(model, allow_pickle=allow_pickle)
    identity = model_identity(source, AutoConfig.from_pretrained(source.path))
    check_identity(content["model"], identity, Path(recipe), source.path)
    groups = recipe_groups(content, identity["num_experts"], recipe)
    options = content["options"] | {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    try:
        run = prepare(model, out, force=force, allow_pickle=allow_pickle, progress=progress, **options)
    except TypeError as err:  # an option this version does not know
        raise MoemergeError(f"{recipe}: its options do not fit this moemerge ({err}); plan it again") from None
    if run.calibration.sha256() != content["calibration"]["sha256"]:
        raise MoemergeError(
            f"the calibration tokens of {content['calibration']['spec']} differ from those {recipe} was planned on "
            "(the text or the tokenizer changed); give the same calibration text or plan again"
        )
    if sorted(groups) != sorted(run.stats):
        raise MoemergeError(
            f"{recipe} plans MoE layers {sorted(groups)} but the model has {sorted(run.stats)}; plan again for it"
        )
    return write_reduced(run, groups, out, force, progress, report)


def read_recipe(path: str | Path) -> dict:
    """The recipe in ``path``, checked for its schema and shape (MoemergeError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise MoemergeError(f"recipe {path} does not exist; make one with moemerge plan")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoemergeError(f"recipe {path} is not valid JSON ({err}); make it again with moemerge plan") from None
    if not isinstance(content, dict) or content.get("schema") != SCHEMA:
        found = content.get("schema") if isinstance(content, dict) else None
        raise MoemergeError(f"{path} is not a moemerge recipe of schema {SCHEMA} (schema: {found!r})")
    for key, kind in (("model", dict), ("options", dict), ("calibration", dict), ("layers", list)):
        if not isinstance(content.get(key), kind):
            raise MoemergeError(f"recipe {path} has no valid {key!r}; make it again with moemerge plan")
    return content


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


def recipe_groups(content: dict, n: int, recipe) -> dict[int, list[list[int]]]:
    """The recorded groups per decoder layer, checked against the model's expert count ``n``."""
    groups = {}
    for entry in content["layers"]:
        layer, layer_groups = entry.get("layer"), entry.get("groups")
        ok = isinstance(layer_groups, list) and all(isinstance(g, list) and g for g in layer_groups)
        members = [e for g in layer_groups for e in g] if ok else []
        soft = "memberships" in entry
        if not ok or not all(isinstance(e, int) and 0 <= e < n for e in members):
            raise MoemergeError(f"{recipe}: layer {layer} has groups that are not lists of expert ids below {n}")
        if not soft and len(set(members)) != len(members):
            raise MoemergeError(f"{recipe}: the groups of layer {layer} hold an expert twice; plan again")
        if soft:
            u = [torch.tensor(m, dtype=torch.float64) for m in entry["memberships"]]
            groups[layer] = SoftGroups([list(g) for g in layer_groups], u)
        else:
            groups[layer] = [list(g) for g in layer_groups]
    return groups


def check_recipe_path(path: Path, force: bool) -> None:
    if path.suffix != ".json":
        raise MoemergeError(f"recipe path {path} must end in .json")
    if path.exists() and not force:
        raise MoemergeError(f"recipe {path} already exists; pass --force to replace it")
    if path.is_dir():
        raise MoemergeError(f"recipe path {path} is a directory; give a file name ending in .json")
    if not path.absolute().parent.is_dir():
        raise MoemergeError(f"the folder of recipe {path} does not exist; create it first")
