"""Held-out text: keep validation and test texts out of the pre-training corpus, whole or embedded in a longer text.

A pre-training text equal to a held-out text (compared after `normalise`, as the split compares them) is
dropped. A held-out text of at least MIN_CONTAINED_CHARS normalised characters found inside a longer text is cut
out of it, and the rest of that text stays, each remaining piece a text of its own (so the model never reads
the two sides of a cut as one passage). Shorter held-out texts ("yes", "Refund please") are only matched whole:
such phrases occur naturally in any corpus, and cutting them would remove text that is not a copy.

Finding them is a batched Aho-Corasick search (polars) for the first MIN_CONTAINED_CHARS characters of every
held-out text in the normalised texts; the few texts with a hit are then checked for the whole held-out text.
"""

import re
import unicodedata
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import accumulate

import polars as pl

MIN_CONTAINED_CHARS = 50
WORD = re.compile(r"\S+")  # the same whitespace as str.split, which `normalise` collapses


def normalise(text: str) -> str:
    """NFC and collapsed whitespace, so that copies differing only in spacing count as duplicates."""
    return " ".join(unicodedata.normalize("NFC", text).split())


class NormalisedText:
    """`normalise(text)` with a map back to `text`: normalising works word by word (NFC within each
    whitespace-separated word, words joined by one space), so a normalised position maps to its word."""

    def __init__(self, text: str):
        self.text = text
        self.words = list(WORD.finditer(text))
        self.normal = [unicodedata.normalize("NFC", word.group()) for word in self.words]
        self.key = " ".join(self.normal)
        self.starts = [0, *accumulate(len(word) + 1 for word in self.normal)][:-1]  # of each word in `key`

    def original(self, start: int, end: int) -> tuple[int, int]:
        """The span of `text` that holds `key[start:end]` (a span that starts and ends on non-space); a word
        that NFC changed maps whole."""
        first, last = bisect_right(self.starts, start) - 1, bisect_right(self.starts, end - 1) - 1
        begin = (self.words[first].start() + start - self.starts[first]
                 if self.normal[first] == self.words[first].group() else self.words[first].start())
        stop = (self.words[last].start() + end - self.starts[last]
                if self.normal[last] == self.words[last].group() else self.words[last].end())
        return begin, stop


def merged(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching spans joined, in order."""
    joined: list[list[int]] = []
    for start, end in sorted(spans):
        if joined and start <= joined[-1][1]:
            joined[-1][1] = max(joined[-1][1], end)
        else:
            joined.append([start, end])
    return [(start, end) for start, end in joined]


class HeldOutTexts:
    """Validation and test texts (normalised, as ingest writes them) to keep out of pre-training text."""

    def __init__(self, texts: Iterable[str]):
        self.whole = set(texts)
        self.by_anchor: dict[str, list[str]] = defaultdict(list)
        for text in sorted(self.whole):
            if len(text) >= MIN_CONTAINED_CHARS:
                self.by_anchor[text[:MIN_CONTAINED_CHARS]].append(text)
        self.anchors = sorted(self.by_anchor)

    def spans(self, key: str, anchors: Iterable[str]) -> list[tuple[int, int]]:
        """Where in `key` the held-out texts that start with one of `anchors` occur."""
        found = []
        for anchor in set(anchors):
            for text in self.by_anchor[anchor]:
                start = key.find(text)
                while start >= 0:
                    found.append((start, start + len(text)))
                    start = key.find(text, start + 1)
        return found

    def cut(self, text: str, anchors: list[str], counts: Counter) -> list[str]:
        """`text` without the held-out passages in it, as the pieces left between them."""
        normalised = NormalisedText(text)
        spans = merged(normalised.original(start, end) for start, end in self.spans(normalised.key, anchors))
        if not spans:  # an anchor without the rest of its text
            return [text]
        counts["passages"] += len(spans)
        counts["chars"] += sum(end - start for start, end in spans)
        bounds = [0, *(edge for span in spans for edge in span), len(text)]
        pieces = [text[start:end] for start, end in zip(bounds[::2], bounds[1::2], strict=True)]
        return [piece for piece in pieces if piece and not piece.isspace()]

    def anchors_in(self, keys: list[str]) -> list[list[str]]:
        """For each normalised text, the anchors (held-out texts' starts) found in it."""
        if not self.anchors:
            return [[] for _ in keys]
        return pl.Series(keys, dtype=pl.String).str.extract_many(self.anchors, overlapping=True).to_list()

    def holding(self, texts: list[str]) -> list[bool]:
        """Whether each (normalised) text is, or holds, a held-out text."""
        return [key in self.whole or bool(anchors and self.spans(key, anchors))
                for key, anchors in zip(texts, self.anchors_in(texts), strict=True)]

    def scrub(self, texts: list[str], counts: Counter) -> list[str]:
        """The batch without blank texts, held-out texts and held-out passages. `counts` receives `blank`,
        `equal` (texts dropped as equal to a held-out text), `kept` (texts that gave pre-training text, whole or
        in part), `passages` and `chars` (cut out of them)."""
        keys = [normalise(text) for text in texts]
        kept = []
        for text, key, anchors in zip(texts, keys, self.anchors_in(keys), strict=True):
            if not key:
                counts["blank"] += 1
            elif key in self.whole:
                counts["equal"] += 1
            else:
                pieces = self.cut(text, anchors, counts) if anchors else [text]
                counts["kept"] += bool(pieces)
                kept.extend(pieces)
        return kept
