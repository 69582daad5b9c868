"""Byte-level BPE tokenizer (HuggingFace ``tokenizers``) trained offline on the run's captions.

Byte-level pre-tokenization means any unicode text encodes without unknown tokens. The normaliser (NFKC,
optional lowercase, whitespace runs collapsed to one space, edges stripped) is part of ``tokenizer.json``,
and so are the CLIP-style template (``<sot> text <eot>``), the truncation that keeps ``<eot>`` and the padding
with id 0, so the saved file alone reproduces ``encode`` exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from codebridge.config import ConfigError, from_dict, num, to_dict
from codebridge.data.modalities.base import Entry, Modality, encoder_name, register_modality
from codebridge.data.modalities.source import DecodeError

if TYPE_CHECKING:
    from torch import nn

    from codebridge.config import Config, PrepConfig
    from codebridge.data.preprocess import Preprocessors

PAD, SOT, EOT, UNK = "<pad>", "<sot>", "<eot>", "<unk>"
SPECIAL_TOKENS = (PAD, SOT, EOT, UNK)  # ids 0, 1, 2, 3: the trainer numbers them first, in this order
TOKENIZER_FILE = "tokenizer.json"
SETTINGS_FILE = "tokenizer_settings.json"
PRETRAINED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
PAD_KEY = "pretrained_pad_token"  # in SETTINGS_FILE: a pretrained checkpoint's tokenizer (Tokenizer.pretrained)


@dataclass
class TextPrep:
    """``prep.text``: the tokenizer's settings (saved with it)."""

    context_length: int = num(16, ge=2)  # <sot> and <eot> at least
    vocab_size: int = num(2000, ge=260)  # the 256 bytes and 4 special tokens are always in the vocabulary
    lowercase: bool = True
    # >0: training draws from each sample's first N captions only (e.g. the corpus's English ones; 0: all of them)
    train_captions: int = num(0, ge=0)


def _normalizer(lowercase: bool) -> normalizers.Normalizer:
    steps = [normalizers.NFKC(), *([normalizers.Lowercase()] if lowercase else [])]
    return normalizers.Sequence([*steps, normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])


class Tokenizer:
    """Text -> (ids [B,L], mask [B,L]) with L = ``prep.context_length``; see ``train`` and ``load``."""

    def __init__(self, tokenizer: HFTokenizer, prep: TextPrep, pad_token: str | None = None) -> None:
        """``pad_token``: a pretrained tower's tokenizer (``pretrained``), which keeps its own special tokens."""
        if prep.context_length < 2:
            raise ConfigError(f"prep.text.context_length={prep.context_length}: needs at least 2 (<sot> and <eot>)")
        self._tok = tokenizer
        self.prep = prep
        self.pad_token = pad_token
        if pad_token is not None:  # its own template ([CLS] text [SEP], ...), truncation keeps it
            tokenizer.enable_truncation(prep.context_length)
            tokenizer.enable_padding(
                pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token, length=prep.context_length
            )
            return
        sot, eot = tokenizer.token_to_id(SOT), tokenizer.token_to_id(EOT)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{SOT} $A {EOT}", special_tokens=[(SOT, sot), (EOT, eot)]
        )
        tokenizer.enable_truncation(prep.context_length)
        tokenizer.enable_padding(pad_id=0, pad_token=PAD, length=prep.context_length)

    @classmethod
    def train(cls, texts: Iterable[str], prep: TextPrep) -> Tokenizer:
        """Learn a BPE vocabulary of at most ``prep.vocab_size`` tokens (256 bytes + 4 specials at least)."""
        tok = HFTokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = _normalizer(prep.lowercase)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=prep.vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok, prep)

    @classmethod
    def pretrained(cls, folder: str | Path, prep: TextPrep) -> Tokenizer:
        """The tokenizer of a pretrained checkpoint folder (``transformers`` AutoTokenizer, fast), truncating and
        padding to ``prep.context_length`` with the checkpoint's own padding token."""
        from transformers import AutoTokenizer  # lazy: only pretrained towers need transformers

        present = [name for name in PRETRAINED_TOKENIZER_FILES if (Path(folder) / name).is_file()]
        if not present:  # AutoTokenizer would build an empty tokenizer from config.json alone, silently
            raise ConfigError(
                f"{folder}: no tokenizer files ({', '.join(PRETRAINED_TOKENIZER_FILES[:3])}, ...); a text tower "
                "needs its checkpoint's tokenizer (for an OpenCLIP conversion: codebridge convert openclip --bpe)"
            )
        auto = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        pad = auto.pad_token or auto.eos_token
        if pad is None or not getattr(auto, "is_fast", False):
            raise ConfigError(f"{folder}: the checkpoint's tokenizer has no fast version or no padding token")
        backend = HFTokenizer.from_str(auto.backend_tokenizer.to_str())
        suffix = getattr(backend.model, "end_of_word_suffix", None)
        if suffix and backend.decoder is not None:  # CLIP's BPE marks word ends ("red</w>"): decode them as spaces
            backend.decoder = decoders.Sequence(
                [backend.decoder, decoders.Replace(suffix, " "), decoders.Strip(" ", 0, 1)]
            )
        return cls(backend, prep, pad_token=pad)

    @property
    def vocab_size(self) -> int:
        """The real vocabulary size (may be below ``prep.vocab_size`` on a small corpus)."""
        return self._tok.get_vocab_size()

    def normalize(self, text: str) -> str:
        """The text as the tokenizer sees it; ``decode(encode([t]))`` gives this back when it fits."""
        normalizer = self._tok.normalizer
        return normalizer.normalize_str(text) if normalizer is not None else text

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """<sot> tokens <eot>, truncated (keeping <eot>) and right-padded with 0 -> ids, mask (True on real)."""
        encodings = self._tok.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long).view(len(texts), self.prep.context_length)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool).view_as(ids)
        return ids, mask

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids of one text back to text, special tokens and padding dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token(self, id: int) -> str:
        """Readable text of one token (e.g. " dog", or "<eot>"); a byte of a multi-byte character shows as U+FFFD."""
        if not 0 <= id < self.vocab_size:
            raise ValueError(f"token id {id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._tok.decode([id], skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` (complete HF tokenizer) and ``tokenizer_settings.json`` (the TextPrep)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / TOKENIZER_FILE))
        settings = to_dict(self.prep) | ({PAD_KEY: self.pad_token} if self.pad_token is not None else {})
        (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        for name in (TOKENIZER_FILE, SETTINGS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} is missing; a tokenizer folder is written by Tokenizer.save"
                )
        try:
            settings = json.loads((directory / SETTINGS_FILE).read_text())
            pad = settings.pop(PAD_KEY, None) if isinstance(settings, dict) else None
            prep = from_dict(TextPrep, settings)
        except (ConfigError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{directory / SETTINGS_FILE}: {exc}") from None
        return cls(HFTokenizer.from_file(str(directory / TOKENIZER_FILE)), prep, pad_token=pad)


class TextProcessor:
    """Captions -> ``{"ids": [L], "mask": [L]}`` with the run's tokenizer; a sample's raw text is its captions."""

    def __init__(self, prep: TextPrep, tokenizer: Tokenizer | None) -> None:
        if tokenizer is not None and tokenizer.prep != prep:
            raise ConfigError(
                f"prep.text {to_dict(prep)} differs from the tokenizer's settings {to_dict(tokenizer.prep)}; "
                "train the tokenizer with the run's prep.text (or load both from the same model folder)"
            )
        self.prep = prep
        self.tokenizer = tokenizer

    def decode(self, captions: list[str]) -> list[str]:
        if not captions:
            raise DecodeError("has no caption")
        return captions

    def from_user(self, item: Any) -> list[str]:
        if not isinstance(item, str):
            raise TypeError(f"text inputs must be strings, got {type(item).__name__}")
        return [item]

    def entry(self, captions: list[str], train: bool, generator: torch.Generator | None = None) -> Entry:
        """One caption: a random one at train time (of the first ``train_captions``, if set), the first at eval."""
        if self.tokenizer is None:
            raise ValueError(
                "the text modality needs a tokenizer: "
                "Preprocessors(prep, Tokenizer.train(all_texts(samples), prep.text))"
            )
        pool = min(len(captions), self.prep.train_captions or len(captions))
        choice = int(torch.randint(pool, (), generator=generator)) if train else 0
        ids, mask = self.tokenizer.encode([captions[choice]])
        return {"ids": ids[0], "mask": mask[0]}


@register_modality
class TextModality(Modality):
    """Captions: ``{"ids": [B,L], "mask": [B,L]}`` (BPE, right-padded) for models/encoders/text.py."""

    name = "text"
    webdataset_keys = ("txt",)  # read by the shard reader as one caption per line
    prep = TextPrep
    encoder = "text"
    stream = 1  # the seed stream it always had

    def processor(self, prep: PrepConfig, tokenizer: Tokenizer | None) -> TextProcessor:
        return TextProcessor(prep.text, tokenizer)

    def build_encoder(self, cfg: Config, preprocessors: Preprocessors) -> nn.Module:
        """Sized by the tokenizer's real vocabulary."""
        from codebridge.models.encoders import ENCODERS  # lazy: the encoders import this package

        return ENCODERS.get(encoder_name(cfg, self.name))(cfg, vocab_size=preprocessors.tokenizer.vocab_size)

    def describe(self, cfg: Config) -> str:
        if encoder_name(cfg, self.name) != self.encoder:  # a pretrained tower describes itself
            return super().describe(cfg)
        enc = cfg.model.text
        return f"transformer width {enc.width}, depth {enc.depth}, {cfg.prep.text.context_length} tokens (BPE)"
