"""LoRA adapters in memory: the layers, attaching them to a model, turning them off, and merging.

A `LoraLinear` *is* the frozen `nn.Linear` it adapts (same `weight` parameter, same name), plus
`lora_A` / `lora_B`, so state-dict keys match transformers for the base and PEFT for the adapter.
Reading and writing them as PEFT's adapter files (and the key names there) is peft_format.py's.

Variants, each in PEFT's format and with PEFT's maths (tests compare logits with PEFT):
- DoRA (`use_dora`): a trained magnitude per output row rescales the adapted weight to that norm.
- Whole modules trained (`modules_to_save`: embed_tokens, lm_head), saved in full.
- Trainable tokens (`trainable_token_indices`): only some rows of embed_tokens / lm_head train,
  e.g. the reserved control tokens a run gives new names (chat.py); only those rows are saved.
- Mixtral's experts (`ExpertLora`): one low-rank pair per expert on a stacked 3D weight, saved as
  PEFT's LoRA on parameters (`target_parameters`), which PEFT loads onto transformers' Mixtral.
- PiSSA / OLoRA initialisation (`init`): A and B start from the base weight's top singular triplets
  (PiSSA) or its QR factors (OLoRA), and the frozen weight becomes the residual W - s B0 A0, so training
  starts at the base model. The saved adapter is for the original base: the difference BA - B0 A0 as a
  LoRA of twice the rank (PEFT's conversion at save time, `path_initial_model_for_weight_conversion`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ModelError
from .families import EXPERT_TARGETS, MISTRAL
from .fp8 import FP8Linear
from .mistral import Experts
from .quant import NF4Linear
from .recompute import linear_grad_only

#: Modules that can train whole (modules_to_save) or by rows (trainable tokens): their paths in the model.
WHOLE_MODULES = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}


@dataclass
class LoraSpec:
    r: int = 16
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(MISTRAL.projections))
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] = field(default_factory=list)  # of WHOLE_MODULES: trained in full
    # Rows of embed_tokens / lm_head that train (PEFT's trainable_token_indices), by module name.
    trainable_tokens: dict[str, list[int]] = field(default_factory=dict)
    init: str = "kaiming"  # kaiming (PEFT's default), pissa, pissa_niter_N or olora: config.py's lora_init

    @property
    def scaling(self) -> float:
        # rsLoRA scales by alpha/sqrt(r) so larger ranks keep learning (Kalajdzievski, 2023).
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Linear):
    """y = x W^T + scaling * dropout(x) A^T B^T, with W frozen and B initialised to zero (or, with
    PiSSA / OLoRA, B0 A0 taken out of W, which they were computed from: lora_init_A / lora_init_B).

    W is the adapted nn.Linear's own weight, or a frozen quantized layer: NF4 (QLoRA, models/quant.py)
    or FP8 (base_precision: fp8, models/fp8.py).
    """

    def __init__(self, base: nn.Module, spec: LoraSpec) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, nn.Linear):
            self.weight = base.weight
            self.weight.requires_grad_(False)
            self.quantized = None
            dev, dt = base.weight.device, base.weight.dtype
        else:
            self.register_parameter("weight", None)
            self.quantized = base
            dev, dt = base.device, torch.float32
        self.register_parameter("bias", None)
        self.lora_A = nn.Linear(self.in_features, spec.r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(spec.r, self.out_features, bias=False, device=dev, dtype=dt)
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling
        self.disabled = False  # adapters_disabled(): the base model's output, in place
        self.lora_init_A = self.lora_init_B = None
        if spec.init == "kaiming":
            self.reset_lora(None)
        else:
            self._init_from_weight(spec.init)
        self.register_parameter("lora_magnitude_vector", None)
        if spec.use_dora:  # starts at the base rows' norms: training starts at the base model
            self.lora_magnitude_vector = nn.Parameter(self._adapted_norm().to(dt))

    def reset_lora(self, generator: torch.Generator | None) -> None:
        # Same init as PEFT's default: A kaiming-uniform, B zero, so training starts at the base model.
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform with a=sqrt(5)
        with torch.no_grad():
            self.lora_A.weight.uniform_(-bound, bound, generator=generator)
            self.lora_B.weight.zero_()

    @torch.no_grad()
    def _init_from_weight(self, init: str) -> None:
        """PiSSA or OLoRA as PEFT 0.21 computes them (in float32; A, B stay float32), then W -= s B0 A0.

        PiSSA: W = U S V^T, A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), so s B A is W's best rank-r
        part (pissa_niter_N: torch.svd_lowrank's estimate of it, N subspace iterations). OLoRA: W = Q R,
        A = R[:r], B = Q[:, :r]."""
        if self.quantized is not None:
            raise ModelError(f"lora_init {init}: the base weight must be a plain float weight to take the "
                             "initial adapter out of it, not a quantized (NF4 / FP8) one")
        if self.r > min(self.out_features, self.in_features):
            raise ModelError(f"lora_init {init}: lora_r {self.r} is above the rank of a {self.out_features} x "
                             f"{self.in_features} weight; lower lora_r or leave that projection out")
        w = self.weight.float()
        if init == "olora":
            q, r = torch.linalg.qr(w)
            a, b = r[: self.r].contiguous(), q[:, : self.r].contiguous()
        else:
            if init == "pissa":
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                u, s, vh = u[:, : self.r], s[: self.r], vh[: self.r]
            else:
                u, s, v = torch.svd_lowrank(w, q=self.r, niter=int(init.removeprefix("pissa_niter_")))
                vh = v.T
            root = torch.sqrt(s / self.scaling)
            a, b = root[:, None] * vh, u * root
        self.lora_A.weight.data, self.lora_B.weight.data = a, b
        self.lora_init_A, self.lora_init_B = a.clone(), b.clone()
        self.weight.copy_(w - self.scaling * (b @ a))

    @property
    def r(self) -> int:
        return self.lora_A.out_features

    @torch.no_grad()
    def set_initial(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Use a0, b0 as the starting factors (a checkpoint's): W + s B0 A0 (the original weight) stays,
        the residual W is recomputed around them. No change when they are this layer's own."""
        a0, b0 = a0.to(self.lora_init_A), b0.to(self.lora_init_B)
        if torch.equal(a0, self.lora_init_A) and torch.equal(b0, self.lora_init_B):
            return
        original = self.weight.float() + self.scaling * (self.lora_init_B @ self.lora_init_A)
        self.weight.copy_(original - self.scaling * (b0 @ a0))
        self.lora_init_A, self.lora_init_B = a0, b0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base(x)
        if self.disabled:  # adapters_disabled(): the base model's output (after PiSSA / OLoRA, W_res + s B0 A0)
            return out if self.lora_init_A is None else out + self._initial(x)
        if self.lora_magnitude_vector is None:
            return out + self._lora(self.lora_dropout(x))
        return out + self._dora(x, out)

    def grad_only(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) when the result is only back-propagated through (models/recompute.py): the
        frozen product is skipped, the low-rank branch runs as usual. (DoRA's magnitude gradient
        needs the frozen product's value, so DoRA runs its whole forward.)"""
        if self.lora_magnitude_vector is not None:
            return self.forward(x)
        base = self.quantized.grad_only(x) if self.quantized is not None else linear_grad_only(x, self.weight)
        return base + self._lora(self.lora_dropout(x))

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight) if self.quantized is None else self.quantized(x)

    def _initial(self, x: torch.Tensor) -> torch.Tensor:
        """s B0 A0 x: what PiSSA / OLoRA took out of the base weight."""
        a0, b0 = self.lora_init_A.to(x.dtype), self.lora_init_B.to(x.dtype)
        return nn.functional.linear(nn.functional.linear(x, a0), b0) * self.scaling

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scaling

    def _dora(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """DoRA's addition to base_out: m / |W + s BA| * (W + s BA) x - W x, row by row. The norm is
        a constant in the backward pass (DoRA paper section 4.3, as PEFT does)."""
        scale = self.lora_magnitude_vector / self._adapted_norm()
        dropped = self.lora_dropout(x)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):  # the base product of the dropped input
            base_out = self._base(dropped)
        return ((scale - 1) * base_out + scale * self._lora(dropped)).to(base_out.dtype)

    @torch.no_grad()
    def _adapted_norm(self) -> torch.Tensor:
        """The norm of each output row of W + scaling * B A, in float32."""
        return torch.linalg.vector_norm(self._dense_weight() + self.delta_weight(), dim=1)

    def _dense_weight(self) -> torch.Tensor:
        """The frozen weight in float32 (a QLoRA base dequantized)."""
        return self.weight.float() if self.quantized is None else self.quantized.dequantized(torch.float32)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The weight this layer applies, in float32: W + s BA, rescaled row by row for DoRA."""
        w = self._dense_weight() + self.delta_weight()
        if self.lora_magnitude_vector is not None:
            w = w * (self.lora_magnitude_vector.float() / torch.linalg.vector_norm(w, dim=1))[:, None]
        return w

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}{dora}")


def expert_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's pair on a stacked expert weight (its ParamWrapper's layout) -> each expert's factors, as views:
    lora_A.weight (E*r, in) holds expert e's A in rows e*r..e*r+r-1, lora_B.weight (out, r*E) its B in
    columns e, E+e, 2E+e, ... (rank-major). Returns (A (E, r, in), B (E, out, r))."""
    a = lora_a.view(num_experts, -1, lora_a.shape[1])
    b = lora_b.view(lora_b.shape[0], -1, num_experts).permute(2, 0, 1)
    return a, b


class ExpertLora(nn.Module):
    """LoRA on one stacked expert weight W (E, out, in): expert e applies W[e] + scaling * B_e A_e.

    The pairs are held as PEFT's ParamWrapper holds them (expert_factors), so the tensors save and load
    unchanged. Same init as PEFT: A kaiming-uniform, B zero. No dropout and no DoRA: PEFT's LoRA on
    parameters has neither."""

    def __init__(self, shape: tuple[int, int, int], spec: LoraSpec, device=None, dtype=None) -> None:
        super().__init__()
        self.num_experts, self.out_features, self.in_features = shape
        n = self.num_experts * spec.r
        self.lora_A = nn.Linear(self.in_features, n, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(n, self.out_features, bias=False, device=device, dtype=dtype)
        self.r, self.scaling = spec.r, spec.scaling
        self.disabled = False  # adapters_disabled()
        self.reset_lora(None)

    reset_lora = LoraLinear.reset_lora

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (E, r, in), B (E, out, r)), views of the held tensors."""
        return expert_factors(self.lora_A.weight, self.lora_B.weight, self.num_experts)

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's low-rank term for its tokens x (T, in)."""
        a, b = self.factors()
        return nn.functional.linear(nn.functional.linear(x, a[e]), b[e]) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B_e A_e for every expert, (E, out, in) in float32."""
        a, b = self.factors()
        return torch.bmm(b.float(), a.float()) * self.scaling

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}")


#: The layers that hold adapters (adapters_disabled, has_adapters).
ADAPTER_LAYERS = (LoraLinear, ExpertLora)


class TrainableTokens(nn.Module):
    """An embedding or output head of which only the rows `token_ids` train (PEFT's trainable
    tokens). It holds the frozen module's own `weight` (same name); the trained rows replace its
    rows in every forward, so they start as the base rows and are saved as values, not differences."""

    def __init__(self, base: nn.Embedding | nn.Linear, token_ids: list[int]) -> None:
        super().__init__()
        self.weight = base.weight
        self.is_embedding = isinstance(base, nn.Embedding)
        ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=self.weight.device)
        self.register_buffer("token_indices", ids, persistent=False)
        self.trainable_tokens_delta = nn.Parameter(self.weight.detach()[ids].clone())
        self.disabled = False  # adapters_disabled(): the base rows

    def merged_weight(self) -> torch.Tensor:
        delta = self.trainable_tokens_delta.to(self.weight.dtype)
        return self.weight.index_copy(0, self.token_indices, delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen module's output with the trained rows' part put in place: no merged copy of
        the whole table (vocabulary x hidden) at each call, only outputs the size of x's."""
        if self.is_embedding:
            out = nn.functional.embedding(x, self.weight)
            if self.disabled:
                return out
            # Which trained row each token is, if any (token_indices is sorted).
            pos = torch.searchsorted(self.token_indices, x).clamp_max(len(self.token_indices) - 1)
            trained = (self.token_indices[pos] == x).unsqueeze(-1)
            return torch.where(trained, self.trainable_tokens_delta[pos].to(out.dtype), out)
        out = nn.functional.linear(x, self.weight)
        if self.disabled:
            return out
        rows = nn.functional.linear(x, self.trainable_tokens_delta.to(self.weight.dtype))
        return out.index_copy(-1, self.token_indices, rows.to(out.dtype))

    def replaced_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The trained rows' indices and values, which replace those rows of the weight (the model's fused
        loss reads them apart: merging them copies the whole weight); None while adapters are off."""
        return None if self.disabled else (self.token_indices, self.trainable_tokens_delta)

    def plain(self) -> nn.Module:
        """The plain module with the trained rows folded into its weight."""
        vocab, dim = self.weight.shape
        w = self.weight
        module = (nn.Embedding(vocab, dim, device=w.device, dtype=w.dtype) if self.is_embedding
                  else nn.Linear(dim, vocab, bias=False, device=w.device, dtype=w.dtype))
        with torch.no_grad():
            module.weight.copy_(self.merged_weight())
        return module


def expert_parameters(target_modules: list[str]) -> list[str]:
    """The stacked expert weights that lora_target_modules adapt (families.EXPERT_TARGETS), in PEFT's
    nesting order (Experts.STACKED)."""
    names = set(target_modules) & set(EXPERT_TARGETS)
    if ("w1" in names) != ("w3" in names):
        raise ModelError("lora_target_modules: w1 and w3 (the experts' gate and up) are one stacked tensor, "
                         "gate_up_proj, with one adapter: name both, or gate_up_proj")
    wanted = {p for n in names for p in EXPERT_TARGETS[n]}
    return [p for p in Experts.STACKED if p in wanted]


def apply_lora(model: nn.Module, spec: LoraSpec, seed: int | None = None) -> list[str]:
    """Freeze every parameter, then wrap the target projections (and give Mixtral's experts their
    adapters). Returns the adapted module names (an expert weight as <experts module>.<weight>)."""
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    wrapped = []
    experts = [(name, m) for name, m in model.named_modules() if isinstance(m, Experts)]
    stacked = expert_parameters(spec.target_modules) if experts else []
    if stacked and (spec.dropout or spec.use_dora):
        raise ModelError(f"lora_dropout {spec.dropout:g} / use_dora {spec.use_dora}: LoRA on Mixtral's experts has "
                         "neither (as PEFT's LoRA on parameters); set lora_dropout 0 and use_dora false, or leave "
                         "the experts out of lora_target_modules")
    if stacked and spec.init != "kaiming":
        raise ModelError(f"lora_init {spec.init}: not for LoRA on Mixtral's experts (PEFT's LoRA on parameters has "
                         "only the default init); use lora_init kaiming, or leave the experts out of "
                         "lora_target_modules")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in spec.target_modules and type(child) in (nn.Linear, NF4Linear, FP8Linear):
                lora = LoraLinear(child, spec)
                if generator is not None and spec.init == "kaiming" and lora.lora_A.weight.device.type == "cpu":
                    lora.reset_lora(generator)
                setattr(module, child_name, lora)
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    for name, module in experts:
        for param in stacked:
            shape, device, dtype = _stacked_shape(module, param)
            lora = ExpertLora(shape, spec, device, dtype)
            if generator is not None and device.type == "cpu":
                lora.reset_lora(generator)
            module.lora[param] = lora
            wrapped.append(f"{name}.{param}")
    matched = {name.rpartition(".")[2] for name in wrapped} | (set(EXPERT_TARGETS) if stacked else set())
    unmatched = sorted(set(spec.target_modules) - matched)
    if unmatched:
        raise ModelError(_unmatched_targets(model, unmatched))
    _train_embeddings(model, spec)
    return wrapped


def _stacked_shape(experts: Experts, param: str) -> tuple[tuple[int, int, int], torch.device, torch.dtype]:
    """(E, out, in), device and dtype of a stacked expert weight (a QLoRA base's: its NF4 layers')."""
    if param in experts.nf4:
        layers = experts.nf4[param]
        return (len(layers), layers[0].out_features, layers[0].in_features), layers[0].device, torch.float32
    w = getattr(experts, param)
    return tuple(w.shape), w.device, w.dtype


def _unmatched_targets(model: nn.Module, unmatched: list[str]) -> str:
    cfg = getattr(model, "config", None)
    family = cfg.family if cfg is not None else None
    if family is None:
        return f"lora_target_modules {unmatched} matched no linear layer"
    message = (f"lora_target_modules {unmatched}: {family.name} has no such projection "
               f"(its projections: {', '.join(family.projections)})")
    if family.moe:
        message += "; the experts take gate_up_proj (or w1 and w3), down_proj (or w2), or experts for both"
    return message


def _train_embeddings(model: nn.Module, spec: LoraSpec) -> None:
    """modules_to_save train whole; trainable tokens wrap their module in TrainableTokens."""
    names = set(spec.modules_to_save) | set(spec.trainable_tokens)  # of WHOLE_MODULES (config, adapter_config)
    both = sorted(set(spec.modules_to_save) & set(spec.trainable_tokens))
    if both:
        raise ModelError(f"{both}: trained whole (modules_to_save) and by rows (trainable tokens) at once")
    if names and getattr(model.config, "tie_word_embeddings", False):
        raise ModelError("modules_to_save / trainable tokens on a model with tied embeddings are not supported")
    for name in spec.modules_to_save:
        module = model.get_submodule(WHOLE_MODULES[name])
        # Trained in place: a copy of the base weight in host memory (not in the state dict) lets
        # adapters_disabled() compute as the base model.
        module.base_weight = module.weight.detach().to("cpu", copy=True)
        module.weight.requires_grad_(True)
    for name, ids in spec.trainable_tokens.items():
        parent, _, child = WHOLE_MODULES[name].rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        module = getattr(owner, child)
        bad = [i for i in ids if not 0 <= i < module.weight.shape[0]]
        if bad:
            raise ModelError(f"trainable tokens {bad}: outside {name}'s {module.weight.shape[0]} rows")
        setattr(owner, child, TrainableTokens(module, ids))


def initialised_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The layers that took their starting factors from the base weight (PiSSA / OLoRA), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear) and m.lora_init_A is not None}


def lora_init_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What PiSSA / OLoRA computed in this process: the residual weights and the starting factors (the
    processes of a distributed run take rank 0's, so their frozen bases are equal too)."""
    return [t for m in initialised_layers(model).values() for t in (m.weight, m.lora_init_A, m.lora_init_B)]


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, (*ADAPTER_LAYERS, TrainableTokens)) or hasattr(m, "base_weight") for m in model.modules())


@contextmanager
@torch.no_grad()
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes as its base: every adapter's low-rank branch is skipped (after
    PiSSA / OLoRA, the starting factors are added back to the residual), trainable tokens' base rows are
    used, and modules trained whole (modules_to_save) get their base weight back for the while. Only
    those whole modules are copied, so the base and the tuned model can be compared on one copy in memory."""
    layers = [m for m in model.modules() if isinstance(m, (*ADAPTER_LAYERS, TrainableTokens))]
    before = [m.disabled for m in layers]
    whole = [m for m in model.modules() if hasattr(m, "base_weight")]
    tuned = [m.weight.detach().to("cpu", copy=True) for m in whole]
    for m in layers:
        m.disabled = True
    for m in whole:
        m.weight.copy_(m.base_weight)
    try:
        yield model
    finally:
        for m, was in zip(layers, before, strict=True):
            m.disabled = was
        for m, weight in zip(whole, tuned, strict=True):
            m.weight.copy_(weight)


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and put plain nn.Linear / nn.Embedding layers back
    (modules trained whole hold their weights already; experts' adapters fold into their stacked
    weights). Returns how many layers (stacked expert weights) were folded."""
    merged = 0
    for module in list(model.modules()):
        if isinstance(module, Experts):
            merged += _merge_experts(module)
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoraLinear):
                # A QLoRA base is dequantized first: the merge is the model that was trained.
                dtype = child.weight.dtype if child.quantized is None else torch.float32
                plain = nn.Linear(child.in_features, child.out_features, bias=False,
                                  device=child.lora_A.weight.device, dtype=dtype)
                plain.weight.copy_(child.merged_weight().to(dtype))
            elif isinstance(child, TrainableTokens):
                plain = child.plain()
            else:
                continue
            setattr(module, child_name, plain)
            merged += 1
    return merged


@torch.no_grad()
def _merge_experts(experts: Experts) -> int:
    """Fold the experts' adapters into their stacked weights (an NF4 base dequantized first, in float32,
    as for a linear layer). Returns how many stacked weights took an adapter."""
    for name in list(experts.nf4):
        dense = torch.stack([q.dequantized(torch.float32) for q in experts.nf4[name]])
        del experts.nf4[name]
        setattr(experts, name, nn.Parameter(dense, requires_grad=False))
    for name, lora in experts.lora.items():
        weight = getattr(experts, name)
        weight.copy_((weight.float() + lora.delta_weight()).to(weight.dtype))
    folded = len(experts.lora)
    experts.lora = nn.ModuleDict()
    return folded
