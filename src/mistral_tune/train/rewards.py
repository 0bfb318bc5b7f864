"""The reward functions of method grpo: the built-ins (a task metric against a reference field,
regex, JSON validity and JSON-schema validity, a length penalty) and the user's own
`module:function`, several summed with weights (config: grpo.rewards).

Every function is called as fn(prompt=messages, completion=text, record=the record's fields) and
returns a float, or None for "not scored". One that raises does not stop the run: that reward is
counted as failed for that completion (NaN in the table: it adds 0 to the weighted sum, and a
completion whose every reward failed gets advantage 0; train/objectives.py grpo_advantages), and
the failure is reported with the record's file:line and where in the function it was raised.
"""

from __future__ import annotations

import json
import math
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RewardConfig
from ..data.prompts import PromptRecord
from ..errors import ConfigError
from ..evaluate.tasks import exact_match, load_function, parse_json, rouge_l, token_f1

RewardFn = Callable[..., float | None]


def _reference(record: dict, field: str) -> str:
    if field not in record:
        raise KeyError(f"the record has no field {field!r} (its fields: {', '.join(sorted(record)) or 'none'})")
    return str(record[field])


def _against_reference(metric: Callable[..., float], field: str = "answer", **metric_args) -> RewardFn:
    return lambda prompt, completion, record: metric(completion, _reference(record, field), **metric_args)


def _exact_match(field: str = "answer", normalize: list[str] | tuple[str, ...] = ("strip",)) -> RewardFn:
    return _against_reference(exact_match, field, steps=tuple(normalize))


def _regex(pattern: str, full: bool = False) -> RewardFn:
    compiled = re.compile(pattern, re.S)
    match = compiled.fullmatch if full else compiled.search
    return lambda prompt, completion, record: float(match(completion.strip() if full else completion) is not None)


def _json_valid() -> RewardFn:
    return lambda prompt, completion, record: float(parse_json(completion)[0])


def _json_schema(schema: str | dict) -> RewardFn:
    import jsonschema

    if isinstance(schema, str):
        schema = json.loads(Path(schema).expanduser().read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)

    def reward(prompt, completion, record) -> float:
        valid, value = parse_json(completion)
        return float(valid and validator.is_valid(value))
    return reward


def _length(max_chars: int) -> RewardFn:
    """0 up to max_chars characters, then falling linearly to -1 at twice that (a length penalty)."""
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    return lambda prompt, completion, record: -min(1.0, max(0, len(completion) - max_chars) / max_chars)


BUILTINS: dict[str, Callable[..., RewardFn]] = {
    "exact_match": _exact_match,
    "token_f1": lambda field="answer": _against_reference(token_f1, field),
    "rouge_l": lambda field="answer": _against_reference(rouge_l, field),
    "regex": _regex,
    "json_valid": _json_valid,
    "json_schema": _json_schema,
    "length": _length,
}


@dataclass
class RewardFailure:
    """A reward function that raised: which, on which record, what, and where it was raised."""

    reward: str
    origin: str
    error: str
    where: str

    def line(self) -> str:
        return f"reward {self.reward} failed on {self.origin}: {self.error} (at {self.where})"


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


class Rewards:
    """The configured reward functions, made once (a bad name, argument, schema or module is a
    ConfigError naming its key, before anything is written)."""

    def __init__(self, specs: list[RewardConfig]) -> None:
        self.names = [s.label for s in specs]
        self.weights = torch.tensor([s.weight for s in specs], dtype=torch.float64)
        self.fns: list[RewardFn] = []
        for i, spec in enumerate(specs):
            key = f"grpo.rewards.{i}"
            if spec.function is not None:
                fn = load_function(spec.function, f"{key}.function")
                args = dict(spec.args)
                self.fns.append(lambda prompt, completion, record, fn=fn, args=args: fn(
                    prompt=prompt, completion=completion, record=record, **args))
                continue
            try:
                self.fns.append(BUILTINS[spec.name](**spec.args))
            except (TypeError, ValueError, OSError) as exc:
                raise ConfigError(f"{key}.args: {spec.name}: {exc}") from None

    def score(self, records: list[PromptRecord], completions: list[str]) -> tuple[torch.Tensor, list[RewardFailure]]:
        """(N, K) float64 rewards of each completion (records[i] its prompt's) by each function, NaN
        where a function failed or returned None; and the failures."""
        table = torch.full((len(completions), len(self.fns)), math.nan, dtype=torch.float64)
        failures: list[RewardFailure] = []
        for i, (rec, text) in enumerate(zip(records, completions, strict=True)):
            for k, fn in enumerate(self.fns):
                try:
                    value = fn(rec.messages, text, rec.fields)
                    if value is not None:
                        table[i, k] = float(value)
                except Exception as exc:  # the user's code: reported and counted, never the end of the run
                    failures.append(RewardFailure(self.names[k], rec.origin, f"{type(exc).__name__}: {exc}",
                                                  _where(exc)))
        return table, failures
