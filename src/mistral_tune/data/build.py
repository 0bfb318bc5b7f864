"""From the config's datasets to tokenized train/validation samples, with a report of what happened."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .formats import Chat, read_jsonl, to_example
from .pack import Sample

MAX_ERRORS_SHOWN = 5


@dataclass
class DataReport:
    records: int = 0
    samples: int = 0
    text_chunks: int = 0
    dropped_too_long: int = 0
    dropped_no_trained_tokens: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    train_samples: int = 0
    val_samples: int = 0
    per_file: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"{self.records} records from {len(self.per_file)} file(s) -> {self.samples} samples "
            f"({self.train_samples} train, {self.val_samples} held out)",
            f"{self.tokens} tokens, {self.trained_tokens} trained "
            f"({100 * self.trained_tokens / max(self.tokens, 1):.1f}%)",
        ]
        if self.text_chunks:
            out.append(f"{self.text_chunks} extra samples from splitting long texts into sequence_len chunks")
        if self.dropped_too_long:
            out.append(f"dropped {self.dropped_too_long} conversation(s) longer than sequence_len")
        if self.dropped_no_trained_tokens:
            out.append(f"dropped {self.dropped_no_trained_tokens} sample(s) with no trained token")
        return out


@dataclass
class Dataset:
    train: list[Sample]
    val: list[Sample]
    report: DataReport


def _text_samples(ids: list[int], sequence_len: int) -> list[Sample]:
    """Split a long text into windows of sequence_len inputs; consecutive windows share one token
    so every token is a target exactly once and none is lost."""
    out = []
    step = sequence_len
    for start in range(0, max(len(ids) - 1, 1), step):
        chunk = ids[start:start + step + 1]
        if len(chunk) >= 2:
            out.append(Sample(chunk[:-1], chunk[1:]))
    return out


def tokenize_file(path: Path, fmt: str, tokenizer, sequence_len: int, train_on_inputs: bool,
                  report: DataReport) -> list[Sample]:
    samples: list[Sample] = []
    errors: list[str] = []
    n_records = 0
    for lineno, record in read_jsonl(path):
        n_records += 1
        try:
            example = to_example(record, fmt)
            if isinstance(example, Chat):
                ids, mask = tokenizer.encode_chat(example.messages, train_on_inputs=train_on_inputs)
                if len(ids) - 1 > sequence_len:
                    # A conversation cut at the end loses its answer; keep it whole or not at all.
                    report.dropped_too_long += 1
                    continue
                sample = Sample.from_ids(ids, mask)
                if sample.n_trained == 0:
                    report.dropped_no_trained_tokens += 1
                    continue
                samples.append(sample)
            else:
                chunks = _text_samples(tokenizer.encode_text(example.text), sequence_len)
                report.text_chunks += len(chunks) - 1
                samples.extend(chunks)
        except (ValueError, DataError) as exc:
            errors.append(f"{path}:{lineno}: {exc}")
    report.records += n_records
    report.per_file[str(path)] = n_records
    if errors:
        shown = "; ".join(errors[:MAX_ERRORS_SHOWN])
        more = f" (and {len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise DataError(f"{len(errors)} bad record(s): {shown}{more}")
    if n_records == 0:
        raise DataError(f"{path}: the dataset is empty")
    return samples


def split_validation(samples: list[Sample], val_set_size: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out a share (0 < x < 1) or a count (x >= 1) of samples, chosen by seed."""
    if val_set_size <= 0:
        return samples, []
    n_val = int(val_set_size) if val_set_size >= 1 else max(1, round(val_set_size * len(samples)))
    if n_val >= len(samples):
        raise DataError(
            f"val_set_size {val_set_size} would hold out {n_val} of {len(samples)} samples, leaving none to train on"
        )
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def build_dataset(cfg, tokenizer) -> Dataset:
    report = DataReport()
    samples: list[Sample] = []
    for ds in cfg.datasets:
        samples.extend(tokenize_file(Path(ds.path), ds.format, tokenizer, cfg.sequence_len,
                                     cfg.train_on_inputs, report))
    if not samples:
        why = []
        if report.dropped_too_long:
            why.append(f"{report.dropped_too_long} longer than sequence_len={cfg.sequence_len}")
        if report.dropped_no_trained_tokens:
            why.append(f"{report.dropped_no_trained_tokens} with no assistant tokens to train on")
        raise DataError(f"no usable sample in {report.records} record(s): " + ", ".join(why))
    train, val = split_validation(samples, cfg.val_set_size, cfg.seed)
    report.samples = len(samples)
    report.train_samples, report.val_samples = len(train), len(val)
    report.tokens = sum(len(s) for s in samples)
    report.trained_tokens = sum(s.n_trained for s in samples)
    return Dataset(train, val, report)
