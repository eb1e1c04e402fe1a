"""NaN and Inf stop a reduction at once: in a layer's weights before its calibration, in its statistics after.

scipy's clustering (and every merge) would otherwise fail, or silently produce garbage, only after all the
work. One helper checks both, for the in-memory and the streaming path alike (both gather statistics with
:class:`moemerge.statistics.LayerAccumulator`).
"""

from __future__ import annotations

import dataclasses

import torch

from moemerge.errors import MoemergeError

WEIGHTS_FIX = "the checkpoint is damaged, or overflowed when saved in a narrower dtype; repair or download it again"
STATISTICS_FIX = (
    "the calibration forward pass overflowed in or before this layer; try --dtype float32, or check the weights of "
    "the layers before it"
)


def check_finite(layer: int, tensors: dict[str, torch.Tensor | None], fix: str) -> None:
    """Raise MoemergeError naming ``layer`` and the first of ``tensors`` (name -> tensor or None) holding NaN or
    Inf, then ``fix``. Checked one slice along the first dimension at a time: no full-size temporary."""
    for name, tensor in tensors.items():
        if tensor is None or not tensor.is_floating_point():
            continue
        slices = tensor if tensor.dim() > 1 else [tensor]
        if not all(_all_finite(part) for part in slices):
            raise MoemergeError(f"layer {layer}: {name} holds NaN or Inf values; {fix}")


def _all_finite(part: torch.Tensor) -> bool:
    """Whether ``part`` holds no NaN or Inf. Any such element makes the sum NaN or Inf, so a finite sum (in float32:
    8x faster than an element-wise test on bf16 weights) settles it; a sum that overflows from large finite values
    is checked element by element."""
    total = part.sum(dtype=torch.float32 if part.element_size() <= 4 else torch.float64)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(part).all())


def check_statistics(stats) -> None:
    """:func:`check_finite` on every tensor of a :class:`~moemerge.statistics.LayerStatistics`."""
    tensors = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    check_finite(
        stats.layer, {f"calibration statistic {k}": v for k, v in tensors.items() if torch.is_tensor(v)}, STATISTICS_FIX
    )
