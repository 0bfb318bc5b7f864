"""Task metrics against the maintained implementations: rouge-score, scikit-learn, sacrebleu, jsonschema."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral_tune.config import TaskEvalConfig
from mistral_tune.errors import ConfigError
from mistral_tune.evaluate.tasks import (
    corpus_bleu,
    corpus_chrf,
    exact_match,
    label_metrics,
    load_function,
    normalize,
    rouge_l,
    score,
    token_f1,
)

WORDS = ["the", "a", "cat", "Cat", "sat", "on", "mat", "dog's", "ran", "far", "an", "away", "42", "x-ray", "Über"]
texts = st.lists(st.sampled_from(WORDS + [",", ".", "!", "  "]), max_size=12).map(" ".join)
FAST = settings(max_examples=60, deadline=None)


@FAST
@given(texts, texts)
def test_rouge_l_equals_rouge_score(pred, ref):
    from rouge_score import rouge_scorer

    theirs = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert rouge_l(pred, ref) == pytest.approx(theirs, abs=1e-12)


SQUAD = ("lower", "punctuation", "articles", "whitespace")


class _SquadTokens:
    """rouge-score's tokenizer interface, splitting as token_f1 does."""

    def tokenize(self, text):
        return normalize(text, SQUAD).split()


@FAST
@given(texts, texts)
def test_token_f1_equals_rouge1_on_the_same_tokens(pred, ref):
    from rouge_score import rouge_scorer

    # ROUGE-1's F-measure is the F1 of the multiset of shared unigrams: what token F1 is.
    theirs = rouge_scorer.RougeScorer(["rouge1"], tokenizer=_SquadTokens()).score(ref, pred)["rouge1"].fmeasure
    p, r = normalize(pred, SQUAD).split(), normalize(ref, SQUAD).split()
    if not p and not r:
        assert token_f1(pred, ref) == 1.0  # both empty: a match (rouge-score says 0 here)
    else:
        assert token_f1(pred, ref) == pytest.approx(theirs, abs=1e-12)


def test_exact_match_normalisations():
    assert exact_match(" Paris\n", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0
    assert exact_match("paris", "Paris", ["lower"]) == 1.0
    assert exact_match("The  Eiffel tower!", "eiffel tower", ["lower", "punctuation", "articles", "whitespace"]) == 1.0
    assert exact_match("Eiffel tower", "Eiffel towers", SQUAD) == 0.0


@FAST
@given(st.lists(st.tuples(st.sampled_from(["pos", "neg", "neutral", "other"]),
                          st.sampled_from(["pos", "neg", "neutral"])), min_size=1, max_size=40))
def test_label_metrics_equal_scikit_learn(pairs):
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    labels = ["neg", "neutral", "pos"]
    ours = label_metrics(preds, refs, labels)
    p, r, f, _ = precision_recall_fscore_support(refs, preds, labels=labels, average="macro", zero_division=0)
    assert ours["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((p, r, f))


CORPUS = (["the cat sat on the mat", "a dog ran far away", "hello there", ""],
          ["the cat is on the mat", "the dog ran away", "hello there friend", "nothing"])


def test_bleu_and_chrf_are_sacrebleu_corpus_scores():
    from sacrebleu.metrics import BLEU, CHRF

    preds, refs = CORPUS
    assert corpus_bleu(preds, refs) == pytest.approx(BLEU().corpus_score(preds, [refs]).score)
    assert corpus_chrf(preds, refs) == pytest.approx(CHRF().corpus_score(preds, [refs]).score)
    assert 0 < corpus_bleu(preds, refs) < 100 and corpus_bleu(refs, refs) == pytest.approx(100)


def _cfg(**kw) -> TaskEvalConfig:
    return TaskEvalConfig.model_validate({"dataset": {"path": "x.jsonl"}, **kw})


def test_json_validity_and_schema(tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    preds = ['{"n": 1}', '```json\n{"n": 2}\n```', '{"n": "two"}', "{n: 1}", "[1, 2]"]
    cfg = _cfg(metrics=["json_valid", "json_schema"], json_schema=str(tmp_path / "s.json"))
    got = score(preds, [""] * len(preds), cfg)
    assert got["json_valid"] == pytest.approx(4 / 5)
    validator = jsonschema.Draft202012Validator(schema)
    expected = [validator.is_valid(v) for v in ({"n": 1}, {"n": 2}, {"n": "two"}, None, [1, 2])]
    assert got["json_schema"] == pytest.approx(sum(expected) / 5)


def test_regex_and_user_function(tmp_path):
    (tmp_path / "judge.py").write_text("def close(pred, ref):\n    return abs(len(pred.strip()) - len(ref)) <= 1\n")
    cfg = _cfg(metrics=["regex", "function"], regex=r"\d{3}-\d{4}", function=f"{tmp_path / 'judge.py'}:close")
    got = score([" 555-1234 ", "call 555-1234", "12-34"], ["555-1234", "x", "12-345"], cfg)
    assert got["regex"] == pytest.approx(1 / 3)
    assert got["function"] == pytest.approx(2 / 3)
    assert load_function("string:capwords") is string.capwords


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "not module:function"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("string:no_such_fn", "has no function 'no_such_fn'"),
    ("missing.py:f", "does not exist"),
])
def test_bad_function_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_function(spec)


def test_metric_needing_a_setting_is_refused_by_the_config():
    from mistral_tune.config import config_from_dict

    with pytest.raises(ConfigError, match="metric json_schema needs eval.tasks.json_schema"):
        config_from_dict({"base_model": "m", "datasets": [{"path": "d.jsonl"}],
                          "eval": {"tasks": {"dataset": {"path": "e.jsonl"}, "metrics": ["json_schema"]}}})
