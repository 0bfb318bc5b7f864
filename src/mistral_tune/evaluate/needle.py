"""Long-context retention: a pass-key probe over context lengths x needle depths, and perplexity by
position on long documents the user gives; base vs tuned.

The probe hides one sentence holding a random number (the needle) at a relative depth of a filler
text of a given length in tokens, asks for the number at the end, and counts the answers that
contain it. Lengths default to a ladder up to twice the trained sequence_len (so the report shows
what happens past it), and probes are dropped from the longest down until their tokens fit the
budget. A model with a sliding window (Mistral 7B v0.1: 4096) attends directly only to the last
window of tokens; the report marks the lengths the window covers.
"""

from __future__ import annotations

import random

import torch

from ..data.formats import Chat, Text
from ..errors import DataError
from ..generate.run import generate_batch
from .base import Evaluation, ModelPair, Result, example_ids, perplexity, token_logprobs

# Our own filler: plain statements with no numbers in them, so the needle is the only number.
FILLER = (
    "The river bends twice before it reaches the old mill.",
    "Most of the orchard was planted by the grandparents of the current owner.",
    "On clear evenings the hills to the west turn a dull orange.",
    "The library closes early on the first day of every month.",
    "A narrow path leads from the station to the market square.",
    "Nobody remembers who painted the blue door at the end of the lane.",
    "The bakery sells out of rye bread well before noon.",
    "Fog settles in the valley on most mornings in the autumn.",
)


def default_lengths(sequence_len: int, max_positions: int) -> list[int]:
    """Four lengths doubling up to twice the trained sequence_len (capped at the model's positions)."""
    top = min(2 * sequence_len, max_positions)
    return sorted({max(32, top // 8), max(32, top // 4), max(32, top // 2), top})


class NeedleProbe:
    """Builds the probe prompts: filler sentences around the needle, the question last."""

    def __init__(self, tokenizer, cfg) -> None:
        self.tokenizer, self.cfg = tokenizer, cfg
        sizes = [len(tokenizer.encode_text(" " + s, bos=False, eos=False)) for s in FILLER]
        self.tokens_per_sentence = sum(sizes) / len(sizes)
        self.overhead = len(self._ids(0, 0, "00000"))

    def _text(self, n_sentences: int, depth: float, key: str) -> str:
        sentences = [FILLER[i % len(FILLER)] for i in range(n_sentences)]
        sentences.insert(round(depth * n_sentences), self.cfg.needle.format(key=key))
        return " ".join(sentences) + "\n\n" + self.cfg.question

    def _ids(self, n_sentences: int, depth: float, key: str) -> list[int]:
        return self.tokenizer.encode_prompt([{"role": "user", "content": self._text(n_sentences, depth, key)}])

    def prompt(self, length: int, depth: float, key: str) -> list[int]:
        """Prompt ids of about `length` tokens (within a sentence) with the needle at `depth`."""
        n = max(0, round((length - self.overhead) / self.tokens_per_sentence))
        ids = self._ids(n, depth, key)
        for _ in range(3):  # sentences do not tokenize quite additively: correct by what was measured
            step = round((length - len(ids)) / self.tokens_per_sentence)
            if step == 0 or n + step < 0:
                break
            n += step
            ids = self._ids(n, depth, key)
        return ids


def plan(lengths: list[int], n_depths: int, trials: int, budget: int) -> tuple[list[int], list[int]]:
    """(lengths kept, lengths dropped): the longest go first until one model's probes fit `budget` tokens."""
    kept = sorted(lengths)
    dropped = []
    while kept and sum(kept) * n_depths * trials > budget:
        dropped.insert(0, kept.pop())
    return kept, dropped


class NeedleEval(Evaluation):
    name = "needle"

    def __init__(self, tokenizer, cfg, sequence_len: int, model_config) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = model_config.sliding_window
        self.sequence_len = sequence_len
        lengths = cfg.lengths or default_lengths(sequence_len, model_config.max_position_embeddings)
        self.lengths, self.dropped = plan(lengths, len(cfg.depths), cfg.trials, cfg.token_budget)
        probe = NeedleProbe(tokenizer, cfg)
        rng = random.Random(cfg.seed)
        self.probes = []  # (length index, depth index, key, prompt ids)
        for li, length in enumerate(self.lengths):
            for di, depth in enumerate(cfg.depths):
                for _ in range(cfg.trials):
                    key = str(rng.randrange(10 ** (cfg.key_digits - 1), 10 ** cfg.key_digits))
                    self.probes.append((li, di, key, probe.prompt(length, depth, key)))

    def _grid(self, model, pair: ModelPair) -> list[list[float]]:
        tokenizer = pair.tokenizer
        hits = [[0.0] * len(self.cfg.depths) for _ in self.lengths]
        order = sorted(range(len(self.probes)), key=lambda i: -len(self.probes[i][3]))  # longest first
        i = 0
        while i < len(order):
            rows = max(1, self.cfg.batch_tokens // len(self.probes[order[i]][3]))
            group = order[i:i + rows]
            i += len(group)
            answers = generate_batch(model, [self.probes[j][3] for j in group], self.cfg.key_digits + 8,
                                     eos_id=tokenizer.eos_id, every=pair.every)
            for j, ids in zip(group, answers, strict=True):
                li, di, key, _ = self.probes[j]
                hits[li][di] += key in tokenizer.decode(ids).replace(" ", "")
        return [[h / self.cfg.trials for h in row] for row in hits]

    def run(self, pair: ModelPair) -> Result:
        result = Result(self.name)
        if not self.lengths:
            result.notes.append(f"no probe fits token_budget {self.cfg.token_budget:,}")
            return result
        base = self.base_once(pair, lambda m: self._grid(m, pair))
        with pair.side("tuned") as model:
            tuned = self._grid(model, pair)

        def mean(grid, rows=None):
            rows = range(len(grid)) if rows is None else rows
            cells = [v for r in rows for v in grid[r]]
            return sum(cells) / len(cells) if cells else None

        trained = [i for i, n in enumerate(self.lengths) if n <= self.sequence_len]
        result.metrics["accuracy"] = {"base": mean(base) if base else None, "tuned": mean(tuned)}
        if trained:
            result.metrics["accuracy_trained_len"] = {"base": mean(base, trained) if base else None,
                                                      "tuned": mean(tuned, trained)}
        in_window = [n <= self.window for n in self.lengths] if self.window else [True] * len(self.lengths)
        result.figures.append({
            "kind": "heatmap", "id": "needle", "title": "Pass-key retrieval (share of probes answered)",
            "x": [f"{d:.0%}" for d in self.cfg.depths], "x_label": "needle depth",
            "y": [f"{n:,}" + ("" if w else " *") for n, w in zip(self.lengths, in_window, strict=True)],
            "y_label": "context length (tokens)",
            "grids": {"base": base, "tuned": tuned} if base else {"tuned": tuned},
        })
        result.notes.append(f"{self.cfg.trials} probe(s) per cell, lengths {', '.join(map(str, self.lengths))}; "
                            f"trained sequence_len {self.sequence_len}")
        if self.window:
            beyond = [n for n, w in zip(self.lengths, in_window, strict=True) if not w]
            result.notes.append(f"sliding window {self.window}: it covers lengths up to {self.window}"
                                + (f"; beyond it (marked *: {', '.join(map(str, beyond))}) the needle is reached only "
                                   "through stacked layers" if beyond else ""))
        else:
            result.notes.append("no sliding window: every length is attended in full")
        if self.dropped:
            result.notes.append(f"lengths {', '.join(map(str, self.dropped))} left out to keep within token_budget "
                                f"{self.cfg.token_budget:,}")
        return result


def position_nll(model, seqs: list[list[int]], buckets: int, batch_tokens: int) -> tuple[list[int], list[float]]:
    """(bucket start positions, mean NLL per bucket) over the documents' predicted positions."""
    longest = max(len(s) for s in seqs) - 1
    width = max(1, -(-longest // buckets))
    sums = torch.zeros(-(-longest // width))
    counts = torch.zeros_like(sums)
    for logp in token_logprobs(model, seqs, batch_tokens):
        idx = torch.arange(len(logp)) // width
        sums.index_add_(0, idx, -logp)
        counts.index_add_(0, idx, torch.ones_like(logp))
    keep = counts > 0
    starts = [int(i) * width + 1 for i in torch.nonzero(keep)[:, 0]]
    return starts, (sums[keep] / counts[keep]).tolist()


class PositionPplEval(Evaluation):
    """Perplexity by position on long documents: does the tuned model still use distant context?"""

    name = "long_ppl"

    def __init__(self, examples: list[tuple[str, Chat | Text]], tokenizer, cfg, max_tokens: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.seqs = [example_ids(tokenizer, ex, origin)[:max_tokens] for origin, ex in examples]
        self.seqs = [s for s in self.seqs if len(s) >= 2]
        if not self.seqs:
            raise DataError(f"eval.needle.documents: {cfg.documents.path} has no document of two tokens or more")

    def run(self, pair: ModelPair) -> Result:
        result = Result(self.name)
        measure = lambda m: position_nll(m, self.seqs, self.cfg.position_buckets, self.cfg.batch_tokens)
        base = self.base_once(pair, measure)
        with pair.side("tuned") as model:
            starts, tuned = measure(model)
        series = {"tuned": [perplexity(x) for x in tuned]}
        if base is not None:
            series["base"] = [perplexity(x) for x in base[1]]
        half = len(tuned) // 2
        late = lambda xs: perplexity(sum(xs[half:]) / max(len(xs[half:]), 1))
        result.metrics["ppl_second_half"] = {"base": late(base[1]) if base else None, "tuned": late(tuned)}
        result.figures.append({"kind": "lines", "id": "long_ppl", "title": "Perplexity by position",
                               "x": starts, "x_label": "token position", "y_label": "perplexity",
                               "series": series, "log_y": True})
        result.notes.append(f"{len(self.seqs)} documents, up to {max(len(s) for s in self.seqs):,} tokens")
        return result
