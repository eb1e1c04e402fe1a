"""One calibration pass, with hooks, that gathers every MoE layer's statistics.

HC-SMoE's feature of expert j is o_j = mean over all T calibration tokens of E_j(x): every
token goes through every expert, with no gate weight. Because the down projection is linear,
o_j = W_down_j @ mean_t(silu(x_t W_gate_j) * (x_t W_up_j)), so only the [n, I] sums of the
intermediate activations are accumulated: never a tokens x experts x hidden buffer. The
statistics of every layer come from the original model's hidden states (as in the paper).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from itertools import accumulate

import torch
from tqdm.auto import tqdm

from moemerge.adapters import MoELayerView, RoutingRule
from moemerge.distributed import gather_in_order, my_share, rank_and_world
from moemerge.heap import trim_heap
from moemerge.statistics.finite import WEIGHTS_FIX, check_finite, check_statistics

CHUNK_BYTES = 128 << 20  # float32 size of the [chunk, n, 2I] expert activations of one token chunk
_SUMMED = ("act", "counts", "prob", "reap")


@dataclass
class LayerStatistics:
    """Calibration statistics of one MoE layer with n experts.

    mean_output: [n, H] float32, o_j = mean_t E_j(x_t) over all tokens.
    counts: [n] int64, how many tokens the router put each expert in its top-k for.
    num_tokens: T.
    prob_sum: [n] float64, router probability (softmax) or score (sigmoid) of each expert summed over tokens.
    reap: [n] float64 REAP saliency, mean over the tokens routed to j of g_j(x) ||E_j(x)||_2 with g
        the top-k weights renormalised to sum to 1 (0 for an expert no token was routed to).
    routing: the layer's routing rule; selection_bias: [n] float32 or None.
    router_inputs: [t, H] float32 hidden states at the router, every ``T/t``-th token, or None.
    router_logits: [t', n] float32 router logits, and expert_outputs: [t', n, H] float32 E_j(x) of
        every expert, for every ``t/t'``-th of those sampled tokens, or None.
    router_logit_features: [n, T] float32 router logits of every expert on every token, or None.
    weight_gram: [n, n] float64 Gram matrix of the experts' flattened (gate, up, down) weights, or None.
    """

    layer: int
    mean_output: torch.Tensor
    counts: torch.Tensor
    num_tokens: int
    prob_sum: torch.Tensor
    reap: torch.Tensor
    routing: RoutingRule
    selection_bias: torch.Tensor | None = None
    router_inputs: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None
    expert_outputs: torch.Tensor | None = None
    router_logit_features: torch.Tensor | None = None
    weight_gram: torch.Tensor | None = None

    @property
    def frequency(self) -> torch.Tensor:
        """[n] float64 share of tokens that selected each expert (sums to top-k)."""
        return self.counts.double() / self.num_tokens


@dataclass
class _SequenceSums:
    """One calibration sequence's part of a layer's statistics: act [n, I] float64 sums of the intermediate
    activations, counts [n], prob [n] and reap [n] sums, router logits [n, t] and sampled router inputs
    [t', H] (or None)."""

    act: torch.Tensor
    counts: torch.Tensor
    prob: torch.Tensor
    reap: torch.Tensor
    router_logits: torch.Tensor | None
    router_inputs: torch.Tensor | None


class LayerAccumulator:
    """Gathers one MoE layer's statistics from the forward pre-hook :meth:`hook` on its block.

    Each forward call (one calibration sequence) is summed on its own, then added to the running totals;
    with several processes the per-sequence sums of all ranks are added in sequence order
    (:mod:`moemerge.distributed`), so the result does not depend on the number of processes. ``seen`` is the
    calibration-set offset of the next token (a driver that skips sequences sets it), which places the
    sampled router inputs. The layer's weights are checked for NaN and Inf when it is built, its statistics
    when they are read (:mod:`moemerge.statistics.finite`).
    """

    def __init__(
        self,
        view: MoELayerView,
        total_tokens: int,
        router_sample: int = 0,
        output_sample: int = 0,
        keep_router_logits: bool = False,
        weight_gram: bool = False,
    ):
        gate_up, down = view.block.experts.gate_up_proj, view.block.experts.down_proj
        weights = {"experts.gate_up_proj": gate_up, "experts.down_proj": down, "gate.weight": view.router_weight}
        check_finite(view.layer, weights | {"gate.e_score_correction_bias": view.selection_bias}, WEIGHTS_FIX)
        self.view = view
        self.total_tokens = total_tokens
        self.keep_router_logits, self.weight_gram = keep_router_logits, weight_gram
        n, intermediate = view.num_experts, view.block.experts.down_proj.shape[2]
        device = view.router_weight.device
        self.act_sum = torch.zeros(n, intermediate, dtype=torch.float64, device=device)
        self.counts = torch.zeros(n, dtype=torch.int64, device=device)
        self.prob_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.reap_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.router_logits: list[torch.Tensor] = []
        self.router_inputs: list[torch.Tensor] = []
        self.seen = 0
        self.stride = math.ceil(total_tokens / router_sample) if router_sample else 0
        self.output_sample = output_sample
        self.pending: list[_SequenceSums] = []
        self.distributed = rank_and_world()[1] > 1

    def hook(self, module, args) -> None:
        """Forward pre-hook on the MoE block: returns None so the forward is unchanged."""
        x = args[0].reshape(-1, args[0].shape[-1])
        sums = self.sequence_sums(x)
        if self.distributed:
            self.pending.append(sums)
        else:
            self.add(sums)
        self.seen += len(x)

    def sequence_sums(self, x: torch.Tensor) -> _SequenceSums:
        """The statistics of hidden states ``x`` [t, H] at the block's input, summed over its tokens.

        Every expert runs on every token as one matrix multiply of a token chunk with the fused
        ``gate_up_proj`` [n, 2I, H] seen as [n * 2I, H], in the weights' dtype; the intermediate
        activations [chunk, n, I] are summed in float64. REAP needs ||E_j(x)|| only for the tokens
        routed to j, so only those go through ``down_proj``.
        """
        view, experts = self.view, self.view.block.experts
        logits, weights, indices = view.block.gate(x)
        n, two_i, hidden = experts.gate_up_proj.shape
        intermediate = two_i // 2
        down = experts.down_proj
        fused = experts.gate_up_proj.reshape(n * two_i, hidden)
        gates = weights.float() / weights.float().sum(-1, keepdim=True)
        act_sum = torch.zeros(n, intermediate, dtype=torch.float64, device=x.device)
        reap = torch.zeros(n, dtype=torch.float64, device=x.device)
        chunk = max(1, CHUNK_BYTES // (n * two_i * 4))
        for start in range(0, len(x), chunk):
            h = (x[start : start + chunk].to(fused.dtype) @ fused.T).view(-1, n, two_i)
            act = view.act_fn(h[..., :intermediate]).float() * h[..., intermediate:].float()
            act_sum += act.sum(0, dtype=torch.float64)
            chunk_ids, chunk_gates = indices[start : start + chunk], gates[start : start + chunk]
            for j in chunk_ids.unique().tolist():
                token, slot = (chunk_ids == j).nonzero(as_tuple=True)
                norms = (act[token, j].to(down.dtype) @ down[j].T).float().norm(dim=-1)
                reap[j] += (chunk_gates[token, slot] * norms).sum(dtype=torch.float64)
        inputs = None
        if self.stride:
            keep = (torch.arange(len(x), device=x.device) + self.seen) % self.stride == 0
            inputs = x[keep].float().cpu()
        return _SequenceSums(
            act_sum,
            torch.bincount(indices.reshape(-1), minlength=n),
            view.routing.scores(logits).sum(0, dtype=torch.float64),
            reap,
            logits.float().T.cpu() if self.keep_router_logits else None,
            inputs,
        )

    def add(self, sums: _SequenceSums) -> None:
        """Add one sequence's sums to the totals."""
        self.act_sum += sums.act.to(self.act_sum.device)
        self.counts += sums.counts.to(self.counts.device)
        self.prob_sum += sums.prob.to(self.prob_sum.device)
        self.reap_sum += sums.reap.to(self.reap_sum.device)
        if sums.router_logits is not None:
            self.router_logits.append(sums.router_logits)
        if sums.router_inputs is not None:
            self.router_inputs.append(sums.router_inputs)

    def result(self) -> LayerStatistics:
        """The layer's statistics over every sequence (of every rank)."""
        if self.distributed:
            local = [dataclasses.replace(s, **{f: getattr(s, f).cpu() for f in _SUMMED}) for s in self.pending]
            for sums in gather_in_order(local):
                self.add(sums)
            self.pending = []
        down = self.view.block.experts.down_proj
        act_mean = (self.act_sum / self.total_tokens).to(down.device)
        step = max(1, CHUNK_BYTES // (down[0].numel() * 8))  # experts per float64 copy of down_proj
        means = [
            torch.einsum("nhi,ni->nh", down[a : a + step].double(), act_mean[a : a + step])
            for a in range(0, len(down), step)
        ]
        mean_output = torch.cat(means).float().cpu()
        bias = self.view.selection_bias
        stats = LayerStatistics(
            self.view.layer,
            mean_output,
            self.counts.cpu(),
            self.total_tokens,
            self.prob_sum.cpu(),
            (self.reap_sum / self.counts.clamp(min=1)).cpu(),
            self.view.routing,
            None if bias is None else bias.detach().float().cpu(),
        )
        if self.router_logits:
            stats.router_logit_features = torch.cat(self.router_logits, dim=1)
        if self.weight_gram:
            stats.weight_gram = gram_of_weights(self.view).cpu()
        if self.router_inputs:
            stats.router_inputs = torch.cat(self.router_inputs)
        if self.output_sample and self.router_inputs:
            x = stats.router_inputs[:: math.ceil(len(stats.router_inputs) / self.output_sample)]
            x = x.to(self.view.router_weight)
            stats.router_logits = (x @ self.view.router_weight.T).float().cpu()
            stats.expert_outputs = expert_outputs(self.view, x).cpu()
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
    down = view.block.experts.down_proj
    outputs = [(view.intermediate(x, j).to(down.dtype) @ down[j].T).float() for j in range(view.num_experts)]
    return torch.stack(outputs, dim=1)


@torch.inference_mode()
def collect_statistics(
    model: torch.nn.Module,
    layers: list[MoELayerView],
    sequences: list[torch.Tensor],
    router_sample: int = 0,
    progress: bool = True,
    output_sample: int = 0,
    keep_router_logits: bool = False,
    weight_gram: bool = False,
) -> dict[int, LayerStatistics]:
    """Run ``sequences`` (1-D token tensors) through ``model`` and return statistics per decoder layer.

    ``router_sample``: keep about this many router-input hidden states per layer (0: none).
    ``output_sample``: of those, keep router logits and every expert's output for about this many.
    ``keep_router_logits``: keep every token's router logits (the router-logits metric).
    ``weight_gram``: compute the Gram matrix of the expert weights (the weight metric).
    """
    total = sum(len(s) for s in sequences)
    accumulators = [
        LayerAccumulator(view, total, router_sample, output_sample, keep_router_logits, weight_gram) for view in layers
    ]
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
