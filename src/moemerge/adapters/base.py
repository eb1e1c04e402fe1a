"""The canonical view of an MoE layer, and the declarative description of a model family.

Methods see only :class:`MoELayerView` tensors (router rows, experts as gate / up / down);
everything a model family does differently is a field of its :class:`MoEFamily` entry
(:mod:`moemerge.adapters.families`). transformers >= 5 holds the experts of one layer fused:
``experts.gate_up_proj`` [n, 2I, H] (gate rows first, then up rows) and ``experts.down_proj``
[n, H, I], or both transposed ([n, H, 2I] and [n, I, H]) where the experts module says ``is_transposed``
(Aria); the router is a module of the block (``gate`` or ``router``) with a ``weight`` [n, H],
for sigmoid routers a selection-only ``e_score_correction_bias`` [n], and a forward that returns
(logits [T, n], top-k weights [T, k], top-k ids [T, k]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moemerge.errors import MoemergeError
from moemerge.transformers_internals import own_gating


@dataclass(frozen=True)
class RoutingRule:
    """How a layer's router picks and weights experts, as plain-tensor code (for methods that re-route).

    scoring: "softmax" or "sigmoid" over the router logits.
    normalize: renormalise the top-k weights to sum to 1.
    scale: factor on the top-k weights (DeepSeek-V3's ``routed_scaling_factor``).
    n_group / topk_group: group-limited routing (DeepSeek-V3): experts are split into
    ``n_group`` contiguous routing groups, each scored by ``group_score`` of its selection
    scores, and only the best ``topk_group`` groups compete.
    group_score: "top2-sum" (DeepSeek-V3: the sum of a group's two best) or "max" (DeepSeek-V2).
    softcap: when above 0, the logits become softcap * tanh(logits / softcap) first (Laguna).
    norm_eps: added to the sum the top-k weights are renormalised by; None: 1e-20 for sigmoid scores, 0 for
        softmax (LFM2-MoE adds 1e-6).
    """

    top_k: int
    scoring: str = "softmax"
    normalize: bool = False
    scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2-sum"
    softcap: float = 0.0
    norm_eps: float | None = None

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, n] float32 router probabilities (softmax) or scores (sigmoid)."""
        return logits.float().softmax(-1) if self.scoring == "softmax" else logits.float().sigmoid()

    def route(
        self, logits: torch.Tensor, bias: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] float32, expert ids [T, k]) for router ``logits`` [T, n], as transformers routes.

        bias: [n] selection-only bias (DeepSeek-V3). keep: [n] bool; experts outside it are masked
        to -inf before scoring and selection, as if pruned.
        """
        logits = logits.float()
        if self.softcap > 0:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        scores = self.scores(logits)
        choice = scores if bias is None else scores + bias.float()
        if keep is not None:
            choice = choice.masked_fill(~keep, float("-inf"))
        if self.n_group > 1:
            grouped = choice.view(len(choice), self.n_group, -1)
            per_group = grouped.topk(2, dim=-1)[0].sum(-1) if self.group_score == "top2-sum" else grouped.amax(-1)
            best_groups = per_group.topk(self.topk_group, dim=-1)[1]
            allowed = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
            choice = choice.masked_fill(~allowed.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        if self.normalize:
            eps = self.norm_eps if self.norm_eps is not None else 1e-20 if self.scoring == "sigmoid" else 0.0
            weights = weights / (weights.sum(-1, keepdim=True) + eps)
        return weights * self.scale, ids


class MoELayerView:
    """One MoE layer of a loaded model, seen the same way for every family.

    Reading returns the live tensors (no copies); :meth:`set_experts` and :meth:`set_router`
    replace them, changing the number of experts of this layer. ``router_name``: the block's attribute that
    holds the router module; ``weight_path`` / ``bias_path``: where the router module keeps its rows and its
    selection bias (dotted attribute paths); ``bias_on_block``: the selection bias is the block's (at
    ``bias_path``), which the block hands its router as a second argument (MiniMax-M2, LFM2-MoE);
    ``router_takes_batch``: the router is called on hidden states [B, T, H], not [T, H] (AFMoE).
    """

    def __init__(
        self,
        layer: int,
        block: nn.Module,
        routing: RoutingRule,
        router_name: str = "gate",
        weight_path: str = "weight",
        bias_path: str = "e_score_correction_bias",
        bias_on_block: bool = False,
        router_takes_batch: bool = False,
    ):
        self.layer = layer
        self.block = block
        self.routing = routing
        self.router_name = router_name
        self.paths = (weight_path, None if bias_on_block else bias_path)
        self.block_bias = bias_path if bias_on_block else None
        self.router_takes_batch = router_takes_batch
        self.transposed = getattr(block.experts, "is_transposed", False)
        if not getattr(block.experts, "is_concatenated", True) or getattr(block.experts, "has_bias", False):
            raise MoemergeError(
                f"layer {layer}: {type(block.experts).__name__} interleaves its gate and up rows or adds biases to "
                "its experts, which moemerge cannot merge yet"
            )
        if not hasattr(block.experts, "gate_up_proj"):  # compressed experts (mc-smoe's compact output): no weights
            return
        n, two_i, hidden = self.gate_up.shape
        if self.down.shape != (n, hidden, two_i // 2):
            expected = "[n, H, 2I] and [n, I, H]" if self.transposed else "[n, 2I, H] and [n, H, I]"
            raise MoemergeError(
                f"layer {layer}: unexpected expert layout gate_up_proj {tuple(block.experts.gate_up_proj.shape)}, "
                f"down_proj {tuple(block.experts.down_proj.shape)}; moemerge expects {expected}"
            )

    @property
    def num_experts(self) -> int:
        experts = self.block.experts
        return experts.gate_up_proj.shape[0] if hasattr(experts, "gate_up_proj") else experts.num_experts

    @property
    def has_shared_expert(self) -> bool:
        return hasattr(self.block, "shared_expert") or hasattr(self.block, "shared_experts")

    @property
    def gating(self):
        """The experts' activation function of (gate [.., I], up [.., I]) pre-activations (:func:`gating`)."""
        return gating(self.block.experts)

    @property
    def router(self) -> nn.Module:
        """The block's router module (a transformers router, or moemerge's grouped router around one)."""
        return getattr(self.block, self.router_name)

    @router.setter
    def router(self, module: nn.Module) -> None:
        setattr(self.block, self.router_name, module)

    @property
    def router_weight(self) -> torch.Tensor:
        """[n, H] router rows."""
        return tensor_at(self.router, self.paths[0])

    @property
    def selection_bias(self) -> torch.Tensor | None:
        """[n] bias added to the scores for top-k selection only (DeepSeek-V3), else None; a view of the stored
        tensor (ERNIE-4.5 stores it as [1, n])."""
        if self.block_bias is not None:
            bias = tensor_at(self.block, self.block_bias)
        else:
            bias = None if self.paths[1] is None else tensor_at(self.router, self.paths[1])
        return None if bias is None else bias.view(-1)

    def route_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, n], top-k weights [T, k], top-k ids [T, k]) of the router on hidden states ``x`` [T, H],
        called as the block calls it."""
        args = (x[None] if self.router_takes_batch else x,)
        if self.block_bias is not None:
            args += (tensor_at(self.block, self.block_bias),)
        return self.router(*args)

    @property
    def gate_up(self) -> torch.Tensor:
        """[n, 2I, H] the experts' gate rows then up rows: the stored tensor, or a transposed view of it."""
        stored = self.block.experts.gate_up_proj
        return stored.transpose(1, 2) if self.transposed else stored

    @property
    def down(self) -> torch.Tensor:
        """[n, H, I] the experts' down projections: the stored tensor, or a transposed view of it."""
        stored = self.block.experts.down_proj
        return stored.transpose(1, 2) if self.transposed else stored

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[t, n, 2I] every expert's gate and up projections of hidden states ``x`` [t, H], in the weights' dtype,
        as one matrix multiply that copies no weight."""
        stored = self.block.experts.gate_up_proj
        x = x.to(stored.dtype)
        if self.transposed:  # [n, H, 2I]
            return torch.matmul(x, stored).transpose(0, 1)
        n, two_i, hidden = stored.shape
        return (x @ stored.reshape(n * two_i, hidden).T).view(-1, n, two_i)

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [n, I, H], up [n, I, H], down [n, H, I]) as views of the fused tensors."""
        gate, up = self.gate_up.chunk(2, dim=1)
        return gate, up, self.down

    def intermediate(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """[T, I] float32 intermediate activations of expert j on hidden states ``x`` [T, H]."""
        gate, up, _ = self.expert_weights()
        return intermediate_activations(gate[j], up[j], self.gating, x)

    def set_experts(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Replace the experts by ``gate``/``up`` [r, I, H] and ``down`` [r, H, I]."""
        experts = self.block.experts
        like = experts.gate_up_proj
        gate_up = torch.cat([gate, up], dim=1)
        if self.transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        experts.gate_up_proj = nn.Parameter(gate_up.to(like).contiguous(), requires_grad=False)
        experts.down_proj = nn.Parameter(down.to(like).contiguous(), requires_grad=False)
        experts.num_experts = gate.shape[0]

    def set_router(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Give the router ``weight`` [m, H] rows (and selection ``bias`` [m] where it has one)."""
        set_router_rows(self.router, weight, bias, paths=self.paths)
        if self.block_bias is not None and tensor_at(self.block, self.block_bias) is not None:
            if bias is None:
                raise ValueError("this block needs a selection bias")
            replace_tensor(self.block, self.block_bias, bias)

    def keep_first(self, r: int) -> None:
        """Shrink the layer to its first r experts and router rows (used to give a model the shapes of a
        reduced checkpoint before its weights are read)."""
        gate, up, down = self.expert_weights()
        bias = self.selection_bias
        self.set_experts(gate[:r], up[:r], down[:r])
        self.set_router(self.router_weight[:r], None if bias is None else bias[:r])


def gating(experts: nn.Module):
    """An experts module's activations [.., I] float32 of its gate and up pre-activations [.., I]: its family's own
    gating where it has one (a clamped SwiGLU), else act_fn(gate) * up with the product in float32."""
    own = own_gating(experts)
    if own is None:
        act_fn = experts.act_fn
        return lambda gate, up: act_fn(gate).float() * up.float()
    return lambda gate, up: own(torch.cat([gate, up], dim=-1)).float()


def intermediate_activations(gate: torch.Tensor, up: torch.Tensor, gated, x: torch.Tensor) -> torch.Tensor:
    """[T, I] float32 activations ``gated``(x gate^T, x up^T) (:func:`gating`) of one expert (gate, up [I, H]) on
    hidden states ``x`` [T, H]."""
    return gated(x @ gate.T, x @ up.T)


def tensor_at(module: nn.Module, path: str) -> torch.Tensor | None:
    """The tensor at the dotted attribute ``path`` of ``module`` (a router or a block), or None where it has none."""
    owner, name = _owner(module, path)
    return getattr(owner, name, None)


def _owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(the submodule of ``module`` that holds the attribute at the dotted ``path``, the attribute's name)."""
    owner_path, _, name = path.rpartition(".")
    return (module.get_submodule(owner_path) if owner_path else module), name


def replace_tensor(module: nn.Module, path: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the tensor at the dotted ``path`` of ``module``, in that tensor's dtype, device,
    kind (parameter or buffer) and leading shape (a bias stored [1, n] becomes [1, m])."""
    owner, name = _owner(module, path)
    old = getattr(owner, name)
    new = tensor.to(old).reshape(*old.shape[: old.dim() - tensor.dim()], *tensor.shape)
    setattr(owner, name, nn.Parameter(new, requires_grad=False) if isinstance(old, nn.Parameter) else new)
    if isinstance(owner, nn.Linear):  # a router whose rows are a Linear's (Hunyuan's ``gate.wg``)
        owner.out_features = tensor.shape[0]


def set_router_rows(
    router: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int | None = None,
    paths: tuple[str, str | None] = ("weight", "e_score_correction_bias"),
) -> None:
    """Resize a transformers router module in place to m = ``weight.shape[0]`` experts: its rows [m, H] at
    ``paths[0]`` and, where it has one, its selection bias [m] at ``paths[1]`` (None: it keeps none).

    Its top-k becomes ``top_k`` if given, else stays as it was but never above m.
    """
    replace_tensor(router, paths[0], weight)
    if paths[1] is not None and tensor_at(router, paths[1]) is not None:
        if bias is None:
            raise ValueError("this router needs a selection bias")
        replace_tensor(router, paths[1], bias)
    router.num_experts = weight.shape[0]
    router.top_k = top_k if top_k is not None else min(router.top_k, weight.shape[0])


@dataclass(frozen=True)
class MoEFamily:
    """What moemerge knows about one model family: where its pieces live and how it routes.

    model_type: ``config.model_type`` of the family.
    expert_count_field: the config field holding the number of routed experts per layer.
    top_k_field: the config field holding the number of experts each token is routed to.
    block: the decoder layer's attribute holding the MoE block (a layer without one, or whose block has no
        ``experts``, is dense).
    router: the block's attribute holding the router module.
    router_weight / selection_bias: where the router module keeps its rows [n, H] and, if it has one, its
        selection-only bias (dotted attribute paths).
    bias_on_block: the selection bias is the block's attribute ``selection_bias``, handed to the router as a
        second argument.
    router_takes_batch: the block calls its router on hidden states [B, T, H] (AFMoE), not [T, H].
    scoring: "softmax" or "sigmoid" over the router logits.
    normalize: whether the top-k weights are renormalised: always (True), never (False), or as the config
        field of this name says.
    scale: the factor on the top-k weights, or the config field that holds it.
    group_limited: DeepSeek-V3's group-limited routing, from the config's ``n_group`` and ``topk_group``:
        always (True), never (False), or when the config field ``group_limited[0]`` holds ``group_limited[1]``
        (DeepSeek-V2's ``topk_method``).
    group_score: how a routing group is scored (:class:`RoutingRule`).
    softcap: the config field holding the router-logit soft cap (:class:`RoutingRule`), if the family has one.
    norm_eps: what the router adds to the sum it renormalises by (:class:`RoutingRule`); None: the rule's default.
    checkpoints: well-known checkpoints of the family (for the README's table).
    """

    model_type: str
    expert_count_field: str
    top_k_field: str = "num_experts_per_tok"
    block: str = "mlp"
    router: str = "gate"
    router_weight: str = "weight"
    selection_bias: str = "e_score_correction_bias"
    bias_on_block: bool = False
    router_takes_batch: bool = False
    scoring: str = "softmax"
    normalize: bool | str = "norm_topk_prob"
    scale: float | str = 1.0
    group_limited: bool | tuple[str, str] = False
    group_score: str = "top2-sum"
    softcap: str | None = None
    norm_eps: float | None = None
    checkpoints: str = ""

    def check_config(self, config, file) -> None:
        """Raise MoemergeError naming the field and ``file`` unless every config field moemerge reads holds a
        usable value: the expert count, layers, sizes and context whole numbers >= 1, top-k from 1 to the
        expert count, the renormalisation switch a boolean, the scale a number above 0, and group-limited
        routing that can run (``n_group`` splits the experts into blocks of at least two, ``topk_group`` of
        them hold at least top-k experts)."""
        n = config_count(config, self.expert_count_field, file)
        for name in ("num_hidden_layers", "hidden_size", "vocab_size", "max_position_embeddings"):
            config_count(config, name, file)
        top_k = config_count(config, self.top_k_field, file, (n, self.expert_count_field))
        if isinstance(self.normalize, str):
            norm = getattr(config, self.normalize, None)
            if norm is not None and not isinstance(norm, bool):
                raise MoemergeError(f"{file}: {self.normalize} is {norm!r}; it must be true or false; fix config.json")
        if isinstance(self.scale, str):
            scale = getattr(config, self.scale, None)
            if type(scale) not in (int, float) or not 0 < scale < math.inf:
                raise MoemergeError(f"{file}: {self.scale} is {scale!r}; it must be a number above 0; fix config.json")
        if self.softcap is not None:
            cap = getattr(config, self.softcap, 0.0)
            if type(cap) not in (int, float) or not 0 <= cap < math.inf:
                raise MoemergeError(f"{file}: {self.softcap} is {cap!r}; it must be a number >= 0; fix config.json")
        if self.routes_by_group(config):
            groups = config_count(config, "n_group", file, (n, self.expert_count_field))
            config_count(config, "topk_group", file, (groups, "n_group"))
            if n % groups or n // groups < 2 or config.topk_group * (n // groups) < top_k:
                raise MoemergeError(
                    f"{file}: n_group {groups} and topk_group {config.topk_group} do not fit "
                    f"{self.expert_count_field} {n} and {self.top_k_field} {top_k} (n_group must split the "
                    "experts into equal blocks of at least 2, and topk_group blocks must hold top-k experts); "
                    "fix config.json"
                )

    def routing_rule(self, config) -> RoutingRule:
        """The family's routing with this config's top-k, renormalisation, scale and groups."""
        normalize = self.normalize if isinstance(self.normalize, bool) else getattr(config, self.normalize, False)
        scale = getattr(config, self.scale) if isinstance(self.scale, str) else self.scale
        grouped = self.routes_by_group(config)
        return RoutingRule(
            top_k=getattr(config, self.top_k_field),
            scoring=self.scoring,
            normalize=bool(normalize),
            scale=scale,
            n_group=config.n_group if grouped else 1,
            topk_group=config.topk_group if grouped else 1,
            group_score=self.group_score,
            softcap=getattr(config, self.softcap, 0.0) if self.softcap else 0.0,
            norm_eps=self.norm_eps,
        )

    def routes_by_group(self, config) -> bool:
        """Whether this config's router is group-limited."""
        if isinstance(self.group_limited, bool):
            return self.group_limited
        field, value = self.group_limited
        return getattr(config, field, None) == value

    def num_experts(self, config) -> int:
        return getattr(config, self.expert_count_field)

    def moe_layers(self, model: nn.Module) -> list[MoELayerView]:
        """Views of the MoE layers of a ``*ForCausalLM`` model, in depth order (dense layers skipped)."""
        rule = self.routing_rule(model.config)
        views = []
        for i, layer in enumerate(model.model.layers):
            block = getattr(layer, self.block, None)
            if hasattr(block, "experts") and hasattr(block, self.router):
                names = (self.router, self.router_weight, self.selection_bias, self.bias_on_block)
                names += (self.router_takes_batch,)
                views.append(MoELayerView(i, block, rule, *names))
        return views

    def partitions(self, config, r: int, check_top_k: bool = True) -> list[tuple[list[int], int]]:
        """Blocks of expert ids that a standard r-expert router needs kept apart, each with its share of r.

        A group never mixes experts of two blocks. Raises MoemergeError when no valid r-expert
        router exists; ``check_top_k=False`` allows r below top-k (grouped routing keeps the
        original router, so it still picks top-k distinct originals). Without group-limited routing there is one
        block: all experts. With it, the n experts form ``n_group`` contiguous routing groups, each scored by
        the sum of its two best scores, the best ``topk_group`` of which compete; a reduced router stays valid
        when every routing group keeps the same number (at least two) of experts and no merged expert mixes
        routing groups, so each is its own clustering problem and r must be a multiple of ``n_group``.
        """
        n, rule = self.num_experts(config), self.routing_rule(config)
        if rule.n_group == 1:
            if check_top_k and r < rule.top_k:
                raise MoemergeError(
                    f"--experts {r} is below the model's top-k ({rule.top_k}): a standard router must pick "
                    f"{rule.top_k} distinct experts per token; use --experts >= {rule.top_k}, or --router grouped "
                    "(which keeps the original router)"
                )
            return [(list(range(n)), r)]
        # r >= topk_group * r / n_group >= top-k, so the check above is implied by the one below
        per_block, rest = divmod(r, rule.n_group)
        reaches_top_k = rule.topk_group * per_block >= rule.top_k
        if rest or per_block < 2 or (check_top_k and not reaches_top_k):
            valid = [
                m * rule.n_group
                for m in range(2, n // rule.n_group)
                if not check_top_k or rule.topk_group * m >= rule.top_k
            ]
            routing = f"n_group={rule.n_group}, topk_group={rule.topk_group}, top-k={rule.top_k}"
            if rest or per_block < 2:
                raise MoemergeError(
                    f"--experts {r} breaks DeepSeek group-limited routing ({routing}): each of the {rule.n_group} "
                    f"routing groups must keep the same number (>= 2) of experts; use --experts in {valid}"
                )
            raise MoemergeError(
                f"--experts {r} leaves {rule.topk_group * per_block} experts in the routing groups a token may use "
                f"({routing}), fewer than top-k; use --experts in {valid}, or --router grouped"
            )
        size = n // rule.n_group
        return [(list(range(g * size, (g + 1) * size)), per_block) for g in range(rule.n_group)]

    def set_num_experts(self, model: nn.Module, r: int) -> None:
        """Record r experts per layer in the config (and the model's own copies of the counts).

        A top-k above r (possible with grouped routing) becomes r in the config, so that the
        checkpoint still loads and runs as a standard model.
        """
        setattr(model.config, self.expert_count_field, r)
        top_k = min(getattr(model.config, self.top_k_field), r)
        setattr(model.config, self.top_k_field, top_k)
        if hasattr(model, "num_experts"):
            model.num_experts = r
        if hasattr(model, "num_experts_per_tok"):
            model.num_experts_per_tok = top_k


def config_count(config, name: str, file, most: tuple[int, str] | None = None) -> int:
    """``config.name``, checked to be a whole number >= 1 (and at most ``most[0]``, the field ``most[1]``); the error
    names the field as config.json spells it (transformers' ``attribute_map`` gives some fields a second name)."""
    value = getattr(config, name, None)
    if type(value) is not int or value < 1 or (most is not None and value > most[0]):
        stored = getattr(config, "attribute_map", {}).get
        bound = "of at least 1" if most is None else f"from 1 to {stored(most[1], most[1])} ({most[0]})"
        raise MoemergeError(
            f"{file}: {stored(name, name)} is {value!r}; it must be a whole number {bound}; fix config.json"
        )
    return value
