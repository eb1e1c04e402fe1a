"""Write a reduced model as a standard transformers checkpoint into a folder (the temporary one of
:func:`moemerge.output_files.atomic_output`), with the source's tokenizer and generation files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from moemerge.errors import MoemergeError

MAX_SHARD_SIZE = 2 * 10**9  # bytes ("2GB" to transformers): larger outputs are sharded
COPIED_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template*",
    "generation_config.json",
)


def write_checkpoint(
    model: torch.nn.Module,
    source_dir: Path,
    out_dir: Path,
    metadata: dict,
    tensor_files: dict[str, dict[str, torch.Tensor]] | None = None,
    dense_experts: bool = True,
) -> None:
    """Save ``model`` (sharded above 2 GB), the source's tokenizer and generation files, ``moemerge.json``,
    and moemerge's own tensor files (file name -> tensors), e.g. the original routers of grouped routing.
    Without ``dense_experts`` the routed experts' tensors are left out (mc-smoe's compact output keeps them
    as factors in a tensor file)."""
    state = None if dense_experts else {name: t for name, t in model.state_dict().items() if not routed_expert(name)}
    model.save_pretrained(out_dir, max_shard_size=MAX_SHARD_SIZE, state_dict=state)
    write_extras(source_dir, out_dir, metadata, tensor_files)


def routed_expert(name: str) -> bool:
    """Whether tensor ``name`` (in-memory or on-disk) belongs to a layer's routed experts: every supported
    family keeps them under ``<block>.experts.``, and shared experts under ``shared_expert(s).``."""
    return ".experts." in name


def write_extras(
    source_dir: Path, out_dir: Path, metadata: dict, tensor_files: dict[str, dict[str, torch.Tensor]] | None
) -> None:
    """Everything of a reduced checkpoint but the model: the source's tokenizer and generation files,
    moemerge's own tensor files and ``moemerge.json``."""
    for file in copied_files(source_dir):
        shutil.copyfile(file, out_dir / file.name)
    for name, tensors in (tensor_files or {}).items():
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, out_dir / name)
    (out_dir / "moemerge.json").write_text(format_metadata(metadata), encoding="utf-8")


def copied_files(source_dir: Path) -> list[Path]:
    """The source's tokenizer and generation files that an output copies (regular files, or symlinks to one
    inside ``source_dir``). Raises MoemergeError for a symlink to a file outside the model folder, which a
    copy would publish (a model folder can carry one to any readable file, e.g. a key)."""
    folder = source_dir.resolve()
    files = []
    for pattern in COPIED_FILES:
        for file in sorted(source_dir.glob(pattern)):
            if file.is_symlink() and not file.resolve().is_relative_to(folder):
                raise MoemergeError(
                    f"{file} is a symlink to {file.resolve()}, outside the model folder, and would be copied into "
                    "the output; replace it with a copy of the file if it belongs to the model"
                )
            if file.is_file():
                files.append(file)
    return files


def format_metadata(metadata: dict) -> str:
    """JSON with two-space indents, except that each entry of ``layers`` stays on one line."""
    layers = metadata.get("layers", [])
    text = json.dumps({**metadata, "layers": []}, indent=2)
    if not layers:
        return text + "\n"
    rows = ",\n".join("    " + json.dumps(entry) for entry in layers)
    return text.replace('"layers": []', '"layers": [\n' + rows + "\n  ]") + "\n"
