"""Terminal chat and batch generation over a loaded model.

Prompts are always formatted by mistral-common (ChatTokenizer.encode_prompt), user text is
encoded as text, and answers stream as they are generated.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..fsutil import atomic_path
from ..generate.decoder import Params
from ..generate.run import Conversation, generate_batch
from ..generate.text import TextStream
from ..models.tuned import TunedModel

HELP = "commands: /reset (forget the conversation), /system TEXT (set; /system alone clears), /exit"


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    seed: int | None = None

    def params(self, turn: int = 0) -> Params:
        """Turn i (or prompt i) samples with seed + i."""
        return Params(self.max_tokens, self.temperature, self.top_p, self.top_k,
                      seed=None if self.seed is None else self.seed + turn)


def chat_loop(
    loaded: TunedModel,
    sampling: Sampling,
    system: str | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], object] = sys.stdout.write,
) -> list[dict]:
    """Read user turns until /exit or end of input; returns the final conversation."""
    tok = loaded.tokenizer
    session = Conversation(loaded.model)
    history: list[dict] = []
    turn = 0
    write(f"chatting with {loaded.name} ({HELP})\n")
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return _with_system(system, history)
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return _with_system(system, history)
        if text == "/reset":
            history.clear()
            session.reset()
            write("(conversation cleared)\n")
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            history.clear()
            session.reset()
            write(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        try:
            ids = tok.encode_prompt(_with_system(system, history))
        except DataError as exc:
            history.pop()
            write(f"(cannot encode this turn: {exc})\n")
            continue
        stream = TextStream(tok)
        for token in session.stream(ids, sampling.params(turn), tok.eos_id):
            write(stream.push(token.id))
        turn += 1
        write(stream.flush() + "\n")
        answer = tok.decode(stream.ids)
        if answer.strip():
            history.append({"role": "assistant", "content": answer})
        else:  # an empty answer cannot be part of a valid conversation; drop the turn
            history.pop()


def _with_system(system: str | None, history: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + history


# ---------------------------------------------------------------------- batch generation


def read_prompts(path: Path, system: str | None = None) -> list[dict]:
    """Records from a JSONL file ({"messages": [...]} or {"prompt": "..."}) or a text file (one
    user message per line). Each record keeps its original fields for the output; a trailing
    assistant message (a reference answer) is left out of the prompt."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    records = []
    jsonl = path.suffix in (".jsonl", ".json")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: expected an object with 'messages' or 'prompt'")
        else:
            rec = {"prompt": line}
        if isinstance(rec.get("messages"), list):
            messages = rec["messages"]
        elif isinstance(rec.get("prompt"), str):
            messages = [{"role": "user", "content": rec["prompt"]}]
        else:
            raise DataError(f"{path}:{n}: needs 'messages' (a list) or 'prompt' (a string)")
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            # An evaluation set carries the reference answer last: answer the turn before it
            # (the record, reference included, is copied to the output).
            messages = messages[:-1]
        if system and not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        records.append({"line": n, "record": rec, "messages": messages})
    if not records:
        raise DataError(f"{path}: no prompts")
    return records


def generate_file(
    loaded: TunedModel, prompts_path: Path, out_path: Path, sampling: Sampling, batch_size: int = 8,
    system: str | None = None, progress: Callable[[int, int], object] | None = None,
) -> int:
    """Answer every prompt of a file in batches; write one JSON line per prompt. Returns the count."""
    tok = loaded.tokenizer
    records = read_prompts(prompts_path, system)
    encoded = []
    for r in records:
        try:
            encoded.append(tok.encode_prompt(r["messages"]))
        except DataError as exc:
            raise DataError(f"{prompts_path}:{r['line']}: {exc}") from None
    # Similar lengths batch together (less padding); output keeps the file's order.
    order = sorted(range(len(records)), key=lambda i: len(encoded[i]))
    answers: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outs = generate_batch(loaded.model, [encoded[i] for i in chunk], sampling.max_tokens, tok.eos_id,
                              sampling.temperature, sampling.top_p,
                              None if sampling.seed is None else sampling.seed + start, batch_size,
                              top_k=sampling.top_k)
        answers.update(zip(chunk, outs, strict=True))
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            ids = answers[i]
            finish = "length" if len(ids) >= sampling.max_tokens else "stop"
            row = {**r["record"], "completion": tok.decode(ids), "prompt_tokens": len(encoded[i]),
                   "completion_tokens": len(ids), "finish_reason": finish}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(records)
