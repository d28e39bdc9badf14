"""Stop strings: cut a stream of text pieces before the first stop string, never letting out text
that might turn out to be the start of one."""
from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feeds text pieces through, holding back whatever could still become a stop string.

    feed() returns the text that is safe to send now and whether a stop string was found (then the
    text is everything before it, and the generation should end). Text is held back while it ends
    with a proper prefix of some stop string: a stop string that spans pieces is caught whole, and
    its first characters are never sent. finish() returns what is held back once the generation ended
    without a stop string.
    """

    def __init__(self, stops: Sequence[str]):
        self._stops = [s for s in stops if s]  # an empty stop string matches nothing
        self._pending = ""  # text received but not yet let out

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text of piece (and what was held back) that can be sent now, and whether a stop hit."""
        if not self._stops:
            return piece, False
        text = self._pending + piece
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return text[:min(hits)], True
        keep = self._held_back(text)
        self._pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def finish(self) -> str:
        """What is still held back (the generation ended without a stop string)."""
        text, self._pending = self._pending, ""
        return text

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
