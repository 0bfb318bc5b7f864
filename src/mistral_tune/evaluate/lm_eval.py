"""lm-evaluation-harness tasks on our model, base vs tuned, through the harness's Python API
(`pip install 'mistral-tune[eval]'`).

The harness asks a model three things: the log-likelihood of a continuation after a context, the
rolling log-likelihood of a whole text, and generation until a stop string. `HarnessLM` answers
them with our model and mistral-common tokenizer, batched, on whichever side of the model pair is
active. Task data comes wherever the task's YAML says (the hub when online, local files with
`lm_eval_include_path` and `dataset_path: json`).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..generate.run import generate_batch
from .base import Evaluation, ModelPair, Result, log_softmax_logits, right_padded


def _harness():
    try:
        import lm_eval
        from lm_eval.api.model import LM
    except ImportError:
        raise ConfigError("eval.forgetting.lm_eval_tasks needs lm-evaluation-harness: "
                          "pip install 'mistral-tune[eval]'") from None
    return lm_eval, LM


def harness_lm(model, tokenizer, batch_size: int = 8):
    """An lm_eval LM backed by our model (built lazily: the harness is an optional install)."""
    lm_eval, LM = _harness()

    class HarnessLM(LM):
        def _encode(self, text: str) -> list[int]:
            return tokenizer.encode_text(text, bos=False, eos=False) if text else []

        def _scores(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            """(sum of log p(continuation), whether greedy decoding gives it) per (context, continuation)."""
            out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
            order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
            device = model.lm_head.weight.device
            for start in range(0, len(order), batch_size):
                group = order[start:start + batch_size]
                seqs = [([tokenizer.bos_id] + pairs[i][0] + pairs[i][1]) for i in group]
                ids, _ = right_padded(seqs, device)
                with torch.no_grad():
                    logp = log_softmax_logits(model, model.hidden_states(ids))
                for row, i in enumerate(group):
                    n_cont, first = len(pairs[i][1]), 1 + len(pairs[i][0])
                    targets = ids[row, first:first + n_cont]
                    lp = logp[row, first - 1:first - 1 + n_cont]
                    out[i] = (float(lp.gather(-1, targets[:, None]).sum()), bool((lp.argmax(-1) == targets).all()))
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = []
            for req in requests:
                context, continuation = req.args
                whole, ctx = self._encode(context + continuation), self._encode(context)
                pairs.append((ctx, whole[len(ctx):]) if whole[:len(ctx)] == ctx else (ctx, self._encode(continuation)))
            return self._scores(pairs)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [self._scores([([], self._encode(req.args[0]))])[0][0] for req in requests]

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                context, kwargs = req.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else until
                ids = [tokenizer.bos_id] + self._encode(context)
                new = generate_batch(model, [ids], int(kwargs.get("max_gen_toks", 256)), eos_id=tokenizer.eos_id)[0]
                text = tokenizer.decode(new)
                cut = min((text.find(s) for s in until if s and s in text), default=-1)
                out.append(text[:cut] if cut >= 0 else text)
            return out

    return HarnessLM()


class LmEval(Evaluation):
    name = "lm_eval"

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        _harness()  # a missing install is reported before anything runs

    def _run(self, model, tokenizer) -> dict[str, float]:
        lm_eval, _ = _harness()
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=self.cfg.lm_eval_include_path)
        out = lm_eval.simple_evaluate(model=harness_lm(model, tokenizer), tasks=list(self.cfg.lm_eval_tasks),
                                      task_manager=manager, limit=self.cfg.lm_eval_limit, log_samples=False)
        metrics = {}
        for task, values in out["results"].items():
            for key, value in values.items():
                name, _, filt = key.partition(",")
                if isinstance(value, (int, float)) and not name.endswith("_stderr") and name != "alias":
                    metrics[f"{task}.{name}" + (f".{filt}" if filt and filt != "none" else "")] = float(value)
        return metrics

    def run(self, pair: ModelPair) -> Result:
        base = self.base_once(pair, lambda m: self._run(m, pair.tokenizer))
        with pair.side("tuned") as model:
            tuned = self._run(model, pair.tokenizer)
        result = Result(self.name)
        for metric, value in tuned.items():
            result.metrics[metric] = {"base": (base or {}).get(metric), "tuned": value}
        result.notes.append(f"lm-evaluation-harness tasks {', '.join(self.cfg.lm_eval_tasks)}"
                            + (f", {self.cfg.lm_eval_limit} examples each" if self.cfg.lm_eval_limit else ""))
        return result
