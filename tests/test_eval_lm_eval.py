"""lm-evaluation-harness on our model, through its Python API, with a local task YAML and local data
(no hub): log-likelihoods against transformers, and a task's accuracy from them."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from mistral_tune.chat import load_tokenizer
from mistral_tune.config import ForgettingConfig
from mistral_tune.evaluate.base import ModelPair
from mistral_tune.models.load import load_model

if importlib.util.find_spec("lm_eval") is None:
    if os.environ.get("MISTRAL_TUNE_REQUIRE_LM_EVAL") == "1":
        raise ImportError("MISTRAL_TUNE_REQUIRE_LM_EVAL=1 but lm-eval is missing: pip install -e '.[eval]'")
    pytest.skip("lm-evaluation-harness is an optional extra: pip install 'mistral-tune[eval]'", allow_module_level=True)

DOCS = [
    {"question": "The sky on a clear day is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Two plus two is", "choices": ["five", "four"], "answer": 1},
    {"question": "Ice is made of frozen", "choices": ["sand", "water", "light", "glass"], "answer": 1},
    {"question": "A week has seven", "choices": ["days", "rivers"], "answer": 0},
    {"question": "Bread is baked in an", "choices": ["oven", "ocean", "orbit"], "answer": 0},
]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    return model.eval(), load_tokenizer(None, tiny_model_dir)


def _reference_loglikelihood(hf, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer.encode_text(context, bos=False, eos=False)
    whole = tokenizer.encode_text(context + continuation, bos=False, eos=False)
    ids = torch.tensor([[tokenizer.bos_id] + whole])
    with torch.no_grad():
        logp = torch.log_softmax(hf(input_ids=ids).logits.double()[0], -1)
    cont = whole[len(ctx):]
    start = 1 + len(ctx)
    return float(sum(logp[start - 1 + k, t] for k, t in enumerate(cont)))


def test_loglikelihoods_equal_transformers(setup, make_hf_mistral):
    from lm_eval.api.instance import Instance

    from mistral_tune.evaluate.lm_eval import harness_lm

    model, tokenizer = setup
    hf = make_hf_mistral(model.config, model.state_dict())
    pairs = [(d["question"], " " + c) for d in DOCS for c in d["choices"]]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    ours = harness_lm(model, tokenizer, batch_size=3).loglikelihood(requests)
    for (value, greedy), (context, continuation) in zip(ours, pairs, strict=True):
        assert value == pytest.approx(_reference_loglikelihood(hf, tokenizer, context, continuation), rel=1e-4)
        assert isinstance(greedy, bool)


def test_local_task_through_the_harness(setup, make_hf_mistral, tmp_path: Path, monkeypatch):
    from mistral_tune.evaluate.lm_eval import LmEval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tokenizer = setup
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    cfg = ForgettingConfig.model_validate({"dataset": {"path": "x"}, "lm_eval_tasks": ["tiny_choice"],
                                           "lm_eval_include_path": str(tmp_path)})
    result = LmEval(cfg).run(ModelPair(model, tokenizer))
    hf = make_hf_mistral(model.config, model.state_dict())
    right = 0
    for d in DOCS:
        scores = [_reference_loglikelihood(hf, tokenizer, d["question"], " " + c) for c in d["choices"]]
        right += max(range(len(scores)), key=scores.__getitem__) == d["answer"]
    assert result.metrics["tiny_choice.acc"] == {"base": None, "tuned": right / len(DOCS)}
