"""From the config's datasets to tokenized train/validation samples, with a report of what happened.

Per dataset: sources -> records -> format -> cleaning -> tokens (+ length policy), streamed in chunks
through worker processes and written to the token cache; a second run with the same inputs maps the
cache and skips all of it. Then, over all datasets: bad-record policy, exact deduplication, the
validation split and the mixing weights. Every record that does not become a sample is counted in
the report and written with its reason to the dataset's rejects file (exact duplicates, found across
datasets, to the build's duplicates file), so that records read = records used + records left out.

The work per record is bounded by what it can become: a conversation whose text is longer than
sequence_len tokens could hold is dropped (or cut) before it is tokenized, and a long raw text is
tokenized in pieces straight into arrays.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import DataError
from ..fsutil import atomic_write_text
from .cache import CacheEntry, CacheWriter, cache_key, default_cache_dir, open_entry
from .clean import Cleaner, NearDuplicateIndex, minhash
from .formats import Chat, FieldMap, Text, canonical_format, detect_format, example_json, to_example
from .pack import Sample, SampleStore, packing_stats
from .report import DataReport, add_entry_report
from .sources import RawRecord, fingerprint, parse_line, read_source, resolve_sources

logger = logging.getLogger(__name__)

MAX_ERRORS_SHOWN = 5
CHUNK_RECORDS = 512  # records per worker task: large enough to amortise the IPC, small for streaming


@dataclass
class Dataset:
    train: SampleStore | list[Sample]
    val: SampleStore | list[Sample]
    report: DataReport
    entries: list[CacheEntry] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # dataset label per entry


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
    max_chars: int  # a conversation with more characters of text surely has more than sequence_len tokens


@dataclass
class _ChunkOut:
    ids: list[np.ndarray] = field(default_factory=list)  # per sample (concatenated by pack())
    mask: list[np.ndarray] = field(default_factory=list)
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
    redacted: list[str] = field(default_factory=list)
    longest: int = 0  # tokens of the longest conversation dropped as too long
    longest_chars: int = 0  # characters of the longest one dropped before tokenizing

    def reject(self, origin: str, kind: str, reason: str) -> None:
        self.rejects.append((origin, kind, _printable(reason)))

    def pack(self) -> _ChunkOut:
        # One array each: they pickle far faster than lists of ints on the way to the main process.
        self.ids = np.concatenate(self.ids) if len(self.ids) else np.zeros(0, np.int32)
        self.mask = np.concatenate(self.mask) if len(self.mask) else np.zeros(0, np.uint8)
        return self


_WORKER: dict = {}


def _init_worker(tokenizer, settings: _Settings) -> None:
    _WORKER["tokenizer"], _WORKER["settings"] = tokenizer, settings


def _work(task: tuple[str, list[RawRecord]]) -> _ChunkOut:
    return process_records(task[1], task[0], _WORKER["tokenizer"], _WORKER["settings"]).pack()


def _printable(text: str) -> str:
    """Text a file or a terminal takes: lone surrogates (from the data) as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _other_format_hint(record: dict, fmt: str, fm: FieldMap) -> str:
    # One format per dataset: a record of another layout is reported as such, not as a missing field.
    try:
        other = detect_format(record, fm)
    except ValueError:
        return ""
    return f" (the record looks like {other}, the dataset is read as {fmt})" if other != fmt else ""


TEXT_PIECE_CHARS = 1 << 20  # a raw text is tokenized this many characters at a time


def encode_text_pieces(tokenizer, text: str, piece_chars: int | None = None) -> np.ndarray:
    """The ids of a raw text (BOS ... EOS), tokenized piece by piece so that a huge text costs an
    array of its ids, not lists of Python ints many times its size.

    Pieces end at a single space between two letters or digits, where both kinds of tokenizer split
    anyway, so the ids are those of the whole text: SentencePiece encodes the next piece without the
    space (its leading-space marker stands for it), tekken keeps the space at the next piece's start.
    A stretch with no such space is cut where the piece ends: the text stays the same, its ids may
    differ around the cut.
    """
    piece_chars = piece_chars or TEXT_PIECE_CHARS
    if len(text) <= piece_chars:
        return np.asarray(tokenizer.encode_text(text), np.int32)
    spm = not tokenizer.is_tekken
    newline = tokenizer.encode_text("\n", bos=False, eos=False) if spm else []
    parts, pos, glued = [], 0, False
    while pos < len(text):
        end = next_pos = min(pos + piece_chars, len(text))
        next_glued = end < len(text)
        if end < len(text):
            cut = _space_cut(text, pos + piece_chars // 2, end)
            if cut is not None:
                end, next_pos, next_glued = cut, cut + spm, False
        eos = next_pos >= len(text)
        ids = None
        if glued and spm:
            # SentencePiece would put its leading-space marker on the piece: encode it after a
            # newline instead and take the newline's ids off.
            ids = tokenizer.encode_text("\n" + text[pos:end], bos=False, eos=eos)
            ids = ids[len(newline):] if ids[:len(newline)] == newline else None
        if ids is None:
            ids = tokenizer.encode_text(text[pos:end], bos=pos == 0, eos=eos)
        parts.append(np.asarray(ids, np.int32))
        pos, glued = next_pos, next_glued
    return np.concatenate(parts)


def _space_cut(text: str, lo: int, hi: int) -> int | None:
    """The last single space in text[lo:hi] between two letters or digits."""
    cut = text.rfind(" ", lo, hi)
    while cut > 0:
        if text[cut - 1].isalnum() and cut + 1 < len(text) and text[cut + 1].isalnum():
            return cut
        cut = text.rfind(" ", lo, cut)
    return None


def _text_windows(ids: np.ndarray, sequence_len: int) -> list[np.ndarray]:
    """Windows of sequence_len inputs; consecutive windows share one token so every token is a
    target exactly once and none is lost."""
    return [ids[s:s + sequence_len + 1] for s in range(0, max(len(ids) - 1, 1), sequence_len)
            if len(ids) - s >= 2]


def _cap_content(m: dict, chars: int) -> dict:
    content = m.get("content")
    return {**m, "content": content[:chars]} if isinstance(content, str) and len(content) > chars else m


def process_records(records: list[RawRecord], fmt: str, tokenizer, st: _Settings) -> _ChunkOut:
    """Format, clean and tokenize a chunk of records; nothing here depends on other chunks."""
    out = _ChunkOut()
    fm = FieldMap(st.field_map)
    for raw in records:
        raw = parse_line(raw)
        if raw.error:
            out.reject(raw.origin, "bad", raw.error)
            continue
        try:
            _process_record(raw, fmt, fm, tokenizer, st, out)
        except RecursionError:  # a record nested deeply enough to parse, too deeply to walk
            out.reject(raw.origin, "bad", "nested too deeply")
    return out


def _process_record(raw: RawRecord, fmt: str, fm: FieldMap, tokenizer, st: _Settings, out: _ChunkOut) -> None:
    L = st.sequence_len
    try:
        # auto: each record by its own keys, so a file mixing layouts works; a set format is
        # applied to every record, and one in another layout is reported as such.
        used = detect_format(raw.record, fm) if fmt == "auto" else fmt
        example = to_example(raw.record, used, fm)
    except ValueError as exc:
        hint = _other_format_hint(raw.record, fmt, fm) if fmt != "auto" else ""
        out.reject(raw.origin, "bad", str(exc) + hint)
        return
    out.counts[f"format:{used}"] += 1
    cleaned = st.cleaner.clean(example)
    out.counts["unicode_fixed"] += bool(cleaned.unicode)
    out.counts.update(f"unicode:{k}" for k in cleaned.unicode)
    out.pii.update(cleaned.pii)
    room = max(0, 20 - len(out.redacted))
    out.redacted.extend(_printable(f"{raw.origin}: ...{r}...") for r in cleaned.redacted[:room])
    if cleaned.injection is not None:
        out.counts["injection"] += 1
        if len(out.flagged) < 20:
            out.flagged.append(_printable(f"{raw.origin}: {cleaned.injection!r}"))
    if cleaned.example is None:
        out.reject(raw.origin, "injection", cleaned.reason or "dropped")
        out.counts["injection_dropped"] += 1
        return
    example = cleaned.example
    try:
        if isinstance(example, Chat):
            chars = sum(len(m["content"]) for m in example.messages if isinstance(m.get("content"), str))
            if chars > st.max_chars:
                # Far too long for sequence_len whatever its tokens: decided before tokenizing.
                if st.on_too_long == "drop":
                    out.reject(raw.origin, "too_long", f"{chars} characters of text: more than sequence_len {L} "
                               "tokens can hold")
                    out.counts["dropped_too_long"] += 1
                    out.longest_chars = max(out.longest_chars, chars)
                    return
                # Truncation keeps the first sequence_len tokens; a message cut to twice the bound
                # still gives more than that, so the kept tokens are the same as without the cut.
                example = Chat([_cap_content(m, 2 * st.max_chars) for m in example.messages], example.tools)
            ids, mask = tokenizer.encode_chat(example.messages, st.train_on_inputs, tools=example.tools,
                                             train_on_thinking=st.train_on_thinking)
            if len(ids) - 1 > L:
                if st.on_too_long == "drop":
                    out.reject(raw.origin, "too_long", f"{len(ids) - 1} tokens > sequence_len {L}")
                    out.counts["dropped_too_long"] += 1
                    out.longest = max(out.longest, len(ids) - 1)
                    return
                # Keep the start; end the sample on the last trained token that fits, so it
                # finishes inside an assistant turn instead of on a half prompt.
                ids, mask = ids[:L + 1], mask[:L + 1]
                last = max((i for i in range(1, len(mask)) if mask[i]), default=0)
                if last == 0:
                    out.reject(raw.origin, "too_long", f"the prompt alone is longer than sequence_len {L}")
                    out.counts["dropped_too_long"] += 1
                    return
                ids, mask = ids[:last + 1], mask[:last + 1]
                out.counts["truncated"] += 1
            windows = [(np.asarray(ids, np.int32), np.asarray(mask, np.uint8))]
        else:
            windows = []
            for w in _text_windows(encode_text_pieces(tokenizer, example.text), L):
                m = np.ones(len(w), np.uint8)
                m[0] = 0  # the first id of a window is only an input there (the previous window trains on it)
                windows.append((w, m))
            out.counts["text_chunks"] += len(windows) - 1
    except (ValueError, DataError) as exc:  # UnicodeEncodeError (a lone surrogate) is a ValueError
        out.reject(raw.origin, "bad", str(exc))
        return
    trained = [int(m[1:].sum()) for _, m in windows]
    if sum(trained) == 0:
        out.reject(raw.origin, "no_trained_tokens", "no trained token (every assistant turn has weight 0)")
        out.counts["dropped_no_trained_tokens"] += 1
        return
    # The first window's hash is the example's; the others derive from it (not from the whole text
    # again per window: a long text has thousands of windows).
    first_hash = _hash64(example_json(example))
    start = len(out.lengths)
    for k, ((w_ids, w_mask), n_tr) in enumerate(zip(windows, trained, strict=True)):
        out.ids.append(w_ids)
        out.mask.append(w_mask)
        out.lengths.append(len(w_ids))
        out.trained.append(n_tr)
        out.hashes.append(first_hash if k == 0 else _hash64(f"{first_hash}#{k}"))
        out.origins.append(raw.origin)
    out.records.append((start, len(out.lengths)))
    if st.near_dedup:
        text = example.text if isinstance(example, Text) else "\n".join(
            str(m.get("content") or "") for m in example.messages)
        out.signatures.append(minhash(text))


# ---------------------------------------------------------------------- one dataset -> one cache entry


def _settings(cfg, tokenizer, field_map: dict[str, str] | None = None) -> _Settings:
    c = cfg.cleaning
    return _Settings(field_map=dict(field_map or {}), sequence_len=cfg.sequence_len,
                     train_on_inputs=cfg.train_on_inputs, train_on_thinking=cfg.train_on_thinking,
                     on_too_long=cfg.on_too_long,
                     cleaner=Cleaner(unicode=c.unicode, redact_pii=c.redact_pii, pii_kinds=tuple(c.pii_kinds),
                                     prompt_injection=c.prompt_injection),
                     near_dedup=c.near_dedup, max_chars=(cfg.sequence_len + 1) * _longest_token_chars(tokenizer))


@functools.lru_cache(maxsize=4)  # 1 s for tekken's 131k entries: once per tokenizer
def _longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters of text one token stands for: the UTF-8 length of the
    longest vocabulary entry (neither tokenizer normalises text, so n characters need at least
    n / this many tokens)."""
    raw = tokenizer.mistral_tokenizer.instruct_tokenizer.tokenizer
    return max(len(raw.id_to_piece(i).encode("utf-8", "surrogatepass")) for i in range(raw.n_words))


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


def load_or_build(ds, cfg, tokenizer, root: Path, reuse: bool = True) -> tuple[CacheEntry, str]:
    """The cache entry of one dataset in root: reused when its key matches (and reuse), else built
    (streaming)."""
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
    status = "built"
    if reuse:
        entry, why = open_entry(root, key)
        if entry is not None:
            return entry, "reused"
        if why != "not cached":
            status = f"rebuilt: {why}"
            logger.warning("token cache %s: %s", root / key, why)
    settings = _settings(cfg, tokenizer, ds.field_map)
    _build_entry(sources, ds, settings, tokenizer, CacheWriter(root, key), _num_workers(cfg), c)
    entry, why = open_entry(root, key)
    if entry is None:  # cannot happen unless the disk fails under us
        raise DataError(f"token cache {root / key}: cannot read back what was just written ({why})")
    return entry, status


def _record_chunks(sources, per_file: dict[str, int], counts: Counter):
    """Chunks of raw (unparsed) records across the dataset's sources, read as they are consumed."""
    chunk: list[RawRecord] = []
    for src in sources:
        n = blank = 0
        for raw in read_source(src, lazy=True):
            if raw.blank:
                blank += 1
                continue
            n += 1
            chunk.append(raw)
            if len(chunk) >= CHUNK_RECORDS:
                yield chunk
                chunk = []
        if n == 0:
            raise DataError(f"{src.label()}: the dataset is empty" + (f" ({blank} blank line(s))" if blank else ""))
        per_file[src.label()] = n
        counts["blank"] += blank
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
    redacted: list[str] = []
    bad: list[str] = []
    longest = [0, 0]  # tokens, characters of the longest conversation dropped as too long
    near = NearDuplicateIndex(cleaning.near_dedup_threshold) if cleaning.near_dedup else None
    exact_seen: set[int] = set()

    def consume(out: _ChunkOut) -> None:
        for origin, kind, reason in out.rejects:
            writer.reject(origin, kind, reason)
            if kind == "bad":
                counts["bad"] += 1
                counts["bad_utf8"] += reason.startswith("not valid UTF-8")
                if len(bad) < 20:
                    bad.append(f"{origin}: {reason}")
        counts.update(out.counts)
        pii.update(out.pii)
        flagged.extend(out.flagged[:max(0, 20 - len(flagged))])
        redacted.extend(out.redacted[:max(0, 20 - len(redacted))])
        longest[:] = max(longest[0], out.longest), max(longest[1], out.longest_chars)
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
        counts["accepted"] += len(out.records)
        lengths = np.asarray(out.lengths, np.int64)
        ids, mask = out.ids, out.mask
        if not keep.all():
            tok_keep = np.repeat(keep, lengths)
            ids, mask = ids[tok_keep], mask[tok_keep]
        writer.append(ids, mask, lengths[keep], np.asarray(out.trained, np.int32)[keep],
                      np.asarray(out.hashes, np.uint64)[keep], [o for o, k in zip(out.origins, keep, strict=True) if k])

    try:
        chunks = _record_chunks(sources, per_file, counts)
        first = next(chunks, None)
        second = next(chunks, None) if first is not None else None
        if second is None or workers <= 1:
            # Small data (or one worker): no process start-up cost.
            for chunk in itertools.chain((c for c in (first, second) if c is not None), chunks):
                consume(process_records(chunk, fmt, tokenizer, settings).pack())
        else:
            _run_pool(chunks, [first, second], fmt, tokenizer, settings, workers, consume)
    except BaseException:
        writer.abort()
        raise
    counts["accepted"] -= counts["near_dup"]
    meta = {
        "dataset": dataset_label(ds), "format": _format_summary(fmt, counts), "per_file": per_file,
        "counts": dict(counts), "redacted": dict(pii), "redacted_examples": redacted, "flagged": flagged,
        "bad_examples": bad, "longest_dropped": {"tokens": longest[0], "characters": longest[1]},
    }
    writer.finish(meta)


def _run_pool(chunks, head, fmt: str, tokenizer, settings, workers, consume) -> None:
    # Bounded in-flight window (not Pool.imap, which would read the whole file ahead into memory).
    # Workers come from a fork server, not a fork of this process: by now this process may run
    # threads (torch's, a tokenizer's, a compiler's) and a child forked while one of them held a
    # lock waited for it forever (seen as data builds hanging on a futex after a compiled step).
    # The server imports this module once, so each worker starts without importing torch again.
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([__name__])
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


def _no_sample_reason(label: str, entry: CacheEntry, cfg) -> str:
    """Why a dataset gave no sample, with what to change."""
    m = entry.manifest
    c = m["counts"]
    why = []
    if c.get("bad"):
        why.append(f"{c['bad']} bad record(s) skipped (e.g. {m['bad_examples'][0]})")
    if c.get("dropped_too_long"):
        longest = m["longest_dropped"]
        if longest["tokens"]:
            fits = min(1 << (longest["tokens"] - 1).bit_length(), 1_048_576)
            hint = (f"the longest has {longest['tokens']} tokens: sequence_len: {fits} fits it, or set "
                    "on_too_long: truncate")
        else:
            hint = f"the longest has {longest['characters']} characters; on_too_long: truncate keeps their start"
        why.append(f"{c['dropped_too_long']} longer than sequence_len={cfg.sequence_len} ({hint})")
    if c.get("dropped_no_trained_tokens"):
        why.append(f"{c['dropped_no_trained_tokens']} with no assistant tokens to train on (no assistant turn, "
                   "or every assistant turn has weight 0)")
    if c.get("injection_dropped"):
        why.append(f"{c['injection_dropped']} dropped for prompt injection")
    if c.get("near_dup"):
        why.append(f"{c['near_dup']} near duplicates")
    n = sum(m["per_file"].values())
    return f"{label}: no usable sample in {n} record(s): " + (", ".join(why) or "nothing to train on")


def _origins_at(entries: list[CacheEntry], part: np.ndarray, local: np.ndarray, wanted) -> dict[int, str]:
    """The origins of the samples at the given (global) indices, read from each entry's origins.txt."""
    by_part: dict[int, dict[int, int]] = collections.defaultdict(dict)
    for k in wanted:
        by_part[int(part[k])][int(local[k])] = int(k)
    out = {}
    for p, locs in by_part.items():
        with (entries[p].path / "origins.txt").open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i in locs:
                    out[locs[i]] = line.rstrip("\n")
    return out


def _deduplicate(entries: list[CacheEntry], part: np.ndarray, local: np.ndarray, n_train_sets: int,
                 root: Path, report: DataReport) -> np.ndarray:
    """Which samples to keep: the first of each set of exact duplicates (training data before held-out
    data), and no held-out sample that is also a training sample. Every record left out is written,
    with the record it repeats, to a duplicates file in root, and counted (as records)."""
    hashes = np.concatenate([np.asarray(e.hashes) for e in entries])
    is_train = part < n_train_sets
    source = np.arange(len(hashes))  # the sample each one repeats (itself if none)

    def firsts(idx: np.ndarray) -> np.ndarray:
        _, first, inverse = np.unique(hashes[idx], return_index=True, return_inverse=True)
        return idx[first[inverse.ravel()]]

    train, val = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    if len(train):
        source[train] = firsts(train)
    if len(val):
        source[val] = firsts(val)
        uniq, first = np.unique(hashes[train], return_index=True)
        at = np.minimum(np.searchsorted(uniq, hashes[val]), max(len(uniq) - 1, 0))
        overlap = (uniq[at] == hashes[val]) if len(uniq) else np.zeros(len(val), bool)
        source[val[overlap]] = train[first[at[overlap]]]
    keep = source == np.arange(len(hashes))
    dropped = np.flatnonzero(~keep)
    if not len(dropped):
        return keep
    origins = _origins_at(entries, part, local, set(dropped.tolist()) | set(source[dropped].tolist()))
    rows, seen = [], set()
    for k in dropped.tolist():
        if (part[k], origins[k]) in seen:  # the other windows of a long text
            continue
        seen.add((part[k], origins[k]))
        if is_train[k] or not is_train[source[k]]:
            report.dedup_exact += 1
            rows.append({"origin": origins[k], "kind": "duplicate",
                         "reason": f"exact duplicate of {origins[source[k]]}"})
        else:
            report.val_overlap_removed += 1
            rows.append({"origin": origins[k], "kind": "held_out_overlap",
                         "reason": f"held-out record equal to training record {origins[source[k]]}"})
    report.duplicate_examples = [f"{r['origin']}: {r['reason']}" for r in rows[:10]]
    digest = hashlib.blake2b("\0".join([str(n_train_sets), *(e.manifest["key"] for e in entries)]).encode(),
                             digest_size=8).hexdigest()
    path = root / f"duplicates-{digest}.jsonl"
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                      errors="backslashreplace")
    report.rejects_files.append(str(path))
    return keep


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

    Raises DataError for bad records (on_bad_record: error), empty or missing data, and a dataset
    that gives no sample (each one is named, with why and what to change).
    """
    report = DataReport()
    root = _cache_root(cfg)
    reuse = root is not None
    if root is None:  # no cache: a folder of this build's own (its rejects stay for the user to read)
        root = Path(tempfile.mkdtemp(prefix="mistral-tune-data-"))
    entries: list[CacheEntry] = []
    labels: list[str] = []
    for ds in [*cfg.datasets, *cfg.val_datasets]:
        entry, status = load_or_build(ds, cfg, tokenizer, root, reuse)
        label = dataset_label(ds)
        if not reuse:  # the arrays stay mapped; keep only the rejects for the user
            for f in entry.path.glob("*.bin"):
                f.unlink()
        entries.append(entry)
        labels.append(label)
        add_entry_report(report, entry, label, status)

    if report.rejected and cfg.on_bad_record == "error":
        shown = "; ".join(report.bad_examples[:MAX_ERRORS_SHOWN])
        more = f" (and {report.rejected - MAX_ERRORS_SHOWN} more)" if report.rejected > MAX_ERRORS_SHOWN else ""
        raise DataError(f"{report.rejected} bad record(s): {shown}{more}; fix them, or set on_bad_record: skip "
                        "to leave them out")
    for entry, label in zip(entries, labels, strict=True):
        if entry.n_samples == 0:
            raise DataError(_no_sample_reason(label, entry, cfg))

    n_train_sets = len(cfg.datasets)
    part = np.concatenate([np.full(e.n_samples, i, np.int32) for i, e in enumerate(entries)])
    local = np.concatenate([np.arange(e.n_samples, dtype=np.int64) for e in entries])
    is_train = part < n_train_sets
    if cfg.cleaning.dedup:
        keep = _deduplicate(entries, part, local, n_train_sets, root, report)
        for i, label in enumerate(labels):
            if not keep[part == i].any():
                what = "exact duplicates of records of earlier datasets" if i < n_train_sets else \
                    "also in the training data, or duplicates"
                raise DataError(f"{label}: all its samples are {what} (listed in {report.rejects_files[-1]}); "
                                "leave the dataset out, or set cleaning.dedup: false")
    else:
        keep = np.ones(len(part), dtype=bool)
    all_store = SampleStore(entries, part, local)
    kept = np.flatnonzero(keep)
    pool_idx = kept[is_train[kept]]
    val_idx = kept[~is_train[kept]]

    report.samples = len(kept)
    report.tokens = int(all_store.lengths[kept].sum())
    report.trained_tokens = int(all_store.trained[kept].sum())

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
    report.unique_train_samples, report.val_samples = len(pool_idx), len(val)
    report.unique_train_tokens = int(all_store.lengths[pool_idx].sum())
    report.train_samples, report.train_tokens = len(train), int(train.lengths.sum())
    report.train_trained_tokens = int(train.trained.sum())
    if cfg.sample_packing:
        report.packed_rows, report.padding_share = packing_stats(train.lengths.tolist(), cfg.sequence_len)
    if report.dropped_no_trained_tokens:
        logger.warning("%d sample(s) had no trained token and were left out", report.dropped_no_trained_tokens)
    return Dataset(train, val, report, entries, labels)
