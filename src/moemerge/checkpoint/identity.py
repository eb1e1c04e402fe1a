"""A model's identity, cheap enough for a 100 GB checkpoint: its family, expert count, config and weights
fingerprints. Recipes record it (``apply`` checks it), resumable runs record it, and every output's
``moemerge.json`` records its source's (``eval --reference`` checks it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moemerge.checkpoint.model_files import safetensors_header
from moemerge.checkpoint.source import SourceModel

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
            header_len, header = safetensors_header(file)
            for name in sorted(k for k in header if k != "__metadata__"):
                entry = header[name]
                begin, end = entry["data_offsets"]
                digest.update(f"{name}:{entry['dtype']}:{entry['shape']}".encode())
                for offset in (begin, (begin + end) // 2, max(end - SAMPLE_BYTES, begin)):
                    f.seek(8 + header_len + offset)
                    digest.update(f.read(min(SAMPLE_BYTES, end - offset)))
    return digest.hexdigest()


def model_identity(source: SourceModel, config) -> dict:
    """``model_type``, ``num_experts``, ``config_sha256`` and ``weights_sha256`` of a checked source model."""
    return {
        "model_type": config.model_type,
        "num_experts": source.family.num_experts(config),
        "config_sha256": config_sha256(source.path),
        "weights_sha256": weights_sha256(source.weight_files),
    }
