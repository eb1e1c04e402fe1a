"""Run a transformers loading call so that any failure is one ``error:`` line and nothing else.

transformers logs a multi-line load report (and Python warns) before some errors, e.g. a table of
every tensor whose shape does not fit the config. While a call runs, its log records and warnings
are held back: released unchanged when it succeeds, dropped when it fails, and the error line then
says what failed (the first mismatched tensor, when the report names one).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from typing import TypeVar

from moemerge.errors import MoemergeError

T = TypeVar("T")
# one row of transformers' load report: "KEY | MISMATCH | Reinit due to size mismatch - ckpt: torch.Size([8, 32]) vs model:torch.Size([6, 32])"
_MISMATCH = re.compile(
    r"^\s*(\S[^|\n]*?)\s*\|[^\n]*?ckpt: torch\.Size\((\[[^\]]*\])\) vs model: ?torch\.Size\((\[[^\]]*\])\)", re.M
)
MAX_DETAIL = 300


class _Hold(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def transformers_call(what: str, load: Callable[[], T], fix: str = "") -> T:
    """``load()``; any exception it raises becomes ``MoemergeError("{what}: {reason}[; {fix}]")``, one line."""
    logger = logging.getLogger("transformers")
    hold, handlers, propagate = _Hold(), logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [hold], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            result = load()
    except Exception as err:
        raise MoemergeError(f"{what}: {_reason(err, hold.records)}" + (f"; {fix}" if fix else "")) from None
    finally:
        logger.handlers, logger.propagate = handlers, propagate
    for record in hold.records:
        logging.getLogger(record.name).handle(record)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return result


def size_mismatch(key: str, stored: str, built: str) -> str:
    """The reason a tensor ``key`` of shape ``stored`` in the weights cannot go where the config builds ``built``."""
    return (
        f"the weights do not fit config.json: {key} is {stored} in the weights but {built} by the config "
        "(an expert count or size in config.json differs from the weights); fix config.json"
    )


def _reason(err: Exception, records: list[logging.LogRecord]) -> str:
    """The first size mismatch of a held load report, else the exception's message, as one short line."""
    for record in records:
        match = _MISMATCH.search(record.getMessage())
        if match:
            return size_mismatch(*match.groups())
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."
