"""The exported HF tokenizer (tokenizer.json and chat template) must give mistral-common's ids.

Each tokenizer is exported once per module and read back with transformers' AutoTokenizer, as a
server would. Texts come from a generator (code with indentation, whitespace runs, tabs, "▁",
emoji, CJK, right-to-left scripts, combining marks, digits, punctuation, any code point), once
as a fixed-seed corpus whose differences are counted, once through hypothesis.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    FinetuningAssistantMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_tune.chat import ChatTokenizer, load_tokenizer
from mistral_tune.export.hf_tokenizer import save_hf_tokenizer

transformers = pytest.importorskip("transformers")

NAMES = ["v1", "v3", "v7", "tekken"]

# ---------------------------------------------------------------------- generated text

CODE_LINES = [
    "def f(x):", "return x + 1", "if a  and  b:", "for i in range(10):", "print(i)  # done",
    "class A(object):", "pass", "x = [1, 2,   3]", "} else {", "foo();", "int main(void) {",
    "SELECT *  FROM t   WHERE a = 1;", "<div class=\"x\">", "</div>", "$ ls -la ~/ && echo ok",
    "    ", "", "'''docstring'''", "return {'a': 1}",
]
FRAGMENTS = [
    " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n", "\n ", " \t ", "\u00a0", "\u3000",
    "▁", "▁▁", " ▁", "▁ ", "Hello", "world", "hello  world", "naïve", "Übergröße", "e\u0301", "n\u0303\u0323",
    "a\u0308\u0301\u0327", "\u0301", "🙂", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🚀🚀", "你好世界", "日本語のテキスト", "한국어",
    "مرحبا بالعالم", "שלום עולם", "\u200f", "\u200e", "\u200b", "\u200d", "0", "42", "3.14159", "2024-01-01",
    "1234567890", ".", ",", "!", "?", "...", "==", "---", "***", "->", "=>", "::", "();", "{}", "[]", "\"", "'",
    "`", "\\", "/", "#", "@", "%", "&", "|", "~", "^", "_", "ß", "Ω", "Привет", "ก", "ॐ", "\x00", "\x7f", "\uffff",
]
RUN_CHARS = " \t\n▁=.-#*0a"


def _code(r: random.Random) -> str:
    indent = r.choice(["    ", "  ", "\t", "        "])
    lines = [indent * r.randint(0, 4) + r.choice(CODE_LINES) + " " * r.choice([0, 0, 0, 1, 3])
             for _ in range(r.randint(1, 6))]
    return "\n".join(lines)


def _any_char(r: random.Random) -> str:
    low, high = r.choice([(0x20, 0x7E), (0xA0, 0xD7FF), (0xE000, 0x10FFFF)])  # no surrogates
    return chr(r.randint(low, high))


def _text(r: random.Random) -> str:
    parts = []
    for _ in range(r.randint(1, 8)):
        kind = r.random()
        if kind < 0.25:
            parts.append(_code(r))
        elif kind < 0.6:
            parts.append(r.choice(FRAGMENTS))
        elif kind < 0.8:
            parts.append(r.choice(RUN_CHARS) * r.randint(1, 40))
        else:
            parts.append("".join(_any_char(r) for _ in range(r.randint(1, 6))))
    return "".join(parts)


def corpus(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [_text(r) for _ in range(n)]


# The same ingredients, drawn by hypothesis (which also shrinks a failure to a short example).
TEXT = st.lists(
    st.one_of(
        st.sampled_from(FRAGMENTS),
        st.builds(_code, st.randoms(use_true_random=False)),
        st.builds(lambda c, n: c * n, st.sampled_from(RUN_CHARS), st.integers(1, 40)),
        st.text(st.characters(exclude_categories=("Cs",)), max_size=6),
    ),
    max_size=8,
).map("".join)
NONBLANK = TEXT.filter(lambda s: s.strip() != "")


# ---------------------------------------------------------------------- exported tokenizers


@dataclass
class Exported:
    name: str
    ours: ChatTokenizer  # training ids come from here
    reference: MistralTokenizer  # mistral-common, finetuning mode
    prompts: MistralTokenizer  # mistral-common, test mode (conversations ending with a user turn)
    hf: object  # what transformers' AutoTokenizer reads from the exported folder
    controls: tuple[str, ...]  # control-token strings: HF tokenizers turn them into the token even in text

    def free_of_controls(self, text: str) -> bool:
        return not any(c in text for c in self.controls)

    @property
    def raw(self):
        return self.reference.instruct_tokenizer.tokenizer


@pytest.fixture(scope="module", params=NAMES)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    ours = load_tokenizer(request.param)
    out = tmp_path_factory.mktemp(f"hf_{request.param}")
    save_hf_tokenizer(ours, out)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    reference = ours.mistral_tokenizer  # MistralTokenizer.from_file(..., mode=finetuning), untouched
    prompts = MistralTokenizer.from_file(ours.source_file, mode=ValidationMode.test)
    raw = reference.instruct_tokenizer.tokenizer
    controls = tuple(raw.id_to_piece(i) for i in sorted(raw.special_ids))
    return Exported(request.param, ours, reference, prompts, hf, controls)


def _mc_messages(conv: list[dict], training: bool) -> list:
    cls = {"system": SystemMessage, "user": UserMessage,
           "assistant": FinetuningAssistantMessage if training else AssistantMessage}
    return [cls[m["role"]](content=m["content"]) for m in conv]


def _template_ids(hf, conv: list[dict], generation_prompt: bool) -> list[int]:
    out = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _text_problem(ex: Exported, text: str) -> str | None:
    """What differs between the HF tokenizer and mistral-common on `text` (None: nothing)."""
    raw = ex.raw
    want = raw.encode(text, bos=True, eos=False)
    got = ex.hf(text).input_ids
    if got != want:
        return f"ids {got[:24]} != {want[:24]}"
    decoded, reference = ex.hf.decode(got, skip_special_tokens=True), raw.decode(want)
    if decoded != reference:  # equals `text` wherever mistral-common round-trips
        return f"decode {decoded!r} != {reference!r}"
    return None


def _conversation(r: random.Random, texts: list[str]) -> list[dict]:
    nonblank = [t for t in texts if t.strip()]
    conv = [{"role": "system", "content": r.choice(nonblank)}] if r.random() < 0.5 else []
    for _ in range(r.randint(1, 3)):
        conv.append({"role": "user", "content": r.choice(nonblank)})
        conv.append({"role": "assistant", "content": r.choice(nonblank) + " " * r.choice([0, 0, 1, 2, 5])})
    return conv


def _chat_problem(ex: Exported, conv: list[dict]) -> str | None:
    """A conversation ending with an assistant turn: the template must give our training ids
    (which are mistral-common's); without that turn, with a generation prompt, mistral-common's
    prompt ids."""
    training, _ = ex.ours.encode_chat(conv)
    reference = ex.reference.encode_chat_completion(ChatCompletionRequest(messages=_mc_messages(conv, True))).tokens
    if training != reference:
        return "training ids differ from mistral-common"
    if _template_ids(ex.hf, conv, False) != training:
        return "chat template differs from the training ids"
    prompt = conv[:-1]
    want = ex.prompts.encode_chat_completion(ChatCompletionRequest(messages=_mc_messages(prompt, False))).tokens
    if _template_ids(ex.hf, prompt, True) != want:
        return "chat template differs from mistral-common's prompt ids"
    return None


# ---------------------------------------------------------------------- tests

N_TEXTS, N_CONVERSATIONS = 2500, 120


def test_generated_corpus_gives_mistral_common_ids(exported: Exported) -> None:
    texts = [t for t in corpus(N_TEXTS) if exported.free_of_controls(t)]
    assert len(texts) >= 2000
    problems = [(t, p) for t in texts if (p := _text_problem(exported, t))]
    r = random.Random(1)
    conversations = [_conversation(r, texts) for _ in range(N_CONVERSATIONS)]
    chat_problems = [(c, p) for c in conversations if (p := _chat_problem(exported, c))]
    round_trips = sum(exported.raw.decode(exported.raw.encode(t, bos=False, eos=False)) == t for t in texts)
    print(f"{exported.name}: {len(problems)} of {len(texts)} texts differ ({round_trips} round-trip in "
          f"mistral-common), {len(chat_problems)} of {len(conversations)} conversations differ")
    assert not problems, f"{len(problems)} of {len(texts)} texts differ, e.g. {problems[:3]}"
    assert not chat_problems, f"{len(chat_problems)} of {len(conversations)} conversations differ: {chat_problems[:2]}"


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT)
def test_text_ids_and_decoding(exported: Exported, text: str) -> None:
    assume(exported.free_of_controls(text))
    assert _text_problem(exported, text) is None


@st.composite
def conversations(draw) -> list[dict]:
    conv = [{"role": "system", "content": draw(NONBLANK)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        conv.append({"role": "user", "content": draw(NONBLANK)})
        conv.append({"role": "assistant", "content": draw(NONBLANK) + draw(st.sampled_from(["", " ", "  ", " \n "]))})
    return conv


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(conv=conversations())
def test_chat_template_ids(exported: Exported, conv: list[dict]) -> None:
    assume(all(exported.free_of_controls(m["content"]) for m in conv))
    assert _chat_problem(exported, conv) is None


def test_leading_spaces_and_trailing_assistant_spaces(exported: Exported) -> None:
    """The cases that went wrong with a whitespace-splitting pre-tokenizer, spelled out."""
    for text in ["def f():\n    return 1", "  two leading spaces", "trailing  ", "a   b", "▁x", " ", "\t\tx"]:
        assert _text_problem(exported, text) is None, text
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello   "},
            {"role": "user", "content": "  indented\n    code"}, {"role": "assistant", "content": "ok"}]
    assert _chat_problem(exported, conv) is None

