"""A compact Mistral decoder in plain PyTorch.

Parameter names equal transformers' `MistralForCausalLM` (and, for Mixtral's sparse mixture of
experts, transformers' `MixtralForCausalLM` with its experts stacked in 3D tensors), so HF
checkpoints load and save unchanged and PEFT/vLLM read our adapters. Attention takes per-token sequence ids so packed
samples never see each other; the sliding window (Mistral 7B v0.1) applies inside each sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.attention import (
    CAUSAL,
    attend,
    dense_mask,
    flex_block_mask,
    one_sample_per_row,
    probe_causal_backends,
)
from ..kernels.loss import IGNORE, chunk_tokens, linear_cross_entropy_sum
from .families import Family, family_of
from .recompute import LayerInputs, by_token_chunks, grad_only, recompute_layer

attention_mask = dense_mask  # the mask every backend must agree with


@dataclass
class MistralConfig:
    vocab_size: int = 32768
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    architecture: str = "MistralForCausalLM"  # or "MixtralForCausalLM" (models/families.py)
    num_local_experts: int | None = None  # Mixtral: experts per layer (each intermediate_size wide)
    num_experts_per_tok: int = 2  # Mixtral: experts each token is routed to
    router_aux_loss_coef: float = 0.001  # Mixtral: the load-balancing loss's weight (transformers' default)
    # Ministral: "sliding_attention" or "full_attention" per layer; None: every layer alike
    layer_types: list[str] | None = None
    # A vision-language checkpoint's config.json (Mistral3ForConditionalGeneration) when this is its
    # text model: written back around the text model's config, so the output keeps the architecture.
    wrapper: dict | None = None

    def __post_init__(self) -> None:
        # Nemo and Small set head_dim=128 explicitly where hidden/heads would give 160.
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            unknown = set(self.layer_types) - {"sliding_attention", "full_attention"}
            if unknown:
                raise ValueError(f"layer_types: unknown attention type(s) {sorted(unknown)}")

    def window(self, layer: int) -> int | None:
        """The sliding window of one layer (None: full attention)."""
        if self.layer_types is not None and self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window

    @classmethod
    def from_hf(cls, data: dict) -> MistralConfig:
        known = {f.name for f in fields(cls)} - {"architecture", "wrapper"}
        arch = (data.get("architectures") or ["MistralForCausalLM"])[0]
        if arch != "MinistralForCausalLM":
            known.discard("layer_types")  # only Ministral's attention reads them (as in transformers)
        return cls(architecture=arch, **{k: v for k, v in data.items() if k in known})

    @property
    def moe(self) -> bool:
        return self.num_local_experts is not None

    @property
    def family(self) -> Family:  # the text model's Family (models/families.py); a wrapper's is its architectures'
        return family_of({"architectures": [self.architecture]})

    def to_hf(self, dtype: str = "float32") -> dict:
        out = asdict(self)
        del out["architecture"], out["wrapper"]
        if not self.moe:
            del out["num_local_experts"], out["num_experts_per_tok"], out["router_aux_loss_coef"]
        if self.layer_types is None:
            del out["layer_types"]
        out.update(
            architectures=[self.architecture],
            model_type=self.family.model_type,
            hidden_act="silu",
            attention_dropout=0.0,
            initializer_range=0.02,
            use_cache=True,
            torch_dtype=dtype,
        )
        if self.wrapper is not None:
            text = {k: v for k, v in out.items() if k not in ("architectures", "torch_dtype", "use_cache")}
            wrapper = {k: v for k, v in self.wrapper.items() if k != "dtype"}
            return {**wrapper, "text_config": {**wrapper.get("text_config", {}), **text},
                    "tie_word_embeddings": self.tie_word_embeddings, "torch_dtype": dtype}
        return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, L, head_dim), computed in float32 for long positions."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, L, D); cos/sin: (B, L, D)
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: MistralConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache=None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:  # decoding: the cache stores the new keys and attends over what it holds
            out = kv_cache.attend(layer, q, k, v, mask, self.head_dim**-0.5)
        else:
            out = attend(q, k, v, mask, self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))


#: Tokens an MLP computes at once in passes that keep no activations (a no-grad forward, a
#: checkpointed layer's re-run): its intermediate activations, 3 x intermediate_size values a token,
#: then stay this size however long the rows are. Rows of 4,096 x 2 run in one piece.
MLP_CHUNK_TOKENS = 8192


@dataclass(frozen=True)
class ModelOptions:
    """How the model computes, apart from its weights: set at once through
    MistralForCausalLM.configure (or for a while through .configured), never attribute by attribute
    from outside. None of it changes the maths, except neftune_alpha and router_aux_loss_coef."""

    gradient_checkpointing: bool = False  # keep each layer's input only; re-run the layer in backward
    offload_activations: bool = False  # with checkpointing on a GPU: kept inputs in pinned host memory
    recompute_by_row: bool = False  # with checkpointing: backward one batch row at a time
    # "sdpa": dense boolean mask, any device. "flex": FlexAttention block mask (GPU fast path), or
    # SDPA's causal kernel when rows hold one sample each (one_sample_rows; kernels/attention.py).
    attn_impl: str = "sdpa"
    one_sample_rows: bool = False
    fused_loss: bool = False  # the loss never keeps the logits (kernels/loss.py)
    mlp_chunk_tokens: int = MLP_CHUNK_TOKENS  # see MLP_CHUNK_TOKENS
    neftune_alpha: float = 0.0  # NEFTune: noise on the input embeddings while training
    # Mixtral: the router balance loss's weight in the trained loss (0: measured and reported only)
    router_aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.attn_impl not in ("sdpa", "flex"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'flex', not {self.attn_impl!r}")
        if self.mlp_chunk_tokens < 1:
            raise ValueError(f"mlp_chunk_tokens must be positive, not {self.mlp_chunk_tokens}")


class MLP(nn.Module):
    def __init__(self, cfg: MistralConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.chunk_tokens = MLP_CHUNK_TOKENS
        self.chunk_backend: str | Callable | None = None  # set by use_fast_path: the chunks compiled

    def forward(self, x: torch.Tensor, grad_only_out: bool = False) -> torch.Tensor:
        if (grad_only_out or not torch.is_grad_enabled()) and x.shape[:-1].numel() > self.chunk_tokens:
            fn = self._forward if self.chunk_backend is None else partial(_compiled_mlp(self.chunk_backend), self)
            return by_token_chunks(fn, x, self.chunk_tokens, grad_only_out)
        return self._forward(x, grad_only_out)

    def _forward(self, x: torch.Tensor, grad_only_out: bool) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        # grad_only_out: the output is only back-propagated through (recompute.py)
        return grad_only(self.down_proj, h) if grad_only_out else self.down_proj(h)


@cache
def _compiled_mlp(backend: str | Callable) -> Callable:
    """MLP._forward compiled for any chunk length, one function for every layer (the module is an
    argument, so the layers share its graphs)."""
    return torch.compile(lambda mlp, x, grad_only_out: mlp._forward(x, grad_only_out), dynamic=True, backend=backend)


class Experts(nn.Module):
    """Mixtral's experts, stacked: gate and up products in one (E, 2I, H) tensor, down in (E, H, I).

    `lora` holds LoRA on a stacked weight by its name (lora.ExpertLora: one low-rank pair per expert);
    `nf4` (QLoRA) holds a stacked weight as one frozen NF4 layer per expert in place of the parameter."""

    STACKED = ("gate_up_proj", "down_proj")  # in the order PEFT nests its adapters on them

    def __init__(self, cfg: MistralConfig) -> None:
        super().__init__()
        n, hidden, width = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.num_experts = n
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, width))
        self.lora = nn.ModuleDict()
        self.nf4 = nn.ModuleDict()

    def _project(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        y = self.nf4[name][e](x) if name in self.nf4 else F.linear(x, getattr(self, name)[e])
        lora = self.lora[name] if name in self.lora else None
        return y if lora is None or lora.disabled else y + lora(x, e)

    # Eager inside a compiled layer: which tokens go to which expert is known only at run time, so
    # dynamo broke the graph there and compiled the rest once per expert index, reaching its
    # recompile limit (8) within one step, after which the whole layer ran eagerly. The experts'
    # work is a few large products per expert, which gain nothing from compiling.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, H); index, weights (T, k): each token's experts and their mixing weights."""
        # NF4 experts go one after another, each dequantized in its turn.
        return self._loop(x, index, weights) if self.nf4 else self._grouped(x, index, weights)

    def _loop(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The experts one after another."""
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(index == e)
            if token.numel() == 0:
                continue
            gate, up = self._project("gate_up_proj", e, x[token]).chunk(2, dim=-1)
            y = self._project("down_proj", e, F.silu(gate) * up) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def _grouped(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert's products at once: the (token, expert) pairs sorted by expert, then one grouped
        product per projection (grouped_mm)."""
        k = index.shape[1]
        order = index.reshape(-1).argsort(stable=True)
        token = order // k
        counts = torch.bincount(index.reshape(-1), minlength=self.num_experts)
        gate, up = self._grouped_project("gate_up_proj", x[token], counts).chunk(2, dim=-1)
        y = self._grouped_project("down_proj", F.silu(gate) * up, counts)
        y = y * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def _grouped_project(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        y = grouped_mm(x, getattr(self, name), counts)
        lora = self.lora[name] if name in self.lora else None
        if lora is None or lora.disabled:
            return y
        a, b = lora.factors()
        return y + grouped_mm(grouped_mm(x, a, counts), b, counts) * lora.scaling


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x (N, in), sorted by group with counts (G,) rows each, times their group's w[g] (G, out, in)
    transposed: (N, out). torch._grouped_mm where it runs (bf16, 16-byte aligned rows: the GPU fast
    path); otherwise one batched product over the groups padded to the largest."""
    if (x.dtype == w.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and x.shape[1] % 8 == 0
            and w.shape[1] % 8 == 0 and w.stride(2) == 1):
        offsets = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)
    starts = counts.cumsum(0) - counts
    group = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
    slot = torch.arange(x.shape[0], device=x.device) - starts[group]
    padded = x.new_zeros(len(counts), int(counts.max()) if x.shape[0] else 0, x.shape[1])
    padded[group, slot] = x
    return torch.bmm(padded, w.transpose(1, 2).to(x.dtype))[group, slot]


class RouterBalance:
    """Mixtral's router load-balancing loss over one forward pass (Switch Transformer's, as transformers'
    load_balancing_loss_func): num_experts * sum_e f_e * P_e, where f_e is the share of the top-k
    picks that went to expert e and P_e expert e's mean router probability, both taken over the real
    tokens (padding excluded) of every MoE layer together.

    grad_scale > 0: the loss trains, its gradient times grad_scale going to the router (and all
    that feeds it). The gradient enters in each MoE layer's backward, so it also reaches layers that
    activation checkpointing runs again in backward (a layer run twice is counted once)."""

    def __init__(self, real: torch.Tensor, grad_scale: float = 0.0) -> None:
        self.real = real.reshape(-1).float()  # (B*L,) 1 for real tokens, 0 for padding
        self.grad_scale = grad_scale
        self.counts: dict[int, torch.Tensor] = {}  # per MoE layer: top-k picks per expert
        self.prob_sums: dict[int, torch.Tensor] = {}  # per MoE layer: router probabilities summed per expert

    @torch.compiler.disable
    def add(self, moe: SparseMoE, logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.grad_scale and id(moe) in self.counts:
            return out  # measured already: a checkpointed layer run again in backward (perhaps one row)
        probs = F.softmax(logits.float(), dim=-1)
        _, picked = probs.topk(moe.top_k, dim=-1)
        real = self.real.to(probs.device)
        if real.numel() != probs.shape[0]:
            raise ValueError(f"router balance: {probs.shape[0]} routed tokens for a mask of {real.numel()}")
        prob_sum = (probs * real[:, None]).sum(0)
        self.counts[id(moe)] = torch.zeros_like(prob_sum).scatter_add_(
            0, picked.reshape(-1), real.repeat_interleave(moe.top_k)).detach()
        self.prob_sums[id(moe)] = prob_sum.detach()
        if self.grad_scale and prob_sum.requires_grad:
            out = _BalanceGrad.apply(out, prob_sum, self)
        return out

    def _picked_share(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(f (E,), the number of layer-tokens both means are over)."""
        rows = len(self.counts) * self.real.sum().to(next(iter(self.counts.values())).device)
        return sum(self.counts.values()) / rows, rows

    def loss(self) -> torch.Tensor:
        f, rows = self._picked_share()
        return f.numel() * (f * (sum(self.prob_sums.values()) / rows)).sum()


class _BalanceGrad(torch.autograd.Function):
    """Identity on a MoE layer's output; its backward adds the balance loss's gradient with respect to
    the layer's summed router probabilities (num_experts * f / rows, f over all layers, known by then)."""

    @staticmethod
    def forward(ctx, out, prob_sum, balance):
        ctx.balance = balance
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        b = ctx.balance
        f, rows = b._picked_share()
        return grad, (b.grad_scale * f.numel() / rows) * f, None


class SparseMoE(nn.Module):
    """Top-k routing (softmax over all experts, the k largest renormalised) to SwiGLU experts."""

    def __init__(self, cfg: MistralConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)  # the router
        self.experts = Experts(cfg)
        self.balance: RouterBalance | None = None  # set while a pass measures the balance loss

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits (T, E), expert index (T, k), mixing weights (T, k) in float32)."""
        logits = self.gate(x)
        probs = F.softmax(logits.float(), dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        return logits, index, weights / weights.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor, grad_only_out: bool = False) -> torch.Tensor:
        B, L, H = x.shape
        flat = x.reshape(B * L, H)
        logits, index, weights = self.route(flat)
        out = self.experts(flat, index, weights)
        if self.balance is not None:
            out = self.balance.add(self, logits, out)
        return out.view(B, L, H)


@contextmanager
def router_balance(model: nn.Module, real: torch.Tensor, grad_scale: float = 0.0) -> Iterator[RouterBalance | None]:
    """Measure (and with grad_scale > 0, train) the router balance loss of the forward and backward passes
    run inside the block; real (B, L) marks the real tokens. Yields None for a model without experts."""
    layers = [m for m in model.modules() if isinstance(m, SparseMoE)]
    if not layers:
        yield None
        return
    balance = RouterBalance(real, grad_scale)
    with _balance_on(layers, balance):
        yield balance


@contextmanager
def _balance_on(layers: list[SparseMoE], balance: RouterBalance) -> Iterator[None]:
    for m in layers:
        m.balance = balance
    try:
        yield
    finally:
        for m in layers:
            m.balance = None


class BatchLoss:
    """A batch's loss terms (MistralForCausalLM.batch_loss): `tokens`, the summed token cross-entropy
    (float32, with its graph), and `router_aux`, Mixtral's router balance loss measured on the batch
    (its mean over the real tokens; None for a dense model)."""

    def __init__(self, tokens: torch.Tensor, balance: RouterBalance | None = None,
                 layers: list[SparseMoE] = (), labels: torch.Tensor | None = None) -> None:
        self.tokens = tokens
        self._balance, self._layers, self._labels = balance, list(layers), labels

    @property
    def router_aux(self) -> torch.Tensor | None:
        b = self._balance
        return b.loss() if b is not None and b.counts else None

    def backward(self, divide_by: float = 1) -> None:
        """Back-propagate tokens / divide_by. Where the router balance trains (router_aux_loss_coef > 0)
        its gradient joins with weight coef x this batch's trained tokens / divide_by: over the
        micro-batches of a step (each divided by the step's trained tokens) the balance loss is
        token-weighted as the token loss is. The MoE layers see the balance again while a
        checkpointed layer re-runs."""
        b = self._balance
        if b is None or self._labels is None:
            (self.tokens / divide_by).backward()
            return
        b.grad_scale = b.grad_scale * int((self._labels != IGNORE).sum()) / divide_by
        with _balance_on(self._layers, b):
            (self.tokens / divide_by).backward()


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MistralConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SparseMoE(cfg) if cfg.moe else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None, layer=0, grad_only=False):
        """grad_only: the returned value will only be back-propagated through, never read
        (a checkpointed layer's backward), so the last projection's product is skipped."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x), grad_only)


class MistralModel(nn.Module):
    def __init__(self, cfg: MistralConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MistralForCausalLM(nn.Module):
    def __init__(self, cfg: MistralConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = MistralModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.options = ModelOptions()

    # The options are read only through self.options: an option set as an attribute would be ignored.
    _OPTION_NAMES = frozenset(f.name for f in fields(ModelOptions))

    def __setattr__(self, name: str, value) -> None:
        if name in self._OPTION_NAMES:
            raise AttributeError(f"{name} is a model option: set it with model.configure({name}=...)")
        super().__setattr__(name, value)

    def configure(self, options: ModelOptions | None = None, **changes) -> ModelOptions:
        """Set how the model computes: `options` whole, or the named fields of the current ones
        changed. Returns the options that were in force before."""
        before = self.options
        new = replace(options if options is not None else before, **changes)
        for m in self.modules():
            if isinstance(m, MLP):
                m.chunk_tokens = new.mlp_chunk_tokens
        object.__setattr__(self, "options", new)  # a plain attribute: nn.Module keeps no state for it
        return before

    @contextmanager
    def configured(self, **changes) -> Iterator[ModelOptions]:
        """The options changed for the block only (evaluation switches attention to the plain path, say)."""
        before = self.configure(**changes)
        try:
            yield self.options
        finally:
            self.configure(before)

    def use_fast_path(self, compile_layers: bool = True, one_sample_rows: bool = False, dynamic: bool = False,
                      backend: str = "inductor") -> None:
        """GPU fast path: FlexAttention block masks, the fused linear + cross-entropy loss, and each
        decoder layer compiled (fused norms, RoPE, SwiGLU and LoRA adds). The maths is unchanged.

        one_sample_rows: the rows hold one sample each (no packing), so attention takes SDPA's
        causal kernel. Otherwise every batch takes the block mask, even one that happens to hold a
        single sample per row: the compiled layers then meet one kind of mask in the whole run.
        dynamic: compile for any batch size and row length (rows of varying length); otherwise
        each new shape compiles its own graphs."""
        self.configure(attn_impl="flex", one_sample_rows=one_sample_rows, fused_loss=True)
        if compile_layers:
            for layer in self.model.layers:
                layer.compile(dynamic=dynamic, backend=backend)
                if isinstance(layer.mlp, MLP):  # its chunks at long context run outside the layer's graph
                    layer.mlp.chunk_backend = backend

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init for a fresh model (HF's normal(0, 0.02), norms at one)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
            elif isinstance(module, Experts):
                for p in module.parameters():
                    nn.init.normal_(p, 0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        kv_cache=None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, L, hidden).

        seq_ids marks which sample each token belongs to (packed rows); without it the whole row
        is one sample. position_ids default to 0..L-1. kv_cache: decoding (generate/cache.py): the
        cache stores each layer's keys and values and decides what each query attends, so the
        position_ids must be given and no mask is built here.
        """
        B, L = input_ids.shape
        cfg = self.config
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
        x = self.model.embed_tokens(input_ids)
        opts = self.options
        if opts.neftune_alpha and self.training:
            # NEFTune (Jain et al., 2023), sized as transformers' hook: alpha / sqrt(row length x hidden).
            size = opts.neftune_alpha / math.sqrt(L * x.shape[-1])
            x = x + torch.empty_like(x).uniform_(-size, size)
        cos, sin = rope_tables(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        windows = [cfg.window(i) for i in range(cfg.num_hidden_layers)]
        if kv_cache is not None:
            masks = dict.fromkeys(windows)
        else:
            masks = {w: self._mask(seq_ids, position_ids, L, input_ids.device, w) for w in set(windows)}
        store = None
        if opts.gradient_checkpointing and self.training and torch.is_grad_enabled():
            store = LayerInputs(offload=opts.offload_activations and x.is_cuda)
            rows = {w: self._row_args(seq_ids, position_ids, cos, sin, m, w) for w, m in masks.items()}
            store.row_args = [rows[w] for w in windows]
        for i, layer in enumerate(self.model.layers):
            mask = masks[windows[i]]
            if store is not None:
                x = recompute_layer(layer, x, store, i, cos, sin, mask)
            elif kv_cache is None:  # no layer index: a compiled layer would guard on it
                x = layer(x, cos, sin, mask)
            else:  # eager (hooks kept: FSDP's), past a compiled layer's wrapper: decoding is graph-replayed
                x = layer._call_impl(x, cos, sin, mask, kv_cache, i)
        return self.model.norm(x)

    def _row_args(self, seq_ids, position_ids, cos, sin, mask, window) -> list[tuple] | None:
        """Per-row (cos, sin, mask) for a checkpointed backward taken one row at a time, which holds
        one row's activations instead of the whole batch's; the same FLOPs. Not with active
        dropout: its masks are drawn for the whole batch in the forward."""
        B, L = position_ids.shape
        if not self.options.recompute_by_row or B == 1:
            return None
        if any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules()):
            return None
        if any(isinstance(m, SparseMoE) and m.balance is not None and m.balance.grad_scale for m in self.modules()):
            return None  # a trained balance loss routes the whole batch at once
        if seq_ids is None:
            seq_ids = torch.zeros_like(position_ids)
        rows = []
        for b in range(B):
            if isinstance(mask, torch.Tensor):
                row_mask = mask[b:b + 1]
            elif isinstance(mask, str):  # CAUSAL holds for every row
                row_mask = mask
            else:
                row_mask = self._mask(seq_ids[b:b + 1], position_ids[b:b + 1], L, position_ids.device, window)
            rows.append((cos[b:b + 1], sin[b:b + 1], row_mask))
        return rows

    def _mask(self, seq_ids, position_ids, L: int, device, window: int | None) -> torch.Tensor | None:
        if seq_ids is None:
            seq_ids = torch.zeros_like(position_ids)
        if self.options.attn_impl == "flex":
            if self.takes_causal_kernel(seq_ids, L, window):
                probe_causal_backends(device, self.config.head_dim)  # here, outside any compiled layer
                return CAUSAL
            return flex_block_mask(seq_ids, window)
        return dense_mask(seq_ids, position_ids, window)

    def takes_causal_kernel(self, seq_ids: torch.Tensor, L: int, window: int | None) -> bool:
        """Whether the fast path attends with the causal kernel: rows of one sample each (the model is
        told so, and the batch shows it) that the layer's sliding window does not cut."""
        return self.options.one_sample_rows and (window is None or L <= window) and one_sample_per_row(seq_ids)

    # ------------------------------------------------------------------ losses of a batch
    # A batch is anything with input_ids, labels (IGNORE where no loss), position_ids and seq_ids
    # (B, L) tensors: data/pack.py's Batch.

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What lm_head applies: its weight and, where an adapter replaces some of its rows (trainable
        tokens: a module with `replaced_rows()`), those rows' indices and values, kept apart (merging
        them would copy the whole weight)."""
        head = self.lm_head
        replaced = head.replaced_rows() if hasattr(head, "replaced_rows") else None
        return (head.weight, *replaced) if replaced is not None else (head.weight, None, None)

    def token_loss(self, batch) -> torch.Tensor:
        """Summed next-token cross-entropy over the batch's trained tokens (float32). Only trained
        positions go through lm_head, so masked prompts cost no logits memory; with the fused_loss
        option the logits are never kept at all (kernels/loss.py)."""
        hidden = self.hidden_states(batch.input_ids, batch.position_ids, batch.seq_ids)
        keep = batch.labels != IGNORE
        h = hidden[keep]
        targets = batch.labels[keep]
        if targets.numel() == 0:
            return hidden.sum() * 0.0
        if self.options.fused_loss:
            weight, rows, values = self.output_head()
            return linear_cross_entropy_sum(h, weight, targets, rows=rows, row_values=values)
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits, targets, reduction="sum")

    def batch_loss(self, batch) -> BatchLoss:
        """The training loss of a batch: the summed token loss and the auxiliary losses measured with it
        (Mixtral's router balance). Back-propagate it with BatchLoss.backward, which also adds the
        auxiliary losses' gradients the options train (router_aux_loss_coef)."""
        if not self.config.moe:  # a dense model: no auxiliary loss, and no walk over its modules per batch
            return BatchLoss(self.token_loss(batch))
        layers = [layer.mlp for layer in self.model.layers]
        coef = self.options.router_aux_loss_coef
        trains = bool(coef) and torch.is_grad_enabled()
        # A placeholder weight while the forward runs (non-zero: the layers route the gradient);
        # BatchLoss.backward sets the real one.
        balance = RouterBalance(batch.seq_ids >= 0, coef if trains else 0.0)
        with _balance_on(layers, balance):
            tokens = self.token_loss(batch)
        return BatchLoss(tokens, balance, layers, batch.labels if trains else None)

    def sequence_logprobs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probability, trained tokens) of each sample in the batch, two (S,) tensors in float32
        and long: the sum over a sample's trained tokens of log p(target). Samples are taken row by
        row, in the order of their seq_ids within a row; a sample without trained tokens gets 0 and 0.
        What the preference losses compare; packed and unpacked rows give the same values."""
        hidden = self.hidden_states(batch.input_ids, batch.position_ids, batch.seq_ids)
        B = batch.seq_ids.shape[0]
        real = batch.seq_ids >= 0
        width = int(batch.seq_ids.max()) + 1 if real.any() else 1
        key = torch.arange(B, device=hidden.device)[:, None] * width + batch.seq_ids  # one id per (row, sample)
        samples = torch.unique(key[real])  # sorted: row by row, seq_id order
        keep = batch.labels != IGNORE
        which = torch.searchsorted(samples, key[keep])
        logp = self.target_logprobs(hidden[keep], batch.labels[keep])
        total = torch.zeros(len(samples), device=hidden.device, dtype=torch.float32).index_add(0, which, logp)
        count = torch.zeros(len(samples), device=hidden.device, dtype=torch.long).index_add(
            0, which, torch.ones_like(which))
        return total, count

    def target_logprobs(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) (N,) float32 for final hidden states h (N, hidden) and their targets (N,), a
        chunk of tokens at a time (vocabulary-sized logits for one chunk only); with gradients each
        chunk's logits are computed again in backward rather than kept."""
        step = chunk_tokens(self.config.vocab_size)

        def chunk(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
            logits = self.lm_head(hc).float()
            return -F.cross_entropy(logits, tc, reduction="none")

        parts = []
        for i in range(0, h.shape[0], step):
            hc, tc = h[i:i + step], targets[i:i + step]
            if torch.is_grad_enabled() and hc.requires_grad:
                parts.append(torch.utils.checkpoint.checkpoint(chunk, hc, tc, use_reentrant=False))
            else:
                parts.append(chunk(hc, tc))
        return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, L, vocab) in float32."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, seq_ids)).float()
