"""The decoding engine (generate/): greedy tokens equal decoding with no cache at all, in float32, for
mixed batches that join and leave, for dense, sliding-window, grouped-query and mixture-of-experts
models, with LoRA unmerged; sampling draws from the right distribution, depends on a request's seed
alone, and keeps to top-k, top-p and a grammar's mask; log-probabilities are the model's."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_tune.generate.decoder import Decoder, End, Params, Token, bucket
from mistral_tune.generate.run import Conversation, generate_batch, stream
from mistral_tune.generate.sampling import Modes, allowed_tokens, pick
from mistral_tune.models.lora import LoraSpec, apply_lora, merge_lora
from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM
from plain_decoding import plain_greedy

VOCAB, EOS = 200, 2


def _model(**kw) -> MistralForCausalLM:
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=kw.pop("kv", 2), max_position_embeddings=512,
                        eos_token_id=EOS, **kw)
    model = MistralForCausalLM(cfg)
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))  # peaked logits: EOS comes early
    return model.eval()


def _lora() -> MistralForCausalLM:
    model = _model()
    apply_lora(model, LoraSpec(r=4, alpha=8), seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, 0.0, 0.3, generator=torch.Generator().manual_seed(1))
    return model.eval()


MODELS = {"dense": _model(), "window 4": _model(sliding_window=4), "one kv head": _model(kv=1),
          "mixtral": _model(num_local_experts=4, num_experts_per_tok=2), "lora unmerged": _lora()}


pytestmark = pytest.mark.usefixtures("one_thread")


prompts = st.lists(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=14), min_size=1, max_size=7)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=prompts, kind=st.sampled_from(sorted(MODELS)), slots=st.integers(1, 4), new=st.integers(1, 10))
def test_greedy_tokens_equal_decoding_without_a_cache(prompts, kind, slots, new) -> None:
    """More prompts than slots: prompts join as others end, rows of different lengths share steps."""
    model = MODELS[kind]
    got = generate_batch(model, prompts, new, eos_id=EOS, batch_size=slots)
    assert got == [plain_greedy(model, p, new, eos_id=EOS) for p in prompts]


def test_lora_unmerged_decodes_as_the_merged_model() -> None:
    model, merged = _lora(), _lora()
    merge_lora(merged)
    ps = [[5, 6, 7], [9] * 11, [3]]
    assert generate_batch(model, ps, 8) == generate_batch(merged, ps, 8) == [plain_greedy(merged, p, 8) for p in ps]


def test_a_kept_prefix_is_not_computed_again_and_changes_nothing() -> None:
    model = MODELS["window 4"]
    chat = Conversation(model, capacity=128)
    fed = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: fed.append(i[0].numel()))
    try:
        first = [t.id for t in chat.stream([5, 6, 7, 8], Params(6), EOS)]
        held = chat.cached_tokens
        fed.clear()
        second_prompt = [5, 6, 7, 8, *first, 9, 10]
        second = [t.id for t in chat.stream(second_prompt, Params(6), EOS)]
    finally:
        hook.remove()
    assert held == 4 + len(first) - 1  # the last answer token was never fed
    assert fed[0] == len(second_prompt) - held  # the prefill computed only what follows the kept prefix
    assert second == plain_greedy(model, second_prompt, 6, eos_id=EOS)


def test_sequences_of_one_prompt_share_its_prefill_and_keep_their_own_seeds() -> None:
    model = MODELS["dense"]
    dec = Decoder(model, slots=4, capacity=64)
    fed, got = [], {i: [] for i in range(3)}
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: fed.append(tuple(i[0].shape)))
    try:
        dec.add_many([([4, 5, 6, 7, 8], Params(6, temperature=1.0, seed=10 + i),
                       lambda item, i=i: got[i].append(item)) for i in range(3)])
    finally:
        hook.remove()
    while dec.rows:
        dec.step()
    assert fed[0] == (1, 5)  # one prefill row for three sequences
    alone = [[t.id for t in stream(model, [4, 5, 6, 7, 8], Params(6, temperature=1.0, seed=10 + i))]
             for i in range(3)]
    assert [[t.id for t in got[i] if isinstance(t, Token)] for i in range(3)] == alone
    assert len({tuple(a) for a in alone}) > 1


def test_an_early_stop_frees_the_slot_and_a_prompt_too_long_fails_alone() -> None:
    model = MODELS["dense"]
    dec = Decoder(model, slots=1, capacity=16)
    it = stream(model, [5, 6], Params(50), decoder=dec)
    next(it)
    it.close()
    assert not dec.rows and dec.free() == 1
    ends = []
    dec.add_many([([3] * 16, Params(4), ends.append)])
    assert isinstance(ends[-1], End) and ends[-1].reason == "error" and "does not fit" in str(ends[-1].error)
    assert [t.id for t in stream(model, [5, 6], Params(3), decoder=dec)] == plain_greedy(model, [5, 6], 3)


def test_logprobs_are_the_models_log_softmax() -> None:
    model = MODELS["mixtral"]
    prompt = [7, 8, 9, 10]
    toks = list(stream(model, prompt, Params(5, logprobs=3)))
    ids = prompt + [t.id for t in toks]
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    for k, t in enumerate(toks):
        row = want[len(prompt) - 1 + k]
        assert t.logprob == pytest.approx(row[t.id].item(), abs=1e-4)
        assert [i for i, _ in t.top] == row.topk(3).indices.tolist()
        assert [v for _, v in t.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)


def _pick(logits, temperature=1.0, top_p=1.0, top_k=0, seed=0, counter=0, bitmask=None, **modes):
    n, vocab = logits.shape
    col = lambda v, dtype=torch.float32: torch.full((n,), v, dtype=dtype)
    if bitmask is None:
        bitmask = torch.full((n, (vocab + 31) // 32), -1, dtype=torch.int32)
    counters = torch.arange(counter, counter + n) if isinstance(counter, int) else counter
    return pick(logits, Modes(sample=True, **modes), col(temperature), col(top_p), col(top_k, torch.long),
                col(seed, torch.long), counters, bitmask).tokens


def test_sampling_draws_from_softmax_over_temperature() -> None:
    """20,000 draws of one row (each its own counter) match softmax(logits / T) within 4 sigma."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    n = 20_000
    drawn = _pick(logits.expand(n, 5).clone(), temperature=0.7, seed=3)
    freq = torch.bincount(drawn, minlength=5).double() / n
    p = torch.softmax(logits.double() / 0.7, -1)
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-9).all(), (freq, p)


@settings(max_examples=40, deadline=None)
@given(logits=st.lists(st.floats(-20, 20, width=32), min_size=2, max_size=40), top_k=st.integers(0, 6),
       top_p=st.floats(0.01, 1.0), seed=st.integers(0, 2**40))
def test_top_k_and_top_p_keep_only_the_tokens_they_allow(logits, top_k, top_p, seed) -> None:
    row = torch.tensor(logits)
    n = 64
    drawn = set(_pick(row.expand(n, -1).clone(), 1.0, top_p, top_k, seed, filter=True).tolist())
    probs = torch.softmax(row.double(), -1)
    order = probs.argsort(descending=True, stable=True)
    before = probs[order].cumsum(0) - probs[order]
    keep = before < top_p
    if top_k:
        keep[top_k:] = False
    keep[0] = True
    cutoff = row[order][keep].min()
    assert drawn <= {i for i in range(len(logits)) if row[i] >= cutoff}


def test_a_grammar_mask_allows_only_its_tokens_and_seeds_repeat() -> None:
    vocab = 70
    allowed = [3, 31, 32, 63, 64, 69]
    words = torch.zeros(1, 3, dtype=torch.int32)
    for t in allowed:
        words[0, t // 32] |= -(2**31) if t % 32 == 31 else 1 << (t % 32)
    assert allowed_tokens(words, vocab)[0].nonzero()[:, 0].tolist() == allowed
    logits = torch.randn(200, vocab, generator=torch.Generator().manual_seed(0))
    drawn = _pick(logits, bitmask=words.expand(200, -1), masked=True)
    assert set(drawn.tolist()) <= set(allowed) and len(set(drawn.tolist())) > 3
    assert drawn.equal(_pick(logits, bitmask=words.expand(200, -1), masked=True))


def test_buckets_and_bad_params() -> None:
    assert [bucket(n, 64) for n in (1, 2, 3, 5, 17, 64, 65)] == [1, 2, 4, 8, 32, 64, 64]
    for bad in (dict(max_tokens=0), dict(max_tokens=1, temperature=-1), dict(max_tokens=1, top_p=0),
                dict(max_tokens=1, logprobs=21), dict(max_tokens=1, top_k=-1)):
        with pytest.raises(ValueError):
            Params(**bad)
    assert math.isclose(Params(3, top_p=1.0).top_p, 1.0)


def test_keys_kept_by_an_earlier_call_are_not_reused_after_the_weights_change() -> None:
    """Evaluations during training ask the same prompts again after optimizer steps (and of the base with
    the adapters off): a call never reuses keys computed by an earlier one."""
    model = _model()
    ps = [[5, 6, 7, 8, 9], [11] * 7]
    generate_batch(model, ps, 6)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(-1.5)
    assert generate_batch(model, ps, 6) == [plain_greedy(model, p, 6) for p in ps]
