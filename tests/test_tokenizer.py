import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lit_transfusion.tokenizer import SPECIAL_TOKENS, TextTokenizer

CORPUS = ["a red circle left of a blue square", "three triangles", "a photo of a green square"] * 50


def test_trained_bpe_round_trips_and_has_specials(tmp_path):
    tk = TextTokenizer.train(CORPUS, vocab_size=300, save_to=tmp_path / "tok.json")
    ids = tk.encode("a red circle left of a blue square")
    assert tk.decode(ids) == "a red circle left of a blue square"
    assert len(ids) <= 9  # whole words merged, not bytes
    sp = tk.special
    assert len({sp.bos, sp.eos, sp.pad, sp.boi, sp.eoi}) == 5
    assert sp.first_code == -1  # a text tokenizer has no image codes (the discrete-token data adds them)
    again = TextTokenizer.from_file(tmp_path / "tok.json")
    assert again.encode("three triangles") == tk.encode("three triangles")
    assert again.vocab_size == tk.vocab_size
    # unseen characters still encode (byte-level)
    assert tk.decode(tk.encode("zebra ü")) == "zebra ü"


def test_foreign_tokenizer_gets_special_tokens(tmp_path):
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.save(str(tmp_path / "foreign.json"))
    tk = TextTokenizer.from_file(tmp_path / "foreign.json")
    assert all(tk.tk.token_to_id(t) is not None for t in SPECIAL_TOKENS)


def test_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        TextTokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        TextTokenizer.from_file(tmp_path / "bad.json")
