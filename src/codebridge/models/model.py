"""The assembled model: one encoder per modality + a bridge, with the Python API (encode, similarity, save, load).

A model folder holds ``model.safetensors`` (the state dict), ``config.json`` (the full Config, the modalities and
the codebridge version) and the preprocessing (``preprocessing.json`` + tokenizer files): everything needed to use
the model offline, and nothing pickled. A pretrained tower adds ``pretrained/<modality>/``: its checkpoint's
config and preprocessing files (its weights are in ``model.safetensors``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from codebridge import __version__
from codebridge.config import Config, ConfigError, from_dict, to_dict
from codebridge.data.modalities import check_modalities, modality
from codebridge.data.modalities.text import TOKENIZER_FILE
from codebridge.data.preprocess import PREP_FILE, Preprocessors, Tokenizer
from codebridge.files import atomic_path, atomic_write_json, naming_errors
from codebridge.models.bridges import bridge_class
from codebridge.models.encoders.pretrained import ASSETS_DIR, pretrained_sections
from codebridge.models.features import BridgeOutput, Features

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

Batch = dict[str, Any]


class CodeBridgeModel(nn.Module):
    """``encoders[modality]`` (each modality's registered encoder) feeding one bridge (``BRIDGES``, named by
    cfg.model.bridge.name).

    ``preprocessors`` must carry the tokenizer when "text" is a modality; its vocabulary sizes the text encoder.
    """

    def __init__(self, cfg: Config, modalities: Sequence[str], preprocessors: Preprocessors) -> None:
        super().__init__()
        specs = check_modalities(list(modalities))
        if preprocessors.prep != cfg.prep:
            raise ConfigError(
                "the preprocessors' settings differ from the config's prep section; build them with "
                "Preprocessors(cfg.prep, tokenizer) so the encoders are sized for the inputs they get"
            )
        if "text" in modalities and preprocessors.tokenizer is None:
            raise ValueError("the text modality needs a tokenizer: Preprocessors(cfg.prep, Tokenizer.train(...))")
        self.cfg = cfg
        self.modalities = list(modalities)
        self.preprocessors = preprocessors
        self.specs = {spec.name: spec for spec in specs}
        self.encoders = nn.ModuleDict({spec.name: spec.build_encoder(cfg, preprocessors) for spec in specs})
        widths = {m: enc.width for m, enc in self.encoders.items()}
        self.bridge = bridge_class(cfg.model.bridge.name)(cfg.model.bridge, widths)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.preprocessors.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---------------------------------------------------------------------------------------------- training
    def forward(self, batch: Batch, step: int = 0) -> dict[str, BridgeOutput]:
        """Encode every model modality present in ``batch`` (the collate contract) and run the bridge."""
        present = [m for m in self.modalities if m in batch]
        if not present:
            raise KeyError(f"the batch has none of the model's modalities {self.modalities}; it has {sorted(batch)}")
        return self.bridge({m: self.features(m, batch[m]) for m in present}, step)

    def features(self, modality: str, entry: dict[str, torch.Tensor]) -> Features:
        """One modality's batch entry (as collated, on any device) -> its encoder's Features: moved to the model's
        device, finished there by the modality's ``on_device`` step (e.g. uint8 pixels -> normalised floats), then
        encoded. Every path from a batch entry to an encoder goes through here, so the step runs exactly once."""
        device = self.device
        entry = {k: v.to(device, non_blocking=True) for k, v in entry.items()}
        return self.encoders[modality](self.specs[modality].on_device(entry, self.cfg.prep))

    def loss(self, batch: Batch, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.bridge.loss(self(batch, step), step)

    def compile_step(self, backend: str = "inductor") -> None:
        """``torch.compile`` the training step in place (``train.compile``): each encoder (``Module.compile``:
        parameter names, the state dict, checkpoints and saved models stay as they are) and the bridge's hot path
        (``Bridge.compile_hot_path``: the tensor work of its forward and loss, without host reads;
        tests/test_compile_clean.py). ``on_device`` stays outside, a few elementwise ops per batch."""
        for encoder in self.encoders.values():
            encoder.compile(backend=backend)
        self.bridge.compile_hot_path(backend=backend)

    # ---------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def encode(self, modality: str, inputs: Any, batch_size: int = 256) -> torch.Tensor:
        """Retrieval embeddings [N, E] of raw items or of an already collated batch entry (a dict of tensors).

        Raw items: what the modality's processor takes (``from_user``), e.g. image paths, bytes, PIL images or
        uint8 [H,W,3] arrays; strings; audio paths, bytes or mono waveforms at ``prep.audio.sample_rate`` (1-D
        arrays/tensors); video paths, bytes or uint8 [T,H,W,3] arrays. They get the eval transforms (no
        augmentation). Runs in eval mode, restoring the mode after.
        """
        return torch.cat(self._outputs(modality, inputs, batch_size, lambda out: out.embedding))

    @torch.no_grad()
    def encode_parts(self, modality: str, inputs: Any, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """The bridge's continuous [N, Ec] and discrete [N, Ed] retrieval parts (``Bridge.retrieval_parts``) of the
        inputs ``encode`` takes, for fused retrieval (eval/fusion.py); a ValueError for a bridge without them."""

        def parts(out: BridgeOutput) -> tuple[torch.Tensor, torch.Tensor]:
            both = self.bridge.retrieval_parts(out)
            if both is None:
                raise ValueError(
                    f"the {self.cfg.model.bridge.name} bridge has no discrete part to fuse with its continuous one"
                )
            return both

        chunks = self._outputs(modality, inputs, batch_size, parts)
        return torch.cat([c for c, _ in chunks]), torch.cat([d for _, d in chunks])

    def _outputs(self, modality: str, inputs: Any, batch_size: int, view: Callable[[BridgeOutput], Any]) -> list[Any]:
        """``view`` of the bridge output of every chunk of ``inputs``, in eval mode (restored after)."""
        if modality not in self.encoders:
            raise KeyError(f"this model has no {modality} encoder; its modalities are {self.modalities}")
        chunks = (
            _chunks(inputs, batch_size) if isinstance(inputs, dict) else self._raw_chunks(modality, inputs, batch_size)
        )
        was_training = self.training
        self.eval()
        try:
            out = [view(self._bridge_output(modality, chunk)) for chunk in chunks]
        finally:
            self.train(was_training)
        if not out:
            raise ValueError(f"encode({modality!r}) got no inputs")
        return out

    def _bridge_output(self, modality: str, entry: dict[str, torch.Tensor]) -> BridgeOutput:
        return self.bridge({modality: self.features(modality, entry)})[modality]

    def _raw_chunks(self, modality: str, items: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
        if isinstance(items, (str, Path, bytes, Image.Image, np.ndarray, torch.Tensor)):
            items = [items]  # one item
        items = list(items)
        return [
            prepare_batch(self.preprocessors, modality, items[i : i + batch_size])
            for i in range(0, len(items), batch_size)
        ]

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Retrieval scores [N_a, N_b]: dot products of embeddings (cosine for plain L2-normalised ones)."""
        return a @ b.T

    # ---------------------------------------------------------------------------------------------- files
    def save(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``model.safetensors``, ``config.json`` and the preprocessing into ``directory``; ``state``: the
        full weights when the trainer shards the towers (default: ``state_dict()``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in (state or self.state_dict()).items()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        meta = {"codebridge_version": __version__, "modalities": self.modalities, "config": to_dict(self.cfg)}
        atomic_write_json(directory / CONFIG_FILE, meta)
        with naming_errors(directory):
            self.preprocessors.save(directory)
            for m, encoder in self.encoders.items():  # pretrained towers: their config and preprocessing files
                if hasattr(encoder, "save_assets"):
                    encoder.save_assets(directory / ASSETS_DIR / m)
        return directory

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> CodeBridgeModel:
        """Rebuild from ``config.json`` and the preprocessing, then load the weights (strict, via safetensors)."""
        directory = Path(directory)
        cfg, modalities = read_model_config(directory)
        required = [WEIGHTS_FILE, PREP_FILE, *([TOKENIZER_FILE] if "text" in modalities else [])]
        _require_files(directory, required)
        preprocessors = Preprocessors.load(directory)
        for m, section in pretrained_sections(cfg, modalities).items():  # built from the saved copy, offline
            section.path = str(directory / ASSETS_DIR / m)
        try:
            model = cls(cfg, modalities, preprocessors)
        except ConfigError as exc:
            raise ConfigError(f"{directory / CONFIG_FILE}: {exc}") from None
        state = load_file(str(directory / WEIGHTS_FILE), device="cpu")
        problems = state_dict_mismatch(model.state_dict(), state)
        if problems:
            raise ConfigError(
                f"{directory / WEIGHTS_FILE} does not fit {directory / CONFIG_FILE} ({problems}); "
                f"{CONFIG_FILE} was edited, or the two files were not saved together: "
                "restore the config.json saved with these weights"
            )
        model.load_state_dict(state, strict=True)
        return model.to(map_location).eval()


def state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What keeps ``found`` from loading strictly into a model with ``expected`` ("" when it fits)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: {tuple(found[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    parts = [
        *([f"missing {missing[:5]}"] if missing else []),
        *([f"unexpected {unexpected[:5]}"] if unexpected else []),
        *shapes[:5],
    ]
    return "; ".join(parts)


def _require_files(directory: Path, names: list[str]) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(f"model folder {directory} does not exist; pass RUN/model (written by training)")
    for name in names:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"model folder {directory} lacks {name}; pass RUN/model (written by training)")


def read_model_config(directory: Path) -> tuple[Config, list[str]]:
    """The Config and modalities of a model folder; a clear ConfigError when they do not fit this codebridge."""
    _require_files(directory, [CONFIG_FILE])
    path = directory / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    missing = [k for k in ("config", "modalities") if k not in meta] if isinstance(meta, dict) else ["config"]
    if missing:
        raise ConfigError(f"{path}: lacks key(s) {', '.join(missing)}; it was not written by CodeBridgeModel.save")
    try:
        cfg = from_dict(Config, meta["config"], path="config")
    except ConfigError as exc:
        version = meta.get("codebridge_version", "an unknown version")
        raise ConfigError(
            f"{path}: {exc}; the file was edited or comes from another codebridge version (it says {version}, "
            f"this is {__version__}): restore the config.json saved with these weights, or load it with that version"
        ) from None
    return cfg, list(meta["modalities"])


def _chunks(entry: dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split a collated batch entry along the batch dimension."""
    n = len(next(iter(entry.values())))
    return [{k: v[i : i + batch_size] for k, v in entry.items()} for i in range(0, n, batch_size)]


def prepare_batch(prep: Preprocessors, name: str, items: list[Any]) -> dict[str, torch.Tensor]:
    """Raw items -> one modality's batch entry with the eval transforms, collated exactly as ``collate`` does."""
    spec, processor = modality(name, "modality"), prep[name]
    raws = []
    for i, item in enumerate(items):
        try:
            raws.append(processor.from_user(item))
        except TypeError as exc:
            raise TypeError(f"{name} item {i}: {exc}") from None
    return spec.collate([processor.entry(raw, train=False) for raw in raws])
