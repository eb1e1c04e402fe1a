"""Check a model directory before any work starts, then load it with transformers."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from moemerge.adapters import MoEFamily, family_for
from moemerge.errors import MoemergeError

SIDECAR = "moemerge_router.safetensors"  # the original routers of a --router grouped output
LOWRANK_FILE = "moemerge_lowrank.safetensors"  # mc-smoe's low-rank and sparse factors
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
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


def inspect_source(path: str | Path, allow_pickle: bool = False) -> SourceModel:
    """Validate a local model directory without loading its weights."""
    path = Path(path)
    if not path.exists():
        raise MoemergeError(f"model path {path} does not exist; pass a local model directory")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise MoemergeError(f"{path} is not a model directory: it has no config.json")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoemergeError(f"{path / 'config.json'} is not valid JSON ({err})") from None
    family = family_for(config)
    weights = sorted(p for p in path.glob("*.safetensors") if p.name not in (SIDECAR, LOWRANK_FILE))
    if weights:
        for file in weights:
            check_safetensors(file)
    else:
        weights = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not weights:
            raise MoemergeError(f"{path} holds no weights (*.safetensors)")
        if not allow_pickle:
            raise MoemergeError(
                f"{path} holds pickle weights ({weights[0].name}), which can run code when loaded; "
                "convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
    return SourceModel(path, config, family, weights)


def check_safetensors(file: Path) -> None:
    """Raise MoemergeError unless ``file`` has a readable header and all the bytes it promises."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if header_len < 0 or 8 + header_len > size:
            raise MoemergeError(f"{file} is truncated or not a safetensors file; download it again")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MoemergeError(f"{file} has a corrupt safetensors header; download it again") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise MoemergeError(
            f"{file} is truncated ({size} bytes, its header needs {8 + header_len + end}); download it again"
        )


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
    try:
        model = model_class.from_pretrained(source.path, dtype=torch_dtype, use_safetensors=not source.uses_pickle)
    except (OSError, ValueError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoemergeError(f"transformers could not load {source.path}: {first_line}") from None
    return model.to(dev).eval(), load_tokenizer(source)


def load_tokenizer(source: SourceModel):
    """The source's tokenizer, or None when it ships none."""
    return AutoTokenizer.from_pretrained(source.path) if any(source.path.glob("tokenizer*")) else None


def stored_expert_counts(path: Path) -> dict[int, int] | None:
    """Experts per MoE layer of a moemerge output whose layers differ in count, else None."""
    meta_file = path / "moemerge.json"
    if not meta_file.is_file():
        return None
    layers = json.loads(meta_file.read_text(encoding="utf-8")).get("layers", [])
    counts = {entry["layer"]: len(entry["groups"]) for entry in layers}
    return counts if len(set(counts.values())) > 1 else None


def per_layer_model_class(source: SourceModel, counts: dict[int, int]) -> type:
    """The source's transformers model class, with MoE layer l built for ``counts[l]`` experts.

    The class keeps its name, and asks the transformers class whether the fast attention and
    experts kernels apply (transformers decides that from the class's source file).
    """
    base = AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(source.path))]

    def __init__(self, config):
        base.__init__(self, config)
        for view in source.family.moe_layers(self):
            view.keep_first(counts[view.layer])

    kernels = {
        name: classmethod(lambda cls, name=name: getattr(base, name)())
        for name in ("_can_set_attn_implementation", "_can_set_experts_implementation")
    }
    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__, **kernels})
