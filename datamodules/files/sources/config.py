"""One user data set, as ``prepare``'s YAML names it (:class:`SourceConfig`), and the names of the source kinds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# The kinds, each read by the module of its name (``registry.READERS``). Named here, in the type jsonargparse reads,
# so that --help lists them and a misspelt kind fails at parse; the readers import this module, so it cannot import
# them to learn their names.
Kind = Literal["imagefolder", "webdataset", "interleaved", "text"]
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass
class SourceConfig:
    """One source of user data.

    Args:
        name: unique; names the output sub-directory and the source in reports
        kind: the format, read by the module of its name in ``datamodules.files.sources``
        path: the data: a folder, a file, a shard brace pattern or URL (per kind)
        val_path: explicit validation data (same format); else the imagefolder validation folder or val_fraction
        val_fraction: held-out fraction, chosen by a stable hash of the sample key (not random); None: unset
            (``prepare`` holds out its default share), 0: no validation split
        caption_column: imagefolder metadata / webdataset json caption field (a str or a list of str)
        text_column: text corpus ``.jsonl`` field
        text_split: ``.txt`` documents: one per "line", or one per blank-line-separated "paragraph"
    """

    name: str
    kind: Kind
    path: str
    val_path: str | None = None
    val_fraction: float | None = None
    caption_column: str = "text"
    text_column: str = "text"
    text_split: Literal["line", "paragraph"] = "line"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"source {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.val_fraction is not None and not 0.0 <= float(self.val_fraction) < 1.0:
            raise ValueError(f"source {self.name!r}: val_fraction {self.val_fraction} must be in [0, 1)")
        if self.text_split not in ("line", "paragraph"):
            raise ValueError(f"source {self.name!r}: text_split {self.text_split!r} is not 'line' or 'paragraph'")
        self.path = str(self.path)
        if self.val_path is not None:
            self.val_path = str(self.val_path)

    @property
    def held_out(self) -> float:
        """The share held out by key hash when the source has no validation data of its own (unset: 0)."""
        return float(self.val_fraction or 0.0)
