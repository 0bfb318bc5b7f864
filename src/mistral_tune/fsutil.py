"""Where mistral-tune may write an output, and writing a file or a directory so that readers see the old or
the new one (atomic_path, atomic_write_text, replace_dir).

The ownership rule, in one place. mistral-tune puts a marker file (MARKER: tool, kind of output,
sources, version) into every output directory it creates. A target is accepted when

- it does not exist, or it is an empty directory, or
- with overwrite, it is an earlier output of ours of the same kind: a directory with our marker,
  or, for a single file (FILE_KINDS), a file of that kind's layout (a GGUF file starts with the GGUF
  magic; a completions file's first line is a JSON record with our completion fields);

and never when it is, lies inside or contains a source (symlinks resolved), contains the
current directory, is the filesystem root, or is a file where a directory goes (or the reverse).

Outputs of versions that wrote no marker count as ours where the layout is unmistakable: a run
directory (the config.yaml, data_report.json and metrics.jsonl every run writes first), the
adapter/, model/ and merged/ inside a run of ours, and the quickstart's directory (quickstart.yaml
beside such a run). Anything else without a marker is never replaced; the error says to choose
another path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .errors import OutputError

MARKER = ".mistral-tune.json"
#: Kinds of output, as the marker names them, and how messages call them.
KINDS = {"run": "training run", "adapter": "LoRA adapter", "model": "fine-tuned model", "merged": "merged model",
         "awq": "AWQ model", "gguf": "GGUF file", "quickstart": "quickstart directory",
         "report": "evaluation report", "tiny": "random-init model", "inspect": "data inspection",
         "completions": "completions file"}
_RUN_PARTS = ("adapter", "model", "merged")  # what a run writes into its own directory
_RUN_FILES = ("config.yaml", "data_report.json", "metrics.jsonl")  # what every run writes first
_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


COMPLETION_FIELDS = ("completion", "prompt_tokens", "completion_tokens", "finish_reason")


def _is_completions(path: Path) -> bool:
    """The first line is a record `mistral-tune generate` writes (an empty file has nothing to lose)."""
    with path.open("rb") as f:
        first = f.readline(1 << 20)
    if not first.strip():
        return path.stat().st_size == 0
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and all(k in record for k in COMPLETION_FIELDS)


#: Single-file outputs: no room for a marker; recognised by their layout.
FILE_KINDS: dict[str, Callable[[Path], bool]] = {"gguf": _is_gguf, "completions": _is_completions}


def expand_path(value: str | Path) -> Path:
    """`~` and environment variables expanded, as a shell would; an unset variable is an error rather
    than a directory literally named `$VAR`."""
    text = os.path.expandvars(str(value))
    unset = _VAR.search(text)
    if unset:
        raise OutputError(f"{value}: environment variable {unset.group(1).strip('{}')} is not set")
    return Path(os.path.expanduser(text))


def _input_path(value: str | Path) -> Path:
    return Path(os.path.expanduser(str(value))).resolve()  # inputs: `~` only, as their readers do


def output_kind(path: Path) -> str | None:
    """The kind of mistral-tune output `path` is (KINDS), or None when mistral-tune did not write it."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        marker = None
    if isinstance(marker, dict) and marker.get("tool") == "mistral-tune" and marker.get("kind") in KINDS:
        return marker["kind"]
    return _unmarked_kind(path)


def _unmarked_kind(path: Path) -> str | None:
    """Outputs of versions before the marker, by layout."""
    if not path.is_dir():
        return None
    if all((path / name).is_file() for name in _RUN_FILES):
        return "run"
    if path.name in _RUN_PARTS and output_kind(path.parent) == "run":
        return path.name
    if (path / "quickstart.yaml").is_file() and output_kind(path / "run") == "run":
        return "quickstart"
    return None


def run_folder(path: str | Path) -> Path | None:
    """The training run a model path belongs to (the folder with config.yaml and metrics.jsonl): the
    path itself, or the run holding it (its adapter/, merged/, best/ ...)."""
    path = Path(path).expanduser().resolve()
    for candidate in (path, path.parent):
        if (candidate / "config.yaml").is_file() and (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def check_target(target: str | Path, kind: str, *, sources: Iterable[str | Path | None] = (),
                 overwrite: bool = False, label: str = "--out",
                 hint: str = "pass --overwrite to replace it") -> Path:
    """The absolute path (`~` and variables expanded, symlinks resolved) where mistral-tune may write an
    output of `kind`, by the rule in this module's docstring; OutputError saying why not otherwise.

    overwrite: an earlier output of ours of the same kind is acceptable (the caller replaces it, or a
    training run continues it). sources: inputs the output must not touch (None entries are skipped).
    """
    shown = f"{label} {target}"
    try:
        path = expand_path(target).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, an unreadable directory on the way
        raise OutputError(f"{shown}: cannot be resolved ({exc})") from None
    if path == path.parent:
        raise OutputError(f"{shown}: is the filesystem root; name a directory of its own")
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise OutputError(f"{shown}: is or contains the current directory ({cwd}); name a directory of its own")
    for source in sources:
        if source is None:
            continue
        src = _input_path(source)
        if path == src:
            raise OutputError(f"{shown}: is the input {src}; mistral-tune never writes over its input")
        if src in path.parents:
            raise OutputError(f"{shown}: lies inside the input {src}; mistral-tune never writes into its input")
        if path in src.parents:
            raise OutputError(f"{shown}: contains the input {src}; replacing it would delete the input")
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if ancestor != path and not ancestor.is_dir():
        raise OutputError(f"{shown}: {ancestor} is a file, not a directory")
    if not path.exists():
        return path
    what = KINDS[kind]
    if kind in FILE_KINDS:
        if path.is_dir():
            raise OutputError(f"{shown}: is a directory; name the {what} to write")
        if not overwrite:
            raise OutputError(f"{shown}: exists; {hint}")
        if not FILE_KINDS[kind](path):
            raise OutputError(f"{shown}: exists and is not a {what}; mistral-tune replaces only its own "
                              "outputs. Choose another path, or move the file away yourself")
        return path
    if not path.is_dir():
        raise OutputError(f"{shown}: is a file, not a directory")
    if not any(path.iterdir()):
        return path
    owner = output_kind(path)
    if owner is None:
        raise OutputError(f"{shown}: exists, is not empty and was not written by mistral-tune (no {MARKER}); "
                          "choose another path, or empty or remove it yourself")
    if owner != kind:
        raise OutputError(f"{shown}: holds a mistral-tune {KINDS[owner]}, not a {what}; choose another path")
    if not overwrite:
        raise OutputError(f"{shown}: holds an earlier {what}; {hint}")
    return path



def mark_output(directory: Path, kind: str, sources: Iterable[str | Path | None] = ()) -> None:
    """Write the marker that makes `directory` an output of ours (check_target, output_kind)."""
    marker = {"tool": "mistral-tune", "kind": kind, "version": __version__,
              "sources": [str(_input_path(s)) for s in sources if s is not None],
              "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (Path(directory) / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A new hidden file beside `path` (`.NAME.tmp-PID`, created here, so it never is an existing file of
    someone else's) for the caller to write; renamed over `path` when the block ends without an exception,
    removed otherwise, so `path` is the old file or the complete new one, never half written. No fsync."""
    path = Path(path)
    base = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp, n = base, 0
    while True:
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            n += 1
            tmp = base.with_name(f"{base.name}-{n}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8", errors: str | None = None) -> None:
    """Write `text` to `path` through atomic_path: readers see the old file or the whole new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding, errors=errors)


def replace_dir(final: Path, write: Callable[[Path], object], kind: str,
                sources: Iterable[str | Path | None] = ()) -> Path:
    """Call write(tmp) on a fresh hidden sibling directory, mark it as ours, then put it at `final`.

    `final` must be absent, an empty directory, or an output of ours of the same kind (the caller has
    run check_target; this is checked again at the moment of replacing). The old directory is moved
    aside, the new one renamed into place, then the old one deleted, so readers see one or the other.
    If anything fails, `final` is as it was and the temporary directory is gone.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        mark_output(tmp, kind, sources)
        if final.exists():
            if not (final.is_dir() and (not any(final.iterdir()) or output_kind(final) == kind)):
                raise OutputError(f"{final}: not an earlier {KINDS[kind]} of mistral-tune (any more); left as it is")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except OSError:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
