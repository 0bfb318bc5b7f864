"""The token cache: tokenized samples of one dataset on disk, so a second run skips tokenizing.

An entry is a directory named by the cache key (a hash of the data, tokenizer, format and every
setting that changes the samples). It holds flat little-endian arrays, written in chunks as the
records stream through and read back memory-mapped (never pickle):

- ``tokens.bin`` int32: the token ids of all samples, concatenated;
- ``mask.bin`` uint8: 1 where the id is a training target (before the next-token shift);
- ``offsets.bin`` int64: sample k is ``tokens[offsets[k]:offsets[k + 1]]``;
- ``trained.bin`` int32: the trained-token count of each sample (after the shift);
- ``hashes.bin`` uint64: a content hash per sample, for exact deduplication across datasets;
- ``origins.txt``: the file:line each sample came from, one per line;
- ``rejects.jsonl``: every record that was not turned into a sample, with its reason;
- ``manifest.json``: counts, the build report of this dataset and a BLAKE2 digest of every file.

The entry is written to a temporary directory and renamed into place, so a crash leaves no half
entry; a digest or size mismatch on load means the entry is corrupt and it is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CACHE_VERSION = 1
ARRAYS = {"tokens": np.int32, "mask": np.uint8, "offsets": np.int64, "trained": np.int32, "hashes": np.uint64}
TEXT_FILES = ("origins.txt", "rejects.jsonl")


def default_cache_dir() -> Path:
    env = os.environ.get("MISTRAL_TUNE_CACHE")
    if env:
        return Path(env).expanduser() / "datasets"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mistral-tune" / "datasets"


def cache_key(parts: dict) -> str:
    blob = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class _HashingFile:
    """An append-only file that keeps a running digest and size of what was written."""

    def __init__(self, path: Path) -> None:
        self.f = path.open("wb")
        self.h = hashlib.blake2b(digest_size=32)
        self.size = 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.h.update(data)
        self.size += len(data)

    def close(self) -> dict:
        self.f.close()
        return {"size": self.size, "blake2b": self.h.hexdigest()}


class CacheWriter:
    """Appends chunks of samples; `finish` publishes the entry atomically."""

    def __init__(self, root: Path, key: str) -> None:
        self.root, self.key = Path(root), key
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.files = {name: _HashingFile(self.tmp / f"{name}.bin") for name in ARRAYS}
        self.files.update({name: _HashingFile(self.tmp / name) for name in TEXT_FILES})
        self.n_samples = 0
        self.n_tokens = 0
        self.files["offsets"].write(np.zeros(1, np.int64).tobytes())

    def append(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, trained: np.ndarray,
               hashes: np.ndarray, origins: list[str]) -> None:
        if len(lengths) == 0:
            return
        offsets = self.n_tokens + np.cumsum(np.asarray(lengths, np.int64))
        for name, arr in (("tokens", ids), ("mask", mask), ("offsets", offsets), ("trained", trained),
                          ("hashes", hashes)):
            self.files[name].write(np.ascontiguousarray(arr, dtype=ARRAYS[name]).tobytes())
        text = "".join(o.replace("\n", " ") + "\n" for o in origins)
        self.files["origins.txt"].write(text.encode("utf-8", "backslashreplace"))  # a file name's odd bytes
        self.n_samples += len(lengths)
        self.n_tokens += int(np.sum(lengths))

    def reject(self, origin: str, kind: str, reason: str) -> None:
        line = json.dumps({"origin": origin, "kind": kind, "reason": reason}, ensure_ascii=False)
        self.files["rejects.jsonl"].write((line + "\n").encode("utf-8", "backslashreplace"))

    def finish(self, meta: dict) -> Path:
        files = {name + (".bin" if name in ARRAYS else ""): f.close() for name, f in self.files.items()}
        manifest = {"version": CACHE_VERSION, "key": self.key, "n_samples": self.n_samples,
                    "n_tokens": self.n_tokens, "files": files, **meta}
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                                encoding="utf-8", errors="backslashreplace")
        final = self.root / self.key
        try:
            os.rename(self.tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
            # Another process (e.g. another rank of the same run) published this key first; the
            # content is the same by construction, and replacing it could pull files from under it.
            shutil.rmtree(self.tmp, ignore_errors=True)
        return final

    def abort(self) -> None:
        for f in self.files.values():
            if not f.f.closed:
                f.f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class CacheEntry:
    """A published entry, its arrays memory-mapped."""

    path: Path
    manifest: dict
    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    trained: np.ndarray
    hashes: np.ndarray

    @property
    def n_samples(self) -> int:
        return len(self.offsets) - 1

    def origins(self, limit: int | None = None) -> list[str]:
        out = []
        with (self.path / "origins.txt").open(encoding="utf-8") as f:
            for line in f:
                if limit is not None and len(out) >= limit:
                    break
                out.append(line.rstrip("\n"))
        return out

    def rejects(self, limit: int | None = None, kind: str | None = None) -> list[dict]:
        out = []
        with (self.path / "rejects.jsonl").open(encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if kind is None or r["kind"] == kind:
                    out.append(r)
                    if limit is not None and len(out) >= limit:
                        break
        return out


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def open_entry(root: Path, key: str) -> tuple[CacheEntry | None, str]:
    """(entry, "") when a valid entry exists; (None, why) when missing or corrupt (then removed)."""
    path = Path(root) / key
    if not path.is_dir():
        return None, "not cached"
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("version") != CACHE_VERSION or manifest.get("key") != key:
            raise ValueError("written by another cache version")
        for name, info in manifest["files"].items():
            f = path / name
            if not f.is_file() or f.stat().st_size != info["size"]:
                raise ValueError(f"{name} has the wrong size")
            if _digest(f) != info["blake2b"]:
                raise ValueError(f"{name} does not match its checksum")
        arrays = {}
        for name, dtype in ARRAYS.items():
            size = manifest["files"][f"{name}.bin"]["size"]
            # np.memmap refuses empty files; an empty dataset is an empty array.
            arrays[name] = (np.memmap(path / f"{name}.bin", dtype=dtype, mode="r") if size
                            else np.zeros(0, dtype))
        n = manifest["n_samples"]
        if len(arrays["offsets"]) != n + 1 or len(arrays["trained"]) != n or len(arrays["hashes"]) != n:
            raise ValueError("array lengths disagree with the manifest")
        if int(arrays["offsets"][-1]) != len(arrays["tokens"]) or len(arrays["mask"]) != len(arrays["tokens"]):
            raise ValueError("offsets disagree with the token count")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        shutil.rmtree(path, ignore_errors=True)
        return None, f"corrupt entry removed ({exc})"
    return CacheEntry(path, manifest, **arrays), ""
