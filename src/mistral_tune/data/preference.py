"""Preference data: pairs of answers to one prompt (DPO, IPO, ORPO, SimPO) and unpaired judged answers
(KTO), read from the config's datasets and rendered with mistral-common exactly as SFT conversations
are (chat.py), only the answer's tokens being targets.

Record layouts:
- paired, explicit prompt: {"prompt": [messages ending with a user turn] | "text",
  "chosen": [assistant messages] | "text", "rejected": ...}
- paired, whole conversations sharing their start (as UltraFeedback-binarized stores them):
  {"chosen": [user, assistant, ...], "rejected": [user, assistant, ...]}; the prompt is the messages
  both share, up to the last user turn.
- unpaired (KTO): {"prompt": ..., "completion": [assistant messages] | "text", "label": true | false}

Every record becomes a *unit* of two samples, kept side by side (samples 2u and 2u + 1): a pair's
chosen and rejected answer; for KTO the judged answer and a mismatched one (the same prompt with the
next record's answer), whose log-probability ratio estimates the KL term KTO measures against. A
row holds whole units, so a pair is packed in one row (its samples never see each other: seq ids),
and the loss reads the units' log-probabilities in row order (models/mistral.py sequence_logprobs).
The shared prompt is computed twice, once per answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from .build import MAX_ERRORS_SHOWN, Dataset, _split_indices, dataset_label
from .formats import check_conversation
from .pack import Sample, pack_rows
from .report import DataReport
from .sources import counted_records

PAIRED, UNPAIRED = "pairs", "kto"


@dataclass
class PreferenceDataset(Dataset):
    """Dataset whose train / val are unit-ordered sample lists (see the module doc); labels: per unit of
    KTO data, whether its answer is desirable (empty for pairs)."""

    kind: str = PAIRED
    train_labels: list[bool] = field(default_factory=list)
    val_labels: list[bool] = field(default_factory=list)


def _messages(value, role: str, what: str) -> list[dict]:
    """A string as one message of `role`, or a list of message objects as they are."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ValueError(f"{what}: expected a string or a list of messages")
    for i, m in enumerate(value):
        if "role" not in m:
            raise ValueError(f"{what}: message {i} has no role")
    return [dict(m) for m in value]


def _split_conversations(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen answer, rejected answer) of two whole conversations: the prompt is their common
    start up to its last user turn."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) == len(rejected):
        raise ValueError("chosen and rejected are the same conversation")
    users = [i for i in range(n) if chosen[i].get("role") == "user"]
    if not users:
        raise ValueError("chosen and rejected share no user turn: the prompt must end with a user message")
    cut = users[-1] + 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _render(tokenizer, prompt: list[dict], answer: list[dict], what: str) -> tuple[list[int], list[bool]]:
    """ids and loss mask of prompt + answer, only the answer's tokens trained."""
    if not answer:
        raise ValueError(f"{what}: empty answer")
    if any(m.get("role") == "user" for m in answer):
        raise ValueError(f"{what}: the answer holds a user turn; give it as assistant messages")
    try:
        check_conversation(prompt + answer)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    ids, mask = tokenizer.encode_chat(prompt + answer)
    start = tokenizer.encode_prompt(prompt)
    if ids[:len(start)] != start:  # mistral-common renders a prompt as the start of its answered form
        raise ValueError(f"{what}: the prompt's tokens are not the start of the answered conversation")
    mask = [False] * len(start) + mask[len(start):]
    if not any(mask[1:]):
        raise ValueError(f"{what}: empty answer (no trained token)")
    return ids, mask


def _prompt(record: dict) -> list[dict]:
    prompt = _messages(record["prompt"], "user", "prompt")
    if not prompt or prompt[-1].get("role") != "user":
        raise ValueError("prompt: must end with a user message")
    return prompt


def pair_samples(record: dict, tokenizer) -> tuple[list[int], list[bool], list[int], list[bool]]:
    """A paired record's chosen and rejected (ids, mask); ValueError (a short reason) for a bad one."""
    if not isinstance(record.get("chosen"), (str, list)) or not isinstance(record.get("rejected"), (str, list)):
        raise ValueError("a preference pair needs chosen and rejected (strings or message lists)")
    if "prompt" in record:
        prompt = _prompt(record)
        chosen = _messages(record["chosen"], "assistant", "chosen")
        rejected = _messages(record["rejected"], "assistant", "rejected")
    else:
        prompt, chosen, rejected = _split_conversations(_messages(record["chosen"], "user", "chosen"),
                                                        _messages(record["rejected"], "user", "rejected"))
    if chosen == rejected:
        raise ValueError("chosen and rejected are the same answer")
    c_ids, c_mask = _render(tokenizer, prompt, chosen, "chosen")
    r_ids, r_mask = _render(tokenizer, prompt, rejected, "rejected")
    return c_ids, c_mask, r_ids, r_mask


def kto_sample(record: dict, tokenizer) -> tuple[list[dict], list[dict], bool]:
    """An unpaired record's (prompt, answer, desirable); ValueError for a bad one."""
    if "completion" not in record or "prompt" not in record:
        raise ValueError("an unpaired (KTO) record needs prompt, completion and label")
    label = record.get("label")
    if not isinstance(label, bool):
        raise ValueError(f"label: expected true or false, got {label!r}")
    return _prompt(record), _messages(record["completion"], "assistant", "completion"), label


@dataclass
class _Read:
    units: list[tuple[Sample, Sample]] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    kto: list[tuple[list[dict], list[dict]]] = field(default_factory=list)  # KTO: (prompt, answer) per unit
    origins: list[str] = field(default_factory=list)


def _read_dataset(ds, tokenizer, kind: str, sequence_len: int, report: DataReport, key: str) -> _Read:
    out = _Read()
    for raw in counted_records(ds, report, key):
        try:
            if raw.error:
                raise ValueError(raw.error)
            units = _record_units(raw.record, tokenizer, kind, out)
        except (ValueError, DataError) as exc:
            report.left_out(raw.origin, str(exc))
            continue
        longest = max(len(s) for s in units[:2] if s is not None) if kind == PAIRED else len(units[0])
        if longest > sequence_len:
            report.left_out(raw.origin, f"too long ({longest} tokens > sequence_len {sequence_len})", too_long=True)
            if kind == UNPAIRED:
                out.kto.pop(), out.labels.pop()
            continue
        out.units.append(units)
        out.origins.append(raw.origin)
    return out


def _record_units(record: dict, tokenizer, kind: str, out: _Read):
    if kind == PAIRED:
        c_ids, c_mask, r_ids, r_mask = pair_samples(record, tokenizer)
        return Sample.from_ids(c_ids, c_mask), Sample.from_ids(r_ids, r_mask)
    prompt, answer, label = kto_sample(record, tokenizer)
    ids, mask = _render(tokenizer, prompt, answer, "completion")
    out.kto.append((prompt, answer))
    out.labels.append(label)
    return Sample.from_ids(ids, mask), None


def _kto_mismatched(read: _Read, tokenizer, sequence_len: int) -> None:
    """Each KTO unit's second sample: its prompt with the next unit's answer (the KL estimate's)."""
    n = len(read.units)
    for u in range(n):
        prompt, _ = read.kto[u]
        other = read.kto[(u + 1) % n][1] if n > 1 else read.kto[u][1]
        ids, mask = _render(tokenizer, prompt, other, "completion")
        ids, mask = ids[:sequence_len + 1], mask[:sequence_len + 1]  # an estimate only: cut to fit
        read.units[u] = (read.units[u][0], Sample.from_ids(ids, mask))


def build_preference_dataset(cfg, tokenizer) -> PreferenceDataset:
    """Units (see the module doc) for training and evaluation from cfg.datasets / cfg.val_datasets.
    Raises DataError for bad records (on_bad_record: error) and for data that gives no unit."""
    kind = UNPAIRED if cfg.method == "kto" else PAIRED
    report = DataReport()
    parts = []
    for key, group in (("datasets", cfg.datasets), ("val_datasets", cfg.val_datasets)):
        reads = [_read_dataset(ds, tokenizer, kind, cfg.sequence_len, report, key) for ds in group]
        parts.append(reads)
        for ds in group:
            report.formats[dataset_label(ds)] = kind
    if report.rejected and cfg.on_bad_record == "error":
        shown = "; ".join(report.bad_examples[:MAX_ERRORS_SHOWN])
        more = f" (and {report.rejected - MAX_ERRORS_SHOWN} more)" if report.rejected > MAX_ERRORS_SHOWN else ""
        what = "preference pair" if kind == PAIRED else "prompt/completion/label (KTO)"
        raise DataError(f"{report.rejected} bad {what} record(s): {shown}{more}; fix them, or set "
                        "on_bad_record: skip to leave them out")
    train, val = _Read(), _Read()
    for target, reads in ((train, parts[0]), (val, parts[1])):
        for r in reads:
            target.units += r.units
            target.labels += r.labels
            target.kto += r.kto
            target.origins += r.origins
    if cfg.val_set_size and train.units:
        tr, va = _split_indices(len(train.units), cfg.val_set_size, cfg.seed)
        val = _subset(train, va)
        train = _subset(train, tr)
    if not train.units:
        raise DataError(f"no usable record in datasets ({report.rejected} bad, {report.dropped_too_long} longer "
                        f"than sequence_len {cfg.sequence_len}); e.g. {'; '.join(report.bad_examples[:3])}")
    if kind == UNPAIRED:
        for read in (train, val):
            if read.units:
                _kto_mismatched(read, tokenizer, cfg.sequence_len)
    train_samples = [s for unit in train.units for s in unit]
    val_samples = [s for unit in val.units for s in unit]
    report.samples = len(train_samples) + len(val_samples)
    report.tokens = sum(len(s) for s in train_samples + val_samples)
    report.trained_tokens = sum(s.n_trained for s in train_samples + val_samples)
    report.train_samples, report.val_samples = len(train_samples), len(val_samples)
    report.unique_train_samples = report.train_samples  # no dataset weights here: each unit once an epoch
    report.train_tokens = report.unique_train_tokens = sum(len(s) for s in train_samples)
    report.train_trained_tokens = sum(s.n_trained for s in train_samples)
    return PreferenceDataset(train_samples, val_samples, report, kind=kind, train_labels=train.labels,
                             val_labels=val.labels)


def _subset(read: _Read, idx: list[int]) -> _Read:
    return _Read([read.units[i] for i in idx], [read.labels[i] for i in idx] if read.labels else [],
                 [read.kto[i] for i in idx] if read.kto else [], [read.origins[i] for i in idx])


def unit_rows(samples, sequence_len: int, packing: bool) -> list[list[int]]:
    """Rows of whole units (samples 2u, 2u + 1 side by side). A row holds up to 2 x sequence_len
    tokens: a unit always fits one (each of its samples fits sequence_len); with packing, several
    units share it (best-fit decreasing on the units' lengths)."""
    lengths = np.asarray([len(s) for s in samples]).reshape(-1, 2).sum(1).tolist()
    groups = pack_rows(lengths, 2 * sequence_len) if packing else [[u] for u in range(len(lengths))]
    return [[i for u in row for i in (2 * u, 2 * u + 1)] for row in groups]
