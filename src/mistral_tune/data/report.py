"""The data report: what became of every record of the config's datasets (read, used, each kind left
out, and why), as counters the build fills in, printed lines and the record accounting."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .cache import CacheEntry
from .clean import UNICODE_REPAIRS


@dataclass
class DataReport:
    records: int = 0  # records read (blank lines are not records)
    blank_lines: int = 0
    samples: int = 0
    text_chunks: int = 0
    dropped_too_long: int = 0
    dropped_no_trained_tokens: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    unique_train_samples: int = 0  # samples = unique_train_samples + val_samples (each sample once)
    unique_train_tokens: int = 0
    val_samples: int = 0
    train_samples: int = 0  # training samples an epoch, after dataset weights (repeats counted)
    train_tokens: int = 0  # their tokens (what `plan` counts)
    train_trained_tokens: int = 0
    per_file: dict[str, int] = field(default_factory=dict)
    rejected: int = 0  # bad records (skipped with on_bad_record: skip)
    invalid_utf8: int = 0  # of which not valid UTF-8
    truncated: int = 0
    dedup_exact: int = 0  # records
    dedup_near: int = 0
    val_overlap_removed: int = 0  # held-out records that were also in the training data
    unicode_fixed: int = 0  # records with any repair
    unicode_repairs: dict[str, int] = field(default_factory=dict)  # records per kind of repair
    redacted: dict[str, int] = field(default_factory=dict)
    redacted_examples: list[str] = field(default_factory=list)  # the first few "origin: ... [EMAIL] ..."
    injection_flagged: int = 0
    injection_dropped: int = 0
    flagged: list[str] = field(default_factory=list)  # the first few "origin: matched text"
    bad_examples: list[str] = field(default_factory=list)  # the first few "origin: reason"
    duplicate_examples: list[str] = field(default_factory=list)  # the first few "origin: duplicate of ..."
    formats: dict[str, str] = field(default_factory=dict)
    cache: dict[str, str] = field(default_factory=dict)
    rejects_files: list[str] = field(default_factory=list)
    mixed: dict[str, int] = field(default_factory=dict)  # samples per epoch, per dataset, after weights
    packed_rows: int = 0
    padding_share: float = 0.0
    warnings: list[str] = field(default_factory=list)  # config against the model (train and validate)

    def left_out(self, origin: str, why: str, too_long: bool = False) -> None:
        """Count a record left out (bad, or too long) and keep the first few reasons."""
        if too_long:
            self.dropped_too_long += 1
        else:
            self.rejected += 1
        if len(self.bad_examples) < 20:
            self.bad_examples.append(f"{origin}: {why}")

    @property
    def weighted(self) -> bool:
        """Whether an epoch's training samples differ from the unique ones (dataset weights, num_samples)."""
        return (self.train_samples, self.train_tokens) != (self.unique_train_samples, self.unique_train_tokens)

    @property
    def records_used(self) -> int:
        return self.records - self.records_left_out

    @property
    def records_left_out(self) -> int:
        return (self.rejected + self.dropped_too_long + self.dropped_no_trained_tokens + self.injection_dropped
                + self.dedup_near + self.dedup_exact + self.val_overlap_removed)

    def lines(self) -> list[str]:
        out = [
            f"{self.records} records from {len(self.per_file)} file(s) -> {self.samples} samples "
            f"({self.unique_train_samples} train + {self.val_samples} held out)",
            f"{self.tokens:,} tokens in those {self.samples} samples, {self.trained_tokens:,} trained "
            f"({100 * self.trained_tokens / max(self.tokens, 1):.1f}%)",
        ]
        if self.weighted:
            out.append(f"an epoch after dataset weights: {self.train_samples} training samples (the "
                       f"{self.unique_train_samples} train samples, some repeated or left out), "
                       f"{self.train_tokens:,} tokens, {self.train_trained_tokens:,} trained")
        if self.formats:
            out.append("formats: " + ", ".join(f"{k} = {v}" for k, v in self.formats.items()))
        if self.blank_lines:
            out.append(f"skipped {self.blank_lines} blank line(s)")
        if self.text_chunks:
            out.append(f"{self.text_chunks} extra samples from splitting long texts into sequence_len chunks")
        if self.rejected:
            utf8 = f" ({self.invalid_utf8} not valid UTF-8)" if self.invalid_utf8 else ""
            out.append(f"skipped {self.rejected} bad record(s){utf8}, e.g. {self.bad_examples[0]}")
        if self.dropped_too_long:
            out.append(f"dropped {self.dropped_too_long} conversation(s) longer than sequence_len")
        if self.truncated:
            out.append(f"truncated {self.truncated} conversation(s) longer than sequence_len "
                       "(kept the start and part of the last assistant turn that fits)")
        if self.dropped_no_trained_tokens:
            out.append(f"warning: dropped {self.dropped_no_trained_tokens} sample(s) with no trained token "
                       "(every assistant turn has weight 0, or truncation left no assistant token)")
        if self.dedup_exact or self.dedup_near:
            out.append(f"removed {self.dedup_exact} exact and {self.dedup_near} near duplicate record(s)")
        if self.val_overlap_removed:
            out.append(f"removed {self.val_overlap_removed} held-out record(s) that are also training records")
        if self.unicode_fixed:
            kinds = ", ".join(f"{n} {UNICODE_REPAIRS[k]}" for k, n in self.unicode_repairs.items())
            out.append(f"repaired Unicode in {self.unicode_fixed} record(s): {kinds}")
        if self.redacted:
            out.append("redacted PII: " + ", ".join(f"{n} {k}" for k, n in sorted(self.redacted.items())))
        if self.injection_flagged:
            out.append(f"flagged {self.injection_flagged} record(s) with possible prompt injection, e.g. "
                       f"{self.flagged[0]}")
        if self.injection_dropped:
            out.append(f"dropped {self.injection_dropped} record(s) with possible prompt injection")
        if self.packed_rows:
            out.append(f"packing: {self.train_samples} samples -> {self.packed_rows} rows, "
                       f"{100 * self.padding_share:.1f}% padding")
        if len(self.mixed) > 1 or any(re.search(r" x[\d.e+-]+$| \(\d+ samples\)$", k) for k in self.mixed):
            out.append("mix per epoch: " + ", ".join(f"{k}: {v}" for k, v in self.mixed.items()))
        if self.cache:
            out.append("token cache: " + ", ".join(f"{k} {v}" for k, v in self.cache.items()))
        if self.rejects_files:
            out.append("records left out, with reasons: " + ", ".join(self.rejects_files))
        out += [f"warning: {w}" for w in self.warnings]
        return out

    def accounting(self) -> str:
        """Where every record went: read = used + each kind left out."""
        parts = [(self.rejected, "bad"), (self.dropped_too_long, "too long"),
                 (self.dropped_no_trained_tokens, "without trained tokens"), (self.injection_dropped, "injection"),
                 (self.dedup_exact, "exact duplicates"), (self.dedup_near, "near duplicates"),
                 (self.val_overlap_removed, "held-out overlaps")]
        return (f"records: {self.records} read = {self.records_used} used"
                + "".join(f" + {n} {what}" for n, what in parts if n)
                + (f" ({self.blank_lines} blank line(s) skipped)" if self.blank_lines else ""))


def add_entry_report(report: DataReport, entry: CacheEntry, label: str, status: str) -> None:
    """Add one dataset's cache entry (its manifest's counts, examples and rejects file) to the report."""
    m = entry.manifest
    counts = m["counts"]
    report.records += sum(m["per_file"].values())
    report.blank_lines += counts.get("blank", 0)
    report.per_file.update(m["per_file"])
    report.formats[label] = m["format"]
    report.cache[label] = status
    report.text_chunks += counts.get("text_chunks", 0)
    report.dropped_too_long += counts.get("dropped_too_long", 0)
    report.truncated += counts.get("truncated", 0)
    report.dropped_no_trained_tokens += counts.get("dropped_no_trained_tokens", 0)
    report.dedup_near += counts.get("near_dup", 0)
    report.unicode_fixed += counts.get("unicode_fixed", 0)
    for k in UNICODE_REPAIRS:
        if counts.get(f"unicode:{k}"):
            report.unicode_repairs[k] = report.unicode_repairs.get(k, 0) + counts[f"unicode:{k}"]
    report.injection_flagged += counts.get("injection", 0) - counts.get("injection_dropped", 0)
    report.injection_dropped += counts.get("injection_dropped", 0)
    report.flagged.extend(m["flagged"][:max(0, 20 - len(report.flagged))])
    for k, n in m["redacted"].items():
        report.redacted[k] = report.redacted.get(k, 0) + n
    report.redacted_examples.extend(m["redacted_examples"][:max(0, 20 - len(report.redacted_examples))])
    report.rejected += counts.get("bad", 0)
    report.invalid_utf8 += counts.get("bad_utf8", 0)
    report.bad_examples.extend(m["bad_examples"])
    if (entry.path / "rejects.jsonl").stat().st_size:
        report.rejects_files.append(str(entry.path / "rejects.jsonl"))
