"""Reading raw records from where a user keeps them, each with its origin (file:line or dataset:index).

Local files: JSONL (also .jsonl.gz), JSON (an array of objects), Parquet and CSV; a glob or a directory
expands to the supported files in it. A directory written by `datasets.Dataset.save_to_disk`, or a
name that is not a local path, is a Hugging Face dataset read through the `datasets` library (which
honours its own cache and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).

Records are streamed: JSONL and CSV line by line, Parquet batch by batch, HF datasets row by row from
their memory-mapped Arrow files, so a file larger than memory is never loaded whole. A JSON array is
the exception (one document; it is parsed whole) - use JSONL for big data.

A record that cannot be read (bad JSON, a number or nesting Python cannot parse, not an object,
invalid UTF-8) is yielded as a `RawRecord` with `error` set, so the caller decides whether to stop or
to skip it; a blank line is yielded with `blank` set, so that it is counted. Invalid UTF-8 is never
repaired here: a replaced byte would be a silent change to the data.
"""

from __future__ import annotations

import csv
import difflib
import glob
import gzip
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

FILE_KINDS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".ndjson": "jsonl", ".json": "json",
              ".parquet": "parquet", ".csv": "csv"}
# CSV cells are strings; these columns usually hold a JSON list (a conversation) when present.
_JSON_COLUMNS = ("messages", "conversations", "tools")


@dataclass
class RawRecord:
    origin: str  # "path:line", "path:line (record N)" (JSON array), "path:row N" or "dataset[split]:index"
    record: dict | None
    error: str | None = None
    line: bytes | None = None  # an unparsed JSONL line (parsed later, in a worker: see parse_line)
    blank: bool = False  # a blank line: no record, only counted


@dataclass
class Source:
    """One concrete thing to read: a local file of a known kind, or an HF dataset."""

    kind: str  # jsonl | json | parquet | csv | hf_disk | hf_hub
    path: str
    name: str | None = None  # HF subset
    split: str | None = None

    def label(self) -> str:
        if self.kind == "hf_hub":
            sub = f"/{self.name}" if self.name else ""
            return f"{self.path}{sub}[{self.split}]"
        if self.kind == "hf_disk" and self.split:
            return f"{self.path}[{self.split}]"
        return self.path


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, kind in sorted(FILE_KINDS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return kind
    return None


def _is_hf_disk(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def resolve_sources(path: str, kind: str = "auto", name: str | None = None, split: str | None = None,
                    key: str = "datasets") -> list[Source]:
    """Expand one dataset entry of the config into the sources to read, in a stable order."""
    p = Path(path).expanduser()
    if _is_hf_disk(p) and kind in ("auto", "hf"):
        return [Source("hf_disk", str(p), name, split)]
    if kind == "hf":  # a hub name, or a local folder that datasets.load_dataset understands
        return [Source("hf_hub", path, name, split or "train")]
    if any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{key}: no file matches {path}")
    elif p.is_dir():
        # Files inside a save_to_disk folder (dataset_info.json, state.json) are not records.
        hf_dirs = [d for d in p.rglob("*") if _is_hf_disk(d)]
        files = sorted(f for f in p.rglob("*") if f.is_file() and _kind_of(f)
                       and not any(d in f.parents for d in hf_dirs))
        if not files:
            raise DataError(f"{key}: {path} has no .jsonl, .json, .parquet or .csv file")
    elif p.is_file():
        files = [p]
    elif kind == "auto" and _looks_like_hub_id(path):
        return [Source("hf_hub", path, name, split or "train")]
    else:
        raise DataError(f"{key}: dataset file not found: {path}{_closest(p)}")  # key: which config entry
    out = []
    for f in files:
        k = kind if kind != "auto" else _kind_of(f)
        if k is None:
            if len(files) == 1:
                raise DataError(f"{key}: cannot tell the file type of {f}; name it .jsonl, .json, .parquet or "
                                ".csv, or set source:")
            continue  # a glob may catch README files and the like
        out.append(Source(k, str(f)))
    return out


def _looks_like_hub_id(path: str) -> bool:
    """"owner/name" that is not a local path: no data-file suffix, no local folder "owner"."""
    p = Path(path)
    return (path.count("/") == 1 and not path.startswith((".", "/", "~")) and _kind_of(p) is None
            and not p.parent.is_dir())


def _closest(p: Path) -> str:
    """"; did you mean ..." with the names nearest to the first missing part of a path."""
    parent = p
    while not parent.exists() and parent != parent.parent:
        missing, parent = parent, parent.parent
    if not parent.is_dir() or parent == p:
        return ""
    names = [c.name for c in parent.iterdir()]
    close = difflib.get_close_matches(missing.name, names, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(str(parent / c) for c in close)}?" if close else ""


def read_source(src: Source, lazy: bool = False) -> Iterator[RawRecord]:
    """Yield every record of a source in order, with its origin.

    lazy: JSONL lines come unparsed (`RawRecord.line`), so that parsing happens in the worker
    processes instead of the one process that reads the file; `parse_line` finishes them.
    """
    readers = {"jsonl": _read_jsonl, "json": _read_json_array, "parquet": _read_parquet, "csv": _read_csv}
    if src.kind in readers:
        if not Path(src.path).is_file():
            raise DataError(f"dataset file not found: {src.path}")
        if src.kind == "jsonl":
            yield from _read_jsonl(Path(src.path), lazy)
        else:
            yield from readers[src.kind](Path(src.path))
    elif src.kind in ("hf_disk", "hf_hub"):
        yield from _read_hf(src)
    else:
        raise DataError(f"unknown source kind {src.kind!r}")


def _read_jsonl(path: Path, lazy: bool = False) -> Iterator[RawRecord]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from _jsonl_records(path, f, lazy)


def _jsonl_records(path: Path, lines: Iterable[bytes], lazy: bool) -> Iterator[RawRecord]:
    for lineno, raw in enumerate(lines, 1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark some editors write
        if not raw.strip():
            yield RawRecord(f"{path}:{lineno}", None, blank=True)
            continue
        rec = RawRecord(f"{path}:{lineno}", None, line=raw)
        yield rec if lazy else parse_line(rec)


def parse_line(rec: RawRecord) -> RawRecord:
    """Decode and parse a lazily read JSONL line into a record (or an error)."""
    if rec.line is None:
        return rec
    try:
        line = rec.line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRecord(rec.origin, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
    record, err = _loads(line)
    if err:
        return RawRecord(rec.origin, None, err)
    if not isinstance(record, dict):
        return RawRecord(rec.origin, None, f"expected a JSON object, got {_json_type(record)}")
    return RawRecord(rec.origin, record)


def _loads(text: str) -> tuple[Any, str | None]:
    """(value, None), or (None, a reason) for text that is not JSON or that Python cannot read:
    an integer past Python's digit limit, nesting deeper than its recursion limit."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg}, column {exc.colno})"
    except ValueError as exc:  # int-string conversion limit
        return None, f"not readable JSON ({str(exc).split(':')[0]})"
    except RecursionError:
        return None, "not readable JSON (nested too deeply)"


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


# Bytes that are not UTF-8 decode (surrogateescape) to U+DC80..U+DCFF; JSON escapes of such code
# points are six ASCII characters in the text, so a raw one in the text is always an invalid byte.
_INVALID_UTF8 = re.compile("[\udc80-\udcff]")
# A JSON string, or one structural character: enough to find where an array element ends.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')


def _element_end(text: str, pos: int) -> int | None:
    """Where the array element starting at pos ends (just past it), found by bracket matching; None
    when it never closes. Used only when the decoder failed on the element, to step over it."""
    depth = 0
    for m in _JSON_TOKEN.finditer(text, pos):
        tok = m.group()
        if tok in "[{":
            depth += 1
        elif tok in "]}":
            if depth == 0:
                return m.start()
            depth -= 1
            if depth == 0:
                return m.end()
        elif tok == "," and depth == 0:
            return m.start()
    return None


def _read_json_array(path: Path) -> Iterator[RawRecord]:
    """A JSON array of objects; origins give the line where each element starts and its index."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    text = data.decode("utf-8", errors="surrogateescape")
    pos = _skip_ws(text, 0)
    if pos == len(text):
        return
    if text[pos] != "[":
        if text[pos] == "{":  # a .json file holding JSON lines is common enough to accept
            yield from _jsonl_records(path, io.BytesIO(data), lazy=False)
            return
        raise DataError(f"{path}:1: expected a JSON array of records")
    invalid = _INVALID_UTF8.search(text) is not None
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, pos + 1)
    line, line_pos, index = 1, 0, 0
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", line_pos, pos)
        line_pos = pos
        origin = f"{path}:{line} (record {index})"
        error = None
        try:
            value, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            end = _element_end(text, pos)  # step over the element, if its brackets close
            if not end or end == pos:
                where = f"{path}:{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else origin
                raise DataError(f"{where}: not valid JSON ({getattr(exc, 'msg', exc)}); the rest of the array "
                                "cannot be read") from None
            value, error = _loads(text[pos:end])
        if invalid and _INVALID_UTF8.search(text, pos, end):
            error = "not valid UTF-8"
        if error:
            yield RawRecord(origin, None, error)
        elif isinstance(value, dict):
            yield RawRecord(origin, value)
        else:
            yield RawRecord(origin, None, f"expected a JSON object, got {_json_type(value)}")
        index += 1
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            line += text.count("\n", line_pos, pos)
            raise DataError(f"{path}:{line}: expected ',' or ']' between array elements")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read as Parquet ({exc})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield RawRecord(f"{path}:row {row}", record)
            row += 1


def _read_csv(path: Path) -> Iterator[RawRecord]:
    csv.field_size_limit(1 << 30)  # the default 128 KiB per cell is too small for long documents
    # Invalid bytes are kept as U+DC80..U+DCFF so that the row holding them is the bad record.
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        header = None
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
            origin = f"{path}:{reader.line_num}"
            if not row:
                yield RawRecord(origin, None, blank=True)
            elif header is None:
                header = row
            elif any(_INVALID_UTF8.search(cell) for cell in row):
                yield RawRecord(origin, None, "not valid UTF-8")
            elif len(row) > len(header):
                yield RawRecord(origin, None, f"{len(row) - len(header)} more field(s) than the header has")
            else:
                yield _csv_record(origin, dict(zip(header, row)))


def _csv_record(origin: str, record: dict) -> RawRecord:
    for col in _JSON_COLUMNS:
        value = record.get(col)
        if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
            parsed, err = _loads(value)
            if err is None:
                record[col] = parsed
            elif not err.startswith("not valid JSON"):
                return RawRecord(origin, None, f"column '{col}': {err}")
            # else left as a string: the format check reports it with a reason
    return RawRecord(origin, record)


def load_hf(src: Source):
    """The `datasets.Dataset` for an HF source (saved to disk, or by name through the hub/cache)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError("reading Hugging Face datasets needs the 'datasets' package: pip install datasets") from None
    label = src.label()
    try:
        if src.kind == "hf_disk":
            ds = datasets.load_from_disk(src.path)
        else:
            ds = datasets.load_dataset(src.path, src.name, split=src.split)
    except Exception as exc:  # offline, missing repo, bad subset: one message for the user
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"{label}: cannot load the Hugging Face dataset ({type(exc).__name__}: {first})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = src.split or ("train" if "train" in ds else None)
        if split not in ds:
            raise DataError(f"{label}: no split {src.split!r}; the dataset has {sorted(ds)} (set split:)")
        ds = ds[split]
    return ds


def _read_hf(src: Source) -> Iterator[RawRecord]:
    ds = load_hf(src)
    label = src.label()
    for i, record in enumerate(ds):
        yield RawRecord(f"{label}:{i}", dict(record))


def fingerprint(src: Source) -> str:
    """A digest that changes whenever the source's content does (for the token cache key)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{src.kind}\0{src.path}\0{src.name}\0{src.split}\0".encode("utf-8", "surrogateescape"))
    if src.kind in ("hf_disk", "hf_hub"):
        ds = load_hf(src)
        h.update(str(getattr(ds, "_fingerprint", "")).encode())
        for f in getattr(ds, "cache_files", []) or []:
            _hash_file(h, Path(f["filename"]))
    else:
        _hash_file(h, Path(src.path))
    return h.hexdigest()


def _hash_file(h, path: Path) -> None:
    # Content, not mtime: a copy of the same data hits the cache, an edit in place does not.
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


def counted_records(ds, report, key: str) -> Iterator[RawRecord]:
    """The records of one datasets entry (its path, source, name and split), each counted in `report`
    (a DataReport: records, records per file, blank lines, which are not yielded)."""
    for src in resolve_sources(ds.path, ds.source, ds.name, ds.split, key=key):
        for raw in read_source(src):
            if raw.blank:
                report.blank_lines += 1
                continue
            report.records += 1
            report.per_file[src.path] = report.per_file.get(src.path, 0) + 1
            yield raw
