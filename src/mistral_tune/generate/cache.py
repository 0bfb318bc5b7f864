"""The keys and values of every sequence being decoded, in one preallocated buffer per layer.

`SlotCache` holds `slots` sequences of up to `capacity` tokens each: (slots, kv heads, capacity,
head_dim) per layer, allocated once, so a decoding step reads and writes fixed addresses and can be
replayed as a CUDA graph. The model's attention hands its new keys and values to `attend`, which
writes them into the cache and attends over it as the engine has set up the pass:

- `prefill(rows, start, length)`: rows of `length` new tokens (right-padded), written at positions
  start.. of their slots, attending causally to what the slot holds before them (`start` > 0: a
  prefix kept from an earlier request);
- `decode(batch, keys, positions)`: one new token in each of the slots 0..batch-1, at the slot's own
  position, attending to the first `keys` positions with everything past its position masked.

Padding costs nothing but its own slot: a row's keys beyond its length are never read unmasked, and
are overwritten as the row grows.
"""

from __future__ import annotations

import torch

from ..kernels.attention import CAUSAL, attend


class SlotCache:
    def __init__(self, config, slots: int, capacity: int, device: torch.device | str) -> None:
        self.slots, self.capacity, self.device = slots, capacity, torch.device(device)
        self.n_kv, self.head_dim = config.num_key_value_heads, config.head_dim
        self.windows = [config.window(i) for i in range(config.num_hidden_layers)]
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._pass: tuple = ()

    def _allocate(self, like: torch.Tensor) -> None:
        """The buffers, in the dtype of the first keys written (the model's compute dtype)."""
        if self.k and self.k[0].dtype == like.dtype:
            return
        shape = (self.slots, self.n_kv, self.capacity, self.head_dim)
        self.k = [torch.zeros(shape, dtype=like.dtype, device=self.device) for _ in self.windows]
        self.v = [torch.zeros(shape, dtype=like.dtype, device=self.device) for _ in self.windows]

    # ------------------------------------------------------------------ set by the engine per pass

    def prefill(self, rows: torch.Tensor, start: int, length: int) -> None:
        if start + length > self.capacity:
            raise ValueError(f"{start + length} tokens do not fit a cache of {self.capacity}")
        self._pass = ("prefill", rows, start, length)

    def decode(self, batch: int, keys: int, positions: torch.Tensor) -> None:
        """positions (batch,): where each slot's new token goes (its length so far)."""
        kpos = torch.arange(keys, device=positions.device)[None]
        pos = positions[:, None]
        masks = {}
        for w in set(self.windows):
            m = kpos <= pos
            masks[w] = (m if w is None else m & (pos - kpos < w))[:, None, None, :]
        self._pass = ("decode", torch.arange(batch, device=positions.device), positions, keys, masks)

    # ------------------------------------------------------------------ called by the attention layers

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor:
        self._allocate(k)
        if self._pass[0] == "prefill":
            return self._attend_prefill(layer, q, k, v, scale)
        return self._attend_decode(layer, q, k, v, scale)

    def _attend_prefill(self, layer, q, k, v, scale) -> torch.Tensor:
        _, rows, start, length = self._pass
        kc, vc = self.k[layer], self.v[layer]
        kc[rows, :, start:start + length] = k
        vc[rows, :, start:start + length] = v
        window = self.windows[layer]
        if start == 0 and (window is None or window >= length):
            return attend(q, k, v, CAUSAL, scale)
        qpos = torch.arange(start, start + length, device=q.device)[:, None]
        kpos = torch.arange(start + length, device=q.device)[None]
        mask = kpos <= qpos
        if window is not None:
            mask &= qpos - kpos < window
        return attend(q, kc[rows, :, :start + length], vc[rows, :, :start + length], mask[None, None], scale)

    def _attend_decode(self, layer, q, k, v, scale) -> torch.Tensor:
        """Grouped-query attention of one query per row, reading each cached key once: the query heads
        that share a key head are one matrix against it."""
        _, rows, positions, keys, masks = self._pass
        kc, vc = self.k[layer], self.v[layer]
        kc[rows, :, positions] = k[:, :, 0]
        vc[rows, :, positions] = v[:, :, 0]
        B, H, _, D = q.shape
        qg = q.reshape(B, self.n_kv, H // self.n_kv, D)
        scores = (qg @ kc[:B, :, :keys].transpose(-1, -2)).float() * scale
        scores = scores.masked_fill(~masks[self.windows[layer]], float("-inf"))
        out = torch.softmax(scores, dim=-1).to(vc.dtype) @ vc[:B, :, :keys]
        return out.reshape(B, H, 1, D)

    # ------------------------------------------------------------------ moving sequences between slots

    def copy(self, source: int, target: int, length: int) -> None:
        """Slot target gets slot source's first `length` positions."""
        for kc, vc in zip(self.k, self.v, strict=True):
            kc[target, :, :length] = kc[source, :, :length]
            vc[target, :, :length] = vc[source, :, :length]


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """The keys and values one token holds in the cache, over every layer."""
    size = torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * size


def cached_logits(model, ids: torch.Tensor, chunks: list[tuple[int, int]]) -> torch.Tensor:
    """Float32 logits of ids (B, L) computed through a SlotCache chunk by chunk ((start, end) pairs
    covering 0..L in order): the first as a prefill, a longer later chunk as a prefill continuing the
    cache, a one-token chunk as a decoding step. They equal one forward over the whole of ids; the
    tests and the GPU benchmark's parity check compare the two."""
    B, L = ids.shape
    cache = SlotCache(model.config, B, L, ids.device)
    rows = torch.arange(B, device=ids.device)
    out = []
    for start, end in chunks:
        positions = torch.arange(start, end, device=ids.device).expand(B, end - start)
        if end - start == 1 and start > 0:
            cache.decode(B, end, positions[:, 0])
        else:
            cache.prefill(rows, start, end - start)
        out.append(model.lm_head(model.hidden_states(ids[:, start:end], positions, kv_cache=cache)).float())
    return torch.cat(out, dim=1)
