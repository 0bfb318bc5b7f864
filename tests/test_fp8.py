"""FP8 frozen base (`base_precision: fp8`, models/fp8.py): torch._scaled_mm's row-wise semantics,
the FP8 linear's error against full precision within what e4m3 rounding allows, a LoRA model on
an FP8 base (checkpointing, compiled layers, training), its memory, and the config's checks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mistral_tune.config import ALL_PROJECTIONS, config_from_dict
from mistral_tune.data.pack import Sample, collate
from mistral_tune.errors import ConfigError
from mistral_tune.models.fp8 import E4M3, FP8Linear, fp8_model, fp8_support_error, quantize_rows
from mistral_tune.models.lora import LoraSpec, apply_lora
from mistral_tune.models.peft_format import BASE_QUANTIZATION

F8 = torch.finfo(E4M3)
U = F8.eps / 2  # e4m3's unit roundoff: 3 mantissa bits, round to nearest (2^-4)
HALF_SUBNORMAL = F8.smallest_normal * F8.eps / 2  # half e4m3's smallest subnormal step (2^-10)
U32 = torch.finfo(torch.float32).eps  # the float32 division by the scale, and float32 accumulation
U_BF16 = torch.finfo(torch.bfloat16).eps / 2  # the bf16 output's rounding (2^-8)


def _matrix(gen: torch.Generator, rows: int, cols: int, spread: float) -> torch.Tensor:
    """Rows of random values whose magnitudes differ by up to 10^spread between rows (tokens of
    very different norms), with a row of zeros and an outlier in a row when there is room."""
    t = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    t *= 10 ** (spread * (torch.rand(rows, 1, generator=gen, dtype=torch.float64) - 0.5))
    if rows > 2:
        t[1] = 0
        t[2, 0] *= 1000
    return t.float()


def _error_bound(a, b, scale_a, scale_b, out) -> torch.Tensor:
    """The largest |quantized(a) quantized(b)^T in bf16 - a b^T| element by element, from e4m3's
    precision: each quantized value v' has |v' - v| <= u|v| + (half a subnormal step) x its scale,
    a product of two such values has error e_a|b| + |a|e_b + e_a e_b, summed over the inner
    dimension; then float32 accumulation and the bf16 output's rounding."""
    a, b = a.double().abs(), b.double().abs()
    e_a = (U + U32) * a + HALF_SUBNORMAL * scale_a.double()
    e_b = (U + U32) * b + HALF_SUBNORMAL * scale_b.double()
    product = e_a @ b.T + a @ e_b.T + e_a @ e_b.T
    accumulation = a.shape[1] * U32 * (a + e_a) @ (b + e_b).T
    return product + accumulation + U_BF16 * out.double().abs() * (1 + U_BF16)


SHAPES = st.tuples(st.integers(1, 24), st.sampled_from([16, 32, 48, 96]), st.sampled_from([16, 32, 64, 80]))


@settings(max_examples=40, deadline=None)
@given(shape=SHAPES, seed=st.integers(0, 2**31 - 1), spread=st.floats(0, 6))
def test_scaled_mm_row_wise_is_the_dequantized_matmul(shape, seed, spread):
    """What the FP8 layer relies on: with scales of shape (M, 1) and (1, N), torch._scaled_mm
    multiplies the e4m3 codes and scales row by row, as the dequantized float product does."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(seed)
    a_codes, a_scale = quantize_rows(_matrix(gen, m, k, spread))
    b_codes, b_scale = quantize_rows(_matrix(gen, n, k, spread))
    want = (a_codes.double() * a_scale.double()) @ (b_codes.double() * b_scale.double()).T
    got = torch._scaled_mm(a_codes, b_codes.t(), scale_a=a_scale, scale_b=b_scale.T.contiguous(),
                           out_dtype=torch.float32)
    size = (a_codes.double() * a_scale).abs() @ (b_codes.double() * b_scale).abs().T
    assert torch.all((got.double() - want).abs() <= k * U32 * size)


@settings(max_examples=40, deadline=None)
@given(shape=SHAPES, seed=st.integers(0, 2**31 - 1), spread=st.floats(0, 6))
def test_fp8_linear_forward_and_input_grad_within_e4m3_bound(shape, seed, spread):
    m, k, n = shape
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        dense.weight.copy_(_matrix(gen, n, k, spread))
    layer = FP8Linear.from_linear(dense)
    x = _matrix(gen, m, k, spread).requires_grad_(True)
    out = layer(x)
    grad = _matrix(gen, m, n, spread)
    out.backward(grad)
    w = dense.weight.detach()

    _, x_scale = quantize_rows(x.detach())
    assert torch.all((out.double() - x.detach().double() @ w.double().T).abs()
                     <= _error_bound(x.detach(), w, x_scale, layer.scale[:, None], out.detach()))
    # The gradient is quantized after its columns are multiplied by the weight's row scales:
    # element (i, j) of the gradient is quantized with scale s_g[i] / s_w[j]. (Where weight row j
    # is zero its codes are zero, and column j of the gradient meets exact zeros: no error.)
    _, g_scale = quantize_rows(grad * layer.scale)
    g_elem_scale = torch.where(w.abs().amax(1) > 0, g_scale / layer.scale, 0.0)
    want = grad.double() @ w.double()
    bound = _error_bound(grad, w.T, g_elem_scale, layer.scale[None, :].expand(k, n), x.grad)
    assert torch.all((x.grad.double() - want).abs() <= bound)


def test_fp8_linear_is_quantized_not_exact():
    """The bound above is not met by accident of an exact path: the layer really rounds to e4m3
    (typical relative error a few percent, 2^-4 at most per value)."""
    gen = torch.Generator().manual_seed(0)
    dense = nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, generator=gen)
    with torch.no_grad():
        dense.weight.normal_(0, 0.1, generator=gen)
        rel = float((FP8Linear.from_linear(dense)(x) - dense(x)).norm() / dense(x).norm())
    assert 0.005 < rel < 0.1


def _tiny(make_tiny_mistral, dtype=torch.float32, **kw):
    return make_tiny_mistral(**kw).to(dtype)


def _lora(model, seed=0):
    apply_lora(model, LoraSpec(r=4, alpha=8), seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
    return model


def _batch(seed=0, rows=2, n=24):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(rows):
        ids = torch.randint(3, 1000, (n + 1,), generator=gen).tolist()
        samples.append(Sample(ids[:-1], ids[1:]))
    return collate(samples, [[i] for i in range(rows)], n)


def test_fp8_weights_take_half_the_bytes(make_tiny_mistral):
    model = _tiny(make_tiny_mistral, torch.bfloat16)
    linears = {n: m for n, m in model.named_modules() if n.rpartition(".")[2] in ALL_PROJECTIONS}
    bf16_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears.values())
    assert fp8_model(model, ALL_PROJECTIONS) == len(linears) == 7 * model.config.num_hidden_layers
    fp8 = [model.get_submodule(n) for n in linears]
    assert all(isinstance(m, FP8Linear) for m in fp8)
    code_bytes = sum(m.codes.numel() * m.codes.element_size() for m in fp8)
    scale_bytes = sum(m.scale.numel() * m.scale.element_size() for m in fp8)
    assert code_bytes * 2 == bf16_bytes
    assert scale_bytes == 4 * sum(m.out_features for m in fp8)  # one float32 per output row
    model.to(torch.float32)  # a dtype change moves nothing out of e4m3
    assert all(m.codes.dtype == E4M3 and m.scale.dtype == torch.float32 for m in fp8)


def test_fp8_base_logits_are_close_to_the_full_precision_base(make_tiny_mistral):
    model = _tiny(make_tiny_mistral, std=0.02)  # HF's init: a model's usual weight scale
    ids = torch.randint(3, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    fp8 = copy.deepcopy(model)
    fp8_model(fp8, ALL_PROJECTIONS)
    with torch.no_grad():
        want, got = model(ids), fp8(ids)
    # Each product rounds both factors to e4m3 (relative error at most u = 2^-4 each, about u/2 on
    # average): a few percent per projection (bounded above), within u in the logits after two layers.
    assert float((got - want).norm() / want.norm()) < U
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) > 0.9


def test_lora_on_fp8_base_checkpoints_to_the_same_gradients(make_tiny_mistral):
    """Checkpointed layers re-run the FP8 products (and skip the down projection's product, taking
    its FP8 input gradient only): the LoRA gradients equal the plain backward's."""
    model = _tiny(make_tiny_mistral)
    fp8_model(model, ALL_PROJECTIONS)
    _lora(model).train()
    batch = _batch()
    grads = []
    for ckpt in (False, True):
        model.configure(gradient_checkpointing=ckpt)
        model.zero_grad(set_to_none=True)
        (model.token_loss(batch) / batch.n_trained).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 2 * 7 * model.config.num_hidden_layers
    for name, g in grads[0].items():
        assert float((grads[1][name] - g).abs().max()) <= 1e-5 * float(g.abs().max()), name


@pytest.mark.slow
def test_fp8_decoder_layer_compiles_to_one_graph(make_tiny_mistral):
    """The fast path compiles each decoder layer: one with FP8 projections under LoRA traces whole
    (no graph break; aot_eager: Dynamo's tracing without a C++ compiler) and gives the eager
    layer's output and gradients."""
    from mistral_tune.models.mistral import rope_tables

    model = _tiny(make_tiny_mistral)
    fp8_model(model, ALL_PROJECTIONS)
    _lora(model).train()
    layer = model.model.layers[0]
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 16, 64, generator=gen)
    cos, sin = rope_tables(torch.arange(16).expand(2, 16), 16, 10000.0, torch.float32)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    torch._dynamo.reset()
    results = []
    for run in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False)):
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        out = run(x, cos, sin, mask)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}))
    torch._dynamo.reset()
    (out_e, gx_e, g_e), (out_c, gx_c, g_c) = results
    assert torch.allclose(out_c, out_e, atol=1e-6)
    assert torch.allclose(gx_c, gx_e, atol=1e-6)
    for name in g_e:
        assert torch.allclose(g_c[name], g_e[name], atol=1e-6), name


def _run_config(tmp_path, model_dir, name, **extra):
    from mistral_tune.quickstart import data_dir

    return config_from_dict({
        "base_model": str(model_dir), "tokenizer": "v3", "datasets": [{"path": str(data_dir() / "train.jsonl")}],
        "output_dir": str(tmp_path / name), "val_set_size": 0.05, "sequence_len": 64, "sample_packing": True,
        "lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-2, "warmup_steps": 3, "max_steps": 30,
        "micro_batch_size": 4, "logging_steps": 1, "eval_steps": 1000, "dataset_cache": False, "seed": 0, **extra,
    })


@pytest.mark.slow
def test_lora_on_fp8_base_learns_like_the_full_precision_base(tiny_model_dir, tmp_path):
    """The bundled quickstart data, the same steps over a full-precision and an FP8 base: the
    held-out loss falls as far on both, within 10% of the full-precision run's fall from the
    first step's loss (measured: within 3%, on a fall of about 0.5 nats)."""
    from mistral_tune.train.loop import train

    results = {}
    for precision in ("bf16", "fp8"):
        cfg = _run_config(tmp_path, tiny_model_dir, precision, base_precision=precision)
        results[precision] = train(cfg, echo=lambda *_: None)
    start = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["step"] == 1
    fall_full = start["loss"] - results["bf16"].eval_loss
    fall_fp8 = start["loss"] - results["fp8"].eval_loss
    assert fall_full > 0.3
    assert fall_fp8 == pytest.approx(fall_full, rel=0.1)
    adapter = results["fp8"].adapter_dir
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / BASE_QUANTIZATION).exists()  # a merge takes the original weights


@pytest.mark.parametrize("adapter", ["qlora", "none"])
def test_fp8_base_is_for_lora_only(adapter):
    with pytest.raises(ConfigError, match=f"base_precision: fp8 is for adapter: lora.*adapter: {adapter}"):
        config_from_dict({"base_model": "x", "datasets": [{"path": "x"}], "adapter": adapter,
                          "base_precision": "fp8"})


@settings(max_examples=20, deadline=None)
@given(major=st.integers(3, 12), minor=st.integers(0, 9), name=st.text(min_size=1, max_size=30))
def test_fp8_needs_compute_capability_8_9(major, minor, name):
    error = fp8_support_error(name, (major, minor))
    if (major, minor) >= (8, 9):
        assert error is None
    else:
        assert f"{name} has {major}.{minor}" in error and "compute capability 8.9" in error


def test_fp8_projection_sizes_must_suit_fp8_matmuls():
    with pytest.raises(ConfigError, match="multiples of 16.*40x64"):
        FP8Linear.from_linear(nn.Linear(64, 40, bias=False))
