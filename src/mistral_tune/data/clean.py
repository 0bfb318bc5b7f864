"""Cleaning steps, each switchable and each counting what it did.

- Unicode: invalid characters (lone surrogates) become U+FFFD, control characters other than tab
  and newlines are removed, text is NFC-normalised (so "é" typed two ways is one string).
- PII: e-mail addresses, phone numbers, IPv4/IPv6 addresses, credit-card numbers (Luhn-checked) and
  API keys / secrets of common forms become typed placeholders such as ``[EMAIL]``.
- Prompt injection: phrases that try to override instructions, or chat-template markers written as
  text, are flagged (counted, listed) or the record is dropped.
- Near-duplicates: MinHash signatures over word 5-grams, compared through LSH banding.

Exact deduplication is a hash of the cleaned example; the build step owns the set of hashes.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .formats import Chat, Text

# ---------------------------------------------------------------------- unicode

# C0 controls except \t \n \r, DEL, C1 controls, and the BOM / zero-width no-break space.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def fix_unicode(text: str) -> str:
    """Replace lone surrogates, drop control characters, NFC-normalise."""
    if text.isascii():
        return _CONTROL.sub("", text)  # NFC is the identity on ASCII
    text = _SURROGATE.sub("\ufffd", text)
    text = _CONTROL.sub("", text)
    return unicodedata.normalize("NFC", text)


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
_EMAIL = re.compile(r"\b[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
# 13-19 digits in groups separated by single spaces or hyphens; checked with Luhn afterwards.
_CARD = re.compile(r"(?<![\d.-])\d(?:[ -]?\d){12,18}(?![\d.])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not inside a longer dotted number (1.2.3.4.5), but a sentence's full stop may follow.
_IPV4 = re.compile(rf"(?<!\d)(?<!\d\.)(?:{_OCTET}\.){{3}}{_OCTET}(?!\d|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
    r"|(?:[0-9A-Fa-f]{1,4}:){2,6}(?::[0-9A-Fa-f]{1,4}){1,5}"
    r"|(?:[0-9A-Fa-f]{1,4}:){1,6}:(?::?[0-9A-Fa-f]{1,4}){1,5})(?![\w:])"
)
# International (+CC ...) or North-American (xxx) xxx-xxxx / xxx-xxx-xxxx forms; digits 10-15 in total.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,4}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?!\w)"
)

PII_KINDS = ("email", "phone", "ip_address", "credit_card", "secret")
PLACEHOLDER = {k: f"[{k.upper()}]" for k in PII_KINDS}


def redact_pii(text: str, kinds: tuple[str, ...] | list[str] = PII_KINDS, counts: Counter | None = None) -> str:
    """Replace PII of the given kinds by typed placeholders; add what was replaced to counts."""
    counts = counts if counts is not None else Counter()

    def sub(kind: str, pattern: re.Pattern, s: str, check=None) -> str:
        def repl(m: re.Match) -> str:
            if check is not None and not check(m.group(0)):
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
        text = sub("email", _EMAIL, text)
    digits = sum(map(text.count, "0123456789"))  # the numeric kinds need at least 4 digits
    if "credit_card" in kinds and digits >= 13:
        text = sub("credit_card", _CARD, text, lambda s: luhn_ok(re.sub(r"\D", "", s)))
    if "ip_address" in kinds and digits >= 4:
        if text.count(".") >= 3:
            text = sub("ip_address", _IPV4, text)
        if "::" in text or text.count(":") >= 7:
            text = sub("ip_address", _IPV6, text, lambda s: any(c.isdigit() for c in s) and s.count(":") >= 2)
    if "phone" in kinds and digits >= 10:
        text = sub("phone", _PHONE, text, lambda s: 10 <= sum(c.isdigit() for c in s) <= 15)
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
    unicode_fixed: bool = False
    pii: Counter = field(default_factory=Counter)
    injection: str | None = None


class Cleaner:
    """Applies the configured steps to one example (all its message texts)."""

    def __init__(self, unicode: bool = True, redact_pii: bool = True,
                 pii_kinds: tuple[str, ...] | list[str] = PII_KINDS, prompt_injection: str = "flag") -> None:
        self.unicode = unicode
        self.redact = redact_pii
        self.pii_kinds = tuple(pii_kinds)
        self.injection = prompt_injection

    def _text(self, s: str, res: CleanResult) -> str:
        if self.unicode:
            fixed = fix_unicode(s)
            if fixed != s:
                res.unicode_fixed = True
                s = fixed
        if self.injection != "off" and res.injection is None:
            res.injection = injection_match(s)
        if self.redact:
            s = redact_pii(s, self.pii_kinds, res.pii)
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
