"""Prompt data for method grpo: conversations that end with the user's turn, rendered with
mistral-common as generation prompts (chat.py encode_prompt), each kept with its record's other
fields for the reward functions.

Record layouts:
- {"prompt": [messages ending with a user turn] | "text", ...any other fields}
- {"messages": [..., user, assistant]}: the prompt is the messages up to the last user turn, and the
  last assistant message's text becomes the field `answer` (unless the record has one), so SFT data
  with one answer per prompt serves an exact-match reward as it is.

A prompt with no room left for max_new_tokens within sequence_len is dropped and counted, as a
conversation too long for SFT is. Bad records get their file:line, as SFT's do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DataError
from ..kernels.loss import IGNORE
from .build import MAX_ERRORS_SHOWN, Dataset, _split_indices, dataset_label
from .formats import check_conversation
from .pack import Sample
from .preference import _messages, _prompt
from .report import DataReport
from .sources import counted_records


@dataclass
class PromptRecord:
    """One prompt: its messages, the record's other fields (what reward functions read) and where it
    came from (path:line)."""

    messages: list[dict]
    fields: dict
    origin: str


@dataclass
class PromptDataset(Dataset):
    """train / val: each prompt's token ids as a Sample with no trained token (what the run's
    fingerprint and lints read); train_records / val_records: the prompts themselves, index for index."""

    train_records: list[PromptRecord] = field(default_factory=list)
    val_records: list[PromptRecord] = field(default_factory=list)


def prompt_record(record: dict, origin: str) -> PromptRecord:
    """The PromptRecord of one raw record; ValueError (a short reason) for a bad one."""
    fields = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
    if "prompt" in record:
        messages = _prompt(record)
    elif "messages" in record:
        conversation = _messages(record["messages"], "user", "messages")
        users = [i for i, m in enumerate(conversation) if m.get("role") == "user"]
        if not users:
            raise ValueError("messages: no user turn to answer")
        messages = conversation[:users[-1] + 1]
        answers = [m for m in conversation[users[-1] + 1:] if m.get("role") == "assistant"]
        if answers and "answer" not in fields:
            fields["answer"] = answers[-1].get("content")
    else:
        raise ValueError("a grpo prompt record needs prompt (messages or text) or messages")
    check_conversation(messages + [{"role": "assistant", "content": "."}])
    return PromptRecord(messages, fields, origin)


def _read_prompts(ds, tokenizer, room: int, report: DataReport, key: str) -> tuple[list[Sample], list[PromptRecord]]:
    samples, records = [], []
    for raw in counted_records(ds, report, key):
        try:
            if raw.error:
                raise ValueError(raw.error)
            rec = prompt_record(raw.record, raw.origin)
            ids = tokenizer.encode_prompt(rec.messages)
        except (ValueError, DataError) as exc:
            report.left_out(raw.origin, str(exc))
            continue
        if len(ids) > room:
            report.left_out(raw.origin, f"prompt too long ({len(ids)} tokens; sequence_len leaves {room} beside "
                            "grpo.max_new_tokens)", too_long=True)
            continue
        samples.append(Sample(list(ids), [IGNORE] * len(ids)))
        records.append(rec)
    return samples, records


def build_prompt_dataset(cfg, tokenizer) -> PromptDataset:
    """The prompts of cfg.datasets (and val_datasets / val_set_size). Raises DataError for bad records
    (on_bad_record: error) and for data that gives no prompt."""
    report = DataReport()
    room = cfg.sequence_len - cfg.grpo.max_new_tokens
    if room < 1:
        raise DataError(f"sequence_len {cfg.sequence_len} leaves no room for a prompt beside grpo.max_new_tokens "
                        f"{cfg.grpo.max_new_tokens}; raise sequence_len")
    parts = []
    for key, group in (("datasets", cfg.datasets), ("val_datasets", cfg.val_datasets)):
        samples, records = [], []
        for ds in group:
            s, r = _read_prompts(ds, tokenizer, room, report, key)
            samples, records = samples + s, records + r
            report.formats[dataset_label(ds)] = "prompts"
        parts.append((samples, records))
    if report.rejected and cfg.on_bad_record == "error":
        shown = "; ".join(report.bad_examples[:MAX_ERRORS_SHOWN])
        more = f" (and {report.rejected - MAX_ERRORS_SHOWN} more)" if report.rejected > MAX_ERRORS_SHOWN else ""
        raise DataError(f"{report.rejected} bad prompt record(s): {shown}{more}; fix them, or set on_bad_record: "
                        "skip to leave them out")
    (train, train_records), (val, val_records) = parts
    if cfg.val_set_size and train:
        tr, va = _split_indices(len(train), cfg.val_set_size, cfg.seed)
        val, val_records = [train[i] for i in va], [train_records[i] for i in va]
        train, train_records = [train[i] for i in tr], [train_records[i] for i in tr]
    if not train:
        raise DataError(f"no usable prompt in datasets ({report.rejected} bad, {report.dropped_too_long} too long); "
                        f"e.g. {'; '.join(report.bad_examples[:3])}")
    report.samples = len(train) + len(val)
    report.tokens = sum(len(s) for s in train + val)
    report.train_samples, report.val_samples = len(train), len(val)
    report.unique_train_samples = len(train)
    report.train_tokens = report.unique_train_tokens = sum(len(s) for s in train)
    return PromptDataset(train, val, report, train_records=train_records, val_records=val_records)
