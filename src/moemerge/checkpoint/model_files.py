"""Checks of the files of a model folder, before anything loads them.

Every entry that moemerge or transformers may read must be a regular file (a FIFO named
``model.safetensors`` would block the header read forever); ``config.json`` must be one JSON
object; every safetensors header must be complete and consistent (:func:`check_safetensors`);
and a ``moemerge.json`` must hold the fields moemerge reads back (:func:`read_record`).
"""

from __future__ import annotations

import json
import math
import struct
from fnmatch import fnmatch
from pathlib import Path

from moemerge.checkpoint.writer import COPIED_FILES
from moemerge.errors import MoemergeError
from moemerge.grouping.groups import layers_problem
from moemerge.input_files import file_kind

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
RECORD = "moemerge.json"
# names that moemerge or transformers read from a model folder: a directory by such a name is refused too
READ_NAMES = ("*.json", "*.safetensors", *(f"*{suffix}" for suffix in PICKLE_SUFFIXES), *COPIED_FILES)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# bits per element of every safetensors dtype
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8}
DTYPE_BITS |= {"F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16}
DTYPE_BITS |= {"I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}


def check_model_folder(folder: Path) -> None:
    """Raise MoemergeError for an entry of ``folder`` that is not a regular file (a FIFO, socket, device or
    dangling symlink), or a directory named like a file that is read (``*.safetensors``, ``config.json``, ...).
    Nothing is opened: a FIFO is found by ``os.stat``."""
    for entry in sorted(folder.iterdir()):
        kind = file_kind(entry)
        if kind is None or (kind == "a directory" and not any(fnmatch(entry.name, p) for p in READ_NAMES)):
            continue
        raise MoemergeError(
            f"{entry} in the model folder is {kind}, not a regular file; replace it with the real file or remove it"
        )


def read_config(folder: Path) -> dict:
    """``folder/config.json`` as a dict, with a ``model_type`` string if it has one."""
    file = folder / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoemergeError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise MoemergeError(
            f"{file} holds a JSON {json_kind(config)}, not an object; a config.json is one object of the model's settings"
        )
    if not isinstance(config.get("model_type", ""), str):
        raise MoemergeError(f'{file}: model_type is {config["model_type"]!r}; it must be a string such as "mixtral"')
    return config


def safetensors_header(file: Path) -> tuple[int, object]:
    """(header length in bytes, the parsed JSON header) of a safetensors file; the tensor data begins at byte
    8 + the length. MoemergeError for a file too short for its header, or a header that is not JSON."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if header_len < 0 or 8 + header_len > size or header_len > MAX_HEADER_BYTES:
            raise MoemergeError(f"{file} is truncated or not a safetensors file; download it again")
        raw = f.read(header_len)
    try:
        return header_len, json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MoemergeError(f"{file} has a corrupt safetensors header; download it again") from None


def check_safetensors(file: Path) -> None:
    """Raise MoemergeError unless ``file`` is a whole safetensors file: a JSON object header whose entries each
    have a known dtype, a shape of whole numbers >= 0 and two data_offsets that span exactly the shape's bytes,
    stored back to back from byte 0, ending where the file ends."""
    header_len, header = safetensors_header(file)
    end, problem = _data_end(header)
    if problem is not None:
        raise MoemergeError(f"{file} has an invalid safetensors header ({problem}); download it again")
    size = file.stat().st_size
    if 8 + header_len + end != size:
        raise MoemergeError(
            f"{file} is truncated ({size} bytes, its header needs {8 + header_len + end}); download it again"
        )


def _data_end(header) -> tuple[int, str | None]:
    """(bytes of tensor data the header describes, None), or (0, what is wrong with it)."""
    if not isinstance(header, dict):
        return 0, f"a JSON {json_kind(header)} instead of an object"
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return 0, "__metadata__ must map names to strings"
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            return 0, f"tensor {name!r} is a JSON {json_kind(entry)}, not an object"
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BITS:
            return 0, f"tensor {name!r} has dtype {dtype!r}, not a safetensors dtype"
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return 0, f"tensor {name!r} has shape {shape!r}, not a list of whole numbers >= 0"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return 0, f"tensor {name!r} has data_offsets {offsets!r}, not two whole numbers"
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if not 0 <= offsets[0] <= offsets[1] or 8 * (offsets[1] - offsets[0]) != bits:
            return (
                0,
                f"tensor {name!r}: data_offsets {offsets} do not span the {bits / 8:g} bytes of its {dtype} shape {shape}",
            )
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            return 0, f"tensor {name!r} starts at data byte {begin}, not {end}: tensors must be stored back to back"
        end = stop
    return end, None


def read_record(folder: Path) -> dict | None:
    """``folder/moemerge.json`` (the record a moemerge output carries), checked for every field moemerge reads
    back: ``router``, ``source`` (``top_k``, and the source's fingerprints when recorded) and every layer's
    ``layer``, ``groups`` and ``memberships``; None when the folder has none."""
    file = folder / RECORD
    if not file.exists():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoemergeError(
            f"{file} is not valid JSON ({err}); restore it from the run that wrote this model"
        ) from None
    problem = _record_problem(record)
    if problem is not None:
        raise MoemergeError(f"{file} is damaged ({problem}); restore it from the run that wrote this model")
    return record


def is_compact(record: dict | None) -> bool:
    """Whether ``record`` (a ``moemerge.json``'s) is a compact mc-smoe output's: experts stored only as factors
    (:mod:`moemerge.checkpoint.compressed`)."""
    compression = (record or {}).get("compression")
    return isinstance(compression, dict) and compression.get("dense") is False


def _record_problem(record) -> str | None:
    """What is wrong with the contents of a moemerge.json, or None."""
    if not isinstance(record, dict):
        return f"a JSON {json_kind(record)} instead of an object"
    if record.get("router") not in ("reduce", "grouped"):
        return f"router is {record.get('router')!r}, not 'reduce' or 'grouped'"
    source = record.get("source")
    if not isinstance(source, dict) or type(source.get("top_k")) is not int or source["top_k"] < 1:
        return "source.top_k is not a whole number >= 1"
    if any(not isinstance(source.get(key, ""), str) for key in ("config_sha256", "weights_sha256")):
        return "source.config_sha256 and source.weights_sha256 must be strings"
    layers = record.get("layers")
    if not isinstance(layers, list) or not layers:
        return "layers is not a non-empty list"
    return layers_problem(layers)


def json_kind(value) -> str:
    """The JSON name of a parsed value's type: object, array, string, number, boolean or null."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
