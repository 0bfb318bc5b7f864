"""Token generation with a KV cache: greedy or sampled (temperature, top-p)."""

from __future__ import annotations

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
):
    """Yield new token ids one at a time; stops at eos_id (not yielded) or max_new_tokens."""
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    cache = KVCache(model.config.num_hidden_layers)
    ids = torch.tensor([prompt_ids], device=device)
    try:
        for _ in range(max_new_tokens):
            logits = model(ids, kv_cache=cache)[0, -1]
            token = _pick(logits, temperature, top_p, generator)
            if token == eos_id:
                return
            yield token
            ids = torch.tensor([[token]], device=device)
    finally:
        model.train(was_training)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def complete(model, tokenizer, messages: list[dict], max_new_tokens: int = 64) -> str:
    """Greedy answer to a conversation that ends with a user message."""
    ids = tokenizer.encode_prompt(messages)
    out = list(generate(model, ids, max_new_tokens, eos_id=tokenizer.eos_id))
    return tokenizer.decode(out)
