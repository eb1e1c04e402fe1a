"""One calibration pass, with hooks, that gathers every MoE layer's statistics.

HC-SMoE's feature of expert j is o_j = mean over all T calibration tokens of E_j(x): every
token goes through every expert, with no gate weight. Because the down projection is linear,
o_j = W_down_j @ mean_t(silu(x_t W_gate_j) * (x_t W_up_j)), so only the [n, I] sums of the
intermediate activations are accumulated: never a tokens x experts x hidden buffer. The
statistics of every layer come from the original model's hidden states (as in the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from moemerge.adapters import MoELayerView

TOKEN_CHUNK = 1024


@dataclass
class LayerStatistics:
    """Calibration statistics of one MoE layer with n experts.

    mean_output: [n, H] float32, o_j = mean_t E_j(x_t) over all tokens.
    counts: [n] int64, how many tokens the router put each expert in its top-k for.
    num_tokens: T.
    router_inputs: [t, H] float32 hidden states at the router, every ``T/t``-th token, or None.
    """

    layer: int
    mean_output: torch.Tensor
    counts: torch.Tensor
    num_tokens: int
    router_inputs: torch.Tensor | None = None

    @property
    def frequency(self) -> torch.Tensor:
        """[n] float64 share of tokens that selected each expert (sums to top-k)."""
        return self.counts.double() / self.num_tokens


class _LayerAccumulator:
    def __init__(self, view: MoELayerView, total_tokens: int, router_sample: int):
        self.view = view
        n, intermediate = view.num_experts, view.block.experts.down_proj.shape[2]
        device = view.router_weight.device
        self.act_sum = torch.zeros(n, intermediate, dtype=torch.float64, device=device)
        self.counts = torch.zeros(n, dtype=torch.int64, device=device)
        self.seen = 0
        self.stride = math.ceil(total_tokens / router_sample) if router_sample else 0
        self.router_inputs: list[torch.Tensor] = []

    def hook(self, module, args) -> None:
        """Forward pre-hook on the MoE block: returns None so the forward is unchanged."""
        x = args[0].reshape(-1, args[0].shape[-1])
        self.counts += torch.bincount(self.view.route(x).reshape(-1), minlength=len(self.counts))
        gate, up, _ = self.view.expert_weights()
        for chunk in x.split(TOKEN_CHUNK):
            for j in range(len(self.counts)):
                act = self.view.act_fn(chunk @ gate[j].T).float() * (chunk @ up[j].T).float()
                self.act_sum[j] += act.sum(0, dtype=torch.float64)
        if self.stride:
            keep = (torch.arange(len(x), device=x.device) + self.seen) % self.stride == 0
            self.router_inputs.append(x[keep].float().cpu())
        self.seen += len(x)

    def result(self) -> LayerStatistics:
        down = self.view.block.experts.down_proj.double()
        mean_act = self.act_sum / self.seen
        mean_output = torch.einsum("nhi,ni->nh", down, mean_act).float().cpu()
        inputs = torch.cat(self.router_inputs) if self.router_inputs else None
        return LayerStatistics(self.view.layer, mean_output, self.counts.cpu(), self.seen, inputs)


@torch.inference_mode()
def collect_statistics(
    model: torch.nn.Module,
    layers: list[MoELayerView],
    sequences: list[torch.Tensor],
    router_sample: int = 0,
    progress: bool = True,
) -> dict[int, LayerStatistics]:
    """Run ``sequences`` (1-D token tensors) through ``model`` and return statistics per decoder layer.

    ``router_sample``: keep about this many router-input hidden states per layer (0: none).
    """
    total = sum(len(s) for s in sequences)
    accumulators = [_LayerAccumulator(view, total, router_sample) for view in layers]
    handles = [acc.view.block.register_forward_pre_hook(acc.hook) for acc in accumulators]
    device = next(model.parameters()).device
    try:
        for seq in tqdm(sequences, desc="calibration", unit="seq", disable=not progress):
            model(input_ids=seq[None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {acc.view.layer: acc.result() for acc in accumulators}
