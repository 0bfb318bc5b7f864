"""A look inside the training data: counts, a length histogram, and samples rendered so that the
tokens the model learns from (trained) and the ones it only reads (masked) look different.

Output: terminal text (ANSI colour, or «guillemets» around trained text without colour), a PNG
histogram and an HTML page with the same samples for the browser.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .build import Dataset

GREEN, DIM, BOLD, RESET = "\x1b[32m", "\x1b[2m", "\x1b[1m", "\x1b[0m"


@dataclass
class Span:
    text: str
    trained: bool


_BYTE_PIECES = re.compile(r"(?:<0x[0-9A-F]{2}>)+")


def _readable(tokenizer, ids: list[int]) -> str:
    text = tokenizer.decode(ids, keep_special=True)
    if not tokenizer.is_tekken:
        # With special tokens kept, SentencePiece text comes back as raw pieces: "▁" for a space
        # and <0xNN> for bytes outside the vocabulary (newlines, rare characters).
        text = _BYTE_PIECES.sub(lambda m: bytes(int(b, 16) for b in re.findall(r"<0x(..)>", m.group(0)))
                                .decode("utf-8", errors="replace"), text).replace("\u2581", " ")
    return text


def render_spans(tokenizer, ids: list[int], mask: list[bool]) -> list[Span]:
    """Runs of trained / masked tokens as text, special tokens ([INST], </s>, ...) kept visible.

    Each run is decoded as the difference of two prefix decodings, so the spaces a tokenizer puts
    at a token's start (SentencePiece) survive the cut between runs.
    """
    spans: list[Span] = []
    start = 0
    prev_text = ""
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            text = _readable(tokenizer, ids[:end])
            piece = text[len(prev_text):] if text.startswith(prev_text) else _readable(tokenizer, ids[start:end])
            spans.append(Span(piece, bool(mask[start])))
            prev_text, start = text, end
    return spans


def histogram(lengths: np.ndarray, max_len: int, bins: int = 16) -> list[tuple[int, int, int]]:
    """(low, high, count) over [0, max_len] in equal bins."""
    edges = np.linspace(0, max_len, bins + 1).astype(int)
    counts, _ = np.histogram(np.clip(lengths, 0, max_len), bins=edges)
    return [(int(edges[i]), int(edges[i + 1]), int(counts[i])) for i in range(bins)]


def histogram_lines(lengths: np.ndarray, max_len: int, width: int = 40) -> list[str]:
    rows = histogram(lengths, max_len)
    top = max((c for *_, c in rows), default=0) or 1
    return [f"  {lo:>6}-{hi:<6} {'#' * max(int(round(width * c / top)), 1 if c else 0):<{width}} {c}"
            for lo, hi, c in rows]


def save_png(lengths: np.ndarray, max_len: int, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(lengths, bins=np.linspace(0, max_len, 41), color="#4c72b0")
    ax.axvline(max_len, color="#c44e52", linestyle="--", label=f"sequence_len {max_len}")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass
class RenderedSample:
    origin: str
    n_tokens: int
    n_trained: int
    spans: list[Span]


def pick_samples(data: Dataset, tokenizer, n: int, seed: int = 0) -> list[RenderedSample]:
    """n distinct training samples chosen by seed, taking the datasets in turn so a mix shows each."""
    store = data.train
    if len(store) == 0 or n <= 0:
        return []
    rng = np.random.default_rng(seed)
    by_part = [rng.permutation(np.flatnonzero(store.part == p)).tolist() for p in range(len(store.parts))]
    by_part = [ks for ks in by_part if ks]
    picks: list[int] = []
    while len(picks) < min(n, len(store)) and any(by_part):
        for ks in by_part:
            while ks and ks[0] in picks:
                ks.pop(0)  # mixing may repeat a sample; show each once
            if ks and len(picks) < n:
                picks.append(ks.pop(0))
    return [_render(data, store, k, tokenizer) for k in picks]


def _render(data: Dataset, store, k: int, tokenizer, origin: str | None = None) -> RenderedSample:
    ids, mask = store.ids_and_mask(k)
    if origin is None:
        p, i = int(store.part[k]), int(store.local[k])
        origin = data.entries[p].origins(limit=i + 1)[-1]
    return RenderedSample(origin, len(ids) - 1, int(store.trained[k]),
                          render_spans(tokenizer, ids.tolist(), mask.astype(bool).tolist()))


def samples_at(data: Dataset, tokenizer, origins: list[str]) -> tuple[list[RenderedSample], list[str]]:
    """The samples made from the records at the given origins ("file:line"), and the origins that
    made no sample (rejected, deduplicated or not in the data)."""
    found, missing = [], []
    for want in origins:
        hits = []
        for p, entry in enumerate(data.entries):
            for i, origin in enumerate(entry.origins()):
                if origin != want:
                    continue
                for store in (data.train, data.val):  # a text record may have made several samples
                    ks = np.flatnonzero((store.part == p) & (store.local == i))
                    if len(ks):
                        hits.append(_render(data, store, int(ks[0]), tokenizer, want))
                        break
        found += hits
        if not hits:
            missing.append(want)
    return found, missing


def summary_lines(data: Dataset, sequence_len: int) -> list[str]:
    r = data.report
    lengths = data.train.lengths
    lines = [
        f"samples: {r.samples} ({r.unique_train_samples} train + {r.val_samples} held out); an epoch after "
        f"dataset weights: {r.train_samples} training samples",
        f"tokens: {r.tokens:,}; trained tokens: {r.trained_tokens:,} "
        f"({100 * r.trained_tokens / max(r.tokens, 1):.1f}%); an epoch: {r.train_tokens:,} tokens",
    ]
    if len(lengths):
        lines.append(f"sample length: min {int(lengths.min())}, median {int(np.median(lengths))}, "
                     f"mean {lengths.mean():.0f}, max {int(lengths.max())} (sequence_len {sequence_len})")
    lines.append(r.accounting())
    lines.append(
        f"truncated {r.truncated}, redacted {sum(r.redacted.values())}"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(r.redacted.items()))})" if r.redacted else "")
        + f", flagged {r.injection_flagged}, Unicode repaired in {r.unicode_fixed} record(s)"
        + (f" ({', '.join(f'{k} {v}' for k, v in r.unicode_repairs.items())})" if r.unicode_repairs else "")
    )
    return lines


def render_terminal(sample: RenderedSample, color: bool, max_chars: int | None = None) -> str:
    spans = sample.spans
    total = sum(len(s.text) for s in spans)
    if max_chars and total > max_chars:
        # Keep the beginning and the end (where the answer closes), say how much is left out.
        head, tail = _cut(spans, max_chars * 2 // 3, from_end=False), _cut(spans, max_chars // 3, from_end=True)
        gap = Span(f" [... {total - max_chars} characters not shown ...] ", False)
        spans = [*head, gap, *tail]
    parts = []
    for s in spans:
        if color:
            parts.append(f"{GREEN}{s.text}{RESET}" if s.trained else f"{DIM}{s.text}{RESET}")
        else:
            parts.append(f"«{s.text}»" if s.trained else s.text)
    return "".join(parts)


def _cut(spans: list[Span], budget: int, from_end: bool) -> list[Span]:
    out: list[Span] = []
    for s in reversed(spans) if from_end else spans:
        if budget <= 0:
            break
        text = s.text[-budget:] if from_end else s.text[:budget]
        out.append(Span(text, s.trained))
        budget -= len(text)
    return out[::-1] if from_end else out


def write_html(samples: list[RenderedSample], header: list[str], path: Path, png_name: str | None) -> Path:
    body = [
        "<!doctype html><meta charset='utf-8'><title>mistral-tune data inspect</title>",
        "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto}"
        "pre{white-space:pre-wrap;font-family:monospace;border:1px solid #ccc;padding:.6em;line-height:1.4}"
        ".t{background:#d7f5d7;color:#064} .m{color:#888} .legend span{padding:0 .3em}</style>",
        "<h1>Training data</h1><pre>" + html.escape("\n".join(header)) + "</pre>",
    ]
    if png_name:
        body.append(f"<img src='{html.escape(png_name)}' alt='sample length histogram'>")
    body.append("<p class='legend'><span class='t'>trained tokens</span> <span class='m'>masked tokens "
                "(context only, no loss)</span></p>")
    for k, s in enumerate(samples):
        spans = "".join(f"<span class='{'t' if sp.trained else 'm'}'>{html.escape(sp.text)}</span>" for sp in s.spans)
        body.append(f"<h3>sample {k + 1}: {html.escape(s.origin)} ({s.n_tokens} tokens, {s.n_trained} trained)"
                    f"</h3><pre>{spans}</pre>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(body) + "\n", encoding="utf-8")
    return path


def inspect_lines(data: Dataset, tokenizer, sequence_len: int, n_samples: int, out_dir: Path | None,
                  color: bool, seed: int = 0, max_chars: int | None = 1500, at: list[str] = (),
                  shown_dir: Path | None = None) -> list[str]:
    """Everything `mistral-tune data inspect` prints; writes the PNG and HTML into out_dir. shown_dir: where
    out_dir's files are to be found once printed (out_dir may be a temporary folder renamed into place)."""
    lines = ["== report", *data.report.lines(), "", "== summary", *summary_lines(data, sequence_len), ""]
    lines += ["== sample lengths (tokens; train)", *histogram_lines(data.train.lengths, sequence_len), ""]
    rejects = [r for e in data.entries for r in e.rejects(limit=10)][:10]
    if rejects:
        lines.append(f"== records left out (first {len(rejects)}; all of them, with reasons, in the rejects files)")
        lines += [f"  {r['origin']}: [{r['kind']}] {r['reason']}" for r in rejects]
        lines.append("")
    if data.report.duplicate_examples:
        lines.append("== duplicates left out (first few; all of them in the duplicates file)")
        lines += [f"  {d}" for d in data.report.duplicate_examples]
        lines.append("")
    if data.report.redacted_examples:
        lines.append("== PII redacted (first few, in context; cleaning.redact_pii: false keeps the text as it is)")
        lines += [f"  {x}" for x in data.report.redacted_examples[:10]]
        lines.append("")
    if data.report.flagged:
        lines.append("== flagged: possible prompt injection (kept; cleaning.prompt_injection: drop removes them)")
        lines += [f"  {f}" for f in data.report.flagged[:10]]
        lines.append("")
    samples = pick_samples(data, tokenizer, n_samples, seed)
    if at:
        chosen, missing = samples_at(data, tokenizer, list(at))
        samples += chosen
        for m in missing:
            lines.append(f"no sample comes from {m} (rejected, deduplicated, or no such record; see above)")
    legend = (f"{GREEN}green{RESET}: trained, {DIM}dim{RESET}: masked" if color
              else "«text» = trained tokens; the rest is masked (context only)")
    lines.append(f"== {len(samples)} sample(s) ({legend})")
    for k, s in enumerate(samples):
        lines.append(f"-- sample {k + 1}: {s.origin} ({s.n_tokens} tokens, {s.n_trained} trained)")
        lines.append(render_terminal(s, color, max_chars))
    if out_dir is not None:
        png = save_png(data.train.lengths, sequence_len, out_dir / "lengths.png", "sample lengths (train)")
        page = write_html(samples, [*data.report.lines(), "", *summary_lines(data, sequence_len)],
                          out_dir / "samples.html", png.name)
        shown = Path(shown_dir or out_dir)
        lines += ["", f"histogram: {shown / png.name}", f"samples page: {shown / page.name}"]
    return lines
