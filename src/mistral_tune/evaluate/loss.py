"""Held-out loss and perplexity on the assistant tokens of the user's evaluation set, base vs tuned."""

from __future__ import annotations

from ..data.formats import Chat
from ..errors import DataError
from .base import Evaluation, ModelPair, Result, perplexity, token_logprobs


def masked_nll(model, samples: list[tuple[list[int], list[bool]]], batch_tokens: int) -> float:
    """Mean negative log-likelihood per trained token (mask True on the tokens predicted)."""
    logps = token_logprobs(model, [ids for ids, _ in samples], batch_tokens, scored=[m for _, m in samples])
    return -float(sum(lp.sum() for lp in logps)) / max(sum(len(lp) for lp in logps), 1)


class LossEval(Evaluation):
    """Loss on the answers of conversations (assistant tokens only, as training counts them)."""

    name = "loss"

    def __init__(self, examples: list[tuple[str, Chat]], tokenizer, batch_tokens: int = 16384) -> None:
        super().__init__()
        self.samples = []
        for origin, ex in examples:
            try:
                self.samples.append(tokenizer.encode_chat(ex.messages, tools=ex.tools))
            except DataError as exc:
                raise DataError(f"{origin}: {exc}") from None
        self.batch_tokens = batch_tokens

    def run(self, pair: ModelPair) -> Result:
        base = self.base_once(pair, lambda m: masked_nll(m, self.samples, self.batch_tokens))
        with pair.side("tuned") as model:
            tuned = masked_nll(model, self.samples, self.batch_tokens)
        result = Result(self.name)
        result.metrics["nll"] = {"base": base, "tuned": tuned}
        result.metrics["ppl"] = {"base": perplexity(base) if base is not None else None, "tuned": perplexity(tuned)}
        result.notes.append(f"{len(self.samples)} conversations; loss per answer token")
        return result
