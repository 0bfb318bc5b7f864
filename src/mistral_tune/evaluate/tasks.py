"""Task metrics on the user's evaluation set: the model answers each prompt (batched generation
with the KV cache), and the answers are scored against the references, base vs tuned.

BLEU and chrF are sacrebleu's (corpus level, its default settings). Exact match, token F1, ROUGE-L
and the label metrics are a few lines each here (rouge-score would bring nltk, seconds to import,
for one longest-common-subsequence); the tests hold them to rouge-score and scikit-learn.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import string
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ..data.formats import Chat
from ..errors import ConfigError
from ..generate.run import generate_batch
from .base import Evaluation, ModelPair, Result

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str, steps: list[str] | tuple[str, ...]) -> str:
    """Apply the chosen normalisations (SQuAD's answer normalisation is lower, punctuation,
    articles, whitespace)."""
    if "lower" in steps:
        text = text.lower()
    if "punctuation" in steps:
        text = text.translate(_PUNCT)
    if "articles" in steps:
        text = _ARTICLES.sub(" ", text)
    if "whitespace" in steps:
        text = " ".join(text.split())
    if "strip" in steps:
        text = text.strip()
    return text


def exact_match(pred: str, ref: str, steps=("strip",)) -> float:
    return float(normalize(pred, steps) == normalize(ref, steps))


def token_f1(pred: str, ref: str, steps=("lower", "punctuation", "articles", "whitespace")) -> float:
    """Harmonic mean of token precision and recall over the multiset of shared tokens."""
    p, r = normalize(pred, steps).split(), normalize(ref, steps).split()
    if not p or not r:
        return float(p == r)
    shared = sum((Counter(p) & Counter(r)).values())
    if not shared:
        return 0.0
    precision, recall = shared / len(p), shared / len(r)
    return 2 * precision * recall / (precision + recall)


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """ROUGE's tokenisation (as rouge-score does it, without stemming): lower case, alphanumeric runs."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure: from the longest common subsequence of the two token lists."""
    p, r = rouge_tokens(pred), rouge_tokens(ref)
    if not p or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for tp in p:
        cur = [0]
        for j, tr in enumerate(r):
            cur.append(prev[j] + 1 if tp == tr else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def label_metrics(preds: list[str], refs: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1 over `labels` (a prediction that is no
    label counts against the reference's label's recall and towards no label's precision)."""
    accuracy = sum(p == r for p, r in zip(preds, refs, strict=True)) / max(len(refs), 1)
    precisions, recalls, f1s = [], [], []
    for label in labels:
        tp = sum(p == label and r == label for p, r in zip(preds, refs, strict=True))
        predicted, actual = preds.count(label), refs.count(label)
        prec = tp / predicted if predicted else 0.0
        rec = tp / actual if actual else 0.0
        precisions.append(prec)
        recalls.append(rec)
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    n = max(len(labels), 1)
    return {"accuracy": accuracy, "precision": sum(precisions) / n, "recall": sum(recalls) / n, "f1": sum(f1s) / n}


def _json_text(text: str) -> str:
    """The answer without a Markdown code fence around it (```json ... ```), which models often add."""
    m = re.fullmatch(r"\s*```[a-zA-Z]*\n?(.*?)\n?```\s*", text, flags=re.S)
    return m.group(1) if m else text


def parse_json(text: str):
    try:
        return True, json.loads(_json_text(text))
    except ValueError:
        return False, None


def corpus_bleu(preds: list[str], refs: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(preds, [refs]).score)


def corpus_chrf(preds: list[str], refs: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(preds, [refs]).score)


def load_function(spec: str, key: str = "eval.tasks.function") -> Callable:
    """`package.module:function` or `path/to/file.py:function`."""
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise ConfigError(f"{key}: {spec!r} is not module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise ConfigError(f"{key}: {path} does not exist")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:  # the user's module failed to import: say which and why, in one line
        raise ConfigError(f"{key}: cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"{key}: {module_name} has no function {fn_name!r}")
    return fn


def score(preds: list[str], refs: list[str], cfg) -> dict[str, float]:
    """Every metric cfg.metrics names, over the whole set (cfg: config.TaskEvalConfig)."""
    n = max(len(refs), 1)
    out: dict[str, float] = {}
    for metric in cfg.metrics:
        if metric == "exact_match":
            out[metric] = sum(exact_match(p, r, cfg.normalize) for p, r in zip(preds, refs, strict=True)) / n
        elif metric == "token_f1":
            out[metric] = sum(token_f1(p, r) for p, r in zip(preds, refs, strict=True)) / n
        elif metric == "rouge_l":
            out[metric] = sum(rouge_l(p, r) for p, r in zip(preds, refs, strict=True)) / n
        elif metric == "bleu":
            out[metric] = corpus_bleu(preds, refs)
        elif metric == "chrf":
            out[metric] = corpus_chrf(preds, refs)
        elif metric == "labels":
            labels = sorted({normalize(x, cfg.normalize) for x in (cfg.labels or refs)})
            out.update(label_metrics([normalize(p, cfg.normalize) for p in preds],
                                     [normalize(r, cfg.normalize) for r in refs], labels))
        elif metric == "json_valid":
            out[metric] = sum(parse_json(p)[0] for p in preds) / n
        elif metric == "json_schema":
            out[metric] = _schema_share(preds, cfg.json_schema)
        elif metric == "regex":
            pattern = re.compile(cfg.regex)
            out[metric] = sum(pattern.fullmatch(p.strip()) is not None for p in preds) / n
        elif metric == "function":
            fn = load_function(cfg.function)
            values = [float(fn(p, r)) for p, r in zip(preds, refs, strict=True)]
            out[metric] = sum(values) / n
    return out


def _schema_share(preds: list[str], schema_path: str) -> float:
    import jsonschema

    schema = json.loads(Path(schema_path).read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    ok = 0
    for p in preds:
        valid, value = parse_json(p)
        ok += valid and validator.is_valid(value)
    return ok / max(len(preds), 1)


def generate_answers(model, tokenizer, prompts: list[list[int]], cfg, seed: int = 0, every=bool) -> list[str]:
    """Answers to every prompt, cfg.batch_size decoding at once; every: ModelPair's."""
    new = generate_batch(model, prompts, cfg.max_new_tokens, eos_id=tokenizer.eos_id, temperature=cfg.temperature,
                         top_p=cfg.top_p, seed=seed, batch_size=cfg.batch_size, every=every)
    return [tokenizer.decode(ids) for ids in new]


class TaskEval(Evaluation):
    name = "tasks"

    def __init__(self, examples: list[tuple[str, Chat]], tokenizer, cfg, n_examples: int = 5) -> None:
        super().__init__()
        from ..errors import DataError

        self.cfg, self.n_examples = cfg, n_examples
        self.messages, self.refs, self.prompts = [], [], []
        for origin, ex in examples:
            msgs = ex.messages
            if msgs[-1]["role"] != "assistant" or not isinstance(msgs[-1].get("content"), str):
                raise DataError(f"{origin}: an evaluation example must end with the assistant's reference answer")
            try:
                self.prompts.append(tokenizer.encode_prompt(msgs[:-1]))
            except DataError as exc:
                raise DataError(f"{origin}: {exc}") from None
            self.messages.append(msgs[:-1])
            self.refs.append(msgs[-1]["content"])
        if "function" in cfg.metrics:
            load_function(cfg.function)  # a bad module:function is reported before any generation

    def _answers(self, model, pair: ModelPair) -> list[str]:
        return generate_answers(model, pair.tokenizer, self.prompts, self.cfg, seed=self.cfg.seed, every=pair.every)

    def run(self, pair: ModelPair) -> Result:
        base = self.base_once(pair, lambda m: self._answers(m, pair))
        with pair.side("tuned") as model:
            tuned = self._answers(model, pair)
        base_scores = score(base, self.refs, self.cfg) if base is not None else {}
        tuned_scores = score(tuned, self.refs, self.cfg)
        result = Result(self.name)
        for metric, value in tuned_scores.items():
            result.metrics[metric] = {"base": base_scores.get(metric), "tuned": value}
        for i in range(min(self.n_examples, len(self.refs))):
            row = {"prompt": self.messages[i][-1]["content"], "reference": self.refs[i], "tuned": tuned[i]}
            if base is not None:
                row["base"] = base[i]
            result.examples.append(row)
        how = "greedy" if self.cfg.temperature <= 0 else f"sampled (temperature {self.cfg.temperature:g})"
        result.notes.append(f"{len(self.refs)} prompts, {how}, at most {self.cfg.max_new_tokens} new tokens")
        return result
