"""Cleaning steps, each switchable and each counting what it did.

- Unicode: lone surrogates become U+FFFD, mojibake (UTF-8 read as Windows-1252 or Latin-1, "cafÃ©")
  is decoded back by ftfy, control characters other than tab and newlines are removed, and text is
  NFC-normalised (so "é" typed two ways is one string). Each repair is counted by kind.
- PII (opt-in): e-mail addresses, phone numbers, public IP addresses, card numbers (known issuer
  prefix, Luhn-checked) and API keys / secrets of common forms become typed placeholders such as
  ``[EMAIL]``. Technical text is left alone: versions, private and loopback addresses, URLs, git
  remotes and code (between backticks) keep their e-mails, numbers and addresses; secrets are
  replaced wherever they are.
- Prompt injection: phrases that try to override instructions, or chat-template markers written as
  text, are flagged (counted, listed) or the record is dropped.
- Near-duplicates: MinHash signatures over word 5-grams, compared through LSH banding.

Exact deduplication is a hash of the cleaned example; the build step owns the set of hashes.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass, field

import ftfy
import ftfy.bad_codecs  # noqa: F401 - registers the sloppy-windows-* codecs named in CHARMAP_ENCODINGS
import numpy as np
from ftfy.chardata import CHARMAP_ENCODINGS

from ..config import PII_KINDS
from .formats import Chat, Text

# ---------------------------------------------------------------------- unicode

# C0 controls except \t \n \r, DEL, C1 controls, and the BOM / zero-width no-break space.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: The kinds of repair fix_unicode counts, as the report names them.
UNICODE_REPAIRS = {"invalid": "lone surrogates replaced", "mojibake": "mojibake undone",
                   "control": "control characters removed", "nfc": "NFC-normalised"}


def _charmap_class(lo: int, hi: int, encodings=CHARMAP_ENCODINGS) -> str:
    chars = set()
    for enc in encodings:
        chars |= {bytes([b]).decode(enc, errors="ignore") for b in range(lo, hi)} - {""}
    return "[" + "".join(re.escape(c) for c in sorted(chars)) + "]"


def _mojibake_pattern() -> tuple[re.Pattern, re.Pattern]:
    """(a quick hint, the exact test): UTF-8 decoded with a one-byte code page (the ones ftfy can
    undo) turns each multi-byte character into a lead character followed by 1-3 continuation
    characters of that code page. Text without such a run cannot be mojibake that ftfy fixes, and
    ftfy's own test costs about 1 ms per KB, so it only sees the lines that have one."""
    exact = []
    for enc in CHARMAP_ENCODINGS:
        cont = _charmap_class(0x80, 0xC0, [enc])
        exact.append(f"{_charmap_class(0xC2, 0xE0, [enc])}{cont}|{_charmap_class(0xE0, 0xF0, [enc])}{cont}{{2}}"
                     f"|{_charmap_class(0xF0, 0xF5, [enc])}{cont}{{3}}")
    return re.compile(_charmap_class(0xC2, 0xF5) + _charmap_class(0x80, 0xC0)), re.compile("|".join(exact))


_MOJIBAKE_HINT, _MOJIBAKE = _mojibake_pattern()
_FIX_SPAN = 2000  # the longest stretch without whitespace that goes to ftfy in one piece
_NON_SPACE = re.compile(r"[^ \t\r\n]*")  # not \S: mojibake holds U+0085 and U+00A0, which \s matches


_JOIN = 64  # mojibake runs closer than this are repaired together (ftfy judges better with context)


def fix_mojibake(text: str) -> str:
    """ftfy's encoding repair ("cafÃ©" -> "café") of the stretches of text that hold mojibake runs.

    A multi-byte character's bytes hold no space, so a run sits inside a word; runs close together
    go to ftfy as one stretch, from the start of the first word to the end of the last. ftfy's
    fix_encoding only re-decodes mis-decoded text: quotes, HTML entities, widths and ligatures stay
    as they are (its fix_text would change them too).
    """
    out, done, start, end = [], 0, -1, -1
    for m in _MOJIBAKE_HINT.finditer(text):
        at = m.start()
        if at < end or not _MOJIBAKE.match(text, at):
            continue
        if start >= 0 and at - end > _JOIN:
            out += [text[done:start], ftfy.fix_encoding(text[start:end])]
            done, start = end, -1
        if start < 0:
            lo = max(done, at - _FIX_SPAN)
            start = max(text.rfind(c, lo, at) for c in " \t\r\n") + 1 or lo
        end = _NON_SPACE.match(text, at, at + _FIX_SPAN).end()
        if end - start > 8 * _FIX_SPAN:  # a long stretch of mojibake: repaired in parts
            out += [text[done:start], ftfy.fix_encoding(text[start:end])]
            done, start = end, -1
    if start >= 0:
        out += [text[done:start], ftfy.fix_encoding(text[start:end])]
        done = end
    return "".join([*out, text[done:]]) if out else text


def fix_unicode(text: str, counts: Counter | None = None) -> str:
    """Replace lone surrogates, undo mojibake, drop control characters, NFC-normalise; add the kind
    of each repair made (invalid, mojibake, control, nfc) to counts."""
    counts = counts if counts is not None else Counter()

    def step(kind: str, new: str) -> str:
        if new != text:
            counts[kind] += 1
        return new

    if not text.isascii():  # the ASCII fast path: only control characters can need work
        text = step("invalid", _SURROGATE.sub("\ufffd", text))
        text = step("mojibake", fix_mojibake(text))
    text = step("control", _CONTROL.sub("", text))
    if not text.isascii():
        text = step("nfc", unicodedata.normalize("NFC", text))
    return text


# ---------------------------------------------------------------------- PII


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# (pattern, literal needles): a pattern is only run when one of its needles is in the text, which
# keeps cleaning cheap next to tokenization (most texts contain none).
_SECRET_PATTERNS = [
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S), ("-----BEGIN",)),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), ("AKIA", "ASIA")),  # AWS access key id
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"), ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),  # GitHub
    (re.compile(r"\bgithub_pat_[A-Za-z0-9_]{40,}\b"), ("github_pat_",)),
    (re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"), ("sk-",)),  # OpenAI / Anthropic style
    (re.compile(r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{20,}\b"), ("k_live_", "k_test_")),  # Stripe
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), ("xox",)),  # Slack
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}"), ("AIza",)),  # Google API key
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), ("hf_",)),  # Hugging Face token
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), ("eyJ",)),  # JWT
]
# A cheaper test for "<...key|secret|token|password> =" run on lower-cased text before _ASSIGNED_SECRET.
_ASSIGNED_HINT = re.compile(r"(?:key|secret|token|passw(?:or)?d)[\"']?\s*[:=]")
# `password = "hunter2hunter2..."`: only the value is replaced, and only when it looks like a secret
# (16+ characters with a digit or symbol), so "the password is required" stays.
_ASSIGNED_SECRET = re.compile(
    r"(?i)\b((?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd)"
    r"[\"']?\s*[:=]\s*[\"']?)((?=[^\s\"'`,;]*[^\sA-Za-z\"'`,;])[^\s\"'`,;]{16,})"
)
_EMAIL = re.compile(r"\b[A-Za-z0-9][A-Za-z0-9._%+-]*@((?:[A-Za-z0-9-]+\.)+([A-Za-z]{2,}))\b")
# Domains that belong to nobody (RFC 2606 / 6761), and file suffixes that follow "@" in asset names
# (icon@2x.png).
_NOBODY = re.compile(r"(?:^|\.)(?:example\.(?:com|net|org)|example|test|invalid|localhost)$", re.I)
_FILE_SUFFIXES = {"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "pdf", "js", "css", "json"}
# 13-19 digits in groups separated by single spaces or hyphens; checked with Luhn afterwards.
_CARD = re.compile(r"(?<![\d.-])\d(?:[ -]?\d){12,18}(?![\d.])")
# Issuer prefixes (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay) with their lengths: a
# Luhn check alone would pass one in ten of all long numbers (order ids, timestamps).
_CARD_ISSUER = re.compile(r"4\d{15}(?:\d{3})?|5[1-5]\d{14}|2(?:2[2-9]|[3-6]\d|7[01]|720)\d{12}|3[47]\d{13}"
                          r"|6(?:011|5\d\d|4[4-9]\d)\d{12}(?:\d{3})?|35(?:2[89]|[3-8]\d)\d{12}|3(?:0[0-5]|[68]\d)\d{11}"
                          r"|62\d{14,17}")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not inside a longer dotted number (1.2.3.4.5), but a sentence's full stop may follow.
_IPV4 = re.compile(rf"(?<!\d)(?<!\d\.)(?:{_OCTET}\.){{3}}{_OCTET}(?!\d|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
    r"|(?:[0-9A-Fa-f]{1,4}:){2,6}(?::[0-9A-Fa-f]{1,4}){1,5}"
    r"|(?:[0-9A-Fa-f]{1,4}:){1,6}:(?::?[0-9A-Fa-f]{1,4}){1,5})(?![\w:])"
)
# Text right before a dotted number that makes it a version: v1.2.3.4, version 1.2.3.4, ==1.2.3.4,
# pkg@1.2.3.4, pkg-1.2.3.4.
_VERSION_BEFORE = re.compile(r"(?:\bv|\bversions?:?\s*|\bver\.?\s*|\brelease:?\s*|[=~<>!]=\s*|@|[A-Za-z]-)$", re.I)
# International (+CC ...) or North-American (xxx) xxx-xxxx / xxx-xxx-xxxx forms; digits 10-15 in total.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,4}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?!\w)"
)
# Where only secrets are redacted: URLs (their user@host and addresses name machines, not people),
# scp-style git remotes (git@github.com:owner/repo), and code between backticks.
_TECHNICAL = re.compile(
    r"```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)|`[^`\n]+`"
    r"|\b[A-Za-z][A-Za-z0-9+.-]*://[^\s<>\"'`]+"
    r"|\b[\w.-]+@[\w.-]+:(?=[\w~])[\w.~/-]+",
    re.S,
)

PLACEHOLDER = {k: f"[{k.upper()}]" for k in PII_KINDS}


def _technical_spans(text: str) -> tuple[list[int], list[int]]:
    if "`" not in text and "~~~" not in text and "://" not in text and "@" not in text:
        return [], []
    spans = [m.span() for m in _TECHNICAL.finditer(text)]
    return [a for a, _ in spans], [b for _, b in spans]


def _in_spans(spans: tuple[list[int], list[int]], start: int, end: int) -> bool:
    i = bisect.bisect_right(spans[0], start) - 1
    return i >= 0 and spans[1][i] > start or (i + 1 < len(spans[0]) and spans[0][i + 1] < end)


def _is_email(m: re.Match) -> bool:
    return not _NOBODY.search(m.group(1)) and m.group(2).lower() not in _FILE_SUFFIXES


def _is_card(s: str) -> bool:
    digits = re.sub(r"\D", "", s)
    return _CARD_ISSUER.fullmatch(digits) is not None and luhn_ok(digits)


def _is_public_ip(s: str) -> bool:
    try:
        return ipaddress.ip_address(s).is_global
    except ValueError:
        return False


def redact_pii(text: str, kinds: tuple[str, ...] | list[str] = PII_KINDS, counts: Counter | None = None) -> str:
    """Replace PII of the given kinds by typed placeholders; add what was replaced to counts."""
    counts = counts if counts is not None else Counter()
    spans: tuple[list[int], list[int]] | None = None  # technical spans of the current text, when needed

    def sub(kind: str, pattern: re.Pattern, s: str, check=None) -> str:
        nonlocal spans
        spans = None

        def repl(m: re.Match) -> str:
            nonlocal spans
            if check is not None and not check(m):
                return m.group(0)
            if kind != "secret":
                spans = spans or _technical_spans(s)
                if _in_spans(spans, *m.span()):
                    return m.group(0)
            counts[kind] += 1
            return PLACEHOLDER[kind]

        return pattern.sub(repl, s)

    if "secret" in kinds:
        for pattern, needles in _SECRET_PATTERNS:
            if any(n in text for n in needles):
                text = sub("secret", pattern, text)

        def repl_assigned(m: re.Match) -> str:
            counts["secret"] += 1
            return m.group(1) + PLACEHOLDER["secret"]

        if _ASSIGNED_HINT.search(text.lower()):
            text = _ASSIGNED_SECRET.sub(repl_assigned, text)
    if "email" in kinds and "@" in text:
        text = sub("email", _EMAIL, text, _is_email)
    digits = sum(map(text.count, "0123456789"))  # the numeric kinds need at least 4 digits
    if "credit_card" in kinds and digits >= 13:
        text = sub("credit_card", _CARD, text, lambda m: _is_card(m.group(0)))
    if "ip_address" in kinds and digits >= 4:
        if text.count(".") >= 3:
            def public_v4(m: re.Match) -> bool:
                s = m.group(0)
                if all(len(o) == 1 for o in s.split(".")):
                    return False  # 1.2.3.4 reads as a version
                return _is_public_ip(s) and not _VERSION_BEFORE.search(m.string, max(0, m.start() - 12), m.start())

            text = sub("ip_address", _IPV4, text, public_v4)
        if "::" in text or text.count(":") >= 7:
            text = sub("ip_address", _IPV6, text, lambda m: _is_public_ip(m.group(0)))
    if "phone" in kinds and digits >= 10:
        text = sub("phone", _PHONE, text, lambda m: 10 <= sum(c.isdigit() for c in m.group(0)) <= 15)
    return text


# ---------------------------------------------------------------------- prompt injection

_INJECTION = re.compile(
    r"(?i)(ignore|disregard|forget)\s+(all\s+|any\s+)?(the\s+|your\s+)?(previous|prior|above|earlier|preceding)\s+"
    r"(instructions?|prompts?|rules|directions)"
    r"|\byou are now (DAN|in developer mode|jailbroken)\b|\bdo anything now\b"
    r"|(reveal|print|show|repeat)\s+(me\s+)?(your|the)\s+(system prompt|hidden instructions|initial instructions)"
    r"|\[/?INST\]|\[/?SYSTEM_PROMPT\]|<\|im_start\|>|<\|im_end\|>|<\|(?:system|user|assistant)\|>"
    r"|<</?SYS>>|<\|begin_of_text\|>|<\|start_header_id\|>"
)


_INJECTION_NEEDLES = ("ignore", "disregard", "forget", "you are now", "anything now", "system prompt",
                      "instructions", "inst]", "system_prompt]", "<|", "<<sys", "<</sys")


def injection_match(text: str) -> str | None:
    lower = text.lower()
    if not any(n in lower for n in _INJECTION_NEEDLES):
        return None
    m = _INJECTION.search(text)
    return m.group(0) if m else None


# ---------------------------------------------------------------------- the cleaner


@dataclass
class CleanResult:
    example: Chat | Text | None  # None: dropped (see reason)
    reason: str | None = None
    unicode: Counter = field(default_factory=Counter)  # repairs by kind (texts repaired)
    pii: Counter = field(default_factory=Counter)
    redacted: list[str] = field(default_factory=list)  # the first few redactions, in their context
    injection: str | None = None


_CONTEXT = 30  # characters shown on each side of a placeholder


class Cleaner:
    """Applies the configured steps to one example (all its message texts)."""

    def __init__(self, unicode: bool = True, redact_pii: bool = False,
                 pii_kinds: tuple[str, ...] | list[str] = PII_KINDS, prompt_injection: str = "flag") -> None:
        self.unicode = unicode
        self.redact = redact_pii
        self.pii_kinds = tuple(pii_kinds)
        self.injection = prompt_injection

    def _text(self, s: str, res: CleanResult) -> str:
        if self.unicode:
            s = fix_unicode(s, res.unicode)
        if self.injection != "off" and res.injection is None:
            res.injection = injection_match(s)
        if self.redact:
            before = sum(res.pii.values())
            s = redact_pii(s, self.pii_kinds, res.pii)
            if sum(res.pii.values()) > before and len(res.redacted) < 3:
                # The placeholder in its context (not the original: PII is not written anywhere).
                at, p = min((s.find(p), p) for p in PLACEHOLDER.values() if p in s)
                res.redacted.append(s[max(0, at - _CONTEXT):at + len(p) + _CONTEXT].replace("\n", " "))
        return s

    def clean(self, example: Chat | Text) -> CleanResult:
        res = CleanResult(example)
        if isinstance(example, Text):
            res.example = Text(self._text(example.text, res))
        else:
            msgs = []
            for m in example.messages:
                content = m.get("content")
                msgs.append({**m, "content": self._text(content, res)} if isinstance(content, str) else m)
            res.example = Chat(msgs, example.tools)
        if res.injection is not None and self.injection == "drop":
            res.reason = f"possible prompt injection: {res.injection!r}"
            res.example = None
        return res


# ---------------------------------------------------------------------- near-duplicates

NUM_PERM = 64
_MERSENNE = np.uint64((1 << 61) - 1)
_rng = np.random.RandomState(1234)  # fixed: signatures must match across processes and runs
_A = _rng.randint(1, 1 << 31, size=NUM_PERM, dtype=np.int64).astype(np.uint64) | np.uint64(1)
_B = _rng.randint(0, 1 << 31, size=NUM_PERM, dtype=np.int64).astype(np.uint64)
_WORD = re.compile(r"\w+")


def minhash(text: str, ngram: int = 5) -> np.ndarray:
    """MinHash signature (NUM_PERM uint32) of the word n-gram set of text (lower-cased)."""
    words = _WORD.findall(text.lower())
    if len(words) < ngram:
        shingles = {" ".join(words)}
    else:
        shingles = {" ".join(words[i:i + ngram]) for i in range(len(words) - ngram + 1)}
    x = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in shingles), dtype=np.uint64, count=len(shingles))
    # (a*x + b) mod 2^61-1 stays below 2^64 because a, b < 2^31 and x < 2^32.
    h = (_A[:, None] * x[None, :] + _B[:, None]) % _MERSENNE
    return (h.min(axis=1) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


class NearDuplicateIndex:
    """LSH over MinHash signatures; `add` answers whether a near-duplicate was seen before."""

    def __init__(self, threshold: float, bands: int = 16) -> None:
        self.threshold = threshold
        self.bands = bands
        self.rows = NUM_PERM // bands
        self.buckets: list[dict[bytes, int]] = [{} for _ in range(bands)]
        self.signatures: list[np.ndarray] = []

    def add(self, sig: np.ndarray) -> bool:
        """True if sig is a near-duplicate of an earlier kept signature (then it is not kept)."""
        keys = [sig[b * self.rows:(b + 1) * self.rows].tobytes() for b in range(self.bands)]
        checked = set()
        for b, key in enumerate(keys):
            j = self.buckets[b].get(key)
            if j is not None and j not in checked:
                checked.add(j)
                if float(np.mean(self.signatures[j] == sig)) >= self.threshold:
                    return True
        idx = len(self.signatures)
        self.signatures.append(sig)
        for b, key in enumerate(keys):
            self.buckets[b].setdefault(key, idx)
        return False
