"""Text deltas as a client sees them: stop strings cut out, and a partial match held back.

A stop string can arrive split over several tokens ("</" then "s>"). Each delta is emitted only
up to the longest tail that could still grow into a stop string; when a stop string completes,
the text before it is emitted and the generation ends. Deltas come from the runtime's
`StreamDecoder`, which already holds back incomplete UTF-8.
"""

from __future__ import annotations


class StopFilter:
    """Feed text deltas in, get the deltas that are safe to send out."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # everything generated so far (a stop string included, if one came)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False
        self._longest = max((len(s) for s in self.stops), default=0)

    def push(self, delta: str) -> str:
        """Add `delta`; returns what may be sent now (empty while a stop string may be forming).
        After a stop string completes, `stopped` is True and nothing more is sent."""
        if self.stopped or not delta:
            return ""
        self.text += delta
        window = max(0, self.sent - self._longest)
        hits = [i for s in self.stops if (i := self.text.find(s, window)) >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self._send(len(self.text))
        return self._send(len(self.text) - self._held_back())

    def flush(self) -> str:
        """The held-back tail, once the generation ended without completing a stop string."""
        return self._send(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for size in range(min(self._longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0

    def _send(self, end: int) -> str:
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out
