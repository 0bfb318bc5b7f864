"""The bad-step guard: which optimizer steps to skip, when to roll back, and when to give up.

A step is bad when its loss or gradient norm is not finite, or when its loss is a spike: more than
`zscore` robust standard deviations above the median of the recent good losses (the robust standard
deviation is 1.4826 x the median absolute deviation, so one earlier outlier cannot hide the next).
A bad step is skipped: no optimizer update, so weights and optimizer state stay as they were.
After `rollback_after` bad steps in a row the loop rolls back to the last checkpoint written before
the streak began and lowers the learning rate; after `max_rollbacks` it stops with a report.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

MIN_HISTORY = 8  # good losses needed before spikes are judged (early losses fall fast)


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


class StepGuard:
    def __init__(self, zscore: float | None, window: int, rollback_after: int, max_rollbacks: int,
                 lr_factor: float) -> None:
        self.zscore = zscore
        self.rollback_after = rollback_after
        self.max_rollbacks = max_rollbacks
        self.lr_factor = lr_factor
        self.recent: deque[float] = deque(maxlen=window)
        self.consecutive = 0
        self.streak_start: int | None = None  # first step of the current run of bad steps
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.events: list[dict] = []  # every skipped step and rollback, for the report

    @classmethod
    def from_config(cls, cfg) -> StepGuard:
        # GRPO's loss is centred on zero by its group-normalised advantages: its size says nothing about
        # the step, and any step with a signal in it would look like a spike. Non-finite steps still stop.
        zscore = None if getattr(cfg, "method", "sft") == "grpo" else cfg.bad_step_zscore
        return cls(zscore, cfg.bad_step_window, cfg.bad_step_rollback_after,
                   cfg.bad_step_max_rollbacks, cfg.bad_step_lr_factor)

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Why this step must be skipped, or None when it may be taken."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm ({grad_norm})"
        if self.zscore is not None and len(self.recent) >= MIN_HISTORY:
            median = statistics.median(self.recent)
            mad = statistics.median(abs(x - median) for x in self.recent)
            # Floor the spread: on near-constant losses a MAD of ~0 would call any wiggle a spike.
            spread = max(1.4826 * mad, 0.01 * abs(median), 1e-6)
            z = (loss - median) / spread
            if z > self.zscore:
                return (f"loss spike ({loss:.4g}: robust z-score {z:.1f} > {self.zscore:g} over the last "
                        f"{len(self.recent)} good steps, median {median:.4g})")
        return None

    def record(self, step: int, loss: float, grad_norm: float, reason: str | None) -> None:
        if reason is None:
            self.recent.append(loss)
            self.consecutive = 0
            self.streak_start = None
            return
        self.consecutive += 1
        if self.streak_start is None:
            self.streak_start = step
        self.events.append({"step": step, "skipped": reason, "loss": _num(loss), "grad_norm": _num(grad_norm)})

    @property
    def needs_rollback(self) -> bool:
        return self.consecutive >= self.rollback_after

    @property
    def may_roll_back(self) -> bool:
        return self.rollbacks < self.max_rollbacks

    def rolled_back(self, step: int, to_step: int) -> None:
        self.rollbacks += 1
        self.lr_scale *= self.lr_factor
        self.consecutive = 0
        self.streak_start = None
        self.events.append({"step": step, "rollback_to": to_step, "lr_scale": self.lr_scale})

    def report(self, why: str) -> str:
        skipped = [e for e in self.events if "skipped" in e]
        kinds: dict[str, int] = {}
        for e in skipped:
            kind = e["skipped"].split(" (")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        rollbacks = [e for e in self.events if "rollback_to" in e]
        parts = [why, f"{len(skipped)} skipped step(s) ({', '.join(f'{n} {k}' for k, n in kinds.items())})"]
        if rollbacks:
            parts.append(f"{len(rollbacks)} rollback(s): "
                         + ", ".join(f"at step {e['step']} to step {e['rollback_to']}" for e in rollbacks)
                         + f"; learning rate now x{self.lr_scale:g}")
        if skipped:
            parts.append(f"last bad step {skipped[-1]['step']}: {skipped[-1]['skipped']}")
        return "; ".join(parts)

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "consecutive": self.consecutive, "streak_start": self.streak_start,
                "rollbacks": self.rollbacks, "lr_scale": self.lr_scale, "events": self.events}

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(state["recent"])
        self.consecutive = state["consecutive"]
        self.streak_start = state["streak_start"]
        self.rollbacks = state["rollbacks"]
        self.lr_scale = state["lr_scale"]
        self.events = list(state["events"])
