"""Turn a ``--calib`` spec into a deterministic list of token sequences.

Specs:
- ``None``: the bundled offline corpus (two of Jane Austen's novels, ``default_corpus.txt.gz``);
- ``PATH.txt``: plain text;
- ``PATH.jsonl`` whose rows have ``text``: documents;
- ``PATH.jsonl`` whose rows have ``input_ids``: token rows, used as given in file order
  (the first ``samples`` rows, each cut to ``seq_len`` tokens);
- any of those files gzipped, named ``PATH.txt.gz`` / ``PATH.jsonl.gz``;
- ``hf:NAME[:CONFIG[:SPLIT]]``: a Hugging Face data set's ``text`` column (needs the hub and
  the ``datasets`` package).

Text is tokenised document by document, joined with the end-of-text token into one stream, and
``samples`` non-overlapping windows of ``seq_len`` tokens are drawn from it with ``seed``, as
the paper draws random 2048-token windows of C4.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from moemerge.defaults import CALIB_SAMPLES, CALIB_SEQ_LEN
from moemerge.errors import MoemergeError
from moemerge.input_files import file_kind


@dataclass
class CalibrationSet:
    """Token sequences (each a 1-D int64 tensor) and the spec they came from."""

    spec: str
    sequences: list[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def sha256(self) -> str:
        """Hash of the tokens (int64 little-endian, sequence lengths included)."""
        h = hashlib.sha256()
        for s in self.sequences:
            h.update(len(s).to_bytes(8, "little"))
            h.update(s.to(torch.int64).numpy().astype("<i8").tobytes())
        return h.hexdigest()


def load_calibration(
    spec: str | None,
    tokenizer,
    samples: int = CALIB_SAMPLES,
    seq_len: int = CALIB_SEQ_LEN,
    seed: int = 0,
    vocab_size: int | None = None,
    context: int | None = None,
) -> CalibrationSet:
    """Read ``spec`` (see the module docstring) into ``samples`` sequences of at most ``seq_len`` tokens.

    ``vocab_size``: when given, a token id at or above it is refused, whichever source it came from.
    ``context``: when given, a ``seq_len`` above it (the model's ``max_position_embeddings``) is refused.
    """
    check_calibration_size(samples, seq_len, context)
    name = spec or "default corpus"
    documents, rows = _read_spec(spec, min_chars=8 * samples * seq_len)
    if rows is not None:
        sequences = _token_rows(Path(spec), rows, samples, seq_len)
    elif tokenizer is None:
        raise MoemergeError(f"the model has no tokenizer to read {name}; pass --calib with an input_ids .jsonl")
    else:
        sequences = _windows(name, _token_stream(documents, tokenizer), samples, seq_len, seed)
    return _within_vocabulary(CalibrationSet(name, sequences), vocab_size)


def load_tokens(spec: str | None, tokenizer, max_tokens: int, vocab_size: int | None = None) -> CalibrationSet:
    """The first ``max_tokens`` tokens of ``spec`` (any ``--calib`` form) as one sequence, e.g. evaluation text.

    Text documents are joined with the end-of-text token; ``input_ids`` rows are concatenated in file order.
    ``vocab_size`` as for :func:`load_calibration`.
    """
    name = spec or "default corpus"
    documents, rows = _read_spec(spec, min_chars=8 * max_tokens)
    if rows is not None:
        stream = torch.cat(_token_rows(Path(spec), rows, len(rows), max_tokens))
    elif tokenizer is None:
        raise MoemergeError(f"the model has no tokenizer to read {name}; pass an input_ids .jsonl")
    else:
        stream = _token_stream(documents, tokenizer)
    if len(stream) < 2:
        raise MoemergeError(f"{name} holds fewer than 2 tokens; give more text")
    return _within_vocabulary(CalibrationSet(name, [stream[:max_tokens].clone()]), vocab_size)


def check_calibration_size(samples: int, seq_len: int, context: int | None = None) -> None:
    """Raise MoemergeError unless there is at least one sequence of at least one token, and (when the model's
    ``context`` is given) the sequences fit in it."""
    if samples < 1 or seq_len < 1:
        raise MoemergeError(f"--calib-samples ({samples}) and --calib-seq-len ({seq_len}) must be at least 1")
    if context is not None and seq_len > context:
        raise MoemergeError(
            f"--calib-seq-len {seq_len} is beyond the model's context of {context} tokens (max_position_embeddings); "
            f"use --calib-seq-len {context} or less"
        )


def check_spec(spec: str | None) -> None:
    """Raise MoemergeError for a spec that cannot be read, before any other work (the hub is not contacted)."""
    if spec is None or spec.startswith("hf:"):
        return
    kind = file_kind(spec)
    if kind == "missing":
        raise MoemergeError(f"text file {spec} does not exist; pass a .txt or .jsonl file, or hf:NAME")
    if kind is not None:
        raise MoemergeError(f"text file {spec} is {kind}; pass a .txt or .jsonl file, or hf:NAME")
    if _kind(Path(spec)) is None:
        raise MoemergeError(f"text file {spec} must end in .txt or .jsonl (optionally with .gz)")


def _within_vocabulary(calibration: CalibrationSet, vocab_size: int | None) -> CalibrationSet:
    """``calibration``, unless a token id is at or above ``vocab_size`` (MoemergeError naming it)."""
    for number, sequence in enumerate(calibration.sequences, start=1):
        if vocab_size is not None and len(sequence) and int(sequence.max()) >= vocab_size:
            raise MoemergeError(
                f"{calibration.spec}: sequence {number} holds token id {int(sequence.max())}, outside the model's "
                f"vocabulary of {vocab_size}; were these tokens made by another model's tokenizer?"
            )
    return calibration


def _kind(path: Path) -> str | None:
    """ ".txt" or ".jsonl" for a (possibly gzipped) text file, else None."""
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    return suffixes[0] if suffixes and suffixes[0] in (".txt", ".jsonl") else None


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise MoemergeError(f"{path} is not a readable gzip file ({err}); recompress it or drop .gz") from None
    return data.decode("utf-8", errors="replace")


def _read_spec(spec: str | None, min_chars: int) -> tuple[list[str] | None, list[dict] | None]:
    """(documents, None) for text specs, or (None, rows) for a .jsonl of ``input_ids`` rows."""
    if spec is None:
        with resources.files(__package__).joinpath("default_corpus.txt.gz").open("rb") as f:
            return [gzip.decompress(f.read()).decode("utf-8")], None
    if spec.startswith("hf:"):
        return _hub_documents(spec, min_chars), None
    check_spec(spec)
    path = Path(spec)
    if _kind(path) == ".txt":
        return [_read_text(path)], None
    rows = _read_jsonl(path)
    if all("input_ids" in row for row in rows):
        return None, rows
    if not all(isinstance(row.get("text"), str) for row in rows):
        raise MoemergeError(f"{spec}: every row must have a 'text' string, or every row 'input_ids'")
    return [row["text"] for row in rows], None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MoemergeError(f"{path}:{number}: not valid JSON ({err.msg}); one JSON object per line") from None
        if not isinstance(row, dict):
            raise MoemergeError(f"{path}:{number}: expected a JSON object with 'text' or 'input_ids'")
        rows.append(row)
    if not rows:
        raise MoemergeError(f"calibration file {path} is empty; give it text or input_ids rows")
    return rows


def _token_rows(path: Path, rows: list[dict], samples: int, seq_len: int) -> list[torch.Tensor]:
    if len(rows) < samples:
        raise MoemergeError(
            f"{path} has {len(rows)} input_ids rows but --calib-samples is {samples}; add rows or lower --calib-samples"
        )
    sequences = []
    for number, row in enumerate(rows[:samples], start=1):
        ids = row["input_ids"]
        if not isinstance(ids, list) or not ids or not all(type(t) is int and t >= 0 for t in ids):
            raise MoemergeError(f"{path}: row {number}: input_ids must be a non-empty list of token ids")
        sequences.append(torch.tensor(ids[:seq_len], dtype=torch.int64))
    return sequences


_last_stream: list = [None, None]  # [key, stream] of the last tokenization


def _token_stream(documents: list[str], tokenizer) -> torch.Tensor:
    """[L] token ids of all documents, separated by the end-of-text token where there is one (not to be modified:
    the last stream is kept, so that calibrating again on the same text and tokenizer, as ``compare``, ``eval``
    and a notebook calling :func:`moemerge.reduce` repeatedly do, skips the tokenization: about 2 s for the
    bundled corpus on one core)."""
    key = _stream_key(documents, tokenizer)
    if key is not None and key == _last_stream[0]:
        return _last_stream[1]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for doc in documents:
        if doc.strip():
            ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + eos
    stream = torch.tensor(ids, dtype=torch.int64)
    if key is not None:
        _last_stream[:] = [key, stream]
    return stream


def _stream_key(documents: list[str], tokenizer) -> str | None:
    """sha256 of the documents and of everything that decides their tokens (the fast tokenizer's full
    serialisation, whether it splits special tokens, its class and end-of-text id); None for a tokenizer without
    one, which is not cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    settings = (type(tokenizer).__qualname__, tokenizer.eos_token_id, backend.encode_special_tokens)
    h = hashlib.sha256()
    for part in (repr(settings), backend.to_str(), *documents):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _windows(name: str, stream: torch.Tensor, samples: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    available = len(stream) // seq_len
    if available < samples:
        raise MoemergeError(
            f"calibration text {name} has {len(stream)} tokens, fewer than --calib-samples {samples} x "
            f"--calib-seq-len {seq_len}; give more text or lower those numbers"
        )
    starts = sorted(random.Random(seed).sample(range(available), samples))
    return [stream[i * seq_len : (i + 1) * seq_len].clone() for i in starts]


def _hub_documents(spec: str, min_chars: int) -> list[str]:
    """The first documents of a hub data set, until they hold ``min_chars`` characters (~2x the tokens needed)."""
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise MoemergeError(f"bad calibration spec {spec!r}; use hf:NAME[:CONFIG[:SPLIT]]")
    name, config, split = parts[0], (parts[1:2] or [None])[0], (parts[2:3] or ["train"])[0]
    try:
        import datasets
    except ImportError:
        raise MoemergeError("hf: calibration specs need the datasets package: pip install datasets") from None
    try:
        documents, chars = [], 0
        for row in datasets.load_dataset(name, config or None, split=split, streaming=True):
            documents.append(row["text"])
            chars += len(row["text"])
            if chars >= min_chars:
                break
        return documents
    except Exception as err:  # the hub is unreachable or the set has no text column
        raise MoemergeError(f"could not read {spec} from the Hugging Face hub ({type(err).__name__}: {err})") from None
