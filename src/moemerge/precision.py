"""Storage dtype (what a checkpoint holds and an output is written in) and compute dtype (what the forward, the
statistics and the merges run in).

Real checkpoints are bfloat16. A CPU without bfloat16 instructions multiplies bf16 matrices 10-700x slower than
float32 ones (AMD Zen 3: 0.1-5 GFLOP/s against about 70), while one with AMX runs them about 9x faster than float32.
So moemerge computes in the storage dtype where the hardware has it natively (a GPU; a CPU with AVX512-BF16 or AMX
for bfloat16, AMX-FP16 for float16) and in float32 elsewhere, and casts every tensor back to its storage dtype before
it is written. The choice follows the CPU's instruction set, never a timing, so a run repeats byte for byte on the
same machine; ``moemerge.json`` records it.

Private torch APIs used here and nowhere else (``tests/test_precision.py`` checks each by name):
``torch.cpu._is_avx512_bf16_supported``, ``torch.cpu._is_amx_tile_supported``, ``torch.cpu._is_amx_fp16_supported``.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import nn

from moemerge.progress import log


def model_dtype(config, dtype: torch.dtype | str) -> torch.dtype:
    """The storage dtype ``from_pretrained(dtype=...)`` gives: the config's for "auto" (float32 if it names none)."""
    if dtype != "auto":
        return dtype
    named = getattr(config, "dtype", None)
    return getattr(torch, named) if isinstance(named, str) else named or torch.float32


def native_cpu_dtypes() -> frozenset[torch.dtype]:
    """The half-precision dtypes this CPU multiplies with its own instructions (float32 always)."""
    native = {torch.float32}
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        native.add(torch.bfloat16)
    if torch.cpu._is_amx_fp16_supported():
        native.add(torch.float16)
    return frozenset(native)


def compute_dtype(storage: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to compute in for weights stored in ``storage`` on ``device``: ``storage`` on a GPU or where the
    CPU has it natively, else float32."""
    if device.type != "cpu" or storage in native_cpu_dtypes():
        return storage
    return torch.float32


def compute_in_fastest(model: nn.Module) -> dict[str, torch.dtype]:
    """Cast a loaded model in place to the dtype to compute in on its device (:func:`compute_dtype` of its own
    dtype), logging the choice; returns its tensors' stored dtypes for :func:`to_storage`."""
    compute = compute_dtype(model.dtype, model.device)
    log.info(describe(model.dtype, compute))
    return to_compute(model, compute)


def describe(storage: torch.dtype, compute: torch.dtype) -> str:
    """One phase-log line saying which dtype a run computes and stores in, and why."""
    if storage == compute:
        return f"computing and storing in {dtype_name(storage)}"
    return (
        f"computing in {dtype_name(compute)}, storing {dtype_name(storage)} "
        f"(this CPU has no native {dtype_name(storage)} matrix multiply)"
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _floating(module: nn.Module):
    return (
        (name, t)
        for name, t in chain(module.named_parameters(), module.named_buffers())
        if t.is_floating_point() and not t.is_meta
    )


def to_compute(module: nn.Module, compute: torch.dtype) -> dict[str, torch.dtype]:
    """Cast ``module``'s floating tensors narrower than ``compute`` up to it, in place; wider ones stay (the float32
    router and selection bias transformers keeps in a bf16 DeepSeek-V3 are never rounded to bf16). Returns every
    floating tensor's dtype before (by name), which :func:`to_storage` restores."""
    stored = {name: t.dtype for name, t in _floating(module)}
    for _, t in _floating(module):
        if t.dtype.itemsize < compute.itemsize:
            t.data = t.data.to(compute)
    return stored


def to_storage(module: nn.Module, stored: dict[str, torch.dtype]) -> None:
    """Cast ``module``'s floating tensors back, in place, to the dtypes :func:`to_compute` recorded (a tensor
    replaced since, e.g. merged experts, takes its name's dtype)."""
    for name, t in _floating(module):
        if t.dtype != stored[name]:
            t.data = t.data.to(stored[name])


def runnable_experts_kernel(model: nn.Module) -> None:
    """Make ``model`` run its experts with transformers' eager loop when its default ``grouped_mm`` kernel cannot:
    torch's grouped matmul needs every matrix row to span a multiple of 16 bytes, so experts of a width that is not a
    multiple of 8 (e.g. 28) fail in bfloat16 or float16 ("strides should be multiple of 16 bytes")."""
    widths = {
        size
        for module in model.modules()
        if isinstance(getattr(module, "down_proj", None), nn.Parameter) and module.down_proj.ndim == 3
        for size in module.down_proj.shape[1:]
    }
    if any(size % 8 for size in widths):
        model.set_experts_implementation("eager")
