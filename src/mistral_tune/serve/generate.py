"""Token generation with a KV cache: greedy or sampled (temperature, top-p), one prompt or a batch.

`generate` streams one sequence; `generate_batch` runs several prompts together (left-padded:
padding is its own sample in the prefill and a masked key while decoding, so each row's tokens
equal what it would get alone); `CachedGenerator` keeps one conversation's cache between chat
turns and reuses the longest common prefix; `TextStream` turns ids into text deltas for
streaming without splitting a multi-byte character; `StopMatcher` cuts streamed text at stop
strings; `AnswerText` does both for one answer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import torch

from ..models.mistral import KVCache, MistralForCausalLM


@torch.no_grad()
def generate(
    model: MistralForCausalLM,
    prompt_ids: list[int],
    max_new_tokens: int = 64,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    cache: KVCache | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time; stops at eos_id (not yielded) or max_new_tokens.

    With a `cache` already holding a prefix of the sequence, prompt_ids are only the tokens after
    it; the cache is extended in place (CachedGenerator relies on that).
    """
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    cache = cache if cache is not None else KVCache(model.config.num_hidden_layers)
    ids = torch.tensor([prompt_ids], device=device)
    try:
        for _ in range(max_new_tokens):
            logits = _last_logits(model, ids, kv_cache=cache)[0]
            token = int(_pick(logits[None], temperature, top_p, generator)[0])
            if token == eos_id:
                return
            yield token
            ids = torch.tensor([[token]], device=device)
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_batch(
    model: MistralForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    every: Callable[[bool], bool] = bool,
) -> list[list[int]]:
    """New token ids for each prompt (eos not included), decoded together in one batch. every: whether
    every process that shares the model's forward passes has finished all its rows (sharded weights:
    each process decodes until all have; see ModelPair)."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    B, longest = len(prompts), max(len(p) for p in prompts)
    pad = [longest - len(p) for p in prompts]
    ids = torch.tensor([[0] * n + p for n, p in zip(pad, prompts, strict=True)], device=device)
    real = torch.tensor([[False] * n + [True] * len(p) for n, p in zip(pad, prompts, strict=True)], device=device)
    # Positions count from each prompt's first real token; padding is sample 0, the prompt sample 1.
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    cache = KVCache(model.config.num_hidden_layers)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    try:
        logits = _last_logits(model, ids, position_ids=positions, seq_ids=real.long(), kv_cache=cache)
        next_pos = positions[:, -1] + 1
        key_mask = real
        for step in range(max_new_tokens):
            tokens = _pick(logits, temperature, top_p, generator).to(device)
            finished = tokens == eos_id if eos_id is not None else torch.zeros_like(done)
            for i in range(B):
                if not done[i] and not finished[i]:
                    out[i].append(int(tokens[i]))
            done |= finished
            if step + 1 == max_new_tokens or every(bool(done.all())):
                break
            key_mask = torch.cat([key_mask, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
            logits = model(tokens[:, None], position_ids=next_pos[:, None], kv_cache=cache, key_mask=key_mask)[:, -1]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return out


def _last_logits(model: MistralForCausalLM, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """(B, vocab) logits of each row's last position only: a prompt's other positions would cost a
    vocabulary-sized product each and are never read."""
    return model.lm_head(model.hidden_states(ids, **kwargs)[:, -1]).float()


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator, top_k: int = 0) -> torch.Tensor:
    """One token per row of (B, vocab) logits; top_k > 0 keeps only the k most likely (ties at the
    k-th value kept too) before top_p.

    Any temperature > 0 and top_p > 0 is usable: in float64 and measured from the row's maximum,
    scaled logits are at most 0 (no overflow), and the most likely token always keeps its share,
    so a temperature or top_p too small to leave other tokens any probability samples greedily.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.double()
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        keep[:, 0] = True  # the most likely token, however small top_p is
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0]


class CachedGenerator:
    """One conversation's KV cache, reused across turns where the new prompt shares a prefix.

    mistral-common may re-render earlier turns (v2/v3 move the system prompt to the last user
    message), so the reusable part is the longest common prefix of the cached and new ids.
    """

    def __init__(self, model: MistralForCausalLM) -> None:
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.cache = KVCache(self.model.config.num_hidden_layers)
        self.ids: list[int] = []

    def stream(self, prompt_ids: list[int], **kwargs) -> Iterator[int]:
        common = 0
        for a, b in zip(self.ids, prompt_ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt_ids) - 1)  # feed at least one token to get logits
        self.cache.crop(common)
        self.ids = list(prompt_ids)
        try:
            for token in generate(self.model, prompt_ids[common:], cache=self.cache, **kwargs):
                self.ids.append(token)
                yield token
        finally:
            # The last token generated may not have been fed (max tokens, or the caller stopped):
            # ids must describe exactly what the cache holds.
            self.ids = self.ids[: self.cache.length]

    @property
    def cached_tokens(self) -> int:
        return self.cache.length


class TextStream:
    """Text deltas for a growing list of ids; holds back an incomplete multi-byte character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return delta


class StopMatcher:
    """Finds the first stop string in text that arrives in pieces, holding back what may begin one.

    Each stop string has a Knuth-Morris-Pratt automaton whose state is the length of the longest
    prefix of the stop string that ends the text so far; that is also how much text must be held
    back. Work per piece is proportional to the piece's length (amortized), however long the stop
    strings are, and the result does not depend on how the text is cut into pieces: the text ends
    before the first stop string to be completed (of those completed at the same character, the
    one that starts first). Empty stop strings are ignored.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.fallback = [self._failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)
        self.held: deque[str] = deque()
        self.stopped = False

    @staticmethod
    def _failure(stop: str) -> list[int]:
        """fail[k]: the length of the longest proper prefix of stop[:k] that is also its suffix."""
        fail, k = [0, 0], 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = fail[k]
            k += stop[i] == stop[k]
            fail.append(k)
        return fail

    def push(self, text: str) -> str:
        """The text that is now known to come before any stop string (possibly empty)."""
        if self.stopped:
            return ""
        held, stops, fallback, state = self.held, self.stops, self.fallback, self.state
        for ch in text:
            held.append(ch)
            found = 0
            for i, stop in enumerate(stops):
                k = state[i]  # < len(stop): a whole match ends the text
                while k and stop[k] != ch:
                    k = fallback[i][k]
                k += stop[k] == ch
                state[i] = k
                if k == len(stop):
                    found = max(found, k)
            if found:
                self.stopped = True
                return "".join(held.popleft() for _ in range(len(held) - found))
        keep = max(state, default=0)
        return "".join(held.popleft() for _ in range(len(held) - keep))

    def flush(self) -> str:
        """At the end of the text: what was held back (no stop string followed)."""
        if self.stopped:
            return ""
        rest = "".join(self.held)
        self.held.clear()
        return rest


class AnswerText:
    """One answer's text from its token ids as they come: whole characters only, cut before the
    first stop string."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.text, self.stops, self.count = TextStream(tokenizer), StopMatcher(stops), 0

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def push(self, token: int) -> str:
        self.count += 1
        return self.stops.push(self.text.push(token))

    def end(self) -> str:
        """The text held back, once no token will follow."""
        return self.stops.push(self.text.flush()) + self.stops.flush()


def complete(model, tokenizer, messages: list[dict], max_new_tokens: int = 64) -> str:
    """Greedy answer to a conversation that ends with a user message."""
    ids = tokenizer.encode_prompt(messages)
    out = list(generate(model, ids, max_new_tokens, eos_id=tokenizer.eos_id))
    return tokenizer.decode(out)
