"""BPE tokenizer: round trip on random words and unicode, context length, padding/mask, save/load."""

from __future__ import annotations

import random
import unicodedata
from pathlib import Path

import pytest
import torch

from codebridge.config import ConfigError
from codebridge.data.modalities.text import TextPrep, Tokenizer

CORPUS = [
    "grinning face",
    "face with tears of joy",
    "a dog face next to a cat face",
    "Red Heart",
    "smiling face with smiling eyes",
    "Hund und Katze",
    "chat qui pleure",
    "犬の顔",
] * 5


def reference_normalise(text: str, lowercase: bool = True) -> str:
    """NFKC, optional lowercase, whitespace runs -> one space, stripped (written independently of the module)."""
    text = unicodedata.normalize("NFKC", text)
    return " ".join((text.lower() if lowercase else text).split())


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, TextPrep(context_length=96, vocab_size=400))


def random_text(rng: random.Random) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789äöüßéñçøåæ日本語犬猫😀😂❤️🐶 \t\n'.,!?-"
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 6))]
    return rng.choice([" ", "  ", "\t"]).join(words)


def test_special_tokens_and_vocabulary(tok: Tokenizer) -> None:
    assert [tok.token(i) for i in range(4)] == ["<pad>", "<sot>", "<eot>", "<unk>"]
    assert 256 + 4 < tok.vocab_size <= 400  # every byte, the specials, and learnt merges
    assert any(tok.token(i) == " face" for i in range(tok.vocab_size))  # a frequent word became one token
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.token(tok.vocab_size)


def test_round_trip_of_random_words_and_unicode(tok: Tokenizer) -> None:
    rng = random.Random(0)
    texts = [random_text(rng) for _ in range(200)] + ["Ｆｕｌｌ　ｗｉｄｔｈ ﬁ", "emoji 👩🏽‍💻 ZWJ", ""]
    ids, mask = tok.encode(texts)
    for text, row, row_mask in zip(texts, ids, mask, strict=True):
        assert row_mask.sum() < 96, "test texts must fit the context"
        assert tok.decode(row) == reference_normalise(text) == tok.normalize(text)
        assert 3 not in row.tolist()  # byte-level: nothing is unknown


def test_case_is_kept_without_lowercase() -> None:
    tok = Tokenizer.train(CORPUS, TextPrep(context_length=32, vocab_size=300, lowercase=False))
    text = "Red  Heart and 犬"
    assert tok.decode(tok.encode([text])[0][0]) == reference_normalise(text, lowercase=False) == "Red Heart and 犬"


def test_layout_padding_and_mask(tok: Tokenizer) -> None:
    short = Tokenizer.train(CORPUS, TextPrep(context_length=6, vocab_size=300))
    ids, mask = short.encode(["red heart", "", "face with tears of joy and a dog face next to a cat"])
    assert ids.shape == mask.shape == (3, 6) and ids.dtype == torch.long and mask.dtype == torch.bool
    for row, row_mask in zip(ids, mask, strict=True):
        n = int(row_mask.sum())
        assert row_mask.tolist() == [True] * n + [False] * (6 - n)  # right-padded
        assert row[0] == 1 and row[n - 1] == 2  # <sot> ... <eot>, also when truncated
        assert (row[n:] == 0).all() and (row[1 : n - 1] > 3).all()
    assert mask[1].sum() == 2  # empty text: <sot><eot>
    assert mask[2].all()  # the long text fills the context
    assert short.decode(ids[2]) == "face with tears of joy and a dog face next to a cat"[: len(short.decode(ids[2]))]


def test_save_load_gives_identical_ids(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    texts = ["face with tears of joy", "犬の顔 😀", "unseen words: xylophone"]
    assert loaded.prep == tok.prep and loaded.vocab_size == tok.vocab_size
    for a, b in zip(tok.encode(texts), loaded.encode(texts), strict=True):
        assert torch.equal(a, b)


def test_load_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json is missing"):
        Tokenizer.load(tmp_path)


def test_context_length_below_two_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="context_length"):
        Tokenizer.train(CORPUS, TextPrep(context_length=1))


@pytest.mark.parametrize("first", [0, 2])
def test_training_draws_from_the_first_train_captions_only(first: int) -> None:
    from codebridge.data.modalities.text import TextProcessor

    prep = TextPrep(context_length=96, vocab_size=400, train_captions=first)
    captions = ["grinning face", "Red Heart", "Hund und Katze", "chat qui pleure"]
    processor = TextProcessor(prep, Tokenizer.train(CORPUS, prep))
    ids = {tuple(processor.entry([c], train=False)["ids"].tolist()): c for c in captions}
    g = torch.Generator().manual_seed(0)
    drawn = {ids[tuple(processor.entry(captions, train=True, generator=g)["ids"].tolist())] for _ in range(64)}
    assert drawn == set(captions[: first or len(captions)])
    assert ids[tuple(processor.entry(captions, train=False)["ids"].tolist())] == captions[0]  # eval: the first
