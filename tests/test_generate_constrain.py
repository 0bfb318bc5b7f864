"""Constrained decoding: xgrammar reads our vocabularies right (what mistral-common encodes is what
the grammar accepts), and a random model decoding under a hypothesis-generated JSON schema always
answers JSON that validates (the schemas are bounded, so a whole answer fits in max_tokens)."""

from __future__ import annotations

import json
import queue

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_tune.chat import load_tokenizer
from mistral_tune.generate.constrain import Grammars, mask_words
from mistral_tune.generate.decoder import End, Params
from mistral_tune.generate.engine import Engine
from mistral_tune.generate.sampling import allowed_tokens
from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM

TOKENIZERS = {v: load_tokenizer(v) for v in ("v3", "tekken")}
GRAMMARS = {v: Grammars(t, t.vocab_size + 7) for v, t in TOKENIZERS.items()}  # a model vocabulary padded past it


pytestmark = pytest.mark.usefixtures("one_thread")


json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=12)
json_objects = st.dictionaries(st.text(min_size=1, max_size=6), st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6), max_size=4)


@settings(max_examples=40, deadline=None)
@given(value=json_objects, version=st.sampled_from(list(TOKENIZERS)))
def test_json_encoded_by_the_tokenizer_is_accepted_token_by_token(value, version) -> None:
    tok, constraint = TOKENIZERS[version], GRAMMARS[version].json(None)
    ids = tok.encode_text(json.dumps(value, ensure_ascii=False), bos=False, eos=False)
    mask = torch.zeros(mask_words(GRAMMARS[version].vocab_size), dtype=torch.int32)
    for t in ids:
        constraint.fill_mask(mask)
        allowed = allowed_tokens(mask[None], GRAMMARS[version].vocab_size)[0]
        assert allowed[t], (version, tok.decode([t]))
        assert not allowed[tok.vocab_size:].any()  # past the tokenizer's vocabulary: never
        constraint.accept(t)
    assert constraint.finished


def _bounded_schema(depth: int = 2) -> st.SearchStrategy[dict]:
    """JSON schemas whose every instance is short (the grammar cannot run on)."""
    leaf = st.sampled_from([{"type": "boolean"}, {"type": "null"}, {"enum": ["a", "bc", 3]},
                            {"type": "integer", "minimum": -50, "maximum": 50}]) | \
        st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n})
    if depth == 0:
        return leaf
    inner = _bounded_schema(depth - 1)
    obj = st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), inner, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {"type": "object", "properties": props, "required": req, "additionalProperties": False}))
    arr = inner.map(lambda items: {"type": "array", "items": items, "maxItems": 2})
    return leaf | obj | arr


def _model(vocab: int) -> MistralForCausalLM:
    cfg = MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    model = MistralForCausalLM(cfg)
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    return model.eval()


MODELS = {v: _model(g.vocab_size) for v, g in GRAMMARS.items()}


def _answer(engine: Engine, prompt: list[int], params: Params) -> tuple[list[int], End]:
    items: queue.Queue = queue.Queue()
    engine.submit(prompt, params, items.put)
    ids = []
    while not isinstance(item := items.get(timeout=60), End):
        ids.append(item.id)
    return ids, item


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=_bounded_schema().filter(lambda s: s.get("type") in ("object", "array")),
       version=st.sampled_from(list(TOKENIZERS)), temperature=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 99))
def test_a_random_model_under_a_schema_answers_valid_json(schema, version, temperature, seed) -> None:
    tok, grammars = TOKENIZERS[version], GRAMMARS[version]
    engine = Engine(MODELS[version], tok.eos_id, max_batch=2)
    try:
        jobs = [Params(300, temperature, seed=seed + i, constraint=grammars.json(schema)) for i in range(2)]
        answers = [_answer(engine, tok.encode_text("JSON:", bos=True, eos=False), p) for p in jobs]
    finally:
        engine.close()
    for ids, end in answers:
        assert end.reason == "stop", (end, tok.decode(ids))
        jsonschema.validate(json.loads(tok.decode(ids)), schema)


def test_max_tokens_cuts_a_constrained_answer_with_length() -> None:
    """A row cut by max_tokens ends with "length": what came is a prefix the grammar accepts."""
    tok, grammars = TOKENIZERS["v3"], GRAMMARS["v3"]
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 6}}, "required": ["a"]}
    engine = Engine(MODELS["v3"], tok.eos_id)
    try:
        ids, end = _answer(engine, [1, 5], Params(3, constraint=grammars.json(schema)))
    finally:
        engine.close()
    assert end.reason == "length" and len(ids) == 3
    check = grammars.json(schema)
    for t in ids:
        check.accept(t)  # raises if the grammar refuses one
    assert not check.finished
