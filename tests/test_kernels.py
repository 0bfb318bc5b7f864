"""The fast-path pieces compute the plain path's function: the fused linear + cross-entropy
against torch's cross_entropy, FlexAttention block masks against the dense mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _peak import peak_bytes
from mistral_tune.data.pack import Sample, collate
from mistral_tune.kernels.attention import CAUSAL, dense_mask, one_sample_per_row
from mistral_tune.kernels.loss import chunk_bytes, chunk_tokens, linear_cross_entropy_sum


@pytest.mark.parametrize("chunk", [7, 64, 4096])
@pytest.mark.parametrize("weight_trainable", [False, True])
def test_linear_cross_entropy_matches_torch(chunk, weight_trainable):
    gen = torch.Generator().manual_seed(chunk)
    h = torch.randn(150, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(400, 32, generator=gen, dtype=torch.float64, requires_grad=weight_trainable)
    targets = torch.randint(0, 400, (150,), generator=gen)

    ours = linear_cross_entropy_sum(h, w, targets, chunk=chunk)
    (ours * 0.37).backward()  # a non-unit upstream gradient must scale the stored gradients
    g_h = h.grad.clone()
    g_w = w.grad.clone() if weight_trainable else None
    h.grad = None
    w.grad = None

    ref = F.cross_entropy(h @ w.t(), targets, reduction="sum")
    (ref * 0.37).backward()
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-10)
    assert torch.allclose(g_h, h.grad, rtol=1e-10, atol=1e-12)
    if weight_trainable:
        assert torch.allclose(g_w, w.grad, rtol=1e-10, atol=1e-12)
    else:
        assert w.grad is None


def test_peak_bytes_sees_kernel_temporaries_and_no_views() -> None:
    """The measuring tool: a view allocates nothing, a kernel's temporary (logsumexp's exp of a
    float32 copy) counts, a freed tensor leaves, and older tensors freed while measuring do not count."""
    older = torch.empty(3000, 1000)

    def fn():
        nonlocal older
        x = torch.empty(1000, 1000)  # 4 MB
        _ = x[:10], x.t(), x.view(-1)
        y = torch.logsumexp(x.zero_(), dim=1)  # (x - max) is a second 4 MB
        del x
        older = None
        return y

    peak, y = peak_bytes(fn)
    assert 8_000_000 <= peak <= 8_000_000 + 16 * 1024
    assert y.shape == (1000,)
    assert older is None


@pytest.mark.parametrize(("dtype", "tokens"), [(torch.float32, 600), (torch.bfloat16, 40)])  # (CPU bf16 is slow)
def test_fused_loss_holds_one_chunk_of_logits(dtype, tokens):
    """At Nemo's 131k vocabulary a chunk is 512 tokens (7B's 32k keeps 2,048), and the loss's forward
    and backward together hold that chunk's buffers (float32 logits, and the bf16 product copy) and
    the hidden state's gradient, nothing more: measured by the CPU allocator (tests/_peak.py)."""
    vocab = 131072
    assert (chunk_tokens(vocab), chunk_tokens(32768)) == (512, 2048)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, 16, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, 16, generator=gen) * 0.1).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)

    def step():
        loss = linear_cross_entropy_sum(h, w, targets)
        loss.backward()
        return loss

    peak, loss = peak_bytes(step)
    expected = chunk_bytes(tokens, vocab, product_bytes=dtype.itemsize)
    assert expected == min(tokens, 512) * vocab * (4 if dtype == torch.float32 else 6)
    hidden_grads = 2 * h.numel() * dtype.itemsize  # kept by the forward, and the scaled one backward returns
    # The CPU's own kernels hold temporaries whose size depends on the CPU: a bf16 product on a CPU without
    # native bf16 matrix instructions converts the weight to float32 (two such copies, 16.8 MB here, were
    # seen on one 2-core machine; 137 KB beyond the chunk on another); reductions keep per-thread buffers.
    # That slack stays well below the second chunk (31 MB here) that a leak would hold.
    cpu_kernels = 64 * 1024 + expected // 64 + (2 * w.numel() * 4 if dtype == torch.bfloat16 else 0)
    assert expected <= peak <= expected + hidden_grads + cpu_kernels
    ref = F.cross_entropy((h.detach() @ w.t()).float(), targets, reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_fused_loss_under_autocast_takes_autocasts_product():
    """Under bf16 autocast (float32 h and a trained float32 head) the product is bf16, as autocast
    makes it for the plain loss: the same loss and gradients as cross_entropy on autocast's logits."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(70, 32, generator=gen, requires_grad=True)
    w = torch.randn(300, 32, generator=gen, requires_grad=True)
    targets = torch.randint(0, 300, (70,), generator=gen)
    results = []
    for fused in (True, False):
        h.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (linear_cross_entropy_sum(h, w, targets, chunk=16) if fused
                    else F.cross_entropy((h @ w.t()).float(), targets, reduction="sum"))
        loss.backward()
        results.append((loss.item(), h.grad.clone(), w.grad.clone()))
    (ours, gh, gw), (ref, rh, rw) = results
    assert ours == pytest.approx(ref, rel=1e-5)
    assert (gh - rh).norm() <= 1e-2 * rh.norm() and (gw - rw).norm() <= 1e-2 * rw.norm()
    assert gh.dtype == gw.dtype == torch.float32


def _lora_model(make_tiny_mistral, spec=None, **overrides):
    from mistral_tune.models.lora import LoraSpec, apply_lora

    model = make_tiny_mistral(**overrides).train()
    apply_lora(model, spec or LoraSpec(r=4, alpha=8), seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name or "trainable_tokens" in name:  # (trained rows: away from the base's)
            torch.nn.init.normal_(p, 0, 0.05)
    return model


def _assert_same_loss_and_grads(model, batch, setting: str, values) -> None:
    """The loss and every trainable gradient agree (float32) for each value of model.<setting>."""

    results = []
    for value in values:
        model.configure(**{setting: value})
        model.zero_grad(set_to_none=True)
        loss = model.token_loss(batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    for name in g0:
        assert (g0[name] - g1[name]).norm() <= 1e-5 * g0[name].norm(), name


@pytest.mark.parametrize("variant", ["lora", "dora", "lm_head_tokens", "lm_head_whole"])
def test_fused_loss_gives_the_models_loss_and_grads(make_tiny_mistral, variant):
    """Also where lm_head trains (whole, or some rows): the fused loss takes the weight the model applies."""
    from mistral_tune.models.lora import LoraSpec

    spec = {"lora": None, "dora": LoraSpec(r=4, alpha=8, use_dora=True),
            "lm_head_tokens": LoraSpec(r=4, alpha=8, trainable_tokens={"lm_head": [5, 9, 700]}),
            "lm_head_whole": LoraSpec(r=4, alpha=8, modules_to_save=["lm_head"])}[variant]
    model = _lora_model(make_tiny_mistral, spec, seed=3)
    gen = torch.Generator().manual_seed(0)
    samples = [Sample.from_ids(torch.randint(3, 1000, (n,), generator=gen).tolist(), [i % 3 != 0 for i in range(n)])
               for n in (30, 17, 9)]
    batch = collate(samples, [[0, 1], [2]], pad_to=64)
    _assert_same_loss_and_grads(model, batch, "fused_loss", (False, True))


def test_trainable_tokens_of_lm_head_cost_no_copy_of_the_head(make_tiny_mistral):
    """Two trained rows of a 32k-row head: the fused loss computes their logits from their values
    and gives them the gradient, so a step holds the loss's chunk and little else; it held a merged
    copy of the whole head and a float32 gradient of all of it (measured by the CPU allocator)."""
    from mistral_tune.models.lora import LoraSpec

    vocab, hidden = 32768, 64
    model = _lora_model(make_tiny_mistral, LoraSpec(r=4, alpha=8, trainable_tokens={"lm_head": [5, 9]}),
                        vocab_size=vocab)
    model.configure(fused_loss=True)
    gen = torch.Generator().manual_seed(0)
    samples = [Sample.from_ids(torch.randint(3, vocab, (n,), generator=gen).tolist(), [True] * n) for n in (60, 40)]
    batch = collate(samples, [[0], [1]], pad_to=64)

    def step():
        model.token_loss(batch).backward()

    peak, _ = peak_bytes(step)
    head = vocab * hidden * 4
    assert peak < chunk_bytes(batch.n_trained, vocab, product_bytes=4) + head // 2
    assert model.lm_head.trainable_tokens_delta.grad.abs().sum() > 0


@pytest.mark.slow
def test_dora_layer_compiles_to_one_graph(make_tiny_mistral):
    """The fast path compiles each decoder layer: a DoRA layer traces whole (no graph break) and
    gives the eager layer's output and gradients. (aot_eager: Dynamo's tracing without a C++ compiler.)"""
    from mistral_tune.models.lora import LoraSpec
    from mistral_tune.models.mistral import attention_mask, rope_tables

    model = _lora_model(make_tiny_mistral, LoraSpec(r=4, alpha=8, use_dora=True), seed=3)
    layer = model.model.layers[0]
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    cos, sin = rope_tables(pos, model.config.head_dim, model.config.rope_theta, x.dtype)
    args = (cos, sin, attention_mask(torch.zeros_like(pos), pos, None))
    results = []
    for run in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False)):
        layer.zero_grad(set_to_none=True)
        out = run(x, *args)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}))
    (eager, g_eager), (compiled, g_compiled) = results
    assert torch.allclose(compiled, eager, atol=1e-6)
    assert any(".lora_magnitude_vector" in n for n in g_eager)
    for n in g_eager:
        assert torch.allclose(g_compiled[n], g_eager[n], atol=1e-6), n


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 7])
def test_flex_block_mask_equals_dense_mask(make_tiny_mistral, window):
    """FlexAttention (compiled on the CPU, forward only: it has no CPU backward) sees exactly what
    the dense mask lets through: packed samples, padding, and the sliding window."""
    model = make_tiny_mistral(seed=1, sliding_window=window)
    gen = torch.Generator().manual_seed(2)
    lengths = [[90, 40, 60], [120, 70]]  # row 2 ends in padding
    samples, rows = [], []
    for row in lengths:
        rows.append([])
        for n in row:
            rows[-1].append(len(samples))
            samples.append(Sample(torch.randint(0, 1000, (n,), generator=gen).tolist(), [-100] * n))
    batch = collate(samples, rows, pad_to=256)
    with torch.no_grad():
        model.configure(attn_impl="sdpa")
        dense = model(batch.input_ids, batch.position_ids, batch.seq_ids)
        model.configure(attn_impl="flex")
        flex = model(batch.input_ids, batch.position_ids, batch.seq_ids)
    real = batch.seq_ids >= 0
    assert torch.allclose(flex[real], dense[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("seq_ids", "single"), [
    ([[0, 0, 0, 0], [1, 1, -1, -1]], True),  # trailing padding is allowed
    ([[0, 0, 1, 1], [2, 2, 2, 2]], False),  # two samples in one row
    ([[-1, 0, 0, 0]], False),  # leading padding: real tokens would see it
    ([[0, -1, 0, 0]], False),  # padding inside a row
    ([[-1, -1, -1, -1]], True),  # nothing but padding: no loss, nothing to see
])
def test_one_sample_per_row(seq_ids, single):
    assert one_sample_per_row(torch.tensor(seq_ids)) is single


@pytest.mark.parametrize("window", [None, 40, 64])
def test_rows_of_one_sample_take_the_causal_kernel_with_the_same_loss_and_grads(make_tiny_mistral, window):
    """With one sample per row the fast path uses SDPA's causal kernel instead of a block mask:
    the same loss and gradients as the dense mask, trailing padding included. A window shorter
    than the row keeps the block mask (it cuts inside the row)."""
    model = _lora_model(make_tiny_mistral, seed=4, sliding_window=window)
    gen = torch.Generator().manual_seed(5)
    samples = [Sample.from_ids(torch.randint(3, 1000, (n,), generator=gen).tolist(), [i % 4 != 0 for i in range(n)])
               for n in (64, 37)]
    batch = collate(samples, [[0], [1]], pad_to=64)
    model.configure(attn_impl="flex", one_sample_rows=True)
    mask = model._mask(batch.seq_ids, batch.position_ids, 64, batch.input_ids.device, window)
    assert (mask == CAUSAL) is (window != 40)
    if window == 40:
        return  # the block mask path is checked against the dense mask on the GPU and above
    _assert_same_loss_and_grads(model, batch, "attn_impl", ("sdpa", "flex"))


def test_packed_rows_keep_the_block_mask_when_a_batch_holds_one_sample_per_row(make_tiny_mistral):
    """With packing, a batch whose rows happen to hold one sample each still takes the block mask,
    so the compiled layers never meet a second kind of mask (and compile again) mid-run."""
    model = make_tiny_mistral()
    model.configure(attn_impl="flex")
    seq_ids = torch.tensor([[0, 0, 0, -1], [0, 0, 0, 0]])
    assert not model.takes_causal_kernel(seq_ids, 4, None)
    model.configure(one_sample_rows=True)
    assert model.takes_causal_kernel(seq_ids, 4, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_causal_kernel_runs_in_float32_after_bf16_on_the_gpu(make_tiny_mistral):
    """bf16: false on a GPU: rows of one sample in float32 take a kernel that runs in float32, also
    after a bf16 step probed the kernels (each dtype gets its own), with the dense mask's result."""
    model = _lora_model(make_tiny_mistral, seed=8).cuda()
    gen = torch.Generator().manual_seed(9)
    samples = [Sample.from_ids(torch.randint(3, 1000, (n,), generator=gen).tolist(), [True] * n) for n in (64, 40)]
    batch = collate(samples, [[0], [1]], pad_to=64).to("cuda")

    model.configure(attn_impl="flex", one_sample_rows=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.token_loss(batch).backward()
    _assert_same_loss_and_grads(model, batch, "attn_impl", ("sdpa", "flex"))


def test_dense_mask_is_causal_per_sample_and_windowed():
    seq = torch.tensor([[0, 0, 0, 1, 1, -1]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = dense_mask(seq, pos, window=2)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],  # token 2 no longer sees token 0: window 2
        [0, 0, 0, 1, 0, 0],  # a new sample starts: nothing earlier is visible
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only itself
    ], dtype=torch.bool)
    assert torch.equal(m, expected)


def test_collate_pads_to_a_multiple():
    samples = [Sample([1] * 130, [-100] * 130), Sample([2] * 20, [-100] * 20)]
    assert collate(samples, [[0], [1]], pad_multiple=128).input_ids.shape == (2, 256)
    assert collate(samples, [[1]], pad_multiple=128).input_ids.shape == (1, 128)
    assert collate(samples, [[1]]).input_ids.shape == (1, 20)


def test_fast_path_true_on_cpu_is_a_config_error(tiny_model_dir, tmp_path):
    import json

    from mistral_tune.config import config_from_dict
    from mistral_tune.errors import ConfigError
    from mistral_tune.train.loop import train

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    cfg = config_from_dict({"base_model": str(tiny_model_dir), "datasets": [{"path": str(data)}],
                            "output_dir": str(tmp_path / "out"), "fast_path": True, "max_steps": 1})
    with pytest.raises(ConfigError, match="fast_path"):
        train(cfg, echo=lambda *_: None)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_rows_of_varying_length_compile_a_fixed_number_of_graphs(make_tiny_mistral, checkpointing):
    """Unpacked rows of many lengths, short micro-batches, training steps and evaluations: the
    compiled layers make one graph per autograd situation (no grad; input without and with a
    gradient) and none for a new row length or batch size, far from dynamo's recompile limit
    (past which it would fall back to eager layers). Counted by dynamo itself, on the CPU."""
    from torch._dynamo.testing import CompileCounter

    from mistral_tune.config import config_from_dict
    from mistral_tune.train.schedule import row_padding

    torch._dynamo.reset()
    model = _lora_model(make_tiny_mistral, seed=6)
    model.configure(gradient_checkpointing=checkpointing)
    counter = CompileCounter()
    model.use_fast_path(one_sample_rows=True, dynamic=True, backend=counter)
    cfg = config_from_dict({"base_model": "x", "datasets": [{"path": "x"}], "sample_packing": False,
                            "sequence_len": 512, "micro_batch_size": 3})
    padding = row_padding(cfg, True, True, cfg.micro_batch_size)
    gen = torch.Generator().manual_seed(7)
    samples = [Sample.from_ids(torch.randint(3, 1000, (n,), generator=gen).tolist(), [True] * n)
               for n in (20, 150, 300, 500, 90, 260, 400, 33)]
    groups = [[[0], [1], [2]], [[3], [4]], [[5]], [[6], [7], [0]], [[2], [3], [4]]]  # 128 ... 512 tokens
    for k, group in enumerate(groups):
        batch = collate(samples, group, **padding)
        assert batch.input_ids.shape[0] == 3
        model.token_loss(batch).backward()
        if k % 2:
            with torch.no_grad():
                model.eval().token_loss(batch)
            model.train()
    assert counter.frame_count == 3
    torch._dynamo.reset()


def test_dense_masked_attention_never_asks_cudnn(monkeypatch):
    """Decoding with a KV cache makes a new key length at every token; cuDNN's attention plans each
    new shape (measured on an H200: ~40 ms of CPU a token). A dense mask must keep cuDNN out of
    SDPA's choice, and still give SDPA's numbers."""
    from mistral_tune.kernels import attention

    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 5, 8, generator=g) for h in (4, 2, 2))
    mask = torch.rand(2, 1, 5, 5, generator=g) > 0.3
    mask[..., 0] = True
    out = attention.attend(q, k, v, mask, 8**-0.5)
    ref = real(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=8**-0.5)
    torch.testing.assert_close(out, ref)
    assert seen == [False]
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the global choice is restored afterwards


def test_long_rows_compile_their_mlp_chunks_once_for_every_length(make_tiny_mistral):
    """Checkpointed layers on the fast path compute their MLP in chunks through one compiled
    function shared by every layer: rows of new lengths (each a new chunk remainder) add no graph,
    and the gradients equal the uncompiled, unchunked step's. Counted by dynamo, on the CPU."""
    from torch._dynamo.testing import CompileCounter


    def batch(n: int):
        ids = torch.randint(3, 1000, (n + 1,), generator=torch.Generator().manual_seed(n)).tolist()
        return collate([Sample(ids[:-1], ids[1:])], [[0]], n)

    def grads(model, b):
        model.zero_grad(set_to_none=True)
        model.token_loss(b).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    torch._dynamo.reset()
    model = _lora_model(make_tiny_mistral, seed=6, num_hidden_layers=3)
    model.configure(gradient_checkpointing=True)
    want = {n: grads(model, batch(n)) for n in (70, 131)}
    counter = CompileCounter()
    model.use_fast_path(one_sample_rows=True, dynamic=True, backend=counter)
    # the CPU's attention; the compiled layers and chunks are the point
    model.configure(attn_impl="sdpa", mlp_chunk_tokens=32)
    for n in (70, 131):
        got = grads(model, batch(n))
        for name in want[n]:
            scale = float(want[n][name].abs().max())  # fused chunks sum in another order
            torch.testing.assert_close(got[name], want[n][name], rtol=0, atol=1e-5 * scale)
    graphs = counter.frame_count
    for n in (45, 99, 160, 77):
        grads(model, batch(n))
    assert counter.frame_count == graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("module", ["embed_tokens", "lm_head"])
def test_trainable_tokens_forward_makes_no_copy_of_the_table(make_tiny_mistral, module):
    """Trained rows of a 32k-row embedding (a training step) or head (a forward for a few tokens,
    as decoding makes): the call holds outputs the size of its tokens', not a merged copy of the
    whole table (measured by the CPU allocator); the rows still get their gradient."""
    from mistral_tune.models.lora import LoraSpec

    vocab, hidden = 32768, 64
    model = _lora_model(make_tiny_mistral, LoraSpec(r=4, alpha=8, trainable_tokens={module: [5, 9, 700]}),
                        vocab_size=vocab, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2)
    table = getattr(model.model, module) if module == "embed_tokens" else model.lm_head
    ids = torch.tensor([[5, 11, 700, 9, 3, 5]])
    if module == "embed_tokens":
        def call():
            table(ids).sum().backward()
    else:
        x = torch.randn(1, 2, hidden)

        def call():
            return table(x)
    peak, _ = peak_bytes(call)
    assert peak < vocab * hidden * 4 // 4, peak
    if module == "embed_tokens":
        assert table.trainable_tokens_delta.grad.abs().sum() > 0
        want = table.weight.index_copy(0, table.token_indices, table.trainable_tokens_delta.detach())[ids]
        torch.testing.assert_close(table(ids), want)
    else:
        merged = table.weight.index_copy(0, table.token_indices, table.trainable_tokens_delta.detach())
        torch.testing.assert_close(table(x), x @ merged.t())
