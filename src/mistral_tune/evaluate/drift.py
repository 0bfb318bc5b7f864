"""Drift: are the prompts a model is served (logged by `serve --log-requests DIR`) still like the
ones it was trained on?

Three measures, each between 0 (alike) and 1 (nothing alike), and their mean as the drift score:
- length: the Kolmogorov-Smirnov statistic between the prompt lengths in tokens;
- tokens: the Jensen-Shannon divergence (base 2) between the token frequencies of the two sets;
- perplexity: the tuned model's perplexity on served prompts against its perplexity on the
  reference prompts, as min(1, max(0, log2(ratio) / 2)), so four times the perplexity counts as 1.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from ..errors import DataError, MistralTuneError
from ..serve.request_log import log_files
from .base import Evaluation, ModelPair, Result, perplexity, token_logprobs


class DriftDetected(MistralTuneError):
    """The served prompts drifted from the training data beyond the threshold."""

    exit_code = 3


def read_served(folder: Path) -> list[dict]:
    """The logged requests, oldest first (a line that is not JSON is a DataError naming it)."""
    files = log_files(Path(folder))
    if not files:
        raise DataError(f"{folder}: no request log (requests.jsonl) here; start the server with --log-requests")
    out = []
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    return out


def served_ids(tokenizer, rec: dict) -> list[int]:
    if "messages" in rec:
        return tokenizer.encode_prompt(rec["messages"])
    return tokenizer.encode_text(rec["prompt"], bos=True, eos=False)


def ks_statistic(a: list[float], b: list[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = sorted(a), sorted(b)
    i = j = 0
    gap = 0.0
    while i < len(a) and j < len(b):
        x = min(a[i], b[j])
        while i < len(a) and a[i] == x:
            i += 1
        while j < len(b) and b[j] == x:
            j += 1
        gap = max(gap, abs(i / len(a) - j / len(b)))
    return gap


def js_divergence(p: Counter, q: Counter) -> float:
    """Jensen-Shannon divergence in bits between two frequency tables (0: same, 1: disjoint)."""
    np_, nq = sum(p.values()), sum(q.values())
    total = 0.0
    for key in p.keys() | q.keys():
        pi, qi = p.get(key, 0) / np_, q.get(key, 0) / nq
        m = (pi + qi) / 2
        if pi:
            total += pi / 2 * math.log2(pi / m)
        if qi:
            total += qi / 2 * math.log2(qi / m)
    return total


class DriftEval(Evaluation):
    name = "drift"

    def __init__(self, served: list[list[int]], reference: list[list[int]], reference_name: str,
                 batch_tokens: int = 16384) -> None:
        super().__init__()
        if not served or not reference:
            raise DataError("drift: no served prompts" if not served else "drift: no reference prompts")
        self.served, self.reference, self.reference_name = served, reference, reference_name
        self.batch_tokens = batch_tokens

    def _ppl(self, model, seqs) -> float:
        logps = token_logprobs(model, [s for s in seqs if len(s) >= 2], self.batch_tokens)
        return perplexity(-float(sum(lp.sum() for lp in logps)) / max(sum(len(lp) for lp in logps), 1))

    def run(self, pair: ModelPair) -> Result:
        length = ks_statistic([len(s) for s in self.served], [len(s) for s in self.reference])
        frequencies = [Counter(t for s in seqs for t in s) for seqs in (self.served, self.reference)]
        tokens = js_divergence(*frequencies)
        with pair.side("tuned") as model:
            ppl_served, ppl_ref = self._ppl(model, self.served), self._ppl(model, self.reference)
        ppl_term = min(1.0, max(0.0, math.log2(ppl_served / ppl_ref) / 2))
        result = Result(self.name)
        for name, value in (("score", (length + tokens + ppl_term) / 3), ("length_ks", length), ("token_js", tokens),
                            ("ppl_served", ppl_served), ("ppl_reference", ppl_ref)):
            result.metrics[name] = {"tuned": value}
        result.notes.append(f"{len(self.served)} served prompts against {len(self.reference)} from "
                            f"{self.reference_name}; score = mean of length_ks, token_js and "
                            f"min(1, max(0, log2(ppl_served / ppl_reference) / 2))")
        edges = _edges([len(s) for s in self.served + self.reference])
        result.figures.append({"kind": "lines", "id": "lengths", "title": "Prompt lengths (share of prompts)",
                               "x": edges[:-1], "x_label": "tokens", "y_label": "share",
                               "series": {"reference": _hist([len(s) for s in self.reference], edges),
                                          "served": _hist([len(s) for s in self.served], edges)}})
        return result


def _edges(values: list[int], bins: int = 20) -> list[int]:
    lo, hi = min(values), max(values) + 1
    width = max(1, math.ceil((hi - lo) / bins))
    return list(range(lo, hi + width, width))


def _hist(values: list[int], edges: list[int]) -> list[float]:
    counts = [0] * (len(edges) - 1)
    for v in values:
        counts[min((v - edges[0]) // (edges[1] - edges[0]), len(counts) - 1)] += 1
    return [c / len(values) for c in counts]
