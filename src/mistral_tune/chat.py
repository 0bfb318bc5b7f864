"""Tokenizer loading and conversation -> (token ids, loss mask) for Mistral-family models.

mistral-common is the ground truth for the prompt format of every tokenizer version (v1 SPM,
v3 SPM, v3-Tekken, v7, ...).  It has no loss-mask API, so `ChatTokenizer.encode_chat` runs the
same steps as `MistralTokenizer.encode_chat_completion` (validate -> normalize -> the instruct
tokenizer's own checks -> start() + one encode call per message) and records which tokens each
message produced.  The tests check that the ids, and which conversations are rejected, are
identical to `encode_chat_completion`'s for the same request.

Messages are OpenAI-style dicts::

    {"role": "system" | "user" | "assistant" | "tool", "content": str}

An assistant message may carry ``"weight": 0 | 1`` (0 = keep as context, do not train) and
OpenAI-style ``"tool_calls"``; a tool message needs ``"tool_call_id"``.  Assistant and system
content may also be a list of parts, ``{"type": "text", "text": str}`` and
``{"type": "thinking", "thinking": str}`` (mistral-common's ThinkChunk, written
``[THINK]...[/THINK]``); an assistant's ``"reasoning_content"`` (or ``"reasoning"``) string is a
leading thinking part, as in the exported chat template.  Thinking needs a tokenizer with
[THINK] tokens (v13 and later reasoning models): other versions reject it with a DataError, as
they reject any content their format cannot write.

Mask convention: ``mask[i]`` says whether ``ids[i]`` is a training target (the caller shifts
for next-token prediction).  It is True exactly on the tokens of assistant messages whose weight
is not 0, including their closing ``</s>``; never on BOS, ``[INST]``/``[/INST]``, user, system or
tool tokens.  With ``train_on_inputs=True`` every token is a target except the leading BOS
(nothing precedes it, so it can never be predicted) and except weight-0 assistant turns (an
explicit per-turn "do not train" is more specific than the global flag).  With
``train_on_thinking=False`` the tokens of thinking parts (from ``[THINK]`` to ``[/THINK]``) are
context, never targets; the rest of the assistant turn is trained as usual.

Added special tokens (``new_special_tokens``): mistral-common cannot add tokens to a tokenizer
(its vocabulary is fixed by the file, and tekken never produces a special id from text), but v3+
SentencePiece files and tekken files reserve unused control-token slots (``[control_N]``,
``<SPECIAL_N>``). A name given to such a slot is read out of message text as that one id and
decoded back to the name; the names live in ``added_tokens.json`` beside the tokenizer file (the
file itself is unchanged, so mistral-common alone still calls the slot ``<SPECIAL_20>``). The text
between added tokens is encoded piece by piece, as mistral-common encodes the text between its own
control tokens: with SentencePiece each piece gets its dummy prefix ("▁"). The exported HF
tokenizer (with its chat template) gives the same ids.

mistral-common's normalizer merges consecutive messages of the same role (and, for assistants,
the same weight) into one, joined by a blank line; for versions <= v3 it also folds all system
messages into one system prompt.  The ids follow whatever it does.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import mistral_common
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    FinetuningAssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest, InstructRequest
from mistral_common.protocol.instruct.tool_calls import Tool, ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from mistral_tune.errors import DataError, ModelError
from mistral_tune.fsutil import atomic_write_text

__all__ = ["ADDED_TOKENS", "BUNDLED", "BUNDLED_DIR", "ChatTokenizer", "find_tokenizer_file", "load_tokenizer"]

logger = logging.getLogger(__name__)

BUNDLED_DIR = Path(mistral_common.__file__).parent / "data"

#: Tokenizer files shipped inside the mistral-common wheel, by short name.
BUNDLED: dict[str, Path] = {
    "v1": BUNDLED_DIR / "tokenizer.model.v1",
    "v3": BUNDLED_DIR / "mistral_instruct_tokenizer_240323.model.v3",
    "v7": BUNDLED_DIR / "mistral_instruct_tokenizer_241114.model.v7",
    "tekken": BUNDLED_DIR / "tekken_240718.json",
}
#: Versions mistral-common encodes but ships no file for: they come inside a model's tekken.json.
_UNSHIPPED = tuple(v.value for v in TokenizerVersion if v > TokenizerVersion.v7)

_ROLES = ("system", "user", "assistant", "tool")

#: Beside a tokenizer file: {name: id} of the reserved control-token slots a run named.
ADDED_TOKENS = "added_tokens.json"
# The reserved slots' own names: tekken's fillers and SentencePiece's unused control pieces.
_FREE_SLOT = re.compile(r"<SPECIAL_\d+>|\[control_\d+\]")

# What mistral-common (and pydantic, whose ValidationError is a ValueError) raises for a bad
# conversation.  It also validates some inputs with bare `assert`s, hence AssertionError.
_LIBRARY_ERRORS = (MistralCommonException, ValueError, AssertionError, NotImplementedError)

Message = SystemMessage | UserMessage | AssistantMessage | ToolMessage


class ChatTokenizer:
    """A mistral-common tokenizer loaded once, with chat encoding that also yields a loss mask."""

    version: str
    is_tekken: bool
    vocab_size: int
    bos_id: int
    eos_id: int
    source_file: Path

    def __init__(self, source_file: Path, added: dict[str, int] | None = None) -> None:
        source_file = Path(source_file)
        try:
            # Finetuning mode: the conversation must end with an assistant message.
            mt = MistralTokenizer.from_file(source_file, mode=ValidationMode.finetuning)
        except Exception as e:  # file formats fail in many ways (json, protobuf, version suffix)
            raise ModelError(f"cannot load tokenizer {source_file}: {e}") from e

        self._mt = mt
        self._instruct = mt.instruct_tokenizer
        raw = self._instruct.tokenizer
        self._raw = raw
        self.source_file = source_file
        self.version = str(raw.version.value)
        self.is_tekken = isinstance(raw, Tekkenizer)
        self.vocab_size = int(raw.n_words)
        self.bos_id = int(raw.bos_id)
        self.eos_id = int(raw.eos_id)
        self.added = dict(added or {})  # name -> id of the named reserved slots
        for name, i in self.added.items():
            if not (raw.is_special(i) and _FREE_SLOT.fullmatch(raw.id_to_piece(i))):
                raise ModelError(f"added token {name!r}: id {i} is not a reserved control-token slot of {source_file}")
        if self.added:
            # Every encode and decode of the instruct tokenizer (hence of the prompt tokenizer built
            # on it below) goes through its text tokenizer: read and write the added names there.
            self._instruct.tokenizer = _AddedTokens(raw, self.added)

        version = raw.version
        builder = getattr(raw, "model_settings_builder", None)
        self._ft_validator = get_validator(version, mode=ValidationMode.finetuning)
        # The tokenizer's own normalizer rebuilds assistant messages as plain AssistantMessage,
        # which drops `weight`.  The same normalizer class built with FinetuningAssistantMessage
        # merges/aggregates identically but keeps the weight, so the mask can follow it.
        normalizer_cls = type(get_normalizer(version, builder))
        self._ft_normalizer = normalizer_cls(
            UserMessage, FinetuningAssistantMessage, ToolMessage, SystemMessage, InstructRequest, builder
        )
        # Generation prompts: test mode (last message user/tool), sharing the loaded vocabulary.
        self._prompt_mt: MistralTokenizer = MistralTokenizer(
            self._instruct,
            validator=get_validator(version, mode=ValidationMode.test),
            request_normalizer=get_normalizer(version, builder),
        )
        if source_file.name == "tokenizer.model" and self.vocab_size != 32000:
            # mistral-common reads a bare tokenizer.model as v1 ("[INST]" as plain text), but a
            # 32768 vocabulary means a v2+ model with control tokens: the prompt format would be wrong.
            logger.warning(
                "%s is loaded as v1 but has %d tokens (v1 has 32000); if the model is v0.3 or later, "
                "rename it tokenizer.model.v3 (or the right version) or pass that file",
                source_file,
                self.vocab_size,
            )

    def __reduce__(self) -> tuple[type[ChatTokenizer], tuple[Path, dict[str, int]]]:
        # Pickle (e.g. for DataLoader workers) as "reload from the file", not as internal state.
        return (ChatTokenizer, (self.source_file, self.added))

    def with_added_tokens(self, names: list[str]) -> ChatTokenizer:
        """This tokenizer with `names` given to the lowest free reserved control-token slots (names
        it has already keep their ids)."""
        raw = self._raw
        taken = set(self.added.values())
        free = (i for i in sorted(raw.special_ids) if i not in taken and _FREE_SLOT.fullmatch(raw.id_to_piece(i)))
        added = dict(self.added)
        for name in names:
            if name in added:
                continue
            if any(raw.id_to_piece(i) == name for i in raw.special_ids):
                raise ModelError(f"new_special_tokens: {name!r} is already a control token of {self.source_file.name}")
            slot = next(free, None)
            if slot is None:
                raise ModelError(
                    f"new_special_tokens: {self.source_file.name} has no free reserved control-token slot for "
                    f"{name!r} (mistral-common cannot add tokens to a vocabulary; v1 has no reserved slots, "
                    "v3+ and tekken have hundreds)")
            added[name] = slot
        return ChatTokenizer(self.source_file, added)

    def __repr__(self) -> str:
        kind = "tekken" if self.is_tekken else "spm"
        return f"ChatTokenizer(version={self.version!r}, {kind}, vocab={self.vocab_size}, file={self.source_file})"

    @property
    def mistral_tokenizer(self) -> MistralTokenizer:
        """The underlying mistral-common tokenizer (finetuning validation mode)."""
        return self._mt

    # ------------------------------------------------------------------ encoding

    @property
    def supports_thinking(self) -> bool:
        """Whether this tokenizer writes thinking parts ([THINK] ... [/THINK]: v13+ with those tokens)."""
        return getattr(self._instruct, "BEGIN_THINK", None) is not None

    def _check_thinking(self, msgs: list[Message]) -> None:
        # Named before mistral-common's own errors, which say only that a chunk type is unexpected.
        if self.supports_thinking:
            return
        for i, m in enumerate(msgs):
            if isinstance(m.content, list) and any(isinstance(c, ThinkChunk) for c in m.content):
                raise DataError(
                    f"message {i}: thinking content needs a tokenizer with [THINK] tokens (v13 or later, "
                    f"as reasoning models ship); this tokenizer is {self.version}"
                )

    def encode_chat(self, messages: list[dict], train_on_inputs: bool = False,
                    tools: list[dict] | None = None,
                    train_on_thinking: bool = True) -> tuple[list[int], list[bool]]:
        """Encode a training conversation (last message: assistant) into ids and a loss mask.

        tools: OpenAI-style tool definitions ({"type": "function", "function": {...}}); the
        tokenizer places them as [AVAILABLE_TOOLS] where its version does (never trained on).
        train_on_thinking: whether the assistant's thinking parts are targets (see the module doc).
        Raises DataError with a short reason if the conversation is malformed or holds content
        this tokenizer version cannot express.
        """
        msgs = _build_messages(messages, training=True)
        if msgs[-1].role != "assistant":
            raise DataError(f"last message must be from the assistant, got {msgs[-1].role!r}")
        self._check_thinking(msgs)
        try:
            tool_defs = [Tool.model_validate(t) for t in tools] if tools else None
            request = ChatCompletionRequest(messages=msgs, tools=tool_defs)
            self._ft_validator.validate_request(request)
            instruct = self._ft_normalizer.from_chat_completion_request(request)
            return self._encode_instruct(instruct, train_on_inputs, train_on_thinking)
        except _LIBRARY_ERRORS as e:
            raise DataError(_reason(e)) from e

    def _encode_instruct(self, req: InstructRequest, train_on_inputs: bool,
                         train_on_thinking: bool = True) -> tuple[list[int], list[bool]]:
        # Mirrors InstructTokenizerBase.encode_instruct (minus truncation, never requested here),
        # keeping each message's token span so it can be masked.
        it = self._instruct
        it.validate_messages(req.messages)
        # The request-level check encode_instruct runs first: v2 allows one tool result per
        # assistant turn (its encoding of tool results holds only one); v3 and later accept more.
        validate_tool_results = getattr(it, "_validate_tool_results", None)
        if validate_tool_results is not None:
            validate_tool_results(req)
        first_user, last_user = it.find_first_last_user(req)
        ids: list[int] = list(it.start())
        mask: list[bool] = [False] * len(ids)
        for i, msg in enumerate(req.messages):
            if isinstance(msg, UserMessage):
                toks, _, _ = it.encode_user_message(
                    msg,
                    req.available_tools,
                    i == last_user,
                    i == first_user,
                    system_prompt=req.system_prompt,
                    force_img_first=True,
                    settings=req.settings,
                )
                target = train_on_inputs
            elif isinstance(msg, AssistantMessage):  # includes its closing </s>
                toks = it.encode_assistant_message(msg, is_before_last_user_message=i < last_user)
                target = getattr(msg, "weight", None) != 0
                if target and not train_on_thinking and isinstance(msg.content, list):
                    ids.extend(toks)
                    mask.extend(self._thinking_mask(msg.content, toks))
                    continue
            elif isinstance(msg, SystemMessage):  # only v7+; older versions fold it into a user turn
                toks, _ = it.encode_system_message(msg)
                target = train_on_inputs
            elif isinstance(msg, ToolMessage):
                toks, _, _ = it.encode_tool_message(msg, i < last_user)
                target = train_on_inputs
            else:  # the normalizer only produces the four types above
                raise DataError(f"unsupported message type {type(msg).__name__}")
            ids.extend(toks)
            mask.extend([target] * len(toks))
        return ids, mask

    def _thinking_mask(self, content: list, toks: list[int]) -> list[bool]:
        """An assistant turn's mask with its thinking parts as context.  v7+ write an assistant's
        parts first, each with its own encode call, then tool calls and </s>; the spans are
        re-encoded here and checked against the turn's ids."""
        mask = [True] * len(toks)
        pos = 0
        for chunk in content:
            part = self._instruct._encode_content_chunk(chunk)[0]
            if toks[pos:pos + len(part)] != part:
                raise ModelError(f"tokenizer {self.version}: cannot locate the thinking part of an assistant turn")
            if isinstance(chunk, ThinkChunk):
                mask[pos:pos + len(part)] = [False] * len(part)
            pos += len(part)
        return mask

    def encode_text(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        """Encode raw continuation text (pretraining-style), optionally wrapped in BOS/EOS."""
        if not isinstance(text, str):
            raise DataError(f"text must be a string, got {type(text).__name__}")
        return list(self._instruct.tokenizer.encode(text, bos=bos, eos=eos))

    def encode_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Encode a conversation for generation: it must end with a user (or tool) message.

        The ids end with ``[/INST]`` (or ``[/TOOL_RESULTS]``), ready for the model to answer.
        Assistant weights are ignored. tools: as for encode_chat (placed as training places them).
        """
        msgs = _build_messages(messages, training=False)
        if msgs[-1].role not in ("user", "tool"):
            raise DataError(f"a prompt must end with a user message, got {msgs[-1].role!r}")
        self._check_thinking(msgs)
        try:
            tool_defs = [Tool.model_validate(t) for t in tools] if tools else None
            request = ChatCompletionRequest(messages=msgs, tools=tool_defs)
            return list(self._prompt_mt.encode_chat_completion(request).tokens)
        except _LIBRARY_ERRORS as e:
            raise DataError(_reason(e)) from e

    def decode(self, ids: list[int], keep_special: bool = False) -> str:
        """Decode ids to text; special tokens ([INST], </s>, ...) are dropped unless keep_special."""
        policy = SpecialTokenPolicy.KEEP if keep_special else SpecialTokenPolicy.IGNORE
        return self._mt.decode(list(ids), special_token_policy=policy)

    # ------------------------------------------------------------------ files

    def save_name(self) -> str:
        """File name under which mistral-common's from_file reloads this tokenizer as the same version."""
        if self.is_tekken:
            return "tekken.json"  # tekken's version lives in the JSON, not the name
        name = self.source_file.name
        # SPM version comes from the suffix (".model.v3", ".model.v7m1"); keep it.  A bare
        # "tokenizer.model" loads as v1, so name it explicitly.
        suffix = name.rsplit(".model.", 1)[1] if ".model." in name else self.version
        return f"tokenizer.model.{suffix}"

    def save(self, out_dir: Path) -> list[Path]:
        """Copy the tokenizer file into out_dir (see save_name), and the added token names beside it;
        return the written paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = out_dir / self.save_name()
        if not (dest.exists() and dest.samefile(self.source_file)):
            shutil.copyfile(self.source_file, dest)
        if not self.added:
            return [dest]
        atomic_write_text(out_dir / ADDED_TOKENS, json.dumps(self.added, indent=2, ensure_ascii=False) + "\n")
        return [dest, out_dir / ADDED_TOKENS]


class _AddedTokens:
    """mistral-common's text tokenizer with the added names read out of text as their ids and
    decoded back to the names; everything else is the tokenizer's own."""

    def __init__(self, raw, added: dict[str, int]) -> None:
        self._raw, self._ids = raw, dict(added)
        self._names = {i: name for name, i in added.items()}
        longest_first = sorted(added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(n) for n in longest_first) + ")")

    def __getattr__(self, name: str):
        return getattr(self._raw, name)

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        ids = [self._raw.bos_id] if bos else []
        for k, part in enumerate(self._split.split(s)):
            if k % 2:  # re.split puts the matched names at the odd places
                ids.append(self._ids[part])
            elif part:
                ids.extend(self._raw.encode(part, bos=False, eos=False))
        return ids + [self._raw.eos_id] if eos else ids

    def decode(self, tokens: list[int], special_token_policy: SpecialTokenPolicy = SpecialTokenPolicy.IGNORE) -> str:
        out: list[str] = []
        run: list[int] = []
        for t in [*tokens, None]:
            if t is not None and int(t) not in self._names:
                run.append(t)
                continue
            out.append(self._raw.decode(run, special_token_policy))  # each piece drops its dummy prefix
            if t is not None:
                out.append(self._names[int(t)])
            run = []
        return "".join(out)


# ---------------------------------------------------------------------- messages


def _reason(e: BaseException) -> str:
    # One line: the caller prefixes file:line.  pydantic's messages span several lines.
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _build_messages(messages: Any, *, training: bool) -> list[Message]:
    """OpenAI-style dicts -> mistral-common message objects, with short DataError reasons."""
    if not isinstance(messages, list):
        raise DataError(f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise DataError("conversation has no messages")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"message {i}: expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in _ROLES:
            raise DataError(f"message {i}: unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        content = m.get("content")
        if "weight" in m and role != "assistant":
            raise DataError(f"message {i}: 'weight' is only allowed on assistant messages")
        try:
            if role == "assistant":
                out.append(_assistant(i, m, content, training))
            elif role == "system":
                out.append(SystemMessage(content=_parts(i, role, content)))
            elif not isinstance(content, str):
                raise DataError(f"message {i}: {role} content must be a string, got {type(content).__name__}")
            elif role == "user":
                out.append(UserMessage(content=content))
            else:
                call_id = m.get("tool_call_id")
                if not isinstance(call_id, str) or not call_id:
                    raise DataError(f"message {i}: tool message needs a 'tool_call_id' string")
                out.append(ToolMessage(content=content, tool_call_id=call_id, name=m.get("name")))
        except ValueError as e:  # pydantic ValidationError
            raise DataError(f"message {i}: {_reason(e)}") from e
    return out


def _parts(i: int, role: str, content: Any) -> str | list[TextChunk | ThinkChunk]:
    """System/assistant content: a string, or a list of text and thinking parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"message {i}: {role} content must be a string or a list of parts, "
                        f"got {type(content).__name__}")
    out: list[TextChunk | ThinkChunk] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(TextChunk(text=part["text"]))
        elif kind == "thinking" and isinstance(part.get("thinking"), str):
            if part.get("closed", True) is not True:
                raise DataError(f"message {i}: an unclosed thinking part cannot be trained or templated")
            out.append(ThinkChunk(thinking=part["thinking"]))
        else:
            raise DataError(f"message {i}: {role} content part {kind!r} is not supported "
                            "(text: {'type': 'text', 'text': ...}; thinking: {'type': 'thinking', 'thinking': ...})")
    return out


def _has_text(content: str | list | None) -> bool:
    if isinstance(content, list):
        return any(isinstance(c, ThinkChunk) or c.text.strip() for c in content)
    return bool(content and content.strip())


def _assistant(i: int, m: dict, content: Any, training: bool) -> AssistantMessage:
    raw_calls = m.get("tool_calls")
    tool_calls = None
    if raw_calls:
        if not isinstance(raw_calls, list):
            raise DataError(f"message {i}: 'tool_calls' must be a list")
        tool_calls = [ToolCall.model_validate(tc) for tc in raw_calls]
    if content is not None:
        content = _parts(i, "assistant", content)
    reasoning = m.get("reasoning_content", m.get("reasoning"))
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise DataError(f"message {i}: 'reasoning_content' must be a string, got {type(reasoning).__name__}")
        if isinstance(content, list) and any(isinstance(c, ThinkChunk) for c in content):
            raise DataError(f"message {i}: thinking given both as a content part and as 'reasoning_content'")
        if reasoning:  # a leading thinking part, as the chat template writes it
            rest = [TextChunk(text=content)] if isinstance(content, str) and content else content or []
            content = [ThinkChunk(thinking=reasoning), *rest]
    if not _has_text(content):
        content = None  # whitespace-only text would train on a bare </s>
    if content is None and not tool_calls:
        raise DataError(f"message {i}: assistant message has empty content")
    if not training:
        return AssistantMessage(content=content, tool_calls=tool_calls)
    weight = m.get("weight")
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise DataError(f"message {i}: weight must be 0 or 1, got {weight!r}")
    return FinetuningAssistantMessage(content=content, tool_calls=tool_calls, weight=weight)


# ---------------------------------------------------------------------- loading


def find_tokenizer_file(d: Path) -> Path:
    """Pick the tokenizer file in a model directory: tekken.json, tokenizer.model.v*, tokenizer.model."""
    looked_for = "tekken.json, tokenizer.model.v*, tokenizer.model"
    if not d.is_dir():
        raise ModelError(f"{d}: not a directory (looked for {looked_for})")
    if (d / "tekken.json").is_file():
        return d / "tekken.json"
    versioned = sorted(p for p in d.glob("tokenizer.model.v*") if p.is_file())
    if len(versioned) == 1:
        return versioned[0]
    if len(versioned) > 1:
        names = ", ".join(p.name for p in versioned)
        raise ModelError(f"{d}: several tokenizer files ({names}); pass the one to use explicitly")
    if (d / "tokenizer.model").is_file():
        return d / "tokenizer.model"
    raise ModelError(f"{d}: no mistral-common tokenizer file found (looked for {looked_for})")


def load_tokenizer(spec: str | None, model_dir: Path | None = None, new_tokens: list[str] = ()) -> ChatTokenizer:
    """Load a tokenizer from a bundled name, a file or directory path, or (spec None) model_dir,
    with the added token names saved beside its file and `new_tokens` (a run's new_special_tokens).

    Bundled names: v1, v3, v7, tekken (v11, v13 and v15 come only inside a model's tekken.json,
    whose config names its version).  A directory is searched for tekken.json, then
    tokenizer.model.v*, then tokenizer.model (which mistral-common always treats as v1).
    Raises ModelError if nothing loadable is found.
    """
    if spec is None:
        if model_dir is None:
            raise ModelError("no tokenizer given: set a tokenizer (bundled name or path) or a model directory")
        path = find_tokenizer_file(Path(model_dir))
    elif spec in BUNDLED:
        path = BUNDLED[spec]
    else:
        p = Path(spec).expanduser()
        if p.is_dir():
            path = find_tokenizer_file(p)
        elif p.is_file():
            path = p
        elif spec in _UNSHIPPED:
            raise ModelError(
                f"tokenizer {spec!r}: mistral-common ships no {spec} tokenizer file (bundled: {', '.join(BUNDLED)}); "
                "pass the model's tekken.json or its directory (the version is read from the file)"
            )
        else:
            raise ModelError(
                f"tokenizer {spec!r}: no such file or directory, and not a bundled name ({', '.join(BUNDLED)})"
            )
    tokenizer = ChatTokenizer(path, _read_added(path.parent / ADDED_TOKENS))
    return tokenizer.with_added_tokens(list(new_tokens)) if new_tokens else tokenizer


def _read_added(path: Path) -> dict[str, int]:
    """The added token names beside a tokenizer file ({} when there is no such file)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    if not (isinstance(data, dict) and all(isinstance(k, str) and type(v) is int for k, v in data.items())):
        raise ModelError(f"{path}: expected an object of token names to ids")
    return data
