"""The row stream and the step arithmetic: which rows each micro-batch of each process takes, how many
optimizer steps a run has, how rows are padded, and the counters a checkpoint carries (Progress)."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import Config
from ..data.pack import length_grouped
from ..errors import CheckpointError


def finite(x: float) -> float | None:
    """x, or None where it is NaN or infinite (JSON holds no such numbers)."""
    return x if math.isfinite(x) else None


class RowStream:
    """The training rows in a per-epoch shuffled order (seed + epoch), taken a micro-batch at a time.

    Its whole state is the position (epoch, offset into that epoch's order): a resumed run goes on
    with exactly the rows an uninterrupted run would see, without replaying. The micro-batches are
    cut from the order one after another (the last of an epoch may be short; the next starts the
    next epoch), and each round of `world_size` of them gives rank r the r-th: whatever the number
    of processes, a step with micro_batch x accumulation x world_size rows trains on the same rows,
    and within an epoch every row is seen exactly once. For one process the micro-batches equal
    group_rows(rows, size, seed + epoch).
    """

    def __init__(self, rows: list[list[int]], seed: int, rank: int = 0, world_size: int = 1,
                 row_lengths: list[int] | None = None, group_size: int = 1) -> None:
        self.rows, self.seed, self.rank, self.world_size = rows, seed, rank, world_size
        self.row_lengths, self.group_size = row_lengths, group_size  # group_by_length
        self.epoch, self.offset = 0, 0
        self._order: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.rows)))
            rng = random.Random(self.seed + epoch)
            rng.shuffle(order)
            if self.row_lengths is not None:
                order = length_grouped(order, self.row_lengths, self.group_size, rng)
            self._order = (epoch, order)
        return self._order[1]

    def next(self, size: int) -> tuple[int, list[list[int]]]:
        """(epoch, rows) of this rank's next micro-batch of at most `size` rows; the epoch is that of
        the round's last micro-batch, the same on every rank."""
        mine: list[list[int]] = []
        for r in range(self.world_size):
            order, epoch = self.order(self.epoch), self.epoch
            if r == self.rank:
                mine = [self.rows[j] for j in order[self.offset:self.offset + size]]
            self.offset += size
            if self.offset >= len(order):
                self.epoch, self.offset = self.epoch + 1, 0
        return epoch, mine

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "rows": len(self.rows)}

    def load_state_dict(self, state: dict, source: Path) -> None:
        if state["rows"] != len(self.rows) or state["seed"] != self.seed:
            raise CheckpointError(f"{source}: data position is for {state['rows']} rows shuffled with seed "
                                  f"{state['seed']}, this run has {len(self.rows)} rows and seed {self.seed}")
        self.epoch, self.offset = state["epoch"], state["offset"]


@dataclass
class Progress:
    """Counters a checkpoint carries besides weights, optimizer, data position and guard."""

    micro_batch_size: int  # may be smaller than the config's after auto_micro_batch
    gradient_accumulation_steps: int
    world_size: int = 1
    step: int = 0
    tokens_seen: int = 0
    train_loss: float = float("nan")
    eval_loss: float | None = None

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    def rescale_to(self, world_size: int, source: Path, echo) -> None:
        """Go on with another number of processes: the same rows per step, through the accumulation."""
        if world_size == self.world_size:
            return
        rows, per_pass = self.rows_per_step, self.micro_batch_size * world_size
        if rows % per_pass:
            raise CheckpointError(
                f"{source}: written by {self.world_size} process(es) with {rows} rows per step (micro_batch_size "
                f"{self.micro_batch_size} x gradient_accumulation_steps {self.gradient_accumulation_steps}); "
                f"{world_size} processes cannot take {rows} rows per step. Use a number of processes that divides "
                f"{rows // self.micro_batch_size}")
        echo(f"resuming {self.world_size} process(es)' run on {world_size}: gradient_accumulation_steps "
             f"{self.gradient_accumulation_steps} -> {rows // per_pass}, the same {rows} rows per step")
        self.gradient_accumulation_steps, self.world_size = rows // per_pass, world_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train_loss"] = finite(self.train_loss)
        d["eval_loss"] = finite(self.eval_loss) if self.eval_loss is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Progress:
        return cls(**{**d, "train_loss": float("nan") if d["train_loss"] is None else d["train_loss"]})


def count_steps(n_rows: int, micro_batch_size: int, rows_per_step: int, num_epochs: float,
                max_steps: int | None = None) -> int:
    """Optimizer steps of a run: max_steps, else num_epochs passes over the rows."""
    micro_per_epoch = math.ceil(n_rows / micro_batch_size)
    per_epoch = max(1, micro_per_epoch * micro_batch_size // rows_per_step)
    return max_steps or max(1, math.ceil(per_epoch * num_epochs))


def one_sample_rows(cfg: Config, model_cfg) -> bool:
    """Whether the fast path's rows hold one sample each that no sliding window cuts: no packing,
    and rows no longer than the window. Such rows take the causal kernel and vary in length."""
    window = model_cfg.sliding_window
    return not cfg.sample_packing and (window is None or cfg.sequence_len <= window)


def row_padding(cfg: Config, fast: bool, one_sample: bool, micro_batch_size: int) -> dict:
    """How collate pads rows: packed rows to sequence_len, others to the longest row. The fast path's
    compiled layers make a graph per shape, so there rows of one sample (compiled for dynamic
    shapes) round up to a multiple of 128, rows a sliding window cuts go to sequence_len too, and a
    short micro-batch gets rows of padding."""
    if not fast:
        return {"pad_to": cfg.sequence_len} if cfg.sample_packing else {}
    rows = {"pad_multiple": 128} if one_sample else {"pad_to": cfg.sequence_len}
    return {**rows, "min_rows": micro_batch_size}

