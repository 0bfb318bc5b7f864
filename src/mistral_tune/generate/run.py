"""Generation for callers that wait for it: a list of prompts answered together (evaluation, batch
files, rollouts), one answer streamed (a terminal chat), a conversation that keeps its cache between
turns. All of it goes through the model's Decoder."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from .decoder import Decoder, End, Params, Token, decoder_for


def generate_batch(
    model,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 64,
    every: Callable[[bool], bool] | None = None,
    top_k: int = 0,
) -> list[list[int]]:
    """New token ids for each prompt (the end-of-sequence token not included).

    Up to batch_size prompts decode together; a prompt takes the place of one that has ended (the
    answers do not depend on which prompts share a step). seed: prompt i samples with seed + i.
    every: for a model sharded over processes that must run the same passes, whether a flag holds
    on every process; each process then adds its prompts batch_size at a time and keeps stepping
    until every process has finished."""
    if not prompts:
        return []
    lockstep = every not in (None, bool)
    slots = min(batch_size, len(prompts))
    capacity = max(len(p) for p in prompts) + max_new_tokens + 1
    decoder = decoder_for(model, slots, capacity, lockstep=lockstep)
    out: list[list[int]] = [[] for _ in prompts]
    errors: list[BaseException] = []

    def sink(i: int) -> Callable[[Token | End], None]:
        def take(item: Token | End) -> None:
            if isinstance(item, Token):
                out[i].append(item.id)
            elif item.reason == "error":
                errors.append(item.error)
        return take

    waiting = deque(range(len(prompts)))

    def params(i: int) -> Params:
        return Params(max_new_tokens, temperature, top_p, top_k, seed=None if seed is None else seed + i)

    while True:
        if waiting and (not lockstep or not decoder.rows):
            n = min(decoder.free(), len(waiting))
            batch = [waiting.popleft() for _ in range(n)]
            decoder.add_many([(prompts[i], params(i), sink(i)) for i in batch], eos_id)
        if errors:
            raise errors[0]
        if lockstep:
            if every(not decoder.rows and not waiting):
                break
            if decoder.rows:
                decoder.step()
            elif not waiting:
                decoder.idle_step()
        elif decoder.rows:
            decoder.step()
        elif not waiting:
            break
    if errors:
        raise errors[0]
    return out


def stream(model, prompt: list[int], params: Params, eos_id: int | None = None,
           decoder: Decoder | None = None) -> Iterator[Token]:
    """One answer's tokens as they are decoded."""
    decoder = decoder or decoder_for(model, 1, len(prompt) + params.max_tokens + 1)
    items: deque[Token | End] = deque()
    seq = decoder.add(prompt, params, items.append, eos_id)
    try:
        while True:
            while items:
                item = items.popleft()
                if isinstance(item, End):
                    if item.reason == "error":
                        raise item.error
                    return
                yield item
            decoder.step()
    finally:  # the consumer stopped early: the sequence leaves its slot, its keys kept
        decoder.drop(seq)


class Conversation:
    """A chat's decoder of one slot: each turn's prompt computes only what follows the part it shares
    with the turn before (mistral-common may re-render earlier turns, so that is the longest common
    prefix, found by the decoder)."""

    def __init__(self, model, capacity: int | None = None) -> None:
        cfg = model.config
        self.decoder = Decoder(model, slots=1, capacity=capacity or cfg.max_position_embeddings)

    def reset(self) -> None:
        self.decoder.held[0] = []

    @property
    def cached_tokens(self) -> int:
        return len(self.decoder.held[0])

    def stream(self, prompt: list[int], params: Params, eos_id: int | None = None) -> Iterator[Token]:
        room = self.decoder.capacity - len(prompt) - 1
        if room < 1:
            raise ValueError(f"the conversation ({len(prompt)} tokens) no longer fits the model's context "
                             f"({self.decoder.capacity} tokens)")
        if params.max_tokens > room:
            params = Params(**{**params.__dict__, "max_tokens": room})
        return stream(self.decoder.model, prompt, params, eos_id, self.decoder)


def complete(model, tokenizer, messages: list[dict], max_new_tokens: int = 64) -> str:
    """Greedy answer to a conversation that ends with a user message."""
    ids = tokenizer.encode_prompt(messages)
    return tokenizer.decode(generate_batch(model, [ids], max_new_tokens, eos_id=tokenizer.eos_id)[0])
