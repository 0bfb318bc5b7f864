"""Several LoRA adapters on one base model, each row of a forward pass using its own (or none).

For serving: requests for different adapters, and for the bare base, are decoded together in one
pass. Each adapted projection holds every adapter's factors side by side, A (R, in) and B (out, R),
R the sum of the adapters' ranks; an adapter that leaves a projection out has zeros there. A pass
computes x A^T for all of them at once, keeps in each row only its own adapter's columns (times
that adapter's scaling), and multiplies by B^T: two thin products per projection, whatever mix of
adapters the rows ask for, no host synchronisation, and the weights read once (not gathered per
row), so a decoding step stays one CUDA graph. Rows that ask for no adapter get the base's output.
A DoRA adapter rescales each output row of its adapted weight: that is a gain per adapter and output
row, taken for each row of the pass by its adapter (1 for the base and for plain LoRA adapters).

Which adapter each row uses is set for one pass (`AdapterRows.selected`); outside a selection the
model computes as its base. Training never builds these layers: a trained adapter is lora.py's
`LoraLinear`. Adapters that change more than projections (modules trained whole, trainable tokens),
Mixtral's expert adapters, and adapters trained on an NF4 (QLoRA) base are refused, naming what is
in the way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import ModelError
from .lora import ADAPTER_LAYERS, TrainableTokens
from .peft_format import ADAPTER_WEIGHTS, BASE_QUANTIZATION, our_key, read_adapter_config


class AdapterRows:
    """The adapters of a model (1-based: 0 is the base) and which one each row of the current pass uses.

    owner[c], scale[c]: the adapter that column c of the stacked factors belongs to, and its scaling."""

    def __init__(self, names: list[str], owner: torch.Tensor, scale: torch.Tensor) -> None:
        self.names, self.owner, self.scale = names, owner, scale
        self.mask: torch.Tensor | None = None  # (rows, R): each row's scaling on its adapter's columns
        self.index: torch.Tensor | None = None  # (rows,): each row's adapter

    @contextmanager
    def selected(self, index: torch.Tensor) -> Iterator[None]:
        """Within the block, row b of a pass uses adapter index[b] (0: none). index (rows,) or (1,) for all
        rows; it is read on the device, so a captured graph replays with the index's new values."""
        self.mask, self.index = torch.where(index[:, None] == self.owner, self.scale, 0.0), index
        try:
            yield
        finally:
            self.mask = self.index = None

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        self.owner, self.scale = self.owner.to(device), self.scale.to(device, dtype)


class MultiLoraLinear(nn.Linear):
    """y = (x W^T + (x A^T * mask) B^T) * gain[row's adapter]: the frozen nn.Linear it replaces (same
    `weight`), plus every adapter's factors stacked and, if one is DoRA, the gains (K + 1, out)
    (buffers: nothing here trains)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, rows: AdapterRows,
                 gain: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", None)
        self.register_buffer("lora_A", a.to(base.weight), persistent=False)
        self.register_buffer("lora_B", b.to(base.weight), persistent=False)
        self.register_buffer("gain", None if gain is None else gain.to(base.weight), persistent=False)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight)
        mask = self.rows.mask
        if mask is None:
            return out
        if mask.shape[0] != 1 and (x.dim() != 3 or x.shape[0] != mask.shape[0]):
            raise RuntimeError(f"adapters chosen for {mask.shape[0]} rows, but the input is {tuple(x.shape)}")
        low = nn.functional.linear(x, self.lora_A)
        low = low * (mask[:, None] if x.dim() == 3 else mask).to(low.dtype)
        out = out + nn.functional.linear(low, self.lora_B)
        if self.gain is None:
            return out
        gain = self.gain[self.rows.index]
        return out * (gain[:, None] if x.dim() == 3 else gain).to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, adapters={len(self.rows.names)}, "
                f"R={self.lora_A.shape[0]}")


def adapter_rows(model: nn.Module) -> AdapterRows | None:
    """The model's several adapters (attach_adapters), or None."""
    return next((m.rows for m in model.modules() if isinstance(m, MultiLoraLinear)), None)


def attach_adapters(model: nn.Module, adapters: list[tuple[str, Path]]) -> AdapterRows:
    """Put the named adapter directories on a plain model (no LoRA layers), numbered 1.. in this order."""
    if any(isinstance(m, (*ADAPTER_LAYERS, TrainableTokens)) for m in model.modules()):
        raise ModelError("several adapters go on a plain base model, not on one that carries an adapter already")
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    factors: dict[str, list[tuple | None]] = {}  # module -> per adapter (A, B, DoRA magnitude or None)
    ranks, scales = [], []
    for k, (name, path) in enumerate(adapters):
        spec, pairs = _read_stackable(name, Path(path), model, linears)
        for module, pair in pairs.items():
            factors.setdefault(module, [None] * len(adapters))[k] = pair
        ranks.append(spec.r)
        scales.append(spec.scaling)
    owner = torch.cat([torch.full((r,), k + 1, dtype=torch.long) for k, r in enumerate(ranks)])
    scale = torch.cat([torch.full((r,), s) for r, s in zip(ranks, scales, strict=True)])
    ref = next(iter(linears.values())).weight
    rows = AdapterRows([n for n, _ in adapters], owner, scale)
    rows.to(ref.device, ref.dtype)
    for module, pairs in factors.items():
        base = linears[module]
        a = torch.cat([p[0] if p is not None else torch.zeros(r, base.in_features)
                       for p, r in zip(pairs, ranks, strict=True)])
        b = torch.cat([p[1] if p is not None else torch.zeros(base.out_features, r)
                       for p, r in zip(pairs, ranks, strict=True)], dim=1)
        parent, _, child = module.rpartition(".")
        layer = MultiLoraLinear(base, a, b, rows, _dora_gains(base.weight, pairs, scales))
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return rows


@torch.no_grad()
def _dora_gains(weight: torch.Tensor, pairs: list[tuple | None], scales: list[float]) -> torch.Tensor | None:
    """(K + 1, out) gains of one projection: DoRA's m / |W + s B A| row by row (in float32, as
    LoraLinear's), 1 for the base and for the adapters without DoRA here; None when none has DoRA."""
    if all(p is None or p[2] is None for p in pairs):
        return None
    gain = torch.ones(len(pairs) + 1, weight.shape[0])
    for k, (pair, s) in enumerate(zip(pairs, scales, strict=True)):
        if pair is not None and pair[2] is not None:
            a, b, m = (t.to(weight.device) for t in pair)
            gain[k + 1] = (m / torch.linalg.vector_norm(weight.float() + s * (b @ a), dim=1)).cpu()
    return gain


def _read_stackable(name: str, path: Path, model: nn.Module, linears: dict[str, nn.Linear]
                    ) -> tuple[object, dict[str, tuple]]:
    """(spec, {module: (A, B, DoRA magnitude or None)}) of one adapter directory, refused unless it is
    LoRA (or DoRA) on these layers only."""
    where = f"adapter {name} ({path})"
    spec, _ = read_adapter_config(path)
    reasons = [why for cond, why in [
        (spec.modules_to_save, f"it trains whole modules ({', '.join(spec.modules_to_save)})"),
        (spec.trainable_tokens, "it trains token rows (trainable_token_indices)"),
        ((path / BASE_QUANTIZATION).is_file(), "it was trained on an NF4 (QLoRA) base, not on this base's weights"),
    ] if cond]
    if reasons:
        raise ModelError(f"{where}: cannot be served beside other adapters: {'; '.join(reasons)}. "
                         "Merge it (mistral-tune merge) and serve the merged model on its own")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ModelError(f"{where}: no {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path / ADAPTER_WEIGHTS)).items():
        ours = our_key(model, key)
        module, _, part = ours.rpartition(".lora_")
        if part not in ("A.weight", "B.weight", "magnitude_vector") or module not in linears:
            layer = dict(model.named_modules()).get(module) if part else None
            why = (f"the base's {module} is a {type(layer).__name__}, not a plain float linear layer" if layer
                   else "it is not a LoRA factor of one of the base's projections (an adapter for another model, "
                   "or for Mixtral's experts, which are not supported here)")
            raise ModelError(f"{where}: tensor {key}: {why}")
        pairs.setdefault(module, {})[part] = tensor.float()
    out = {}
    for module, pair in sorted(pairs.items()):
        base = linears[module]
        if "magnitude_vector" in pair and not spec.use_dora:
            raise ModelError(f"{where}: {module} has a DoRA magnitude, but adapter_config.json says use_dora false")
        want = {"A.weight": (spec.r, base.in_features), "B.weight": (base.out_features, spec.r),
                **({"magnitude_vector": (base.out_features,)} if spec.use_dora else {})}
        for part, shape in want.items():
            got = tuple(pair[part].shape) if part in pair else None
            if got != shape:
                raise ModelError(f"{where}: {module}.lora_{part} has shape {got}, the base and adapter_config.json's "
                                 f"r={spec.r} imply {shape} (an adapter for another base, or per-module ranks?)")
        out[module] = (pair["A.weight"], pair["B.weight"], pair.get("magnitude_vector"))
    if not out:
        raise ModelError(f"{where}: holds no LoRA factors")
    return spec, out
