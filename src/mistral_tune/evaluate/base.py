"""What every evaluation shares: the model pair (tuned and base), one result shape, reading an
evaluation's data, and per-token log-probabilities computed a batch and a chunk at a time.

An evaluation is a class with a `name` and `run(pair) -> Result`, one file per kind (loss, tasks,
forgetting, needle, drift). It measures the tuned model and, where the pair has one, the base. The
base of a LoRA/QLoRA model is the same model with its adapters switched off in place
(`models.lora.adapters_disabled`), so no second copy is held; a merged or fully fine-tuned model needs its
base loaded beside it. The base does not change while training, so an evaluation measures it once.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..chat import ChatTokenizer
from ..data.formats import Chat, Text, to_example
from ..data.sources import read_source, resolve_sources
from ..errors import DataError
from ..models.lora import adapters_disabled, has_adapters


class ModelPair:
    """The tuned model and, when it can be had, its base.

    base_model None with adapters in `model`: the base is `model` with its adapters off. A merged or
    fully fine-tuned model has a base only when one is given. autocast_dtype: the training loop's
    bf16 autocast, for a model whose trained weights are float32 over a bf16 base. every: for a
    model sharded over processes that evaluate in lockstep (Runtime.every), whether a flag holds on
    every process; a loop whose length depends on the model's outputs (generation) ends by it.
    """

    def __init__(self, model, tokenizer: ChatTokenizer, base_model=None,
                 autocast_dtype: torch.dtype | None = None, every: Callable[[bool], bool] = bool) -> None:
        self.model, self.tokenizer, self.base_model = model, tokenizer, base_model
        self.autocast_dtype, self.every = autocast_dtype, every

    @property
    def in_place(self) -> bool:
        return self.base_model is None and has_adapters(self.model)

    @property
    def has_base(self) -> bool:
        return self.in_place or self.base_model is not None

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def config(self):
        return self.model.config

    @contextlib.contextmanager
    def side(self, which: str) -> Iterator[Any]:
        """The model that computes as `which` ("base" or "tuned"), in eval mode, without gradients."""
        if which == "base" and not self.has_base:
            raise ValueError("this model pair has no base")
        model = self.base_model if which == "base" and self.base_model is not None else self.model
        was_training = model.training
        model.eval()
        device = model.lm_head.weight.device
        with contextlib.ExitStack() as stack:
            # Evaluation runs eager on the plain attention path: the training fast path's compiled layers
            # would recompile for every shape that decoding with a KV cache makes.
            stack.enter_context(model.configured(attn_impl="sdpa"))
            stack.enter_context(torch.no_grad())
            stack.enter_context(torch.compiler.set_stance("force_eager"))
            if which == "base" and self.in_place:
                stack.enter_context(adapters_disabled(model))
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(device.type, dtype=self.autocast_dtype))
            try:
                yield model
            finally:
                model.train(was_training)


@dataclass
class Result:
    """One evaluation's outcome. metrics: {name: {"base": x, "tuned": y}} (base absent without a
    base); figures: what the report draws (see report.py for the kinds); examples: a few rows that
    show what the numbers mean; warnings: thresholds crossed, said in words."""

    name: str
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    figures: list[dict] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def flat(self) -> dict[str, float]:
        """{"tasks.exact_match": tuned, "tasks.exact_match@base": base} for logs and early stopping."""
        out = {}
        for metric, sides in self.metrics.items():
            for side, value in sides.items():
                if value is not None:
                    out[f"{self.name}.{metric}" + ("" if side == "tuned" else f"@{side}")] = value
        return out


class Evaluation(ABC):
    """The shared interface. Subclasses set `name` and implement `run`."""

    name = ""

    def __init__(self) -> None:
        self._base_cache: Any = None

    @abstractmethod
    def run(self, pair: ModelPair) -> Result:
        """Evaluate the pair (tuned, and base where it has one)."""

    def base_once(self, pair: ModelPair, measure: Callable[[Any], Any]) -> Any:
        """measure(base model), computed on the first call only (the base does not train); None
        when the pair has no base."""
        if not pair.has_base:
            return None
        if self._base_cache is None:
            with pair.side("base") as model:
                self._base_cache = measure(model)
        return self._base_cache


def read_examples(ds, key: str, limit: int | None = None) -> list[tuple[str, Chat | Text]]:
    """(origin, example) for the records of one dataset entry (any source the training data takes);
    a bad record is a DataError naming its file and line."""
    out: list[tuple[str, Chat | Text]] = []
    for src in resolve_sources(ds.path, ds.source, ds.name, ds.split, key=key):
        for raw in read_source(src):
            if raw.error:
                raise DataError(f"{key}: {raw.origin}: {raw.error}")
            try:
                out.append((raw.origin, to_example(raw.record, ds.format, ds.field_map)))
            except ValueError as exc:
                raise DataError(f"{key}: {raw.origin}: {exc}") from None
            if limit is not None and len(out) >= limit:
                return out
    if not out:
        raise DataError(f"{key}: {ds.path} has no records")
    return out


def example_ids(tokenizer: ChatTokenizer, example: Chat | Text, origin: str) -> list[int]:
    """Every token of an example (a text with BOS, a conversation as the chat format renders it)."""
    try:
        if isinstance(example, Text):
            return tokenizer.encode_text(example.text, bos=True, eos=False)
        return tokenizer.encode_chat(example.messages, train_on_inputs=True, tools=example.tools)[0]
    except DataError as exc:
        raise DataError(f"{origin}: {exc}") from None


def length_batches(lengths: list[int], batch_tokens: int) -> Iterator[list[int]]:
    """Indices grouped longest first so that a batch holds at most batch_tokens (padded) tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    group: list[int] = []
    for i in order:
        if group and (len(group) + 1) * lengths[group[0]] > batch_tokens:
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def right_padded(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the mask of real tokens; causal attention keeps padding out of sight."""
    longest = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    real = torch.zeros(len(seqs), longest, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        real[i, :len(s)] = True
    return ids.to(device), real.to(device)


CHUNK = 1024  # positions whose vocabulary-sized logits exist at once


def log_softmax_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (float32) from final hidden states."""
    return torch.log_softmax(model.lm_head(hidden).float(), dim=-1)


def token_logprobs(model, seqs: list[list[int]], batch_tokens: int = 16384,
                   scored: list[list[bool]] | None = None) -> list[torch.Tensor]:
    """log p(token t | tokens < t) for t = 1..len-1 of every sequence (float32, on the CPU); with
    `scored` (a flag per token), only for the tokens flagged, in order. Logits are computed for
    those positions only: an answer's few tokens cost a few vocabulary-sized products, not a
    whole conversation's."""
    out: list[torch.Tensor | None] = [None] * len(seqs)
    device = model.lm_head.weight.device
    for group in length_batches([len(s) for s in seqs], batch_tokens):
        ids, real = right_padded([seqs[i] for i in group], device)
        want = real[:, 1:].clone()
        if scored is not None:
            flags, _ = right_padded([[int(f) for f in scored[i]] for i in group], device)
            want &= flags[:, 1:].bool()
        values = model.target_logprobs(model.hidden_states(ids)[:, :-1][want], ids[:, 1:][want]).cpu()
        for i, part in zip(group, values.split(want.sum(1).tolist()), strict=True):
            out[i] = part
    return out  # type: ignore[return-value]


def perplexity(nll_per_token: float) -> float:
    return math.exp(min(nll_per_token, 50.0))
