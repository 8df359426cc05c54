"""The prepared directory's ``tokenizer.json``: a copy of the one given, or a byte-level BPE trained on the
sources' captions and texts, kept across reruns with the same origin (so prepared splits stay valid)."""

from __future__ import annotations

import shutil
from pathlib import Path

from datamodules.files.prepare.errors import PrepareError
from datamodules.files.prepare.settings import files_sha1
from datamodules.files.schema import TOKENIZER
from datamodules.files.sources import SourceConfig, caption_corpus


def prepare_tokenizer(sources: list[SourceConfig], out: Path, tokenizer_path: str | None, vocab_size: int,
                      texts: int) -> tuple[Path, str]:
    """``out/tokenizer.json`` and its origin: a copy of ``tokenizer_path``, or a byte-level BPE of ``vocab_size``
    trained on at most ``texts`` captions / texts of each source."""
    from lit_transfusion.tokenizer import TextTokenizer

    target = out / TOKENIZER
    origin_file = out / "tokenizer.origin"
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        origin = f"file:{path.resolve()}:{files_sha1(path.parent, (path.name,))}"
    else:
        origin = f"bpe:{vocab_size}:" + ",".join(f"{s.name}={s.path}" for s in sources)
    if target.is_file() and origin_file.is_file() and origin_file.read_text() == origin:
        return target, origin
    if tokenizer_path is not None:
        try:
            TextTokenizer.from_file(tokenizer_path)  # validates, adds nothing on disk
        except (FileNotFoundError, ValueError) as e:
            raise PrepareError(f"tokenizer_path: {e}") from None
        shutil.copyfile(tokenizer_path, target)
    else:
        corpus = [t for s in sources for t in caption_corpus(s, limit=texts)]
        if not corpus:
            raise PrepareError("no caption or text found in any source to train the tokenizer on "
                               f"({', '.join(s.name for s in sources)}); give tokenizer_path instead")
        TextTokenizer.train(corpus, vocab_size, save_to=target)
    origin_file.write_text(origin)
    return target, origin
