"""Shared output of the benchmark scripts: a titled markdown table, printed and optionally saved."""

from __future__ import annotations

from pathlib import Path


def emit_table(title: str, columns: list[str], rows: list[str], out: str | None) -> None:
    """Print ``title`` and a markdown table of ``columns`` and pre-formatted ``rows``; also write it to ``out``."""
    table = "\n".join([f"{title}\n", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows])
    print(table)
    if out:
        Path(out).write_text(table + "\n", encoding="utf-8")
