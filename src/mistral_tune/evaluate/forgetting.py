"""Forgetting: did the fine-tune cost general ability?

Two measures on a general reference set the user names (any data source the training data takes):
the perplexity of base and tuned on it, and the KL divergence of the tuned model's next-token
distribution from the base's, KL(tuned || base) in nats per token, both computed on the same
batch (adapters on, then off). Thresholds turn into warnings in the report and the run log.
lm-evaluation-harness tasks, when installed, are in lm_eval.py.
"""

from __future__ import annotations

from .base import (
    CHUNK,
    Evaluation,
    ModelPair,
    Result,
    length_batches,
    log_softmax_logits,
    perplexity,
    right_padded,
    token_logprobs,
)


def mean_nll(model, seqs: list[list[int]], batch_tokens: int) -> float:
    logps = token_logprobs(model, seqs, batch_tokens)
    return -float(sum(lp.sum() for lp in logps)) / max(sum(len(lp) for lp in logps), 1)


def kl_per_token(pair: ModelPair, seqs: list[list[int]], batch_tokens: int) -> float:
    """Mean over all predicted positions of KL(p_tuned || p_base) = sum_v p_t(v) (log p_t(v) - log p_b(v))."""
    total, count = 0.0, 0
    for group in length_batches([len(s) for s in seqs], batch_tokens):
        ids, real = right_padded([seqs[i] for i in group], pair.device)
        with pair.side("tuned") as model:
            hidden_t = model.hidden_states(ids)
        with pair.side("base") as model:
            hidden_b = model.hidden_states(ids)
        for start in range(0, ids.shape[1], CHUNK):
            end = start + CHUNK
            with pair.side("tuned") as model:
                logp_t = log_softmax_logits(model, hidden_t[:, start:end])
            with pair.side("base") as model:
                logp_b = log_softmax_logits(model, hidden_b[:, start:end])
            kl = (logp_t.exp() * (logp_t - logp_b)).sum(-1)
            mask = real[:, start:end]
            total += float(kl[mask].sum())
            count += int(mask.sum())
    return total / max(count, 1)


class ForgettingEval(Evaluation):
    name = "forgetting"

    def __init__(self, seqs: list[list[int]], cfg, source: str, batch_tokens: int = 16384) -> None:
        super().__init__()
        self.seqs, self.cfg, self.source, self.batch_tokens = seqs, cfg, source, batch_tokens

    def run(self, pair: ModelPair) -> Result:
        result = Result(self.name)
        base = self.base_once(pair, lambda m: mean_nll(m, self.seqs, self.batch_tokens))
        with pair.side("tuned") as model:
            tuned = mean_nll(model, self.seqs, self.batch_tokens)
        result.metrics["ppl"] = {"base": perplexity(base) if base is not None else None, "tuned": perplexity(tuned)}
        n_tokens = sum(len(s) - 1 for s in self.seqs)
        result.notes.append(f"{len(self.seqs)} texts from {self.source}, {n_tokens:,} predicted tokens")
        if base is None:
            result.notes.append("no base model: KL and the perplexity change need one")
            return result
        increase = perplexity(tuned) / perplexity(base) - 1
        result.metrics["ppl_increase"] = {"tuned": increase}
        limit = self.cfg.max_ppl_increase
        if limit is not None and increase > limit:
            result.warnings.append(f"perplexity on {self.source} rose {100 * increase:.1f}% over the base's "
                                   f"(limit {100 * limit:.0f}%)")
        if self.cfg.kl:
            kl = kl_per_token(pair, self.seqs, self.batch_tokens)
            result.metrics["kl"] = {"tuned": kl}
            if self.cfg.max_kl is not None and kl > self.cfg.max_kl:
                result.warnings.append(f"KL from base rose to {kl:.3g} nats/token (limit {self.cfg.max_kl:g})")
        return result
