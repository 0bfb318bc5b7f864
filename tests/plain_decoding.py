"""The reference the decoding engine is checked against: greedy decoding with no cache at all, each
token the argmax of one full forward over everything so far."""

from __future__ import annotations

import torch


@torch.no_grad()
def plain_greedy(model, prompt: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    was = model.training
    model.eval()
    ids, out = list(prompt), []
    try:
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids], device=model.lm_head.weight.device))[0, -1].argmax())
            if token == eos_id:
                break
            out.append(token)
            ids.append(token)
    finally:
        model.train(was)
    return out
