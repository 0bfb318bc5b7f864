"""Cross-entropy over the vocabulary without keeping the logits.

`linear_cross_entropy_sum(h, W, targets)` equals `cross_entropy(h @ W.T, targets, reduction="sum")`
but works through the tokens in chunks and computes the gradient with respect to `h` during the
forward pass, so the (tokens x vocab) logits never exist in full: for Mistral 7B at 16k tokens that
is 2 GB of float32 logits (8 GB for Nemo's 131k vocabulary) that are never allocated. The frozen
lm_head of LoRA gets no gradient; a trainable one gets its gradient accumulated chunk by chunk.
With trainable tokens, the trained rows' values stand in for the weight's rows (their logits
computed from them) and get the gradient, and the frozen weight is neither copied nor differentiated.

A chunk holds LOGITS_PER_CHUNK logits whatever the vocabulary (2,048 tokens of Mistral 7B's 32,768,
512 of Nemo's 131,072), in two buffers made once and reused by every chunk: the float32 logits,
turned in place into the softmax's gradient, and, where the product is computed in a lower
precision (bf16 autocast), the product and then the gradient in that precision. Nothing else of
the chunk's size is allocated: with a frozen head, `chunk_bytes` is the loss's peak beyond its
inputs and the hidden state's gradient (plan.py counts it).
"""

from __future__ import annotations

import torch

#: The target of a position that takes no loss (PyTorch's ignore_index): prompts, padding.
IGNORE = -100
LOGITS_PER_CHUNK = 2048 * 32768  # 256 MiB of float32 logits a chunk


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk for this vocabulary size."""
    return max(1, LOGITS_PER_CHUNK // vocab)


def chunk_bytes(tokens: int, vocab: int, product_bytes: int = 2, acc_bytes: int = 4) -> int:
    """The chunk buffers' bytes at `tokens` tokens: the accumulation dtype's logits, and the product's
    copy when its dtype (product_bytes an element) is narrower than that."""
    rows = min(tokens, chunk_tokens(vocab))
    return rows * vocab * (acc_bytes + (product_bytes if product_bytes < acc_bytes else 0))


def _product_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `h @ weight.T` takes here: autocast's, where it is on (it leaves float64 alone),
    otherwise the inputs'."""
    if torch.is_autocast_enabled(h.device.type) and torch.float64 not in (h.dtype, weight.dtype):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                rows: torch.Tensor | None, row_values: torch.Tensor | None):
        n, vocab = h.shape[0], weight.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)  # float32 at least, float64 stays float64
        mm = _product_dtype(h, weight)
        w = weight.to(mm)  # a copy only where autocast would make one
        values = row_values.to(weight.dtype).to(mm) if rows is not None else None  # as the merged weight's rows
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=acc) if weight.requires_grad else None
        grad_values = torch.zeros_like(row_values, dtype=acc) if rows is not None and row_values.requires_grad else None
        total = torch.zeros((), dtype=acc, device=h.device)
        size = min(chunk, n)
        logits_buf = torch.empty(size, vocab, dtype=acc, device=h.device)
        product_buf = logits_buf if mm == acc else torch.empty(size, vocab, dtype=mm, device=h.device)
        for start in range(0, n, chunk):
            hc = h[start:start + chunk].to(mm)
            tc = targets[start:start + chunk]
            logits, product = logits_buf[:hc.shape[0]], product_buf[:hc.shape[0]]
            torch.mm(hc, w.t(), out=product)
            if values is not None:
                product[:, rows] = hc @ values.t()
            if product is not logits:
                logits.copy_(product)
            # lse = max + log(sum(exp(logits - max))), leaving exp(logits - max) in the buffer.
            picked = logits.gather(1, tc[:, None]).squeeze(1)
            top = logits.amax(dim=1)
            sums = logits.sub_(top[:, None]).exp_().sum(dim=1)
            total += (sums.log() + top - picked).sum()
            if grad_h is None and grad_w is None and grad_values is None:
                continue
            # d(sum CE)/d logits = softmax - onehot, in place over the chunk's buffer.
            grad = logits.div_(sums[:, None])
            grad[torch.arange(tc.shape[0], device=h.device), tc] -= 1.0
            if product is not logits:
                grad = product.copy_(grad)
            if values is not None:  # the rows' gradient goes to their values, not to the weight
                grad_rows = grad[:, rows]
                grad[:, rows] = 0
                if grad_values is not None:
                    grad_values += grad_rows.t() @ hc
            if grad_h is not None:
                grad_h[start:start + chunk] = grad @ w
                if values is not None:
                    grad_h[start:start + chunk] += grad_rows @ values
            if grad_w is not None:
                grad_w += grad.t() @ hc  # into float32 from the product's dtype (on a GPU with no float32 copy)
        ctx.save_for_backward(grad_h, grad_w, grad_values)
        ctx.weight_dtype = weight.dtype
        ctx.values_dtype = row_values.dtype if row_values is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_values = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        gv = (grad_values * grad_out).to(ctx.values_dtype) if grad_values is not None else None
        return gh, gw, None, None, None, gv


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: int | None = None, rows: torch.Tensor | None = None,
                             row_values: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over tokens of cross-entropy(h @ W.T, targets), in float32. h (N, d), targets (N,).
    W is weight, its rows `rows` (distinct indices) replaced by row_values (trainable tokens) when given.
    chunk: tokens a chunk (default: chunk_tokens of the vocabulary)."""
    return _LinearCrossEntropy.apply(h, weight, targets, chunk or chunk_tokens(weight.shape[0]), rows, row_values)
