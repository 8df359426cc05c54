"""Work units: the picklable pieces of work ``prepare`` hands its worker processes, each yielding raw
:class:`~datamodules.files.records.Record` s and counting the skips it finds while reading."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from datamodules.files.records import Record, Skips

UNIT_SIZE = 256  # records per Unit (non-webdataset sources)


class Unit:
    """A picklable piece of work for one ``prepare`` process: ``records(skips)`` yields its Records and counts
    the skips it finds while reading (webdataset: the whole shard is read there)."""

    source: str
    split: str

    def records(self, skips: Skips) -> Iterator[Record]:
        raise NotImplementedError

    def text_records(self, skips: Skips) -> Iterator[Record]:
        """The records for their texts alone (tokenizer training): a unit that reads image bytes itself may
        leave them unread."""
        return self.records(skips)


@dataclass
class RecordsUnit(Unit):
    """Records already scanned (imagefolder, interleaved, text): up to ``UNIT_SIZE`` of them."""

    source: str
    split: str
    items: list[Record] = field(default_factory=list)

    def records(self, skips: Skips) -> Iterator[Record]:
        yield from self.items

    def __len__(self) -> int:
        return len(self.items)


def chunk(source: str, split: str, records: list[Record]) -> list[Unit]:
    """Scanned records -> units of up to ``UNIT_SIZE`` records."""
    return [RecordsUnit(source, split, records[i : i + UNIT_SIZE]) for i in range(0, len(records), UNIT_SIZE)]
