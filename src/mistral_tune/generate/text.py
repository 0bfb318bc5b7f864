"""An answer's text as its tokens arrive: `TextStream` turns ids into text deltas without splitting a
multi-byte character, `StopMatcher` cuts streamed text at stop strings, `AnswerText` does both for one
answer."""

from __future__ import annotations

from collections import deque


class TextStream:
    """Text deltas for a growing list of ids; holds back an incomplete multi-byte character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return delta


class StopMatcher:
    """Finds the first stop string in text that arrives in pieces, holding back what may begin one.

    Each stop string has a Knuth-Morris-Pratt automaton whose state is the length of the longest
    prefix of the stop string that ends the text so far; that is also how much text must be held
    back. Work per piece is proportional to the piece's length (amortized), however long the stop
    strings are, and the result does not depend on how the text is cut into pieces: the text ends
    before the first stop string to be completed (of those completed at the same character, the
    one that starts first). Empty stop strings are ignored.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.fallback = [self._failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)
        self.held: deque[str] = deque()
        self.stopped = False

    @staticmethod
    def _failure(stop: str) -> list[int]:
        """fail[k]: the length of the longest proper prefix of stop[:k] that is also its suffix."""
        fail, k = [0, 0], 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = fail[k]
            k += stop[i] == stop[k]
            fail.append(k)
        return fail

    def push(self, text: str) -> str:
        """The text that is now known to come before any stop string (possibly empty)."""
        if self.stopped:
            return ""
        held, stops, fallback, state = self.held, self.stops, self.fallback, self.state
        for ch in text:
            held.append(ch)
            found = 0
            for i, stop in enumerate(stops):
                k = state[i]  # < len(stop): a whole match ends the text
                while k and stop[k] != ch:
                    k = fallback[i][k]
                k += stop[k] == ch
                state[i] = k
                if k == len(stop):
                    found = max(found, k)
            if found:
                self.stopped = True
                return "".join(held.popleft() for _ in range(len(held) - found))
        keep = max(state, default=0)
        return "".join(held.popleft() for _ in range(len(held) - keep))

    def flush(self) -> str:
        """At the end of the text: what was held back (no stop string followed)."""
        if self.stopped:
            return ""
        rest = "".join(self.held)
        self.held.clear()
        return rest


class AnswerText:
    """One answer's text from its token ids as they come: whole characters only, cut before the
    first stop string."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.text, self.stops, self.count = TextStream(tokenizer), StopMatcher(stops), 0

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def push(self, token: int) -> str:
        self.count += 1
        return self.stops.push(self.text.push(token))

    def end(self) -> str:
        """The text held back, once no token will follow."""
        return self.stops.push(self.text.flush()) + self.stops.flush()
