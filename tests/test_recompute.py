"""Activation checkpointing (models/recompute.py) must not change the maths, and must actually keep
nothing per layer but its input. The CPU runs the same code as the GPU except the host offload,
which the GPU benchmark's parity check covers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_tune.data.pack import Sample, collate
from mistral_tune.models.lora import LoraSpec, apply_lora


def _batch(seed: int = 0, packed: bool = False):
    gen = torch.Generator().manual_seed(seed)
    lengths = [7, 12, 5] if packed else [24]
    samples = []
    for n in lengths * 2:
        ids = torch.randint(3, 1000, (n + 1,), generator=gen).tolist()
        samples.append(Sample(ids[:-1], ids[1:]))
    k = len(lengths)
    return collate(samples, [list(range(k)), list(range(k, 2 * k))], 24)


def _close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    # Float32 summation order differs (per-row backward accumulates row by row): relative to the
    # tensor's scale, not element by element.
    scale = float(want.abs().max())
    assert scale > 0, name
    assert float((got - want).abs().max()) <= 1e-5 * scale, name


def _grads(model, batch, checkpointing: bool, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.configure(gradient_checkpointing=checkpointing)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout masks
    loss = model.token_loss(batch) / batch.n_trained
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("by_row", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_full_finetune_gradients_equal_without_checkpointing(packed: bool, by_row: bool, make_tiny_mistral) -> None:
    model = make_tiny_mistral(sliding_window=6)
    batch = _batch(packed=packed)
    loss_a, plain = _grads(model, batch, False)
    model.configure(recompute_by_row=by_row)  # backward one row at a time, or the whole batch at once
    loss_b, ckpt = _grads(model, batch, True)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert "model.embed_tokens.weight" in ckpt  # the gradient reaches through every layer's input
    for name in plain:
        _close(ckpt[name], plain[name], name)


def test_lora_with_dropout_recomputes_the_same_masks(make_tiny_mistral) -> None:
    model = make_tiny_mistral()
    apply_lora(model, LoraSpec(r=4, alpha=8, dropout=0.3), seed=0)
    with torch.no_grad():  # non-zero B, so every LoRA path carries gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    batch = _batch(1)
    model.configure(recompute_by_row=True)  # asked for, but dropout's batch-wide masks keep the backward whole
    _, plain = _grads(model, batch, False, seed=5)
    _, ckpt = _grads(model, batch, True, seed=5)
    _, other_masks = _grads(model, batch, False, seed=6)
    assert len(plain) == 2 * 7 * 2
    for name in plain:
        _close(ckpt[name], plain[name], name)
    # Non-vacuous: different dropout masks do give different gradients.
    assert any(not torch.allclose(other_masks[n], plain[n]) for n in plain)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_and_trained_embeddings_checkpoint_to_the_same_gradients(make_tiny_mistral, dropout: float) -> None:
    """DoRA's magnitude gradient needs the frozen product's value, which the re-run layer would
    otherwise skip; trained rows and modules lie outside the layers."""
    model = make_tiny_mistral()
    batch = _batch(1)
    spec = LoraSpec(r=4, alpha=8, dropout=dropout, use_dora=True, modules_to_save=["lm_head"],
                    trainable_tokens={"embed_tokens": batch.input_ids[0, :3].tolist()})
    apply_lora(model, spec, seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    _, plain = _grads(model, batch, False, seed=5)
    _, ckpt = _grads(model, batch, True, seed=5)
    assert sum(".lora_magnitude_vector" in n for n in plain) == 7 * 2
    for name in plain:
        _close(ckpt[name], plain[name], name)


def test_accumulating_two_micro_batches_adds_gradients(make_tiny_mistral) -> None:
    model = make_tiny_mistral()
    apply_lora(model, LoraSpec(r=4, alpha=8), seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.train()
    for checkpointing in (False, True):
        model.configure(gradient_checkpointing=checkpointing)
        model.zero_grad(set_to_none=True)
        for seed in (1, 2):
            model.token_loss(_batch(seed)).backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        if not checkpointing:
            want = got
    for name in want:
        _close(got[name], want[name], name)


def _saved_elements(model, batch) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.token_loss(batch)
    loss.backward()
    return total


def test_checkpointing_keeps_nothing_per_layer_for_autograd(make_tiny_mistral) -> None:
    batch = _batch()
    counts = {}
    for layers in (2, 6):
        model = make_tiny_mistral(num_hidden_layers=layers)
        apply_lora(model, LoraSpec(r=4, alpha=8), seed=0)
        model.train()
        model.configure(gradient_checkpointing=True)
        counts[layers, True] = _saved_elements(model, batch)
        model.configure(gradient_checkpointing=False)
        counts[layers, False] = _saved_elements(model, batch)
    # Without checkpointing autograd's saved activations grow with depth; with it they do not
    # (each layer's input is kept by the checkpoint itself, outside autograd's saved tensors).
    assert counts[6, False] > counts[2, False] * 2
    assert counts[6, True] == counts[2, True]
    assert counts[2, True] < counts[2, False] / 2


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("lora", [True, False])
def test_backward_rerun_skips_the_last_projections_product(make_tiny_mistral, lora: bool) -> None:
    """The re-run forward inside a checkpointed backward never reads its layer's output, so the
    down projection's product is skipped there: the checkpointed step costs exactly one forward
    of the decoder layers, minus those products, more than the plain step (matmul FLOPs)."""
    model = make_tiny_mistral(num_hidden_layers=3)
    if lora:
        apply_lora(model, LoraSpec(r=4, alpha=8), seed=0)
    model.train()
    batch = _batch(2)
    with torch.no_grad():
        forward = _flops(lambda: model.token_loss(batch))
    cost = {}
    for checkpointing in (False, True):
        model.configure(gradient_checkpointing=checkpointing)
        cost[checkpointing] = _flops(lambda: model.token_loss(batch).backward())
    cfg = model.config
    tokens = batch.input_ids.numel()
    down = 2 * tokens * cfg.intermediate_size * cfg.hidden_size * cfg.num_hidden_layers
    lm_head = 2 * tokens * cfg.vocab_size * cfg.hidden_size  # not part of any layer: not re-run
    assert cost[True] - cost[False] == forward - lm_head - down


def test_qlora_checkpointed_gradients_equal_plain(make_tiny_mistral) -> None:
    """An NF4 base (QLoRA): the checkpointed backward, with its grad-only down projection, gives
    the plain path's LoRA gradients."""
    pytest.importorskip("bitsandbytes")
    from mistral_tune.models.quant import quantize_model

    model = make_tiny_mistral(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    quantize_model(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    apply_lora(model, LoraSpec(r=4, alpha=8), seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    batch = _batch(3)
    _, plain = _grads(model, batch, False)
    for by_row in (False, True):
        model.configure(recompute_by_row=by_row)
        _, ckpt = _grads(model, batch, True)
        assert len(plain) == 2 * 7 * model.config.num_hidden_layers
        for name in plain:
            _close(ckpt[name], plain[name], name)


def _chunk_mlps(model, n: int) -> None:
    from mistral_tune.models.mistral import MLP

    model.configure(mlp_chunk_tokens=n)
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert mlps and all(m.chunk_tokens == n for m in mlps)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 60), by_row=st.booleans(), packed=st.booleans(), lora=st.booleans())
def test_mlp_in_token_chunks_gives_the_plain_gradients(make_tiny_mistral, n, by_row, packed, lora) -> None:
    """Checkpointed layers compute their MLP n tokens at a time (the no-grad forward, and the re-run
    back-propagated chunk by chunk): the loss and gradients equal the plain unchunked step's."""
    model = make_tiny_mistral(num_hidden_layers=2)
    if lora:
        apply_lora(model, LoraSpec(r=4, alpha=8), seed=0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    batch = _batch(4, packed=packed)
    loss_a, plain = _grads(model, batch, False)
    _chunk_mlps(model, n)
    model.configure(recompute_by_row=by_row)
    loss_b, ckpt = _grads(model, batch, True)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert set(ckpt) == set(plain)
    for name in plain:
        _close(ckpt[name], plain[name], name)


def test_mlp_chunks_with_dropout_back_propagate_the_forwards_masks(make_tiny_mistral) -> None:
    """With LoRA dropout the chunks draw their masks in the no-grad forward and again in backward;
    the gradient must be that of the loss the forward computed: checked against central finite
    differences of that loss (same seed each time), in float64."""
    model = make_tiny_mistral(num_hidden_layers=2).double()
    apply_lora(model, LoraSpec(r=4, alpha=8, dropout=0.3), seed=0)
    model.double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    _chunk_mlps(model, 7)
    model.train()
    model.configure(gradient_checkpointing=True)
    batch = _batch(5)
    keep = batch.labels != -100

    def loss(seed: int) -> torch.Tensor:  # float64 throughout (token_loss's logits are float32)
        torch.manual_seed(seed)
        hidden = model.hidden_states(batch.input_ids, batch.position_ids, batch.seq_ids)
        return torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), batch.labels[keep])

    def grads(seed: int) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss(seed).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    got = grads(11)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    directions = {n: torch.randn(g.shape, generator=gen, dtype=g.dtype) for n, g in got.items() if ".mlp." in n}
    assert directions
    predicted = sum(float((got[n] * d).sum()) for n, d in directions.items())

    def loss_at(eps: float) -> float:
        with torch.no_grad():
            for n, d in directions.items():
                params[n].add_(eps * d)
            value = float(loss(11))
            for n, d in directions.items():
                params[n].sub_(eps * d)
        return value

    # The norms compute in float32 whatever the input: a step large enough for its rounding.
    eps = 1e-3
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert numeric == pytest.approx(predicted, rel=1e-3)
    # Non-vacuous: with other masks (another seed) the directional derivative is another number.
    other = grads(12)
    assert abs(sum(float((other[n] * d).sum()) for n, d in directions.items()) - predicted) > 0.05 * abs(predicted)


def test_mlp_chunks_add_no_flops(make_tiny_mistral) -> None:
    model = make_tiny_mistral(num_hidden_layers=2)
    apply_lora(model, LoraSpec(r=4, alpha=8), seed=0)
    model.train()
    model.configure(gradient_checkpointing=True)
    batch = _batch(6)
    whole = _flops(lambda: model.token_loss(batch).backward())
    _chunk_mlps(model, 5)
    assert _flops(lambda: model.token_loss(batch).backward()) == whole


def test_checkpointed_step_holds_the_mlp_activations_of_one_chunk(make_tiny_mistral) -> None:
    """Long rows: with the MLP in chunks, the step's peak no longer holds the MLP's activations
    (several times the hidden width a token) for the whole row (CPU allocator, tests/_peak.py)."""
    from _peak import peak_bytes

    model = make_tiny_mistral(num_hidden_layers=2, hidden_size=32, intermediate_size=512,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    apply_lora(model, LoraSpec(r=4, alpha=8), seed=0)
    model.train()
    model.configure(gradient_checkpointing=True)
    L = 1024
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (L + 1,), generator=gen).tolist()
    batch = collate([Sample(ids[:-1], ids[1:])], [[0]], L)

    def step():
        model.zero_grad(set_to_none=True)
        model.token_loss(batch).backward()

    step()  # gradients allocated once, as in training
    whole, _ = peak_bytes(step)
    _chunk_mlps(model, 64)
    chunked, _ = peak_bytes(step)
    # Unchunked, the MLP holds gate, up and their product (3 x 512 floats a token) and as many
    # gradients: at least 2 x 4 x 1536 x L bytes; chunked, 64 tokens of them.
    mlp_row = 2 * 4 * 3 * 512 * L
    assert whole - chunked >= 0.8 * mlp_row * (1 - 64 / L), (whole, chunked)


def test_grad_only_chunks_back_propagate_the_masks_of_their_forward() -> None:
    """by_token_chunks' grad-only pass draws its chunks' dropout masks again in backward, from the
    random state of its forward, whatever was drawn in between."""
    from mistral_tune.models.recompute import by_token_chunks

    def fn(x: torch.Tensor, grad_only_out: bool) -> torch.Tensor:
        return torch.nn.functional.dropout(x, 0.5) * 3.0

    x = torch.randn(4, 9, 6)
    torch.manual_seed(3)
    with torch.no_grad():
        want = by_token_chunks(fn, x, 5, False)  # the no-grad forward's masks, chunk by chunk
    torch.manual_seed(3)
    leaf = x.clone().requires_grad_()
    out = by_token_chunks(fn, leaf, 5, True)
    torch.rand(1000)  # other layers draw before this one's backward
    out.backward(torch.ones_like(out))
    assert torch.equal(leaf.grad, (want != 0).float() * 6.0)
