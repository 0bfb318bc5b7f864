"""Each row's next token, chosen on the device: greedy, temperature, top-k, top-p, a grammar's mask of
allowed tokens, and the log-probabilities a client asked for. Nothing here reads a value back to the
host, so a whole decoding step, sampling included, can be replayed as one CUDA graph.

Random draws come from a counter-based hash of (the request's seed, the index of the token in its
answer, the vocabulary entry) rather than from a generator's state: a request's samples depend on its
seed alone, never on which other requests share its batch or on how far they are. Sampling is
Gumbel-max, exact for the distribution softmax(logits / temperature) restricted to the kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: The most `top_logprobs` a request may ask for (the OpenAI API's limit).
MAX_TOP_LOGPROBS = 20

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # as a signed 64-bit integer
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


@dataclass(frozen=True)
class Modes:
    """Which parts of sampling a step needs (each is a separate captured graph, so a greedy batch pays
    for none of the rest). sample: some row has temperature > 0; filter: some row keeps only its top-k /
    top-p tokens; masked: some row follows a grammar; logprobs: some row wants log-probabilities."""

    sample: bool = False
    filter: bool = False
    masked: bool = False
    logprobs: bool = False


@dataclass
class Choice:
    """What pick() returns, one entry per row: the tokens, and with Modes.logprobs each token's
    log-probability and the row's most likely tokens with theirs (the model's distribution: the raw
    logits' log-softmax, before temperature, filtering or a grammar)."""

    tokens: torch.Tensor  # (B,) int64
    finite: torch.Tensor  # (B,) bool: the row's logits are all finite (a diverged model's are not)
    logprob: torch.Tensor | None = None  # (B,) float32
    top_ids: torch.Tensor | None = None  # (B, MAX_TOP_LOGPROBS)
    top_logprobs: torch.Tensor | None = None


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser: each bit of the output depends on every bit of the input."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def gumbel_noise(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) float32 Gumbel(0, 1) draws, a pure function of each row's (seed, counter)."""
    row = _mix(seed * _GOLDEN + counter)[:, None]
    bits = _mix(row + torch.arange(1, vocab + 1, device=seed.device) * _GOLDEN)
    u = (_shift_right(bits, 11).double() + 0.5) / float(1 << 53)  # uniform in (0, 1), never 0 or 1
    return (-torch.log(-torch.log(u))).float()


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) bool from (B, ceil(vocab / 32)) int32 words, bit j of word w allowing token 32w + j."""
    index = torch.arange(vocab, device=bitmask.device)
    return ((bitmask[:, index >> 5] >> (index & 31)) & 1).bool()


def _keep_top(scaled: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """scaled with every token outside each row's top-k and top-p set to -inf (top_k 0: no limit; the
    most likely token is always kept). Ties with the last kept value are kept."""
    ordered, _ = scaled.sort(dim=-1, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    keep = (probs.cumsum(-1) - probs) < top_p[:, None]
    rank = torch.arange(scaled.shape[-1], device=scaled.device)[None]
    keep &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
    keep[:, 0] = True
    cutoff = ordered.masked_fill(~keep, float("inf")).amin(-1, keepdim=True)
    return scaled.masked_fill(scaled < cutoff, float("-inf"))


def pick(logits: torch.Tensor, modes: Modes, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
         seed: torch.Tensor, counter: torch.Tensor, bitmask: torch.Tensor) -> Choice:
    """The next token of each row of (B, vocab) float32 logits; the other tensors hold one entry (or
    bitmask row) per row. A row with temperature 0 is greedy."""
    raw, vocab = logits, logits.shape[-1]
    finite = torch.isfinite(raw).all(-1)
    if modes.masked:
        logits = logits.masked_fill(~allowed_tokens(bitmask, vocab), float("-inf"))
    tokens = logits.argmax(-1)
    if modes.sample:
        scaled = logits / temperature.clamp_min(1e-6)[:, None]
        if modes.filter:
            scaled = _keep_top(scaled, top_p, top_k)
        drawn = (scaled + gumbel_noise(seed, counter, vocab)).argmax(-1)
        tokens = torch.where(temperature > 0, drawn, tokens)
    if not modes.logprobs:
        return Choice(tokens, finite)
    logp = torch.log_softmax(raw, dim=-1)
    top = logp.topk(min(MAX_TOP_LOGPROBS, vocab), dim=-1)
    return Choice(tokens, finite, logp.gather(-1, tokens[:, None])[:, 0], top.indices, top.values)
