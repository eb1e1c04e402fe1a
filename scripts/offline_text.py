"""Real English text from Debian packages, for the bundled corpus and the demo model.

Run: ``python scripts/offline_text.py OUT_DIR``. Needs ``apt-get`` and ``dpkg`` (no root
needed for ``apt-get download``). Writes ``austen/<novel>.txt`` and ``python_docs.txt`` to
OUT_DIR, and (re)builds the two texts the repository ships: the package's offline calibration
corpus (Persuasion and Northanger Abbey) and ``demo/heldout.txt`` (the start of Emma, which the
demo model never sees in training).

Jane Austen's novels come from ``r-cran-janeaustenr``: ``data/Rdata.rdb`` is a sequence of
blocks, each a 4-byte big-endian length followed by a zlib stream holding one R object in
R's XDR serialisation; every object there is a character vector (one element per line).
"""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO / "src" / "moemerge" / "calibration" / "default_corpus.txt.gz"
HELDOUT = REPO / "demo" / "heldout.txt"
HELDOUT_CHARS = 60_000
AUSTEN_NOVELS = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]


def paragraphs(text: str) -> list[str]:
    """Austen's lines are wrapped at ~70 columns: rejoin each paragraph onto one line."""
    blocks = [" ".join(b.split()) for b in text.split("\n\n")]
    return [b for b in blocks if b]


def _read_r_strings(blob: bytes) -> list[str]:
    """Decode one XDR-serialised R character vector (STRSXP of CHARSXPs)."""
    if blob[:2] != b"X\n":
        raise ValueError("not an XDR R serialisation")
    pos = 2
    version = struct.unpack(">i", blob[pos : pos + 4])[0]
    pos += 12  # version, writer R version, minimal reader version
    if version == 3:
        n = struct.unpack(">i", blob[pos : pos + 4])[0]
        pos += 4 + n  # native encoding name
    flags, length = struct.unpack(">ii", blob[pos : pos + 8])
    pos += 8
    if flags & 0xFF != 16:
        raise ValueError(f"expected a character vector, got SEXP type {flags & 0xFF}")
    lines = []
    for _ in range(length):
        _, n = struct.unpack(">ii", blob[pos : pos + 8])
        pos += 8
        if n < 0:  # NA_character_
            lines.append("")
            continue
        lines.append(blob[pos : pos + n].decode("utf-8"))
        pos += n
    return lines


def read_rdb(path: Path) -> list[list[str]]:
    """All character vectors stored in an R lazy-load database ``.rdb``, in file order."""
    data = path.read_bytes()
    pos, objects = 0, []
    while pos < len(data):
        stream = zlib.decompressobj()
        blob = stream.decompress(data[pos + 4 :])
        pos = len(data) - len(stream.unused_data)
        objects.append(_read_r_strings(blob))
    return objects


def unpack_deb(name: str, into: Path) -> Path:
    subprocess.run(["apt-get", "download", name], cwd=into, check=True, capture_output=True)
    deb = next(into.glob(f"{name}_*.deb"))
    root = into / name
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def main(out_dir: str) -> None:
    out = Path(out_dir)
    (out / "austen").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack_deb("r-cran-janeaustenr", Path(tmp))
        rdb = next(root.rglob("janeaustenr/data/Rdata.rdb"))
        # The index (.rdx) lists objects alphabetically, and so are they stored.
        for name, lines in zip(AUSTEN_NOVELS, read_rdb(rdb), strict=True):
            (out / "austen" / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        root = unpack_deb("python3.11-doc", Path(tmp))
        sources = sorted(next(root.rglob("html/_sources")).rglob("*.rst.txt"))
        text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sources)
        (out / "python_docs.txt").write_text(text, encoding="utf-8")
    _write_shipped_texts(out / "austen")


def _write_shipped_texts(austen: Path) -> None:
    corpus = []
    for name in ("persuasion", "northangerabbey"):
        corpus += paragraphs((austen / f"{name}.txt").read_text(encoding="utf-8"))
    with DEFAULT_CORPUS.open("wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(("\n\n".join(corpus) + "\n").encode("utf-8"))
    emma, heldout = paragraphs((austen / "emma.txt").read_text(encoding="utf-8")), ""
    for para in emma:
        if len(heldout) >= HELDOUT_CHARS:
            break
        heldout += para + "\n\n"
    HELDOUT.write_text(heldout, encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
