"""Served prompts written to disk for drift checks (`serve --log-requests DIR`), opt-in.

Each accepted request becomes one JSONL line: time, endpoint, the prompt (chat messages or
completion text) with e-mails, phone numbers, IP addresses, card numbers and secrets replaced by
placeholders, and its token count. Completions are not logged. Files are capped in size: the
current file is `requests.jsonl`; when the next line would pass `max_bytes` it is renamed
`requests.N.jsonl` and only the newest `keep` files are kept. A prompt longer than a quarter of
`max_bytes` is cut (and marked) so one request cannot fill the log.
"""

from __future__ import annotations

import datetime
import json
import re
import threading
from pathlib import Path

from ..data.clean import redact_pii

CURRENT = "requests.jsonl"
_ROTATED = re.compile(r"^requests\.(\d+)\.jsonl$")


def log_files(folder: Path) -> list[Path]:
    """The log's files, oldest first."""
    folder = Path(folder)
    rotated = sorted((int(m.group(1)), p) for p in folder.glob("requests.*.jsonl") if (m := _ROTATED.match(p.name)))
    files = [p for _, p in rotated]
    if (folder / CURRENT).is_file():
        files.append(folder / CURRENT)
    return files


class RequestLog:
    def __init__(self, folder: Path, max_bytes: int = 10_000_000, keep: int = 5) -> None:
        self.folder, self.max_bytes, self.keep = Path(folder), max_bytes, keep
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _text(self, text: str) -> tuple[str, bool]:
        limit = self.max_bytes // 4
        text = redact_pii(text)
        return (text[:limit], True) if len(text.encode()) > limit else (text, False)

    def record(self, req, prompt_tokens: int) -> None:
        """Log one accepted request (a ChatRequest or CompletionRequest of serve/server.py)."""
        rec: dict = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        truncated = False
        if hasattr(req, "messages"):
            messages = []
            for m in req.messages:
                content, cut = self._text(m.text())
                truncated |= cut
                messages.append({"role": m.role, "content": content})
            rec.update(endpoint="chat", messages=messages)
        else:
            prompt, truncated = self._text(req.prompt)
            rec.update(endpoint="completions", prompt=prompt)
        rec["prompt_tokens"] = prompt_tokens
        if truncated:
            rec["truncated"] = True
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
        with self._lock:
            current = self.folder / CURRENT
            if current.is_file() and current.stat().st_size + len(line) > self.max_bytes:
                self._rotate(current)
            with current.open("ab") as f:
                f.write(line)

    def _rotate(self, current: Path) -> None:
        rotated = log_files(self.folder)[:-1]
        n = int(_ROTATED.match(rotated[-1].name).group(1)) + 1 if rotated else 1
        current.rename(self.folder / f"requests.{n}.jsonl")
        rotated = log_files(self.folder)  # the new current file makes the `keep`-th
        for old in rotated[:max(0, len(rotated) - (self.keep - 1))]:
            old.unlink()
