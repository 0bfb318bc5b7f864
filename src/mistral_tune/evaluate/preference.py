"""Preference evaluation: the log-probabilities a model gives each sample of preference units
(data/preference.py: chosen and rejected answers side by side), and on held-out pairs the share the
model prefers the chosen answer of (its summed log-probability is the higher), next to the reference
(the starting model) and the preference loss. PreferenceEval puts that accuracy in the evaluation
report, beside the forgetting and task metrics.

The reference's log-probabilities are these too, measured once with the starting weights: the
training loop keeps them in memory (4 bytes a sample) instead of a frozen second model or a pass
with the adapters off at every step.
"""

from __future__ import annotations

import torch

from ..data.pack import collate, group_rows
from .base import Evaluation, ModelPair, Result


@torch.no_grad()
def sample_logprobs(model, samples, rows: list[list[int]], micro_batch_size: int, device: torch.device,
                    autocast_dtype: torch.dtype | None = None, padding: dict | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability, trained tokens) of every sample that `rows` hold, as (N,) tensors on the CPU
    indexed by sample (float32 and long), in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    logp = torch.zeros(len(samples), dtype=torch.float32)
    count = torch.zeros(len(samples), dtype=torch.long)
    try:
        for group in group_rows(rows, micro_batch_size, None):
            batch = collate(samples, group, **(padding or {})).to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                lp, n = model.sequence_logprobs(batch)
            idx = torch.tensor([i for row in group for i in row])
            logp[idx], count[idx] = lp.float().cpu(), n.cpu()
    finally:
        model.train(was_training)
    return logp, count


def prefers_chosen(logp: torch.Tensor) -> float:
    """Share of units (chosen, rejected side by side in `logp`) whose chosen answer has the higher
    log-probability."""
    pairs = logp.view(-1, 2)
    return float((pairs[:, 0] > pairs[:, 1]).double().mean()) if len(pairs) else 0.0


def judged_right(logp: torch.Tensor, ref: torch.Tensor, desirable: list[bool]) -> float:
    """KTO's held-out accuracy: share of judged answers whose log-ratio to the reference has the sign
    of their label (up for desirable, down for undesirable). `logp`/`ref` hold units (judged answer,
    mismatched answer)."""
    ratio = (logp.view(-1, 2)[:, 0] - ref.view(-1, 2)[:, 0])
    labels = torch.tensor(desirable, dtype=torch.bool)
    return float(((ratio > 0) == labels).double().mean()) if len(labels) else 0.0


class PreferenceEval(Evaluation):
    """Held-out preference units (a preference run's held-out set, rows as the loop makes them) scored by
    the tuned model. Pairs: accuracy (share of pairs whose chosen answer has the higher log-probability)
    and margin (mean log-probability of chosen minus rejected, nats); KTO: accuracy (share of judged
    answers whose log-ratio to the reference has their label's sign). The base side is the starting
    model, the reference the run measured (with init_from: the base with that run's adapter), not the
    base with adapters off; without a reference, the pair's base."""

    name = "preference"

    def __init__(self, samples, rows: list[list[int]], micro_batch_size: int, reference: torch.Tensor | None = None,
                 desirable: list[bool] | None = None, padding: dict | None = None) -> None:
        super().__init__()
        self.samples, self.rows, self.micro_batch_size = samples, rows, micro_batch_size
        self.reference, self.desirable, self.padding = reference, desirable, padding

    def _logprobs(self, model, device) -> torch.Tensor:
        return sample_logprobs(model, self.samples, self.rows, self.micro_batch_size, device, None, self.padding)[0]

    def run(self, pair: ModelPair) -> Result:
        result = Result(self.name)
        with pair.side("tuned") as model:
            tuned = self._logprobs(model, pair.device)
        if self.desirable:  # KTO: judged against the reference, which has no accuracy of its own
            if self.reference is not None:
                result.metrics["accuracy"] = {"tuned": judged_right(tuned, self.reference, self.desirable)}
            result.notes.append(f"{len(self.desirable)} held-out judged answers (KTO)")
            return result
        base = self.reference
        if base is None:
            base = self.base_once(pair, lambda model: self._logprobs(model, pair.device))
        for metric, measure in (("accuracy", prefers_chosen), ("margin", mean_margin)):
            result.metrics[metric] = {"base": measure(base) if base is not None else None, "tuned": measure(tuned)}
        result.notes.append(f"{len(tuned) // 2} held-out pairs; base: "
                            + ("the starting model (the reference)" if self.reference is not None else "adapters off"))
        return result


def mean_margin(logp: torch.Tensor) -> float:
    """Mean over units (chosen, rejected side by side) of the chosen answer's log-probability minus the
    rejected one's."""
    pairs = logp.double().view(-1, 2)
    return float((pairs[:, 0] - pairs[:, 1]).mean()) if len(pairs) else 0.0
