"""Write a reduced model as a standard transformers checkpoint, atomically.

The output is built in a hidden temporary directory beside the target and renamed into place
only when complete, so a failed run leaves nothing behind and never half-replaces an old output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from moemerge.errors import MoemergeError

MAX_SHARD_SIZE = "2GB"
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


def check_output(out: Path, force: bool) -> None:
    """Fail early if ``out`` exists and may not be replaced."""
    if out.exists() and not force:
        raise MoemergeError(f"output directory {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise MoemergeError(f"output path {out} is a file, not a directory; choose another --out")


def check_not_source(out: Path, source: Path) -> None:
    """Fail if ``out`` is the source model's own directory (``--force`` would delete the model)."""
    if out.resolve() == source.resolve():
        raise MoemergeError(f"--out {out} is the source model directory; choose another output directory")


def write_json(obj, out: str | Path) -> None:
    """Write ``obj`` as indented JSON to the file ``out`` atomically (a temporary file beside it, renamed into
    place), creating its folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_output(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block finishes without error."""
    out = Path(out).absolute()
    check_output(out, force)
    anchor = out.parent
    while not anchor.exists():
        anchor = anchor.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=anchor))
    try:
        yield tmp
        publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def publish(tmp: Path, out: Path) -> None:
    """Give the finished directory ``tmp`` the usual file modes and rename it to ``out`` (replacing it)."""
    # mkdtemp and safetensors' atomic writes leave owner-only modes
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for file in tmp.iterdir():
        file.chmod(0o666 & ~umask)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_checkpoint(
    model: torch.nn.Module,
    source_dir: Path,
    out_dir: Path,
    metadata: dict,
    tensor_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Save ``model`` (sharded above 2 GB), the source's tokenizer and generation files, ``moemerge.json``,
    and moemerge's own tensor files (file name -> tensors), e.g. the original routers of grouped routing."""
    model.save_pretrained(out_dir, max_shard_size=MAX_SHARD_SIZE)
    write_extras(source_dir, out_dir, metadata, tensor_files)


def write_extras(
    source_dir: Path, out_dir: Path, metadata: dict, tensor_files: dict[str, dict[str, torch.Tensor]] | None
) -> None:
    """Everything of a reduced checkpoint but the model: the source's tokenizer and generation files,
    moemerge's own tensor files and ``moemerge.json``."""
    for pattern in COPIED_FILES:
        for file in sorted(source_dir.glob(pattern)):
            if file.is_file():
                shutil.copyfile(file, out_dir / file.name)
    for name, tensors in (tensor_files or {}).items():
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, out_dir / name)
    (out_dir / "moemerge.json").write_text(format_metadata(metadata), encoding="utf-8")


def format_metadata(metadata: dict) -> str:
    """JSON with two-space indents, except that each entry of ``layers`` stays on one line."""
    layers = metadata.get("layers", [])
    text = json.dumps({**metadata, "layers": []}, indent=2)
    if not layers:
        return text + "\n"
    rows = ",\n".join("    " + json.dumps(entry) for entry in layers)
    return text.replace('"layers": []', '"layers": [\n' + rows + "\n  ]") + "\n"
