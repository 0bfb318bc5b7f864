"""The model's options and its loss methods: options are set through one call and never as attributes;
per-sequence log-probabilities equal transformers + PEFT's, packed or not; the fused loss reads the
trained rows of an adapted head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

from mistral_tune.data.pack import IGNORE, Sample, collate
from mistral_tune.models.lora import LoraSpec, apply_lora
from mistral_tune.models.mistral import ModelOptions
from mistral_tune.models.peft_format import save_adapter

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

OPTION_NAMES = ["gradient_checkpointing", "offload_activations", "recompute_by_row", "attn_impl", "one_sample_rows",
                "fused_loss", "mlp_chunk_tokens", "neftune_alpha", "router_aux_loss_coef"]


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_an_option_set_as_an_attribute_is_refused(make_tiny_mistral, name):
    model = make_tiny_mistral()
    value = getattr(model.options, name)
    with pytest.raises(AttributeError, match=rf"model.configure\({name}="):
        setattr(model, name, value)
    assert model.options == ModelOptions()


def test_configured_restores_every_option_even_when_the_block_raises(make_tiny_mistral):
    model = make_tiny_mistral()
    model.configure(gradient_checkpointing=True, mlp_chunk_tokens=7)
    before = model.options
    with pytest.raises(RuntimeError, match="inside"):
        with model.configured(attn_impl="flex", fused_loss=True, mlp_chunk_tokens=3) as opts:
            assert opts.attn_impl == "flex" and opts.gradient_checkpointing
            assert model.model.layers[0].mlp.chunk_tokens == 3
            raise RuntimeError("inside")
    assert model.options == before
    assert all(layer.mlp.chunk_tokens == 7 for layer in model.model.layers)


@pytest.mark.parametrize("changes", [{"attn_impl": "flash"}, {"mlp_chunk_tokens": 0}])
def test_configure_refuses_bad_values_and_keeps_the_old_ones(make_tiny_mistral, changes):
    model = make_tiny_mistral()
    with pytest.raises(ValueError, match=next(iter(changes))):
        model.configure(**changes)
    assert model.options == ModelOptions()
    with pytest.raises(TypeError):
        model.configure(no_such_option=True)


def _samples(seed: int, n: int = 4, vocab: int = 1000) -> list[Sample]:
    """Chat-like samples: a prompt without loss, then an answer with loss, of varying lengths."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, answer = (int(x) for x in torch.randint(2, 9, (2,), generator=gen))
        ids = torch.randint(0, vocab, (prompt + answer + 1,), generator=gen).tolist()
        out.append(Sample.from_ids(ids, [False] * (prompt + 1) + [True] * answer))
    return out


def _adapted(make_tiny_mistral, spec: LoraSpec):
    model = make_tiny_mistral()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, spec, seed=3)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval(), base_state


SPEC = LoraSpec(r=4, alpha=8, trainable_tokens={"lm_head": [3, 17, 999]})


@pytest.mark.parametrize("packed", [False, True])
def test_sequence_logprobs_equal_transformers_and_peft(make_tiny_mistral, make_hf_mistral, tmp_path: Path, packed):
    model, base_state = _adapted(make_tiny_mistral, SPEC)
    save_adapter(model, SPEC, tmp_path, base_model="tiny")
    ref = PeftModel.from_pretrained(make_hf_mistral(model.config, base_state), str(tmp_path)).eval()
    samples = _samples(1)
    rows = [[0, 1, 2, 3]] if packed else [[0], [1], [2], [3]]
    batch = collate(samples, rows)
    with torch.no_grad():
        logp, count = model.sequence_logprobs(batch)
        want = []
        for s in samples:
            logits = ref(input_ids=torch.tensor([s.tokens]), use_cache=False).logits.float()[0]
            labels = torch.tensor(s.labels)
            keep = labels != IGNORE
            want.append(F.log_softmax(logits[keep], -1).gather(1, labels[keep, None]).sum())
    assert count.tolist() == [s.n_trained for s in samples]
    assert torch.allclose(logp, torch.stack(want), rtol=1e-5, atol=1e-5), (logp, want)
    # the summed token loss is their negated sum
    with torch.no_grad():
        assert float(model.token_loss(batch)) == pytest.approx(-float(logp.sum()), rel=1e-5)


def test_sequence_logprobs_gradient_equals_autograd_through_the_logits(make_tiny_mistral):
    model, _ = _adapted(make_tiny_mistral, SPEC)
    model.train()
    batch = collate(_samples(2, n=5), [[0, 1], [2, 3, 4]])
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    logp, _ = model.sequence_logprobs(batch)
    (logp * weights).sum().backward()
    ours = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    logits = model(batch.input_ids, batch.position_ids, batch.seq_ids)
    keep = batch.labels != IGNORE
    token = F.log_softmax(logits[keep], -1).gather(1, batch.labels[keep, None])[:, 0]
    sample = (torch.arange(2)[:, None] * 3 + batch.seq_ids)[keep]  # (row, seq_id) -> 0, 1 | 3, 4, 5
    index = torch.tensor([0, 1, -1, 2, 3, 4])[sample]
    (token * weights[index]).sum().backward()
    for a, (name, p) in zip(ours, [(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6), name


def test_fused_loss_reads_the_trained_rows_of_an_adapted_head(make_tiny_mistral):
    """With trainable tokens on lm_head the fused loss (kernels/loss.py) must use their values, not the
    frozen weight's rows: the same loss and gradients as the plain loss."""
    model, _ = _adapted(make_tiny_mistral, SPEC)
    model.train()
    samples = _samples(3, n=6)
    for s in samples:  # targets that are trained rows
        s.labels[-1] = 17
    batch = collate(samples, [[0, 1, 2], [3, 4, 5]])
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        with model.configured(fused_loss=fused):
            loss = model.batch_loss(batch)
            loss.backward(batch.n_trained)
        assert loss.router_aux is None  # a dense model has no auxiliary loss
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss.tokens), grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    delta = [n for n in results[0][1] if "trainable_tokens_delta" in n]
    assert delta and results[0][1][delta[0]].abs().max() > 0
    for n, g in results[0][1].items():
        assert torch.allclose(g, results[1][1][n], rtol=1e-4, atol=1e-6), n
