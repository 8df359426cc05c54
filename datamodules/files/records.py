"""What a source reader hands to ``prepare``: raw records (paths or bytes, unchecked text), and the tally of
samples skipped by reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ImageRef:
    """An image not yet decoded: a file ``path`` or the raw bytes ``data`` (a tar member); ``name`` is what a
    report shows (the path, or ``shard.tar:key.jpg``)."""

    name: str
    path: str | None = None
    data: bytes | None = None


@dataclass
class Record:
    """One raw sample.

    kind      "pair" | "interleaved" | "text"
    key       stable identity within its source (relative file name, ``shard:key``, ``file:line``)
    segments  pair: ``[ImageRef]``; interleaved: ``str`` and ``ImageRef`` in document order; text: ``[str]``
    captions  pair only: the alternative captions of the image (one is drawn per use)
    """

    kind: str
    key: str
    segments: list = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


class Skips:
    """Samples skipped, counted by reason, with the first ``keep`` offending names per reason."""

    def __init__(self, keep: int = 5):
        self.keep = keep
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str, n: int = 1) -> None:
        self.counts[reason] += n
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.keep:
            shown.append(where)

    def merge(self, other: Skips) -> Skips:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            shown = self.examples.setdefault(reason, [])
            shown += other.examples.get(reason, [])[: self.keep - len(shown)]
        return self

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict, keep: int = 5) -> Skips:
        s = cls(keep)
        s.counts.update(d.get("counts", {}))
        s.examples = {k: list(v) for k, v in d.get("examples", {}).items()}
        return s

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0
