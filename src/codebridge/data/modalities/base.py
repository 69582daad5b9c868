"""What a modality is: one ``Modality`` spec per file of this package, registered in ``MODALITIES``.

A spec answers for itself everything the readers, the dataset, the model, eval and the report need: the file
extensions and WebDataset member keys of its media, its preprocessing config (section ``prep.<name>``) and the
``Processor`` that decodes a reference and turns it into tensors, how items collate into a batch entry and what
is finished per batch on the model's device (``on_device``), its encoder
(a registered encoder name, whose config is section ``model.<name>``) and how the report shows an item.
Nothing outside a spec branches on a modality's name (captions excepted: readers know a caption column).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

from codebridge.config import Choice, ConfigError
from codebridge.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from codebridge.config import Config, PrepConfig
    from codebridge.data.modalities.text import Tokenizer
    from codebridge.data.preprocess import Preprocessors

Entry = dict[str, torch.Tensor]  # one item's tensors, or a modality's batch entry


class Processor(Protocol):
    """Decodes one modality's references and preprocesses its raw items (built by ``Modality.processor``)."""

    def decode(self, ref: Any) -> Any:
        """A sample's reference (a path or the file bytes; the captions for text) -> raw item; a ``DecodeError``
        saying what is wrong when it does not decode. The one decoding path: training, eval, ``data check``."""

    def from_user(self, item: Any) -> Any:
        """An item given to ``model.encode(modality, items)`` (a path, bytes, or an in-memory form) -> raw item."""

    def entry(self, raw: Any, train: bool, generator: torch.Generator | None = None) -> Entry:
        """Raw item -> its tensors; random (augmentation, caption choice) only when ``train``, from ``generator``."""


class Modality:
    """Base of a modality spec; subclass it in one file and decorate the class with ``@register_modality``."""

    name: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]] = ()  # media file extensions (lowercase, no dot); () for inline captions
    prep: ClassVar[type]  # the config dataclass of section prep.<name>
    encoder: ClassVar[str]  # a registered encoder (models/encoders); its config is section model.<name>

    @property
    def webdataset_keys(self) -> tuple[str, ...]:
        """The shard member extensions that hold this modality (default: its file extensions)."""
        return self.extensions

    @property
    def stream(self) -> int:
        """Which random stream a sample's augmentation of this modality draws from (with seed, epoch, index): a
        stable number, so adding a modality to a run leaves the others' augmentation unchanged."""
        return zlib.crc32(self.name.encode())

    def processor(self, prep: PrepConfig, tokenizer: Tokenizer | None) -> Processor:
        raise NotImplementedError

    def build_encoder(self, cfg: Config, preprocessors: Preprocessors) -> nn.Module:
        """The encoder of this modality for a model with config ``cfg`` (``encoder``, registered in ENCODERS)."""
        from codebridge.models.encoders import ENCODERS  # lazy: the encoders import this package

        return ENCODERS.get(encoder_name(cfg, self.name))(cfg)

    def describe(self, cfg: Config) -> str:
        """One line for the report: the encoder and the settings that shape it."""
        return f"encoder {encoder_name(cfg, self.name)!r}"

    def on_device(self, entry: Entry, prep: PrepConfig) -> Entry:
        """The batch half of preprocessing, run by the model on its device right before the encoder (default:
        none). Why: per item in the loader's workers, a spec does only what shrinks or must see one item (decode,
        crop to uint8); work that grows the bytes (to float, normalise, photometric augmentation) runs here, once
        per batch, where the model is. Must leave an already finished entry unchanged."""
        return entry

    def collate(self, entries: list[Entry]) -> Entry:
        """Items' tensors -> the batch entry: stacked, variable-length ones right-padded with zeros (masks False)."""
        return {key: pad_sequence([e[key] for e in entries], batch_first=True) for key in entries[0]}

    def thumbnail(self, raw: Any) -> Image.Image | None:
        """How the report shows a raw item (an RGB image), or None when it cannot be shown as a picture."""
        return None

    def rules(self, cfg: Config) -> dict[str, bool]:
        """Rules across config sections that hold when this modality is used (message -> holds, ``broken``)."""
        return {}


MODALITIES: Registry[Modality] = Registry("modality")


def register_modality(cls: type[Modality]) -> type[Modality]:
    """Class decorator: register one instance of the spec under ``cls.name`` with its prep config type."""
    if cls.name in ("bridge", "sections"):
        raise ValueError(f"a modality cannot be named {cls.name!r}: model.{cls.name} is taken")
    MODALITIES.register(cls.name, config=cls.prep)(cls())
    return cls


def modality_names() -> list[str]:
    """The registered modalities, in registration order (the built-in ones first)."""
    return list(MODALITIES.configs())


def modality(name: str, where: str = "data.modalities") -> Modality:
    """The spec registered as ``name``; a ConfigError naming ``where`` and the registered ones otherwise."""
    if name not in modality_names():
        raise ConfigError(
            f"{where}: {name!r} is not a registered modality; expected one of {', '.join(modality_names())}"
        )
    return MODALITIES.get(name)


def check_modalities(names: list[str], where: str = "data.modalities") -> list[Modality]:
    """The specs of ``names``: at least one, each once, each registered (else a ConfigError naming ``where``)."""
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"{where}: {list(names)} must name at least one modality, each once")
    return [modality(name, where) for name in names]


def prep_configs() -> dict[str, type]:
    """``prep.<name>`` -> config type of every registered modality."""
    return MODALITIES.configs()


def encoder_options(name: str) -> dict[str, type]:
    """The encoders modality ``name`` can use -> their config types: its own (``Modality.encoder``) first, then
    every registered encoder whose config lists the modality in ``modalities`` (e.g. the pretrained towers)."""
    from codebridge.models.encoders import ENCODERS  # lazy: the encoders import torch modules and this package

    own = MODALITIES.get(name).encoder
    found = {own: ENCODERS.config(own)}
    found |= {enc: kind for enc, kind in ENCODERS.configs().items() if name in getattr(kind, "modalities", ())}
    return {enc: kind for enc, kind in found.items() if kind is not None}


def encoder_configs() -> dict[str, Any]:
    """``model.<name>`` -> the config type of each registered modality's encoder (those that have one), or a
    ``Choice`` among them when other registered encoders serve the modality (``model.<name>.encoder``)."""
    found: dict[str, Any] = {}
    for name in modality_names():
        options = encoder_options(name)
        own = MODALITIES.get(name).encoder
        if len(options) > 1 and own in options:
            found[name] = Choice(own, lambda name=name: encoder_options(name))
        elif own in options:
            found[name] = options[own]
    return found


def encoder_name(cfg: Config, name: str) -> str:
    """The encoder modality ``name`` uses in ``cfg``: ``model.<name>.encoder`` when set, else its own."""
    section = cfg.model.sections.get(name)
    return getattr(section, "encoder", None) or MODALITIES.get(name).encoder
