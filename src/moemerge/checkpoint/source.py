"""Check a model directory before any work starts, then load it with transformers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from moemerge.adapters import MoEFamily, family_for
from moemerge.checkpoint.load_errors import transformers_call
from moemerge.checkpoint.model_files import (
    PICKLE_SUFFIXES,
    check_model_folder,
    check_safetensors,
    is_compact,
    read_config,
    read_record,
)
from moemerge.errors import MoemergeError
from moemerge.precision import runnable_experts_kernel
from moemerge.transformers_internals import causal_lm_class, subclass_with_init

SIDECAR = "moemerge_router.safetensors"  # the original routers of a --router grouped output
LOWRANK_FILE = "moemerge_lowrank.safetensors"  # mc-smoe's low-rank and sparse factors
FACTORS = ("left", "right", "indices", "values")  # what LOWRANK_FILE holds of each expert matrix
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SourceModel:
    """A checked model directory: its ``config.json`` contents, family adapter and weight files."""

    path: Path
    config: dict
    family: MoEFamily
    weight_files: list[Path]

    @property
    def uses_pickle(self) -> bool:
        return self.weight_files[0].suffix in PICKLE_SUFFIXES


def factor_key(layer: int, expert: int, matrix: str) -> str:
    """Where one expert matrix's :data:`FACTORS` are in :data:`LOWRANK_FILE`: ``{key}.left`` and so on."""
    return f"layers.{layer}.experts.{expert}.{matrix}"


def inspect_source(path: str | Path, allow_pickle: bool = False, compact: bool = False) -> SourceModel:
    """Validate a local model directory without loading its weights: every file in it is a regular file
    (:func:`check_model_folder`), ``config.json`` a supported family's with usable values in every field
    moemerge reads, every safetensors header complete, and a ``moemerge.json`` readable. A compact mc-smoe output
    (experts only as factors, :mod:`moemerge.checkpoint.compressed`) is refused unless ``compact``: only
    :func:`moemerge.load_model` and evaluation run it."""
    path = Path(path)
    if not path.exists():
        raise MoemergeError(f"model path {path} does not exist; pass a local model directory")
    if not path.is_dir():
        raise MoemergeError(f"{path} is not a model directory but a file; pass the folder holding config.json")
    check_model_folder(path)
    if not (path / "config.json").exists():
        raise MoemergeError(f"{path} is not a model directory: it has no config.json")
    config = read_config(path)
    family = family_for(config)
    family.check_config(load_config(path), path / "config.json")
    safetensors = sorted(path.glob("*.safetensors"))
    for file in safetensors:
        check_safetensors(file)
    if is_compact(read_record(path)) and not compact:
        raise MoemergeError(
            f"{path} is a compact mc-smoe output: its experts are stored only as low-rank and sparse factors "
            f"({LOWRANK_FILE}), which moemerge.load_model and moemerge eval run; to reduce, compare or inspect it, "
            "write it with reduce --mc-smoe-dense"
        )
    weights = [p for p in safetensors if p.name not in (SIDECAR, LOWRANK_FILE)]
    if not weights:
        weights = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not weights:
            raise MoemergeError(f"{path} holds no weights (*.safetensors)")
        if not allow_pickle:
            raise MoemergeError(
                f"{path} holds pickle weights ({weights[0].name}), which can run code when loaded; "
                "convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
    return SourceModel(path, config, family, weights)


def load_config(path: Path):
    """transformers' config of the model folder ``path``; one MoemergeError line when transformers refuses it
    (e.g. a field of the wrong type)."""
    file = path / "config.json"
    return transformers_call(f"{file} is refused by transformers", lambda: AutoConfig.from_pretrained(path), "fix it")


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (a GPU when there is one)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MoemergeError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoemergeError(f"--device {device} asked for a GPU but torch sees none; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise MoemergeError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or auto")
    return dev


def resolve_dtype(dtype: str):
    if dtype not in DTYPES:
        raise MoemergeError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_source(source: SourceModel, dtype: str = "auto", device: str = "cpu"):
    """(model in eval mode on ``device``, tokenizer or None) for a checked source.

    A moemerge output with different expert counts per layer (non-uniform ``--budget``) is built
    with those counts before its weights are read; transformers alone refuses it (size mismatch).
    """
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    counts = stored_expert_counts(source.path)
    model_class = AutoModelForCausalLM if counts is None else per_layer_model_class(source, counts)
    model = transformers_call(
        f"transformers could not load {source.path}",
        lambda: model_class.from_pretrained(source.path, dtype=torch_dtype, use_safetensors=not source.uses_pickle),
    )
    runnable_experts_kernel(model)
    return model.to(dev).eval(), load_tokenizer(source)


def has_tokenizer(source: SourceModel) -> bool:
    """Whether the model folder ships tokenizer files."""
    return any(source.path.glob("tokenizer*"))


def load_tokenizer(source: SourceModel):
    """The source's tokenizer, or None when it ships none."""
    if not has_tokenizer(source):
        return None
    return transformers_call(
        f"transformers could not load the tokenizer of {source.path}",
        lambda: AutoTokenizer.from_pretrained(source.path),
    )


def stored_expert_counts(path: Path) -> dict[int, int] | None:
    """Experts per MoE layer of a moemerge output whose layers differ in count, else None."""
    record = read_record(path)
    if record is None:
        return None
    counts = {entry["layer"]: len(entry["groups"]) for entry in record["layers"]}
    return counts if len(set(counts.values())) > 1 else None


def per_layer_model_class(source: SourceModel, counts: dict[int, int]) -> type:
    """The source's transformers model class, with MoE layer l built for ``counts[l]`` experts."""

    def __init__(self, config):
        base.__init__(self, config)
        for view in source.family.moe_layers(self):
            view.keep_first(counts[view.layer])

    base = causal_lm_class(AutoConfig.from_pretrained(source.path))
    return subclass_with_init(base, __init__)
