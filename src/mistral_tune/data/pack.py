"""Samples, packing them into rows, and batches of tensors.

A sample holds the model inputs and the next-token targets of one example (targets are -100 where
no loss is taken). A row holds one sample (no packing) or several (packing, best-fit decreasing);
every token carries the index of its sample so attention stays inside it, and position ids restart
at 0 for each sample.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..kernels.loss import IGNORE


@dataclass
class Sample:
    tokens: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    @classmethod
    def from_ids(cls, ids: list[int], mask: list[bool]) -> Sample:
        """Shift ids by one: input ids[:-1], target ids[1:] where the mask allows loss."""
        return cls(ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True)])


class SampleStore(Sequence):
    """Samples stored flat (ids, mask, offsets; e.g. memory-mapped from the token cache), indexed
    lazily: a million samples cost a few arrays, not a million Python lists. Items are `Sample`s."""

    def __init__(self, parts: list, part: np.ndarray, local: np.ndarray) -> None:
        self.parts = parts  # objects with .tokens .mask .offsets .trained arrays
        self.part = np.asarray(part, dtype=np.int32)
        self.local = np.asarray(local, dtype=np.int64)
        self.lengths = np.zeros(len(self.local), dtype=np.int64)  # len(Sample) = ids - 1
        self.trained = np.zeros(len(self.local), dtype=np.int64)
        for p_idx, p in enumerate(parts):
            sel = self.part == p_idx
            loc = self.local[sel]
            self.lengths[sel] = p.offsets[loc + 1] - p.offsets[loc] - 1
            self.trained[sel] = p.trained[loc]

    def __len__(self) -> int:
        return len(self.local)

    def ids_and_mask(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.parts[self.part[k]]
        i = self.local[k]
        a, b = int(p.offsets[i]), int(p.offsets[i + 1])
        return p.tokens[a:b], p.mask[a:b]

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.subset(np.arange(len(self))[k])
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        ids, mask = self.ids_and_mask(k)
        return Sample.from_ids(ids.tolist(), mask.astype(bool).tolist())

    def subset(self, indices) -> SampleStore:
        idx = np.asarray(indices, dtype=np.int64)
        out = SampleStore.__new__(SampleStore)
        out.parts, out.part, out.local = self.parts, self.part[idx], self.local[idx]
        out.lengths, out.trained = self.lengths[idx], self.trained[idx]
        return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, IGNORE where no loss
    position_ids: torch.Tensor  # (B, L) long, restarting at 0 per sample
    seq_ids: torch.Tensor  # (B, L) long, which sample of the row each token is; -1 for padding

    @property
    def n_trained(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def n_real(self) -> int:
        return int((self.seq_ids >= 0).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.labels, self.position_ids, self.seq_ids)))


class _MinCapacityTree:
    """Finds the fullest row that still fits a sample: a segment tree over remaining capacities."""

    def __init__(self, capacity: int) -> None:
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.count = [0] * (2 * self.size)
        self.rows: list[list[int]] = [[] for _ in range(capacity + 1)]

    def add(self, cap: int, row: int) -> None:
        self.rows[cap].append(row)
        i = cap + self.size
        while i:
            self.count[i] += 1
            i //= 2

    def pop_smallest_at_least(self, need: int) -> tuple[int, int] | None:
        """Remove and return (capacity, row) with the smallest capacity >= need, if any."""
        if need >= self.size:
            return None
        # Walk from the leaf `need` rightwards over the tree for the first non-empty capacity.
        i = need + self.size
        if self.count[i] == 0:
            while True:
                if i % 2 == 0 and self.count[i + 1] > 0:
                    i += 1
                    break
                i //= 2
                if i <= 1:
                    return None
            while i < self.size:
                i = 2 * i if self.count[2 * i] > 0 else 2 * i + 1
        cap = i - self.size
        row = self.rows[cap].pop()
        j = i
        while j:
            self.count[j] -= 1
            j //= 2
        return cap, row


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: group sample indices into rows whose total length is <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    tree = _MinCapacityTree(capacity)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample of {n} tokens does not fit a row of {capacity}")
        found = tree.pop_smallest_at_least(n)
        if found is None:
            rows.append([i])
            cap, row = capacity, len(rows) - 1
        else:
            cap, row = found
            rows[row].append(i)
        if cap - n > 0:
            tree.add(cap - n, row)
    return rows


def sample_lengths(samples) -> list[int]:
    lengths = getattr(samples, "lengths", None)  # a SampleStore knows them without building samples
    return lengths.tolist() if lengths is not None else [len(s) for s in samples]


def make_rows(samples, capacity: int, packing: bool) -> list[list[int]]:
    if packing:
        return pack_rows(sample_lengths(samples), capacity)
    return [[i] for i in range(len(samples))]


def packing_stats(lengths: list[int], capacity: int) -> tuple[int, float]:
    """(rows, share of padding) when samples of these lengths are packed into rows of capacity."""
    if not lengths:
        return 0, 0.0
    rows = pack_rows(lengths, capacity)
    return len(rows), 1.0 - sum(lengths) / (len(rows) * capacity)


def collate(samples: list[Sample], rows: list[list[int]], pad_to: int | None = None, pad_id: int = 0,
            pad_multiple: int = 1, min_rows: int = 0) -> Batch:
    """Tensors for the given rows; rows are padded to pad_to, or else to the longest row rounded up
    to a multiple of pad_multiple, and the batch to min_rows rows with rows of padding (few
    distinct shapes keep compiled kernels from recompiling; padding carries no loss)."""
    rows = list(rows) + [[]] * (min_rows - len(rows))
    known = getattr(samples, "lengths", None)  # a SampleStore: no need to build each sample twice
    lengths = [sum(int(known[i]) if known is not None else len(samples[i]) for i in row) for row in rows]
    L = pad_to or -(-max(lengths) // pad_multiple) * pad_multiple
    B = len(rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    seq_ids = torch.full((B, L), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for k, i in enumerate(row):
            s = samples[i]
            n = len(s)
            input_ids[b, start:start + n] = torch.tensor(s.tokens)
            labels[b, start:start + n] = torch.tensor(s.labels)
            position_ids[b, start:start + n] = torch.arange(n)
            seq_ids[b, start:start + n] = k
            start += n
        # Padding gets positions too (never attended to by real tokens: its seq id is -1).
        position_ids[b, start:] = torch.arange(L - start)
    return Batch(input_ids, labels, position_ids, seq_ids)


def length_grouped(order: list[int], lengths: list[int], group: int, rng: random.Random) -> list[int]:
    """Reorder rows so that each run of `group` consecutive rows (one micro-batch) has similar lengths:
    cut the order into mega-batches of 64 groups, sort each by length, then shuffle the groups so
    that the batch order stays random. Only the last group may be short, and it stays last, so
    groups keep starting at multiples of `group` (ranks take their micro-batches that way)."""
    mega = 64 * group
    order = [j for k in range(0, len(order), mega) for j in sorted(order[k:k + mega], key=lambda j: -lengths[j])]
    groups = [order[k:k + group] for k in range(0, len(order), group)]
    tail = [groups.pop()] if groups and len(groups[-1]) < group else []
    rng.shuffle(groups)
    return [j for g in groups + tail for j in g]


def group_rows(rows: list[list[int]], micro_batch_size: int, shuffle_seed: int | None,
               row_lengths: list[int] | None = None) -> list[list[list[int]]]:
    """Rows grouped into micro-batches, shuffled by seed (None keeps the order); with row_lengths
    (group_by_length), rows of similar length share a micro-batch (see length_grouped)."""
    order = list(range(len(rows)))
    rng = random.Random(shuffle_seed)
    if shuffle_seed is not None:
        rng.shuffle(order)
    if row_lengths is not None:
        order = length_grouped(order, row_lengths, micro_batch_size, rng)
    return [[rows[j] for j in order[k:k + micro_batch_size]] for k in range(0, len(order), micro_batch_size)]
