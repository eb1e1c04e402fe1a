"""One calibration pass, with hooks, that gathers every MoE layer's statistics.

HC-SMoE's feature of expert j is o_j = mean over all T calibration tokens of E_j(x): every
token goes through every expert, with no gate weight. Because the down projection is linear,
o_j = W_down_j @ mean_t(silu(x_t W_gate_j) * (x_t W_up_j)), so only the [n, I] sums of the
intermediate activations are accumulated: never a tokens x experts x hidden buffer. The
statistics of every layer come from the original model's hidden states (as in the paper).

Every statistic is a registered :class:`Statistic` (kind "statistic" of :mod:`moemerge.registry`) that fills one
field of :class:`LayerStatistics`: what it takes from each token chunk or each sequence, how the parts add up, how
the total becomes the value. The ``always`` ones are collected on every calibration; the others only when a
method, metric, merge or router-rows rule declares it reads them (``needs``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import accumulate

import torch
from tqdm.auto import tqdm

from moemerge.adapters import MoELayerView, RoutingRule
from moemerge.distributed import gather_in_order, my_share, rank_and_world
from moemerge.heap import trim_heap
from moemerge.registry import names, register, resolve
from moemerge.statistics.finite import WEIGHTS_FIX, check_finite, check_statistics

CHUNK_BYTES = 128 << 20  # float32 size of the [chunk, n, 2I] expert activations of one token chunk
ROUTER_SAMPLE_TOKENS = 8192  # router inputs kept per layer (router_inputs)
OUTPUT_SAMPLE_TOKENS = 512  # of those, tokens whose every expert output is kept (expert_outputs, router_logits)


@dataclass
class LayerStatistics:
    """Calibration statistics of one MoE layer with n experts (each tensor field is a registered Statistic).

    mean_output: [n, H] float32, o_j = mean_t E_j(x_t) over all tokens.
    gated_mean_output: [n, H] float32 or None, mean_t p_j(x_t) E_j(x_t) over all tokens, p_j the router's
        probability (softmax) or score (sigmoid) of expert j (REAM's expert feature).
    counts: [n] int64, how many tokens the router put each expert in its top-k for.
    num_tokens: T.
    prob_sum: [n] float64, router probability (softmax) or score (sigmoid) of each expert summed over tokens.
    reap: [n] float64 REAP saliency, mean over the tokens routed to j of g_j(x) ||E_j(x)||_2 with g
        the top-k weights renormalised to sum to 1 (0 for an expert no token was routed to).
    activation_norm, activation_sq_norm: [n] float64 or None, mean over the tokens routed to j of ||E_j(x)||_2 and
        of ||E_j(x)||_2^2, without gate weight (the MAN and MSAN scores; 0 for an expert no token was routed to).
    routed_mean_output: [n, H] float32 or None, mean over the tokens routed to j of E_j(x), without gate weight
        (MoNE's novice; 0 for an expert no token was routed to).
    routing_weight_mean: [n] float64 or None, mean over all tokens of the top-k weight the block gives j (0 on a
        token that did not select j), as the block applies it (renormalised and scaled as the family does).
    routing: the layer's routing rule; selection_bias: [n] float32 or None.
    router_inputs: [t, H] float32 hidden states at the router, every ``T/t``-th token, or None.
    router_logits: [t', n] float32 router logits, and expert_outputs: [t', n, H] float32 E_j(x) of
        every expert, for every ``t/t'``-th of those sampled tokens, or None.
    router_logit_features: [n, T] float32 router logits of every expert on every token, or None.
    weight_gram: [n, n] float64 Gram matrix of the experts' flattened (gate, up, down) weights, or None.
    budget_errors: [n - top_k + 1] float64 or None: ``--budget search``'s proxy, the layer's output error reduced to
        top_k .. n experts (not a calibration statistic: set by :func:`moemerge.budget_search.layer_errors`).
    """

    layer: int
    mean_output: torch.Tensor
    counts: torch.Tensor
    num_tokens: int
    prob_sum: torch.Tensor
    reap: torch.Tensor
    routing: RoutingRule
    selection_bias: torch.Tensor | None = None
    gated_mean_output: torch.Tensor | None = None
    activation_norm: torch.Tensor | None = None
    activation_sq_norm: torch.Tensor | None = None
    routed_mean_output: torch.Tensor | None = None
    routing_weight_mean: torch.Tensor | None = None
    router_inputs: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None
    expert_outputs: torch.Tensor | None = None
    router_logit_features: torch.Tensor | None = None
    weight_gram: torch.Tensor | None = None
    budget_errors: torch.Tensor | None = None

    @property
    def frequency(self) -> torch.Tensor:
        """[n] float64 share of tokens that selected each expert (sums to top-k)."""
        return self.counts.double() / self.num_tokens


@dataclass
class Sequence:
    """What a statistic may read of one calibration sequence at a layer's MoE block."""

    accumulator: LayerAccumulator
    x: torch.Tensor  # [t, H] block inputs
    logits: torch.Tensor  # [t, n] router logits
    indices: torch.Tensor  # [t, k] selected experts
    weights: torch.Tensor  # [t, k] float32 top-k weights as the block applies them
    gates: torch.Tensor  # [t, k] float32 top-k weights renormalised to sum to 1


@dataclass
class Chunk:
    """What a statistic may read of one token chunk of a sequence: every expert run on every token."""

    sequence: Sequence
    start: int  # the chunk's first token in the sequence
    act: torch.Tensor  # [c, n, I] float32 intermediate activations of every expert


@dataclass(frozen=True)
class Statistic:
    """How one field of :class:`LayerStatistics` is collected.

    per_chunk: (Chunk) -> a part, summed over the chunks of a sequence; or per_sequence: (Sequence) -> a part.
        The parts of every sequence (of every process) are then summed, or with ``join`` concatenated in
        sequence order along ``dim``.
    finish: (LayerAccumulator, the total or the joined parts, the statistics finished so far) -> the field's value;
        default: the total, on the CPU.
    requires: statistics it is computed from (finished first). always: collected on every calibration.
    kept: kept in a streamed run's record of each finished layer (small; the report reads it).
    """

    per_chunk: Callable[[Chunk], torch.Tensor] | None = None
    per_sequence: Callable[[Sequence], torch.Tensor] | None = None
    join: bool = False
    dim: int = 0
    finish: Callable | None = None
    requires: tuple[str, ...] = ()
    always: bool = False
    kept: bool = False


def statistic(name: str, **declared) -> Statistic:
    """Register a :class:`Statistic` filling the LayerStatistics field ``name``."""
    return register("statistic", name)(Statistic(**declared))


def _mean_output(acc: LayerAccumulator, act_sum: torch.Tensor, stats: dict) -> torch.Tensor:
    """[n, H] float32 W_down_j @ (act_sum_j / T) (act_sum [n, I]: a sum over the tokens of act_j, or of p_j act_j)."""
    return _through_down(acc, act_sum / acc.total_tokens)


def _routed_mean_output(acc: LayerAccumulator, act_sum: torch.Tensor, stats: dict) -> torch.Tensor:
    """[n, H] float32 W_down_j @ (act_sum_j / count_j) (act_sum [n, I]: a sum over the tokens routed to j)."""
    return _through_down(acc, act_sum / stats["counts"].to(act_sum.device).clamp(min=1)[:, None])


def _through_down(acc: LayerAccumulator, act_mean: torch.Tensor) -> torch.Tensor:
    """[n, H] float32 W_down_j @ act_mean_j for act_mean [n, I], in float64, a few experts at a time."""
    down = acc.view.down
    act_mean = act_mean.to(down.device)
    step = max(1, CHUNK_BYTES // (down[0].numel() * 8))  # experts per float64 copy of down_proj
    means = [
        torch.einsum("nhi,ni->nh", down[a : a + step].double(), act_mean[a : a + step])
        for a in range(0, len(down), step)
    ]
    return torch.cat(means).float().cpu()


def _gated_act_sum(chunk: Chunk) -> torch.Tensor:
    """[n, I] float64 sums over the chunk's tokens of p_j(x) act_j(x), p the router's probabilities or scores."""
    sequence = chunk.sequence
    logits = sequence.logits[chunk.start : chunk.start + len(chunk.act)]
    probs = sequence.accumulator.view.routing.scores(logits)
    return (chunk.act.float() * probs[:, :, None]).sum(0, dtype=torch.float64)


def _routed_act_sum(chunk: Chunk) -> torch.Tensor:
    """[n, I] float64 sums over the chunk's tokens routed to j of act_j(x) (a masked sum, not index_add_, which
    adds in no fixed order on CUDA)."""
    act = chunk.act
    ids = chunk.sequence.indices[chunk.start : chunk.start + len(act)]
    routed = torch.zeros(act.shape[:2], dtype=act.dtype, device=act.device).scatter_(1, ids, 1.0)  # [c, n]
    return (act * routed[:, :, None]).sum(0, dtype=torch.float64)


def _weight_sum(sequence: Sequence) -> torch.Tensor:
    """[n] float64 sums over the sequence's tokens of the top-k weight the block gives each expert."""
    weights = torch.zeros_like(sequence.logits, dtype=torch.float32).scatter_(1, sequence.indices, sequence.weights)
    return weights.sum(0, dtype=torch.float64)


def _routed_output_norms(chunk: Chunk):
    """For each expert j some of the chunk's tokens were routed to: (j, their renormalised gates g_j [m] float32,
    ||E_j(x)||_2 [m] float32). Only routed tokens go through down_proj."""
    sequence, act = chunk.sequence, chunk.act
    down = sequence.accumulator.view.down
    end = chunk.start + len(act)
    ids, gates = sequence.indices[chunk.start : end], sequence.gates[chunk.start : end]
    for j in ids.unique().tolist():
        token, slot = (ids == j).nonzero(as_tuple=True)
        yield j, gates[token, slot], (act[token, j].to(down.dtype) @ down[j].T).float().norm(dim=-1)


def _routed_norm_sum(score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[Chunk], torch.Tensor]:
    """Per chunk: [n] float64 sums over the tokens routed to j of ``score(gates, norms)``."""

    def part(chunk: Chunk) -> torch.Tensor:
        sums = torch.zeros(chunk.act.shape[1], dtype=torch.float64, device=chunk.act.device)
        for j, gates, norms in _routed_output_norms(chunk):
            sums[j] += score(gates, norms).sum(dtype=torch.float64)
        return sums

    return part


def _per_routed_token(acc: LayerAccumulator, total: torch.Tensor, stats: dict) -> torch.Tensor:
    """A routed-token sum [n] divided by each expert's count (an expert never routed to keeps 0)."""
    return (total / stats["counts"].to(total.device).clamp(min=1)).cpu()


def _sampled_inputs(sequence: Sequence) -> torch.Tensor:
    """[t', H] float32: the sequence's block inputs at every ``stride``-th token of the calibration set."""
    acc, x = sequence.accumulator, sequence.x
    keep = (torch.arange(len(x), device=x.device) + acc.seen) % acc.stride == 0
    return x[keep].float().cpu()


def _output_sample(acc: LayerAccumulator, stats: dict) -> torch.Tensor:
    """Every ``len / output_sample``-th sampled router input, in the router's dtype."""
    inputs = stats["router_inputs"]
    return inputs[:: math.ceil(len(inputs) / acc.output_sample)].to(acc.view.router_weight)


statistic(
    "mean_output",
    per_chunk=lambda c: c.act.sum(0, dtype=torch.float64),
    finish=_mean_output,
    always=True,
    kept=True,
)
statistic("gated_mean_output", per_chunk=_gated_act_sum, finish=_mean_output)
statistic(
    "counts",
    per_sequence=lambda s: torch.bincount(s.indices.reshape(-1), minlength=s.logits.shape[1]),
    always=True,
    kept=True,
)
statistic(
    "prob_sum",
    per_sequence=lambda s: s.accumulator.view.routing.scores(s.logits).sum(0, dtype=torch.float64),
    always=True,
    kept=True,
)
statistic(
    "reap",
    per_chunk=_routed_norm_sum(lambda gates, norms: gates * norms),
    finish=_per_routed_token,
    requires=("counts",),
    always=True,
    kept=True,
)
statistic(
    "activation_norm",
    per_chunk=_routed_norm_sum(lambda gates, norms: norms),
    finish=_per_routed_token,
    requires=("counts",),
)
statistic(
    "activation_sq_norm",
    per_chunk=_routed_norm_sum(lambda gates, norms: norms.double() ** 2),
    finish=_per_routed_token,
    requires=("counts",),
)
statistic("routed_mean_output", per_chunk=_routed_act_sum, finish=_routed_mean_output, requires=("counts",))
statistic(
    "routing_weight_mean",
    per_sequence=_weight_sum,
    finish=lambda acc, total, stats: (total / acc.total_tokens).cpu(),
)
statistic(
    "selection_bias",
    finish=lambda acc, total, stats: (
        None if acc.view.selection_bias is None else acc.view.selection_bias.detach().float().cpu()
    ),
    always=True,
    kept=True,
)
statistic("router_inputs", per_sequence=_sampled_inputs, join=True)
statistic("router_logit_features", per_sequence=lambda s: s.logits.float().T.cpu(), join=True, dim=1, kept=True)
statistic("weight_gram", finish=lambda acc, total, stats: gram_of_weights(acc.view).cpu())
statistic(
    "router_logits",
    finish=lambda acc, total, stats: (_output_sample(acc, stats) @ acc.view.router_weight.T).float().cpu(),
    requires=("router_inputs",),
)
statistic(
    "expert_outputs",
    finish=lambda acc, total, stats: expert_outputs(acc.view, _output_sample(acc, stats)).cpu(),
    requires=("router_inputs",),
)


def collected(needs: Iterable[str]) -> list[str]:
    """The statistics a calibration collects when ``needs`` are asked for: the ``always`` ones, those asked, and
    what they require, in registration order (which puts what is required first)."""
    needs = (needs,) if isinstance(needs, str) else needs
    wanted = {name for name in names("statistic") if resolve("statistic", name).always} | set(needs)
    pending = list(wanted)
    while pending:
        for required in resolve("statistic", pending.pop()).requires:
            if required not in wanted:
                wanted.add(required)
                pending.append(required)
    return [name for name in names("statistic") if name in wanted]


class LayerAccumulator:
    """Gathers one MoE layer's statistics from the forward pre-hook :meth:`hook` on its block.

    ``needs``: the optional statistics to collect (see :func:`collected`); ``router_sample`` and ``output_sample``:
    how many tokens router_inputs and expert_outputs / router_logits keep. Each forward call (one calibration
    sequence) is summed on its own, then added to the running totals; with several processes the per-sequence
    parts of all ranks are added in sequence order (:mod:`moemerge.distributed`), so the result does not depend on
    the number of processes. ``seen`` is the calibration-set offset of the next token (a driver that skips
    sequences sets it), which places the sampled router inputs. The layer's weights are checked for NaN and Inf
    when it is built, its statistics when they are read (:mod:`moemerge.statistics.finite`).
    """

    def __init__(
        self,
        view: MoELayerView,
        total_tokens: int,
        needs: Iterable[str] = (),
        router_sample: int = ROUTER_SAMPLE_TOKENS,
        output_sample: int = OUTPUT_SAMPLE_TOKENS,
    ):
        gate_up, down = view.block.experts.gate_up_proj, view.block.experts.down_proj
        weight_path = f"{view.router_name}.{view.paths[0]}"
        bias_path = view.block_bias or f"{view.router_name}.{view.paths[1]}"
        weights = {"experts.gate_up_proj": gate_up, "experts.down_proj": down, weight_path: view.router_weight}
        check_finite(view.layer, weights | {bias_path: view.selection_bias}, WEIGHTS_FIX)
        self.view = view
        self.total_tokens = total_tokens
        self.names = collected(needs)
        self.statistics = {name: resolve("statistic", name) for name in self.names}
        if "router_inputs" in self.names and router_sample < 1:
            raise ValueError("router_inputs needs router_sample >= 1")
        self.stride = math.ceil(total_tokens / router_sample) if router_sample else 0
        self.output_sample = output_sample
        self.totals: dict[str, torch.Tensor] = {}
        self.joined: dict[str, list[torch.Tensor]] = {name: [] for name, s in self.statistics.items() if s.join}
        self.seen = 0
        self.pending: list[dict[str, torch.Tensor]] = []
        self.distributed = rank_and_world()[1] > 1

    def hook(self, module, args) -> None:
        """Forward pre-hook on the MoE block: returns None so the forward is unchanged."""
        x = args[0].reshape(-1, args[0].shape[-1])
        parts = self.sequence_parts(x)
        if self.distributed:
            self.pending.append(parts)
        else:
            self.add(parts)
        self.seen += len(x)

    def sequence_parts(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each statistic's part of hidden states ``x`` [t, H] at the block's input.

        Every expert runs on every token as one matrix multiply of a token chunk with the fused
        ``gate_up_proj`` (:meth:`MoELayerView.pre_activations`), in the weights' dtype; the per-chunk parts (such as the
        intermediate activations [chunk, n, I] summed in float64) add up over the chunks.
        """
        view = self.view
        logits, weights, indices = view.route_tokens(x)
        weights = weights.float()
        sequence = Sequence(self, x, logits, indices, weights, weights / weights.sum(-1, keepdim=True))
        parts = {name: s.per_sequence(sequence) for name, s in self.statistics.items() if s.per_sequence}
        chunked = {name: s.per_chunk for name, s in self.statistics.items() if s.per_chunk}
        if chunked:
            n, two_i, _ = view.gate_up.shape
            intermediate = two_i // 2
            chunk = max(1, CHUNK_BYTES // (n * two_i * 4))
            for start in range(0, len(x), chunk):
                h = view.pre_activations(x[start : start + chunk])
                act = view.gating(h[..., :intermediate], h[..., intermediate:])
                for name, per_chunk in chunked.items():
                    part = per_chunk(Chunk(sequence, start, act))
                    parts[name] = part if name not in parts else parts[name].add_(part)
        return parts

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        """Add one sequence's parts to the totals."""
        for name, part in parts.items():
            if name in self.joined:
                self.joined[name].append(part)
            elif name in self.totals:
                self.totals[name] += part.to(self.totals[name].device)
            else:
                self.totals[name] = part.to(self.view.router_weight.device).clone()

    def result(self) -> LayerStatistics:
        """The layer's statistics over every sequence (of every rank)."""
        if self.distributed:
            local = [{name: part.cpu() for name, part in parts.items()} for parts in self.pending]
            for parts in gather_in_order(local):
                self.add(parts)
            self.pending = []
        values: dict[str, torch.Tensor | None] = {}
        for name, s in self.statistics.items():
            if s.join:
                total = torch.cat(self.joined[name], dim=s.dim) if self.joined[name] else None
            else:
                total = self.totals.get(name)
            values[name] = s.finish(self, total, values) if s.finish else total.cpu()
        stats = LayerStatistics(
            layer=self.view.layer, num_tokens=self.total_tokens, routing=self.view.routing, **values
        )
        check_statistics(stats)
        return stats


def gram_of_weights(view: MoELayerView, columns: int = 1 << 20) -> torch.Tensor:
    """[n, n] float64 inner products of the experts' flattened gate, up and down weights, built in column
    chunks so that no float64 copy of a whole weight tensor is made."""
    n = view.num_experts
    gram = torch.zeros(n, n, dtype=torch.float64, device=view.router_weight.device)
    for weight in view.expert_weights():
        flat = weight.reshape(n, -1)
        for start in range(0, flat.shape[1], columns):
            block = flat[:, start : start + columns].double()
            gram += block @ block.T
    return gram


def expert_outputs(view: MoELayerView, x: torch.Tensor) -> torch.Tensor:
    """[t, n, H] float32 E_j(x) of every expert of ``view`` on hidden states ``x`` [t, H]."""
    down = view.down
    outputs = [(view.intermediate(x, j).to(down.dtype) @ down[j].T).float() for j in range(view.num_experts)]
    return torch.stack(outputs, dim=1)


@torch.inference_mode()
def collect_statistics(
    model: torch.nn.Module,
    layers: list[MoELayerView],
    sequences: list[torch.Tensor],
    needs: Iterable[str] = (),
    progress: bool = True,
    router_sample: int = ROUTER_SAMPLE_TOKENS,
    output_sample: int = OUTPUT_SAMPLE_TOKENS,
) -> dict[int, LayerStatistics]:
    """Run ``sequences`` (1-D token tensors) through ``model`` and return statistics per decoder layer.

    ``needs``: the optional statistics to collect besides the ``always`` ones (names of LayerStatistics fields);
    ``router_sample`` / ``output_sample``: how many tokens the sampled ones keep (see :class:`LayerAccumulator`).
    """
    total = sum(len(s) for s in sequences)
    accumulators = [LayerAccumulator(view, total, needs, router_sample, output_sample) for view in layers]
    handles = [acc.view.block.register_forward_pre_hook(acc.hook) for acc in accumulators]
    device = next(model.parameters()).device
    offsets = sequence_offsets(sequences)
    try:
        for i in tqdm(my_share(len(sequences)), desc="calibration", unit="seq", disable=not progress):
            for acc in accumulators:
                acc.seen = offsets[i]
            model(input_ids=sequences[i][None].to(device), use_cache=False)
            trim_heap()
    finally:
        for handle in handles:
            handle.remove()
    return {acc.view.layer: acc.result() for acc in accumulators}


def sequence_offsets(sequences: list[torch.Tensor]) -> list[int]:
    """The calibration-set offset of each sequence's first token."""
    return list(accumulate((len(s) for s in sequences[:-1]), initial=0))
