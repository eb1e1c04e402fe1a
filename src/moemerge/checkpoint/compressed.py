"""MC-SMoE outputs that save memory: experts computed from their low-rank and sparse factors.

``moemerge_lowrank.safetensors`` holds, for expert e of MoE layer l and each of its matrices W [a, b] (gate and
up [I, H], down [H, I]), the factors of W = L R + S (:mod:`moemerge.merging.low_rank`), keyed
``layers.{l}.experts.{e}.{gate|up|down}.{left [a, q]|right [q, b]|indices [z]|values [z]}``, the indices into the
flattened W, ascending. By default ``reduce --method mc-smoe`` writes the experts only there (a *compact* output);
``--mc-smoe-dense`` also writes the dense L R + S into the model files, which any loader runs.

:class:`CompressedExperts` stacks one layer's factors and multiplies by L R + S without forming W:
x W^T = (x R^T) L^T + (S x^T)^T, S a CSR sparse matrix.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from moemerge.checkpoint.model_files import read_record
from moemerge.checkpoint.source import FACTORS, LOWRANK_FILE, factor_key
from moemerge.errors import MoemergeError

MATRICES = ("gate", "up", "down")


class CompressedExperts(nn.Module):
    """The r experts of one MoE layer as MC-SMoE's factors, called as transformers' experts modules are:
    ``(hidden [t, H], ids [t, k], weights [t, k]) -> [t, H]``.

    Per matrix m of shape [a, b]: parameters ``{m}_left`` [r, a, q], ``{m}_right`` [r, q, b] and ``{m}_values``
    [r, z] (so the parameter count is the stored factor count), and int32 buffers ``{m}_crow`` [r, a + 1] and
    ``{m}_col`` [r, z], the residual's CSR row offsets and columns. Built empty on the meta device; :meth:`fill`
    gives it the factors. Computes in float32 whatever the stored dtype.
    """

    def __init__(self, experts: int, hidden: int, intermediate: int, rank: int, nnz: int, gated):
        super().__init__()
        self.num_experts = experts
        self.gated = gated  # the replaced experts module's activations (:func:`moemerge.adapters.base.gating`)
        self.shapes = {"gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}
        self.rank, self.nnz = rank, nnz
        for m, (a, b) in self.shapes.items():
            for name, shape in (("left", (a, rank)), ("right", (rank, b)), ("values", (nnz,))):
                self.register_parameter(f"{m}_{name}", _frozen(torch.empty(experts, *shape, device="meta")))
            self.register_buffer(f"{m}_crow", torch.empty(experts, a + 1, dtype=torch.int32, device="meta"))
            self.register_buffer(f"{m}_col", torch.empty(experts, nnz, dtype=torch.int32, device="meta"))

    def fill(self, factors: dict[str, tuple[torch.Tensor, ...]], dtype: torch.dtype, device: torch.device) -> None:
        """Take the factors of every matrix: ``factors[m]`` = (left [r, a, q], right [r, q, b], indices [r, z]
        int64 ascending per expert, values [r, z]), as :func:`read_layer_factors` gives them; floats stored in
        ``dtype``."""
        for m, (a, b) in self.shapes.items():
            left, right, indices, values = factors[m]
            rows = torch.div(indices, b, rounding_mode="floor")
            counts = torch.zeros(self.num_experts, a, dtype=torch.int64).scatter_add_(1, rows, torch.ones_like(rows))
            crow = torch.cat([counts.new_zeros(self.num_experts, 1), counts.cumsum(1)], dim=1)
            for name, t in (("left", left), ("right", right), ("values", values)):
                self._parameters[f"{m}_{name}"] = _frozen(t.to(device=device, dtype=dtype))
            self._buffers[f"{m}_crow"] = crow.to(device=device, dtype=torch.int32)
            self._buffers[f"{m}_col"] = (indices % b).to(device=device, dtype=torch.int32)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        x = hidden_states.float()
        out = torch.zeros_like(x)
        for e in top_k_index.unique().tolist():
            if e >= self.num_experts:  # the id transformers' experts modules skip (expert parallelism)
                continue
            token, slot = torch.where(top_k_index == e)
            h = x[token]
            inner = self.gated(self._times("gate", e, h), self._times("up", e, h))
            out.index_add_(0, token, self._times("down", e, inner) * top_k_weights[token, slot, None].float())
        return out.to(hidden_states.dtype)

    def _times(self, m: str, e: int, h: torch.Tensor) -> torch.Tensor:
        """[t, a] float32 h W^T for ``h`` [t, b], W = L R + S the matrix ``m`` of expert ``e``."""
        left, right = self._parameters[f"{m}_left"][e].float(), self._parameters[f"{m}_right"][e].float()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            residual = torch.sparse_csr_tensor(
                self._buffers[f"{m}_crow"][e],
                self._buffers[f"{m}_col"][e],
                self._parameters[f"{m}_values"][e].float(),
                self.shapes[m],
                check_invariants=False,  # read_layer_factors checked the indices
            )
            return (h @ right.T) @ left.T + (residual @ h.T).T


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def read_layer_factors(
    file: Path, layer: int, experts: int, shapes: dict[str, tuple[int, int]]
) -> dict[str, tuple[torch.Tensor, ...]]:
    """The factors of MoE layer ``layer``'s ``experts`` experts in ``file``, whose matrices have ``shapes``
    (:attr:`CompressedExperts.shapes`), stacked per matrix as :meth:`CompressedExperts.fill` takes them. Raises
    ValueError naming what is missing or malformed: an expert's factor, a shape other than the layer's, a rank or
    residual size differing between experts, indices not ascending or outside the matrix."""
    stacked = {}
    with safe_open(file, framework="pt") as f:
        names = set(f.keys())
        for m, (a, b) in shapes.items():
            parts = []
            for e in range(experts):
                key = factor_key(layer, e, m)
                missing = [p for p in FACTORS if f"{key}.{p}" not in names]
                if missing:
                    raise ValueError(f"it has no {key}.{missing[0]}")
                left, right, indices, values = (f.get_tensor(f"{key}.{p}") for p in FACTORS)
                q = left.shape[-1] if left.ndim == 2 else -1
                if left.shape != (a, q) or right.shape != (q, b) or indices.ndim != 1 or values.shape != indices.shape:
                    raise ValueError(
                        f"{key} has factors {list(left.shape)}, {list(right.shape)}, {list(indices.shape)}, "
                        f"{list(values.shape)}, not [{a}, q], [q, {b}], [z], [z] for this layer's [{a}, {b}] matrix"
                    )
                indices = indices.long()
                if len(indices) and (indices[0] < 0 or indices[-1] >= a * b or (indices.diff() <= 0).any()):
                    raise ValueError(f"{key}.indices are not ascending positions inside the [{a}, {b}] matrix")
                parts.append((left, right, indices, values))
            if len({(p[0].shape, p[2].shape) for p in parts}) > 1:
                raise ValueError(f"the experts of layer {layer} differ in {m} rank or residual size")
            stacked[m] = tuple(torch.stack(column) for column in zip(*parts, strict=True))
    return stacked


def factor_shapes(file: Path, layer: int) -> tuple[int, int]:
    """(rank q, residual entries z) of expert 0's gate in ``file``, read from its header; ValueError when absent."""
    key = factor_key(layer, 0, "gate")
    try:
        with safe_open(file, framework="pt") as f:
            return f.get_slice(f"{key}.left").get_shape()[1], math.prod(f.get_slice(f"{key}.values").get_shape())
    except (SafetensorError, KeyError, IndexError):
        raise ValueError(f"it has no {key}.left and .values") from None


class CompactExperts:
    """The factor file of a compact mc-smoe output (checked source ``source``), read one layer at a time into the
    :class:`CompressedExperts` that :meth:`install` puts in a model built from its config."""

    def __init__(self, source):
        self.file = source.path / LOWRANK_FILE
        self.family = source.family
        self.counts = {entry["layer"]: len(entry["groups"]) for entry in read_record(source.path)["layers"]}
        if not self.file.is_file():
            raise MoemergeError(
                f"{source.path} is a compact mc-smoe output, whose experts are stored only in {LOWRANK_FILE}, and "
                "that file is missing; restore it, or reduce the original model again"
            )
        self.modules: dict[int, CompressedExperts] = {}

    def install(self, model: nn.Module) -> None:
        """Replace the experts of every MoE layer of ``model`` (its weights still on the meta device) by empty
        :class:`CompressedExperts` shaped as the factors."""
        for view in self.family.moe_layers(model):
            if view.layer not in self.counts:
                raise self._damaged(f"moemerge.json names no groups for MoE layer {view.layer}")
            view.keep_first(self.counts[view.layer])
            n, two_i, hidden = view.gate_up.shape
            try:
                rank, nnz = factor_shapes(self.file, view.layer)
            except ValueError as err:
                raise self._damaged(str(err)) from None
            view.block.experts = CompressedExperts(n, hidden, two_i // 2, rank, nnz, view.gating)
            self.modules[view.layer] = view.block.experts

    def fill(self, layer: int, dtype: torch.dtype, device: torch.device) -> None:
        """Read MoE layer ``layer``'s factors into its :class:`CompressedExperts` (no-op for a dense layer)."""
        experts = self.modules.get(layer)
        if experts is None:
            return
        try:
            factors = read_layer_factors(self.file, layer, experts.num_experts, experts.shapes)
        except ValueError as err:
            raise self._damaged(str(err)) from None
        for m in MATRICES:
            if factors[m][0].shape[-1] != experts.rank or factors[m][2].shape[-1] != experts.nnz:
                raise self._damaged(f"layer {layer}'s {m} factors differ in rank or residual size from its gate's")
        experts.fill(factors, dtype, device)

    def _damaged(self, problem: str) -> MoemergeError:
        return MoemergeError(
            f"{self.file}, which holds the experts of this compact mc-smoe output, is damaged ({problem}); reduce "
            "the original model again"
        )
