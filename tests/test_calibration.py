"""Calibration specs -> token sequences, checked against the input files and an independent tokenisation."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import random
import re
import struct
import sys
import types
from importlib import resources

import pytest
import torch
from conftest import TOKENIZER_DIR
from transformers import AutoTokenizer

from moemerge.calibration import CalibrationSet, load_calibration
from moemerge.errors import MoemergeError

DOCS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a neighbourhood,",
    "this truth is so well fixed in the minds of the surrounding families, that he is considered as the rightful property.",
    "My dear Mr. Bennet, said his lady to him one day, have you heard that Netherfield Park is let at last?",
    "Mr. Bennet replied that he had not. But it is, returned she; for Mrs. Long has just been here, and she told me all.",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def stream_of(documents: list[str], tokenizer) -> list[int]:
    """The spec's token stream, built here independently: each document's tokens, then end-of-text."""
    ids: list[int] = []
    for doc in documents:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def spec_windows(stream: list[int], samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """The documented window draw: ``samples`` of the len // seq_len aligned windows, by random.Random(seed), sorted."""
    starts = sorted(random.Random(seed).sample(range(len(stream) // seq_len), samples))
    return [stream[i * seq_len : (i + 1) * seq_len] for i in starts]


def independent_sha256(sequences: list[list[int]]) -> str:
    """sha256 over, per sequence, an 8-byte little-endian length then the ids as little-endian int64."""
    h = hashlib.sha256()
    for seq in sequences:
        h.update(struct.pack("<Q", len(seq)))
        h.update(struct.pack(f"<{len(seq)}q", *seq))
    return h.hexdigest()


def as_lists(calib: CalibrationSet) -> list[list[int]]:
    assert all(s.dtype == torch.int64 and s.dim() == 1 for s in calib.sequences)
    return [s.tolist() for s in calib.sequences]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_input_ids_rows_are_used_as_given_in_file_order(tmp_path):
    """input_ids rows: the first ``samples`` rows of the file, in order, each cut to seq_len, shorter ones kept whole."""
    rng = random.Random(7)
    rows = [[rng.randrange(4096) for _ in range(length)] for length in (40, 3, 12, 25, 9)]
    spec = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": r, "extra": i} for i, r in enumerate(rows)])
    calib = load_calibration(spec, tokenizer=None, samples=4, seq_len=10)
    expected = [r[:10] for r in rows[:4]]
    assert as_lists(calib) == expected
    assert calib.num_tokens == sum(len(r) for r in expected)
    assert calib.sha256() == independent_sha256(expected)


def test_input_ids_rows_fewer_than_samples_is_an_error(tmp_path):
    """Asking for more sequences than the file has input_ids rows raises MoemergeError (no silent reuse) naming the file,
    its row count and the --calib-samples asked for."""
    spec = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 3]}] * 3)
    with pytest.raises(MoemergeError) as error:
        load_calibration(spec, tokenizer=None, samples=4, seq_len=8)
    message = str(error.value)
    assert spec in message and re.search(r"\b3 input_ids rows\b.*--calib-samples (is )?4\b", message), message


@pytest.mark.parametrize("bad", [[], [1, -2], [1, 2.5], [1, "x"], "1 2 3", [1, True], None], ids=repr)
def test_invalid_input_ids_rows_are_errors(tmp_path, bad):
    """Rows with empty, negative, fractional, boolean or non-numeric ids raise MoemergeError."""
    spec = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [4, 5]}, {"input_ids": bad}])
    with pytest.raises(MoemergeError):
        load_calibration(spec, tokenizer=None, samples=2, seq_len=8)


def test_text_jsonl_windows_are_the_spec_windows_of_the_tokenised_stream(tmp_path, tokenizer):
    """Text rows: each window is an aligned, non-overlapping seq_len slice of the independently tokenised stream, sorted."""
    spec = write_jsonl(tmp_path / "docs.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    stream = stream_of(DOCS, tokenizer)
    samples, seq_len = 5, 16
    calib = load_calibration(spec, tokenizer, samples=samples, seq_len=seq_len, seed=3)
    got = as_lists(calib)
    assert got == spec_windows(stream, samples, seq_len, seed=3)
    # the same facts without the draw: contiguous aligned slices, strictly increasing (so disjoint) starts
    starts = []
    for window in got:
        assert len(window) == seq_len
        matches = [i for i in range(0, len(stream) - seq_len + 1, seq_len) if stream[i : i + seq_len] == window]
        assert matches
        starts.append(matches[0])
    assert all(b - a >= seq_len for a, b in itertools.pairwise(starts))
    assert calib.num_tokens == samples * seq_len
    assert calib.sha256() == independent_sha256(got)


def test_txt_file_is_one_document(tmp_path, tokenizer):
    """A .txt file is tokenised as one document (plus end-of-text) and windowed like text rows."""
    text = "\n".join(DOCS)
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    stream = stream_of([text], tokenizer)
    calib = load_calibration(str(path), tokenizer, samples=4, seq_len=20, seed=11)
    assert as_lists(calib) == spec_windows(stream, 4, 20, seed=11)


def test_text_exactly_long_enough_and_one_token_short(tmp_path, tokenizer):
    """A stream of exactly samples x seq_len tokens is used whole; one more token per window is an error."""
    path = tmp_path / "corpus.txt"
    path.write_text(DOCS[0], encoding="utf-8")
    stream = stream_of([DOCS[0]], tokenizer)
    whole = load_calibration(str(path), tokenizer, samples=1, seq_len=len(stream))
    assert as_lists(whole) == [stream]
    with pytest.raises(MoemergeError):
        load_calibration(str(path), tokenizer, samples=1, seq_len=len(stream) + 1)
    with pytest.raises(MoemergeError):
        load_calibration(str(path), tokenizer, samples=len(stream) // 4 + 1, seq_len=4)


def test_seed_determines_the_sample(tmp_path, tokenizer):
    """The same seed gives identical sequences and hash; another seed draws other windows and another hash."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(DOCS), encoding="utf-8")
    a = load_calibration(str(path), tokenizer, samples=3, seq_len=8, seed=0)
    b = load_calibration(str(path), tokenizer, samples=3, seq_len=8, seed=0)
    c = load_calibration(str(path), tokenizer, samples=3, seq_len=8, seed=1)
    assert as_lists(a) == as_lists(b)
    assert a.sha256() == b.sha256() == independent_sha256(as_lists(a))
    assert as_lists(a) != as_lists(c)
    assert a.sha256() != c.sha256()


def test_sha256_counts_sequence_boundaries():
    """The hash covers the lengths: [1,2],[3] and [1],[2,3] (same tokens, other split) hash differently."""
    one = CalibrationSet("x", [torch.tensor([1, 2]), torch.tensor([3])])
    two = CalibrationSet("x", [torch.tensor([1]), torch.tensor([2, 3])])
    assert one.sha256() == independent_sha256([[1, 2], [3]])
    assert two.sha256() == independent_sha256([[1], [2, 3]])
    assert one.sha256() != two.sha256()
    assert CalibrationSet("x", [torch.tensor([1, 2], dtype=torch.int32)]).sha256() == independent_sha256([[1, 2]])


def test_default_corpus_covers_the_paper_setting(tokenizer):
    """spec None: the bundled corpus yields 32 x 2048 windows that are the spec windows of its own tokenisation."""
    raw = resources.files("moemerge.calibration").joinpath("default_corpus.txt.gz").read_bytes()
    stream = stream_of([gzip.decompress(raw).decode("utf-8")], tokenizer)
    assert len(stream) >= 32 * 2048
    calib = load_calibration(None, tokenizer, samples=32, seq_len=2048, seed=0)
    assert as_lists(calib) == spec_windows(stream, 32, 2048, seed=0)
    assert calib.num_tokens == 32 * 2048


@pytest.mark.parametrize(
    "content",
    ["", "   \n\n", "\n\n\n"],
    ids=["empty", "whitespace", "blank-lines"],
)
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_empty_files_are_errors(tmp_path, tokenizer, content, suffix):
    """Empty or whitespace-only calibration files raise MoemergeError naming the file and saying it holds nothing: a
    .jsonl "is empty", a .txt "has 0 tokens" (fewer than the samples x seq_len asked for)."""
    path = tmp_path / f"calib{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MoemergeError) as error:
        load_calibration(str(path), tokenizer, samples=1, seq_len=4)
    message = str(error.value)
    expected = r"\bis empty\b" if suffix == ".jsonl" else r"\bhas 0 tokens\b.*--calib-samples 1 x --calib-seq-len 4"
    assert str(path) in message and re.search(expected, message), message


@pytest.mark.parametrize(
    "lines",
    [
        ['{"text": "fine"}', '{"text": "broken"'],
        ['{"text": "fine"}', '["not", "an", "object"]'],
        ['{"text": "fine"}', '{"input_ids": [1, 2]}'],
        ['{"text": "fine"}', '{"content": "no text key"}'],
        ['{"text": 5}'],
    ],
    ids=["bad-json", "not-object", "mixed-rows", "no-text", "text-not-string"],
)
def test_malformed_jsonl_is_an_error(tmp_path, tokenizer, lines):
    """Malformed jsonl (bad JSON, non-objects, mixed or missing keys) raises MoemergeError, never a raw exception."""
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(MoemergeError):
        load_calibration(str(path), tokenizer, samples=1, seq_len=2)


def test_bad_json_error_names_the_line(tmp_path, tokenizer):
    """A line that is not JSON is reported with its 1-based line number."""
    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{oops\n', encoding="utf-8")
    with pytest.raises(MoemergeError, match=":3"):
        load_calibration(str(path), tokenizer, samples=1, seq_len=2)


@pytest.mark.parametrize("samples,seq_len", [(0, 8), (2, 0), (-1, 8)])
def test_nonpositive_sizes_are_errors(tmp_path, samples, seq_len):
    """--calib-samples or --calib-seq-len below 1 raise MoemergeError."""
    spec = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 3]}] * 3)
    with pytest.raises(MoemergeError):
        load_calibration(spec, tokenizer=None, samples=samples, seq_len=seq_len)


def test_bad_specs_are_errors(tmp_path, tokenizer):
    """Missing files, unknown suffixes, a directory and malformed hf: specs raise MoemergeError naming the spec and
    the problem: a missing file "does not exist", a .csv must end in .txt or .jsonl, a directory is said to be one
    (not to be missing), a bad hf: spec shows the hf:NAME[:CONFIG[:SPLIT]] form."""
    (tmp_path / "calib.csv").write_text("text\nhello world\n", encoding="utf-8")
    for spec, named in [
        (str(tmp_path / "missing.txt"), r"does not exist"),
        (str(tmp_path / "calib.csv"), r"\.txt or \.jsonl"),
        (str(tmp_path), r"(?i)\bdirectory\b"),
        ("hf:", r"hf:NAME\[:CONFIG\[:SPLIT\]\]"),
        ("hf::x", r"hf:NAME\[:CONFIG\[:SPLIT\]\]"),
        ("hf:a:b:c:d", r"hf:NAME\[:CONFIG\[:SPLIT\]\]"),
    ]:
        with pytest.raises(MoemergeError) as error:
            load_calibration(spec, tokenizer, samples=1, seq_len=4)
        message = str(error.value)
        assert spec in message and re.search(named, message), (spec, message)
        if spec == str(tmp_path):
            assert "does not exist" not in message, message


def test_text_needs_a_tokenizer(tmp_path):
    """Text calibration without a tokenizer raises MoemergeError (input_ids rows need none)."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(DOCS), encoding="utf-8")
    with pytest.raises(MoemergeError):
        load_calibration(str(path), tokenizer=None, samples=1, seq_len=4)


def test_hf_spec_without_datasets_package_fails_fast(monkeypatch, tokenizer):
    """hf:NAME with the datasets package missing raises MoemergeError at once (no network access attempted)."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(MoemergeError, match="datasets"):
        load_calibration("hf:allenai/c4:en:train", tokenizer, samples=1, seq_len=4)


def fake_datasets(rows=None, error=None):
    """A stand-in ``datasets`` module: records load_dataset's arguments and how many rows were read."""
    calls, pulled = [], []

    def load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        if error is not None:
            raise error
        pulled.append(0)
        for row in rows:
            pulled[-1] += 1
            yield row

    return types.SimpleNamespace(load_dataset=load_dataset), calls, pulled


def test_hf_spec_parts_and_text_column(monkeypatch, tokenizer):
    """hf:NAME[:CONFIG[:SPLIT]] passes name, config (None) and split (train) through; windows come from the rows read."""
    module, calls, pulled = fake_datasets(rows=[{"text": d} for d in DOCS])
    monkeypatch.setitem(sys.modules, "datasets", module)
    plain = load_calibration("hf:org/set", tokenizer, samples=2, seq_len=8, seed=5)
    load_calibration("hf:org/set:en", tokenizer, samples=2, seq_len=8)
    load_calibration("hf:org/set:en:validation", tokenizer, samples=2, seq_len=8)
    assert calls == [
        ("org/set", None, "train", True),
        ("org/set", "en", "train", True),
        ("org/set", "en", "validation", True),
    ]
    read = DOCS[: pulled[0]]
    assert as_lists(plain) == spec_windows(stream_of(read, tokenizer), 2, 8, seed=5)
    assert plain.spec == "hf:org/set"


def test_hf_spec_reads_the_whole_set_when_short(monkeypatch, tokenizer):
    """A hub set with fewer characters than wanted is read to its end, and windows come from all of it."""
    module, _, pulled = fake_datasets(rows=[{"text": d} for d in DOCS])
    monkeypatch.setitem(sys.modules, "datasets", module)
    stream = stream_of(DOCS, tokenizer)
    calib = load_calibration("hf:org/set", tokenizer, samples=len(stream) // 64, seq_len=64, seed=2)
    assert pulled == [len(DOCS)]
    assert as_lists(calib) == spec_windows(stream, len(stream) // 64, 64, seed=2)


@pytest.mark.parametrize(
    "rows,error",
    [(None, ConnectionError("no network")), ([{"content": "no text column"}], None)],
    ids=["unreachable", "no-text-column"],
)
def test_hf_spec_failures_are_moemerge_errors(monkeypatch, tokenizer, rows, error):
    """An unreachable hub or a data set without a text column raises MoemergeError."""
    module, _, _ = fake_datasets(rows=rows, error=error)
    monkeypatch.setitem(sys.modules, "datasets", module)
    with pytest.raises(MoemergeError):
        load_calibration("hf:org/set", tokenizer, samples=1, seq_len=4)


def test_gzipped_files_read_as_their_plain_text(tmp_path, tokenizer):
    """.txt.gz and .jsonl.gz give the spec windows of the decompressed text."""
    text = "\n".join(DOCS)
    (tmp_path / "corpus.txt.gz").write_bytes(gzip.compress(text.encode("utf-8")))
    rows = "".join(json.dumps({"text": d}) + "\n" for d in DOCS)
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(rows.encode("utf-8")))
    calib = load_calibration(str(tmp_path / "corpus.txt.gz"), tokenizer, samples=4, seq_len=20, seed=11)
    assert as_lists(calib) == spec_windows(stream_of([text], tokenizer), 4, 20, seed=11)
    calib = load_calibration(str(tmp_path / "docs.jsonl.gz"), tokenizer, samples=5, seq_len=16, seed=3)
    assert as_lists(calib) == spec_windows(stream_of(DOCS, tokenizer), 5, 16, seed=3)


@pytest.mark.parametrize("name", ["corpus.gz", "corpus.csv.gz", "corpus.txt.bz2"])
def test_other_suffixes_are_refused(tmp_path, tokenizer, name):
    (tmp_path / name).write_bytes(gzip.compress(b"text"))
    with pytest.raises(MoemergeError, match=r"must end in \.txt or \.jsonl"):
        load_calibration(str(tmp_path / name), tokenizer, samples=1, seq_len=2)


def test_corrupt_gzip_is_a_clean_error(tmp_path, tokenizer):
    (tmp_path / "corpus.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(MoemergeError, match="not a readable gzip file"):
        load_calibration(str(tmp_path / "corpus.txt.gz"), tokenizer, samples=1, seq_len=2)


def test_a_repeated_calibration_is_the_tokenization_of_its_own_text_and_tokenizer(tmp_path, tokenizer):
    """The last token stream is reused (``compare`` and repeated ``reduce`` calls calibrate on the same text):
    every call must still give the windows of an independent tokenisation of *its* text with *its* tokenizer,
    so a changed document, a tokenizer with one more token, another end-of-text id or special tokens split is
    never served the previous stream, and windows handed out are not views that a caller could change the stream
    through."""
    spec = tmp_path / "docs.jsonl"
    spec.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps({"text": d.replace("truth", "fact")}) + "\n" for d in DOCS))
    grown = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    grown.add_tokens(["Netherfield"])
    other_eos = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    other_eos.eos_token = other_eos.convert_ids_to_tokens(5)
    assert other_eos.eos_token_id == 5 != tokenizer.eos_token_id
    splitting = AutoTokenizer.from_pretrained(TOKENIZER_DIR, split_special_tokens=True)  # same tokenizer.json
    special = tmp_path / "special.jsonl"  # the end-of-text marker as text: one token, or pieces when split
    special.write_text("".join(json.dumps({"text": f"{d} {tokenizer.eos_token}"}) + "\n" for d in DOCS))
    # each change follows a call that differs from it in that change only
    calls = [(spec, tokenizer), (spec, tokenizer), (edited, tokenizer), (spec, tokenizer), (spec, grown)]
    calls += [(spec, tokenizer), (spec, other_eos), (special, tokenizer), (special, splitting)]
    for path, tok in calls:
        docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
        got = load_calibration(str(path), tok, samples=3, seq_len=16, seed=1)
        assert [s.tolist() for s in got.sequences] == spec_windows(stream_of(docs, tok), 3, 16, 1), (path, tok)
        for s in got.sequences:
            s.fill_(0)  # a caller's change to its windows must not reach the next call
