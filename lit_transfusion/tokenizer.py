"""Text tokenizer: byte-level BPE (HuggingFace ``tokenizers``) trained on a corpus, or any local
``tokenizer.json``; always carries the special tokens ``<pad> <bos> <eos> <boi> <eoi>``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lit_transfusion.batch import SpecialIds

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>")


class TextTokenizer:
    """Wraps a ``tokenizers.Tokenizer``; adds missing special tokens to a foreign tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens(missing)
        self.tk = tokenizer
        ids = {name.strip("<>"): tokenizer.token_to_id(name) for name in SPECIAL_TOKENS}
        self.special = SpecialIds(**ids)

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {str(path)!r} does not exist: expected a HuggingFace tokenizers 'tokenizer.json' "
                "(or leave tokenizer_path unset to train a byte-level BPE on the corpus)"
            )
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"tokenizer file {str(path)!r} is not a valid tokenizer.json: {e}") from e

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512, save_to: str | Path | None = None) -> TextTokenizer:
        """Train a byte-level BPE on ``texts`` (vocab_size includes the 256 byte symbols and specials)."""
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        if save_to is not None:
            Path(save_to).parent.mkdir(parents=True, exist_ok=True)
            tk.save(str(save_to))
        return cls(tk)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids (no special tokens added)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)
