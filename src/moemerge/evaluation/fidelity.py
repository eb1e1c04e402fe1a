"""Fidelity of a reduced model to its original on the same tokens (HC-SMoE paper, table 23).

- Last hidden states (the base model's output, after its final norm): mean over tokens of the
  L2 distance ||h - h_ref||, of the relative distance ||h - h_ref|| / ||h_ref||, and of the
  cosine similarity.
- Per MoE layer: the reduced layer and the original layer are fed the *original* model's inputs
  to that layer, so each number isolates that layer's own error (no propagation from earlier
  layers): relative squared error sum ||y - y_ref||^2 / sum ||y_ref||^2 over tokens.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from moemerge.adapters import MoEFamily


class FidelitySums:
    """Running sums of the fidelity measures over evaluation windows, for the MoE layers ``layers``."""

    def __init__(self, layers: list[int]):
        self.l2 = self.relative = self.cosine = 0.0
        self.tokens = 0
        self.errors = {layer: [0.0, 0.0] for layer in layers}

    def add_hidden(self, h: torch.Tensor, h_ref: torch.Tensor) -> None:
        """Add one window's last hidden states [T, H] of the model and of the reference."""
        h, h_ref = h.double(), h_ref.double().to(h.device)
        distance = (h - h_ref).norm(dim=-1)
        self.l2 += float(distance.sum())
        self.relative += float((distance / h_ref.norm(dim=-1).clamp_min(1e-30)).sum())
        self.cosine += float(functional.cosine_similarity(h, h_ref, dim=-1).sum())
        self.tokens += len(h)

    def add_layer(self, layer: int, y: torch.Tensor, y_ref: torch.Tensor) -> None:
        """Add the outputs of the model's and the reference's MoE block ``layer`` on the same inputs."""
        y, y_ref = y.double(), y_ref.double()
        self.errors[layer][0] += float(((y - y_ref) ** 2).sum())
        self.errors[layer][1] += float((y_ref**2).sum())

    def result(self) -> dict:
        """{"last_hidden": {"l2", "relative_l2", "cosine", "tokens"}, "moe_layers": [{"layer", "relative_error"}]}."""
        return {
            "last_hidden": {
                "l2": self.l2 / self.tokens,
                "relative_l2": self.relative / self.tokens,
                "cosine": self.cosine / self.tokens,
                "tokens": self.tokens,
            },
            "moe_layers": [
                {"layer": layer, "relative_error": err / max(norm, 1e-300)}
                for layer, (err, norm) in self.errors.items()
            ],
        }


@torch.inference_mode()
def fidelity(model, reference, family: MoEFamily, chunks: list[torch.Tensor]) -> dict:
    """:meth:`FidelitySums.result` of ``model`` against ``reference`` on the token windows ``chunks``.

    model / reference: causal LMs of one family with the same decoder layers.
    """
    device = next(reference.parameters()).device
    reduced_blocks = {view.layer: view.block for view in family.moe_layers(model)}
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for view in family.moe_layers(reference):

        def capture(module, args, output, layer=view.layer):  # returns None: the output is left unchanged
            captured[layer] = (args[0], output)

        handles.append(view.block.register_forward_hook(capture))
    sums = FidelitySums(list(reduced_blocks))
    try:
        for chunk in chunks:
            ids = chunk[None].to(device)
            captured.clear()
            h_ref = reference.model(input_ids=ids).last_hidden_state[0]
            h = model.model(input_ids=ids.to(next(model.parameters()).device)).last_hidden_state[0]
            sums.add_hidden(h, h_ref)
            for layer, (x, y_ref) in captured.items():
                sums.add_layer(layer, reduced_blocks[layer](x), y_ref)
    finally:
        for handle in handles:
            handle.remove()
    return sums.result()
