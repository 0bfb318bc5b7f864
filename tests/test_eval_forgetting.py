"""Forgetting and loss measures against a reference: transformers + PEFT logits, SciPy's KL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel
from scipy.special import rel_entr

from mistral_tune.config import ForgettingConfig
from mistral_tune.evaluate.base import ModelPair, token_logprobs
from mistral_tune.evaluate.forgetting import ForgettingEval, kl_per_token, mean_nll
from mistral_tune.models.lora import LoraLinear, LoraSpec, apply_lora
from mistral_tune.models.peft_format import save_adapter

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _seqs(lengths=(7, 12, 3, 9), vocab=1000, seed=2) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _adapted(make_tiny_mistral, b_std: float):
    model = make_tiny_mistral()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraSpec(r=4, alpha=8), seed=3)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.normal_(0.0, b_std, generator=gen)
    return model.eval(), base_state


def _reference(tmp_path, model, base_state, make_hf_mistral, seqs):
    """Per sequence: (tuned log-probs, base log-probs) over the vocabulary, float64, from PEFT."""
    save_adapter(model, LoraSpec(r=4, alpha=8), tmp_path, base_model="tiny")
    ref = PeftModel.from_pretrained(make_hf_mistral(model.config, base_state), str(tmp_path)).eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            x = torch.tensor([s])
            tuned = torch.log_softmax(ref(input_ids=x, use_cache=False).logits.double()[0], -1)
            with ref.disable_adapter():
                base = torch.log_softmax(ref(input_ids=x, use_cache=False).logits.double()[0], -1)
            out.append((tuned, base))
    return out


def test_kl_and_perplexity_equal_peft_and_scipy(tmp_path, make_tiny_mistral, make_hf_mistral):
    model, base_state = _adapted(make_tiny_mistral, b_std=0.2)
    seqs = _seqs()
    ref = _reference(tmp_path, model, base_state, make_hf_mistral, seqs)
    pair = ModelPair(model, tokenizer=None)
    # KL(tuned || base) at every position, by SciPy's elementwise relative entropy.
    kl_ref = np.concatenate([rel_entr(t.exp().numpy(), b.exp().numpy()).sum(-1) for t, b in ref]).mean()
    kl = kl_per_token(pair, seqs, batch_tokens=20)  # a small budget: several batches, padded rows
    assert kl > 1e-3
    assert kl == pytest.approx(kl_ref, rel=1e-4)
    # Mean NLL of the next token, tuned and base.
    for side, which in (("tuned", 0), ("base", 1)):
        nll_ref = -np.concatenate([r[which][:-1].gather(-1, torch.tensor(s[1:])[:, None])[:, 0].numpy()
                                   for r, s in zip(ref, seqs, strict=True)]).mean()
        with pair.side(side) as m:
            assert mean_nll(m, seqs, batch_tokens=20) == pytest.approx(nll_ref, rel=1e-5)


def test_token_logprobs_do_not_depend_on_batching(make_tiny_mistral):
    model = make_tiny_mistral()
    seqs = _seqs(lengths=(5, 17, 2, 11, 11))
    one = token_logprobs(model, seqs, batch_tokens=1)  # one sequence a batch
    many = token_logprobs(model, seqs, batch_tokens=10_000)  # all padded together
    for a, b, s in zip(one, many, seqs, strict=True):
        assert a.shape == (len(s) - 1,)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_an_untrained_adapter_forgets_nothing(make_tiny_mistral):
    model, _ = _adapted(make_tiny_mistral, b_std=0.0)  # B = 0: the adapter is the identity
    cfg = ForgettingConfig.model_validate({"dataset": {"path": "x"}})
    result = ForgettingEval(_seqs(), cfg, "x").run(ModelPair(model, tokenizer=None))
    assert result.metrics["kl"]["tuned"] == 0.0
    assert result.metrics["ppl"]["base"] == result.metrics["ppl"]["tuned"]
    assert result.warnings == []


def test_thresholds_become_warnings(make_tiny_mistral):
    model, _ = _adapted(make_tiny_mistral, b_std=0.5)
    cfg = ForgettingConfig.model_validate({"dataset": {"path": "x"}, "max_kl": 1e-4, "max_ppl_increase": 1e-4})
    result = ForgettingEval(_seqs(), cfg, "general.jsonl").run(ModelPair(model, tokenizer=None))
    kl = result.metrics["kl"]["tuned"]
    assert any(w.startswith(f"KL from base rose to {kl:.3g} nats/token") for w in result.warnings)
    assert any("perplexity on general.jsonl rose" in w for w in result.warnings) == (
        result.metrics["ppl_increase"]["tuned"] > 1e-4)


def test_a_merged_model_compares_with_a_separate_base(make_tiny_mistral):
    from mistral_tune.models.lora import merge_lora

    tuned, base_state = _adapted(make_tiny_mistral, b_std=0.2)
    seqs = _seqs()
    in_place = kl_per_token(ModelPair(tuned, None), seqs, 1000)
    merge_lora(tuned)
    base = make_tiny_mistral()
    base.load_state_dict(base_state)
    assert kl_per_token(ModelPair(tuned, None, base_model=base), seqs, 1000) == pytest.approx(in_place, rel=1e-4)


def test_answer_loss_equals_transformers_cross_entropy(make_tiny_mistral, make_hf_mistral):
    from mistral_tune.evaluate.loss import masked_nll

    model = make_tiny_mistral()
    hf = make_hf_mistral(model.config, model.state_dict())
    gen = torch.Generator().manual_seed(4)
    samples = []
    for n in (9, 14, 5, 11):
        ids = _seqs(lengths=(n,), seed=n)[0]
        mask = (torch.rand(n, generator=gen) < 0.4).tolist()
        mask[-1] = True
        samples.append((ids, mask))
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in samples:
            labels = torch.tensor([t if m else -100 for t, m in zip(ids, mask, strict=True)])
            logits = hf(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum"))
            count += int((labels[1:] != -100).sum())
    assert masked_nll(model, samples, batch_tokens=24) == pytest.approx(total / count, rel=1e-5)
