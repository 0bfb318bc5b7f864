"""From the config's datasets to tokenized train/validation samples, with a report of what happened.

Per dataset: sources -> records -> format -> cleaning -> tokens (+ length policy), streamed in chunks
through worker processes and written to the token cache; a second run with the same inputs maps the
cache and skips all of it. Then, over all datasets: bad-record policy, exact deduplication, the
validation split and the mixing weights. Every record that does not become a sample is counted in
the report, and (except exact duplicates, which are counted and listed by hash) written with its
reason to the dataset's rejects file.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import multiprocessing
import os
import random
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import DataError
from .cache import CacheEntry, CacheWriter, cache_key, default_cache_dir, open_entry
from .clean import Cleaner, NearDuplicateIndex, minhash
from .formats import Chat, FieldMap, Text, canonical_format, detect_format, example_json, to_example
from .pack import Sample, SampleStore, packing_stats
from .sources import RawRecord, fingerprint, parse_line, read_source, resolve_sources

logger = logging.getLogger(__name__)

MAX_ERRORS_SHOWN = 5
CHUNK_RECORDS = 512  # records per worker task: large enough to amortise the IPC, small for streaming


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
    rejected: int = 0  # bad records (skipped with on_bad_record: skip)
    truncated: int = 0
    dedup_exact: int = 0
    dedup_near: int = 0
    val_overlap_removed: int = 0  # held-out samples that were also in the training data
    unicode_fixed: int = 0
    redacted: dict[str, int] = field(default_factory=dict)
    injection_flagged: int = 0
    injection_dropped: int = 0
    flagged: list[str] = field(default_factory=list)  # the first few "origin: matched text"
    bad_examples: list[str] = field(default_factory=list)  # the first few "origin: reason"
    formats: dict[str, str] = field(default_factory=dict)
    cache: dict[str, str] = field(default_factory=dict)
    rejects_files: list[str] = field(default_factory=list)
    mixed: dict[str, int] = field(default_factory=dict)  # samples per epoch, per dataset, after weights
    packed_rows: int = 0
    padding_share: float = 0.0

    def lines(self) -> list[str]:
        out = [
            f"{self.records} records from {len(self.per_file)} file(s) -> {self.samples} samples "
            f"({self.train_samples} train, {self.val_samples} held out)",
            f"{self.tokens} tokens, {self.trained_tokens} trained "
            f"({100 * self.trained_tokens / max(self.tokens, 1):.1f}%)",
        ]
        if self.formats:
            out.append("formats: " + ", ".join(f"{k} = {v}" for k, v in self.formats.items()))
        if self.text_chunks:
            out.append(f"{self.text_chunks} extra samples from splitting long texts into sequence_len chunks")
        if self.rejected:
            out.append(f"skipped {self.rejected} bad record(s), e.g. {self.bad_examples[0]}")
        if self.dropped_too_long:
            out.append(f"dropped {self.dropped_too_long} conversation(s) longer than sequence_len")
        if self.truncated:
            out.append(f"truncated {self.truncated} conversation(s) longer than sequence_len "
                       "(kept the start and part of the last assistant turn that fits)")
        if self.dropped_no_trained_tokens:
            out.append(f"warning: dropped {self.dropped_no_trained_tokens} sample(s) with no trained token "
                       "(every assistant turn has weight 0, or truncation left no assistant token)")
        if self.dedup_exact or self.dedup_near:
            out.append(f"removed {self.dedup_exact} exact and {self.dedup_near} near duplicate(s)")
        if self.val_overlap_removed:
            out.append(f"removed {self.val_overlap_removed} held-out sample(s) that are also training samples")
        if self.unicode_fixed:
            out.append(f"fixed Unicode (control characters, invalid characters, NFC) in {self.unicode_fixed} record(s)")
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
            out.append("rejected records and reasons: " + ", ".join(self.rejects_files))
        return out


@dataclass
class Dataset:
    train: SampleStore | list[Sample]
    val: SampleStore | list[Sample]
    report: DataReport
    entries: list[CacheEntry] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # dataset label per entry


def _text_samples(ids: list[int], sequence_len: int) -> list[Sample]:
    """Split a long text into windows of sequence_len inputs; consecutive windows share one token
    so every token is a target exactly once and none is lost."""
    return [Sample(c[:-1], c[1:]) for c in _text_windows(ids, sequence_len)]


def _text_windows(ids: list[int], sequence_len: int) -> list[list[int]]:
    out = []
    for start in range(0, max(len(ids) - 1, 1), sequence_len):
        chunk = ids[start:start + sequence_len + 1]
        if len(chunk) >= 2:
            out.append(chunk)
    return out


def split_validation(samples: list[Sample], val_set_size: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out a share (0 < x < 1) or a count (x >= 1) of samples, chosen by seed."""
    train_idx, val_idx = _split_indices(len(samples), val_set_size, seed)
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


def _split_indices(n: int, val_set_size: float, seed: int) -> tuple[list[int], list[int]]:
    if val_set_size <= 0:
        return list(range(n)), []
    n_val = int(val_set_size) if val_set_size >= 1 else max(1, round(val_set_size * n))
    if n_val >= n:
        raise DataError(
            f"val_set_size {val_set_size} would hold out {n_val} of {n} samples, leaving none to train on"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [i for i in range(n) if i not in held], sorted(held)


# ---------------------------------------------------------------------- per-record work (in workers)


@dataclass
class _Settings:
    field_map: dict[str, str]
    sequence_len: int
    train_on_inputs: bool
    train_on_thinking: bool
    on_too_long: str
    cleaner: Cleaner
    near_dedup: bool


@dataclass
class _ChunkOut:
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    records: list[tuple[int, int]] = field(default_factory=list)  # per accepted record: its sample range
    signatures: list = field(default_factory=list)  # per accepted record, when near_dedup
    rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (origin, kind, reason)
    counts: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    flagged: list[str] = field(default_factory=list)


_WORKER: dict = {}


def _init_worker(tokenizer, settings: _Settings) -> None:
    _WORKER["tokenizer"], _WORKER["settings"] = tokenizer, settings


def _work(task: tuple[str, list[RawRecord]]) -> _ChunkOut:
    out = process_records(task[1], task[0], _WORKER["tokenizer"], _WORKER["settings"])
    # Arrays pickle far faster than lists of ints on the way back to the main process.
    out.ids, out.mask = np.asarray(out.ids, np.int32), np.asarray(out.mask, np.uint8)
    return out


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _other_format_hint(record: dict, fmt: str, fm: FieldMap) -> str:
    # One format per dataset: a record of another layout is reported as such, not as a missing field.
    try:
        other = detect_format(record, fm)
    except ValueError:
        return ""
    return f" (the record looks like {other}, the dataset is read as {fmt})" if other != fmt else ""


def process_records(records: list[RawRecord], fmt: str, tokenizer, st: _Settings) -> _ChunkOut:
    """Format, clean and tokenize a chunk of records; nothing here depends on other chunks."""
    out = _ChunkOut()
    fm = FieldMap(st.field_map)
    L = st.sequence_len
    for raw in records:
        raw = parse_line(raw, st.cleaner.unicode)
        if raw.error:
            out.rejects.append((raw.origin, "bad", raw.error))
            continue
        try:
            # auto: each record by its own keys, so a file mixing layouts works; a set format is
            # applied to every record, and one in another layout is reported as such.
            used = detect_format(raw.record, fm) if fmt == "auto" else fmt
            example = to_example(raw.record, used, fm)
        except ValueError as exc:
            hint = _other_format_hint(raw.record, fmt, fm) if fmt != "auto" else ""
            out.rejects.append((raw.origin, "bad", str(exc) + hint))
            continue
        out.counts[f"format:{used}"] += 1
        cleaned = st.cleaner.clean(example)
        out.counts["unicode_fixed"] += cleaned.unicode_fixed or raw.fixed_utf8
        out.pii.update(cleaned.pii)
        if cleaned.injection is not None:
            out.counts["injection"] += 1
            if len(out.flagged) < 20:
                out.flagged.append(f"{raw.origin}: {cleaned.injection!r}")
        if cleaned.example is None:
            out.rejects.append((raw.origin, "injection", cleaned.reason or "dropped"))
            out.counts["injection_dropped"] += 1
            continue
        example = cleaned.example
        try:
            if isinstance(example, Chat):
                ids, mask = tokenizer.encode_chat(example.messages, st.train_on_inputs, tools=example.tools,
                                                 train_on_thinking=st.train_on_thinking)
                windows = [(ids, mask)]
                if len(ids) - 1 > L:
                    if st.on_too_long == "drop":
                        out.rejects.append((raw.origin, "too_long", f"{len(ids) - 1} tokens > sequence_len {L}"))
                        out.counts["dropped_too_long"] += 1
                        continue
                    # Keep the start; end the sample on the last trained token that fits, so it
                    # finishes inside an assistant turn instead of on a half prompt.
                    ids, mask = ids[:L + 1], mask[:L + 1]
                    last = max((i for i in range(1, len(mask)) if mask[i]), default=0)
                    if last == 0:
                        out.rejects.append((raw.origin, "too_long",
                                            f"the prompt alone is longer than sequence_len {L}"))
                        out.counts["dropped_too_long"] += 1
                        continue
                    windows = [(ids[:last + 1], mask[:last + 1])]
                    out.counts["truncated"] += 1
            else:
                ids = tokenizer.encode_text(example.text)
                # The first id of a window is only an input there (the previous window trains on it).
                windows = [(w, [False] + [True] * (len(w) - 1)) for w in _text_windows(ids, L)]
                out.counts["text_chunks"] += len(windows) - 1
        except (ValueError, DataError) as exc:
            out.rejects.append((raw.origin, "bad", str(exc)))
            continue
        trained = [sum(m[1:]) for _, m in windows]
        if sum(trained) == 0:
            out.rejects.append((raw.origin, "no_trained_tokens",
                                "no trained token (every assistant turn has weight 0)"))
            out.counts["dropped_no_trained_tokens"] += 1
            continue
        key = example_json(example)
        first = len(out.lengths)
        for k, ((w_ids, w_mask), n_tr) in enumerate(zip(windows, trained, strict=True)):
            out.ids.extend(w_ids)
            out.mask.extend(w_mask)
            out.lengths.append(len(w_ids))
            out.trained.append(n_tr)
            out.hashes.append(_hash64(key if k == 0 else f"{key}#{k}"))
            out.origins.append(raw.origin)
        out.records.append((first, len(out.lengths)))
        if st.near_dedup:
            text = example.text if isinstance(example, Text) else "\n".join(
                str(m.get("content") or "") for m in example.messages)
            out.signatures.append(minhash(text))
    return out


# ---------------------------------------------------------------------- one dataset -> one cache entry


def _settings(cfg, field_map: dict[str, str] | None = None) -> _Settings:
    c = cfg.cleaning
    return _Settings(field_map=dict(field_map or {}), sequence_len=cfg.sequence_len,
                     train_on_inputs=cfg.train_on_inputs, train_on_thinking=cfg.train_on_thinking,
                     on_too_long=cfg.on_too_long,
                     cleaner=Cleaner(unicode=c.unicode, redact_pii=c.redact_pii, pii_kinds=tuple(c.pii_kinds),
                                     prompt_injection=c.prompt_injection),
                     near_dedup=c.near_dedup)


def _tokenizer_digest(tokenizer) -> str:
    h = hashlib.blake2b(digest_size=16)
    with Path(tokenizer.source_file).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    added = f":{sorted(tokenizer.added.items())}" if tokenizer.added else ""  # names read out of the text
    return f"{tokenizer.version}:{h.hexdigest()}{added}"


def _code_digest() -> str:
    """A digest of the code that turns records into samples: a changed pipeline never reuses a cache
    written by the old one, even when the version number did not move."""
    h = hashlib.blake2b(digest_size=8)
    here = Path(__file__).resolve().parent
    for f in sorted([*here.glob("*.py"), here.parent / "chat.py"]):
        h.update(f.read_bytes())
    return h.hexdigest()


def _num_workers(cfg) -> int:
    return cfg.dataset_num_workers or max(1, min(os.cpu_count() or 1, 8))


def dataset_label(ds) -> str:
    extra = f"/{ds.name}" if ds.name else ""
    return f"{ds.path}{extra}" + (f"[{ds.split}]" if ds.split else "")


def load_or_build(ds, cfg, tokenizer, cache_root: Path | None) -> tuple[CacheEntry, str]:
    """The cache entry of one dataset: reused when its key matches, else built (streaming)."""
    sources = resolve_sources(ds.path, ds.source, ds.name, ds.split)
    c = cfg.cleaning
    import mistral_common

    key = cache_key({
        "sources": [fingerprint(s) for s in sources],
        "tokenizer": _tokenizer_digest(tokenizer),
        "format": ds.format, "field_map": ds.field_map,
        "sequence_len": cfg.sequence_len, "train_on_inputs": cfg.train_on_inputs,
        "train_on_thinking": cfg.train_on_thinking, "on_too_long": cfg.on_too_long,
        "cleaning": {k: v for k, v in c.model_dump().items() if k != "dedup"},
        "mistral_common": mistral_common.__version__, "mistral_tune": __version__, "code": _code_digest(),
    })
    root = cache_root if cache_root is not None else Path(tempfile.mkdtemp(prefix="mistral-tune-data-"))
    status = "built"
    if cache_root is not None:
        entry, why = open_entry(root, key)
        if entry is not None:
            return entry, "reused"
        if why != "not cached":
            status = f"rebuilt: {why}"
            logger.warning("token cache %s: %s", root / key, why)
    settings = _settings(cfg, ds.field_map)
    _build_entry(sources, ds, settings, tokenizer, CacheWriter(root, key), _num_workers(cfg), c)
    entry, why = open_entry(root, key)
    if entry is None:  # cannot happen unless the disk fails under us
        raise DataError(f"token cache {root / key}: cannot read back what was just written ({why})")
    return entry, status


def _record_chunks(sources, fix_utf8: bool, per_file: dict[str, int]):
    """Chunks of raw (unparsed) records across the dataset's sources, read as they are consumed."""
    chunk: list[RawRecord] = []
    for src in sources:
        n = 0
        for raw in read_source(src, fix_utf8=fix_utf8, lazy=True):
            n += 1
            chunk.append(raw)
            if len(chunk) >= CHUNK_RECORDS:
                yield chunk
                chunk = []
        if n == 0:
            raise DataError(f"{src.label()}: the dataset is empty")
        per_file[src.label()] = n
    if chunk:
        yield chunk


def _format_summary(fmt: str, counts: Counter) -> str:
    """The dataset's format for the report: the one set, or what auto found (with counts if mixed)."""
    if fmt != "auto":
        return fmt
    found = sorted(((k.split(":", 1)[1], n) for k, n in counts.items() if k.startswith("format:")),
                   key=lambda kv: -kv[1])
    if len(found) == 1:
        return found[0][0]
    return ", ".join(f"{f} ({n})" for f, n in found) or "auto (no readable record)"


def _build_entry(sources, ds, settings: _Settings, tokenizer, writer: CacheWriter, workers: int,
                 cleaning) -> None:
    per_file: dict[str, int] = {}
    fmt = canonical_format(ds.format)
    counts: Counter = Counter()
    pii: Counter = Counter()
    flagged: list[str] = []
    bad: list[str] = []
    near = NearDuplicateIndex(cleaning.near_dedup_threshold) if cleaning.near_dedup else None
    exact_seen: set[int] = set()

    def consume(out: _ChunkOut) -> None:
        for origin, kind, reason in out.rejects:
            writer.reject(origin, kind, reason)
            if kind == "bad":
                counts["bad"] += 1
                if len(bad) < 20:
                    bad.append(f"{origin}: {reason}")
        counts.update(out.counts)
        pii.update(out.pii)
        flagged.extend(out.flagged[:max(0, 20 - len(flagged))])
        counts["accepted"] += len(out.records)
        keep = np.ones(len(out.lengths), dtype=bool)
        if near is not None:
            for (a, b), sig in zip(out.records, out.signatures, strict=True):
                if cleaning.dedup and out.hashes[a] in exact_seen:
                    continue  # an exact duplicate: left to (and counted by) exact deduplication
                exact_seen.add(out.hashes[a])
                if near.add(sig):
                    keep[a:b] = False
                    counts["near_dup"] += 1
                    writer.reject(out.origins[a], "near_duplicate", "near-duplicate of an earlier record")
        lengths = np.asarray(out.lengths, np.int64)
        ids, mask = np.asarray(out.ids, np.int32), np.asarray(out.mask, np.uint8)
        if not keep.all():
            tok_keep = np.repeat(keep, lengths)
            ids, mask = ids[tok_keep], mask[tok_keep]
        writer.append(ids, mask, lengths[keep], np.asarray(out.trained, np.int32)[keep],
                      np.asarray(out.hashes, np.uint64)[keep], [o for o, k in zip(out.origins, keep, strict=True) if k])

    try:
        chunks = _record_chunks(sources, settings.cleaner.unicode, per_file)
        first = next(chunks, None)
        second = next(chunks, None) if first is not None else None
        if second is None or workers <= 1:
            # Small data (or one worker): no process start-up cost.
            for chunk in (c for c in (first, second) if c is not None):
                consume(process_records(chunk, fmt, tokenizer, settings))
            for chunk in chunks:
                consume(process_records(chunk, fmt, tokenizer, settings))
        else:
            _run_pool(chunks, [first, second], fmt, tokenizer, settings, workers, consume)
    except BaseException:
        writer.abort()
        raise
    meta = {
        "dataset": dataset_label(ds), "format": _format_summary(fmt, counts), "per_file": per_file,
        "counts": dict(counts), "redacted": dict(pii), "flagged": flagged, "bad_examples": bad,
    }
    writer.finish(meta)


def _run_pool(chunks, head, fmt: str, tokenizer, settings, workers, consume) -> None:
    # Bounded in-flight window (not Pool.imap, which would read the whole file ahead into memory).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, settings)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in itertools.chain(head, chunks):  # lazily: the file is read as the workers keep up
            pending.append(pool.apply_async(_work, ((fmt, chunk),)))
            while len(pending) >= 2 * workers:
                consume(pending.popleft().get())
        while pending:
            consume(pending.popleft().get())


# ---------------------------------------------------------------------- all datasets -> Dataset


def _cache_root(cfg) -> Path | None:
    if not cfg.dataset_cache:
        return None
    return Path(cfg.dataset_cache_dir).expanduser() if cfg.dataset_cache_dir else default_cache_dir()


def _add_entry_report(report: DataReport, entry: CacheEntry, label: str, status: str) -> None:
    m = entry.manifest
    counts = m["counts"]
    report.records += sum(m["per_file"].values())
    report.per_file.update(m["per_file"])
    report.formats[label] = m["format"]
    report.cache[label] = status
    report.text_chunks += counts.get("text_chunks", 0)
    report.dropped_too_long += counts.get("dropped_too_long", 0)
    report.truncated += counts.get("truncated", 0)
    report.dropped_no_trained_tokens += counts.get("dropped_no_trained_tokens", 0)
    report.dedup_near += counts.get("near_dup", 0)
    report.unicode_fixed += counts.get("unicode_fixed", 0)
    report.injection_flagged += counts.get("injection", 0) - counts.get("injection_dropped", 0)
    report.injection_dropped += counts.get("injection_dropped", 0)
    report.flagged.extend(m["flagged"][:max(0, 20 - len(report.flagged))])
    for k, n in m["redacted"].items():
        report.redacted[k] = report.redacted.get(k, 0) + n
    report.rejected += counts.get("bad", 0)
    report.bad_examples.extend(m["bad_examples"])
    if (entry.path / "rejects.jsonl").stat().st_size:
        report.rejects_files.append(str(entry.path / "rejects.jsonl"))


def _mix(indices: np.ndarray, weight: float, num_samples: int | None, rng: np.random.Generator) -> np.ndarray:
    """Samples for one epoch: whole repeats plus a random part, so the count is weight * n (or num_samples)."""
    n = len(indices)
    target = num_samples if num_samples is not None else int(round(weight * n))
    if n == 0 or target == n:
        return indices
    reps, rest = divmod(target, n)
    return np.concatenate([np.tile(indices, reps), np.sort(rng.choice(indices, size=rest, replace=False))])


def build_dataset(cfg, tokenizer) -> Dataset:
    """Samples for training and evaluation from cfg.datasets / cfg.val_datasets, with a DataReport.

    Raises DataError for bad records (on_bad_record: error), empty or missing data, and when no
    sample with a trained token is left.
    """
    report = DataReport()
    root = _cache_root(cfg)
    entries: list[CacheEntry] = []
    labels: list[str] = []
    for ds in [*cfg.datasets, *cfg.val_datasets]:
        entry, status = load_or_build(ds, cfg, tokenizer, root)
        label = dataset_label(ds)
        if root is None:  # no cache: the arrays stay mapped; keep only the rejects for the user
            for f in entry.path.glob("*.bin"):
                f.unlink()
        entries.append(entry)
        labels.append(label)
        _add_entry_report(report, entry, label, status)

    if report.rejected and cfg.on_bad_record == "error":
        shown = "; ".join(report.bad_examples[:MAX_ERRORS_SHOWN])
        more = f" (and {report.rejected - MAX_ERRORS_SHOWN} more)" if report.rejected > MAX_ERRORS_SHOWN else ""
        raise DataError(f"{report.rejected} bad record(s): {shown}{more}; fix them, or set on_bad_record: skip "
                        "to leave them out")

    n_train_sets = len(cfg.datasets)
    part = np.concatenate([np.full(e.n_samples, i, np.int32) for i, e in enumerate(entries)])
    local = np.concatenate([np.arange(e.n_samples, dtype=np.int64) for e in entries])
    hashes = np.concatenate([np.asarray(e.hashes) for e in entries]) if entries else np.zeros(0, np.uint64)
    is_train = part < n_train_sets
    keep = np.ones(len(part), dtype=bool)
    if cfg.cleaning.dedup:
        # First occurrence wins, training data before held-out data.
        _, first = np.unique(hashes[is_train], return_index=True)
        train_keep = np.zeros(int(is_train.sum()), dtype=bool)
        train_keep[first] = True
        keep[is_train] = train_keep
        report.dedup_exact += int((~train_keep).sum())
        if (~is_train).any():
            val_h = hashes[~is_train]
            _, vfirst = np.unique(val_h, return_index=True)
            val_keep = np.zeros(len(val_h), dtype=bool)
            val_keep[vfirst] = True
            report.dedup_exact += int((~val_keep).sum())
            overlap = np.isin(val_h, hashes[is_train])
            report.val_overlap_removed = int((val_keep & overlap).sum())
            keep[~is_train] = val_keep & ~overlap
    all_store = SampleStore(entries, part, local)
    kept = np.flatnonzero(keep)
    pool_idx = kept[is_train[kept]]
    val_idx = kept[~is_train[kept]]

    report.samples = len(kept)
    report.tokens = int(all_store.lengths[kept].sum())
    report.trained_tokens = int(all_store.trained[kept].sum())
    if len(pool_idx) == 0:
        raise DataError(_no_sample_reason(report, cfg))

    if cfg.val_set_size:
        tr, va = _split_indices(len(pool_idx), cfg.val_set_size, cfg.seed)
        pool_idx, val_idx = pool_idx[tr], pool_idx[va]
    rng = np.random.default_rng(cfg.seed)
    mixed = []
    for i, ds in enumerate(cfg.datasets):
        own = pool_idx[part[pool_idx] == i]
        chosen = _mix(own, ds.weight, ds.num_samples, rng)
        report.mixed[labels[i] + (f" x{ds.weight:g}" if ds.weight != 1 else "")
                     + (f" ({ds.num_samples} samples)" if ds.num_samples else "")] = len(chosen)
        mixed.append(chosen)
    train_idx = np.concatenate(mixed)
    train, val = all_store.subset(train_idx), all_store.subset(val_idx)
    report.train_samples, report.val_samples = len(train), len(val)
    if cfg.sample_packing:
        report.packed_rows, report.padding_share = packing_stats(train.lengths.tolist(), cfg.sequence_len)
    if report.dropped_no_trained_tokens:
        logger.warning("%d sample(s) had no trained token and were left out", report.dropped_no_trained_tokens)
    return Dataset(train, val, report, entries, labels)


def _no_sample_reason(report: DataReport, cfg) -> str:
    why = []
    if report.rejected:
        why.append(f"{report.rejected} bad record(s) skipped (e.g. {report.bad_examples[0]})")
    if report.dropped_too_long:
        why.append(f"{report.dropped_too_long} longer than sequence_len={cfg.sequence_len}")
    if report.dropped_no_trained_tokens:
        why.append(f"{report.dropped_no_trained_tokens} with no assistant tokens to train on (no assistant "
                   "turn, or every assistant turn has weight 0)")
    if report.dedup_exact:
        why.append(f"{report.dedup_exact} duplicates")
    if report.injection_dropped:
        why.append(f"{report.injection_dropped} dropped for prompt injection")
    return f"no usable sample in {report.records} record(s): " + (", ".join(why) or "nothing to train on")
