"""Samples, packing them into rows, and batches of tensors.

A sample holds the model inputs and the next-token targets of one example (targets are -100 where
no loss is taken). A row holds one sample (no packing) or several (packing, best-fit decreasing);
every token carries the index of its sample so attention stays inside it, and position ids restart
at 0 for each sample.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE = -100


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
        return cls(ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])])


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


def make_rows(samples: list[Sample], capacity: int, packing: bool) -> list[list[int]]:
    if packing:
        return pack_rows([len(s) for s in samples], capacity)
    return [[i] for i in range(len(samples))]


def collate(samples: list[Sample], rows: list[list[int]], pad_to: int | None = None, pad_id: int = 0,
            pad_multiple: int = 1) -> Batch:
    """Tensors for the given rows; rows are padded to pad_to, or else to the longest row rounded up
    to a multiple of pad_multiple (few distinct shapes keep compiled kernels from recompiling)."""
    lengths = [sum(len(samples[i]) for i in row) for row in rows]
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


def group_rows(rows: list[list[int]], micro_batch_size: int, shuffle_seed: int | None) -> list[list[list[int]]]:
    """Rows grouped into micro-batches, shuffled by seed (None keeps the order)."""
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    return [[rows[j] for j in order[k:k + micro_batch_size]] for k in range(0, len(order), micro_batch_size)]
