"""Typed configuration: dataclasses loaded from YAML, with dotted ``--set a.b=value`` overrides.

Every field has a type and a default; an unknown key or a value of the wrong type is an error that
names the full dotted path of the field and what it accepts, so a typo never silently does nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the field and what is allowed."""


# ----------------------------------------------------------------------------------------------
# Preprocessing (saved next to the weights so a loaded model preprocesses exactly like training)
# ----------------------------------------------------------------------------------------------
@dataclass
class ImagePrep:
    size: int = 32
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited on this colour
    augment: bool = True  # train-time only: random resized crop, flip off (emoji are not mirror-symmetric), jitter
    crop_scale: tuple[float, float] = (0.7, 1.0)
    color_jitter: float = 0.2


@dataclass
class TextPrep:
    context_length: int = 16
    vocab_size: int = 2000
    lowercase: bool = True


@dataclass
class AudioPrep:
    sample_rate: int = 16000
    n_mels: int = 40
    n_fft: int = 400  # 25 ms at 16 kHz
    hop_length: int = 160  # 10 ms at 16 kHz
    max_seconds: float = 2.0
    normalize: Literal["none", "utterance"] = "none"  # utterance: each mel channel to zero mean, unit variance per clip


@dataclass
class VideoPrep:
    frames: int = 8  # T frames sampled uniformly over the clip
    size: int = 32


@dataclass
class PrepConfig:
    image: ImagePrep = field(default_factory=ImagePrep)
    text: TextPrep = field(default_factory=TextPrep)
    audio: AudioPrep = field(default_factory=AudioPrep)
    video: VideoPrep = field(default_factory=VideoPrep)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    train: str = "emoji-style:train"  # a built-in suite[:split] or a CSV/TSV/JSONL/WebDataset spec
    val: str | None = "emoji-style:test"
    root: str | None = None  # built-in data location; default $CODEBRIDGE_HOME or ~/.cache/codebridge
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])
    skip_bad: bool = False  # skip (and count, and log) unreadable samples instead of stopping
    num_workers: int = 0
    cache: bool = True  # keep decoded inputs in memory so later epochs skip decoding
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_audio_key: str = "audio"
    csv_video_key: str = "video"
    csv_separator: str | None = None  # None: ',' for .csv, tab for .tsv


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
@dataclass
class ImageEncoderConfig:
    patch_size: int = 4
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    freeze_patch_embed: bool = False  # FDT freezes the ViT patch embedding (conv1)


@dataclass
class TextEncoderConfig:
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    causal: bool = False  # CLIP's text tower is causal and summarises at EOT; default: masked mean


@dataclass
class AudioEncoderConfig:
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    subsample: int = 4  # time reduction of the convolutional front end (2 stride-2 convs)
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"  # learned: a table sized for prep.audio.max_seconds


@dataclass
class VideoEncoderConfig:
    temporal_depth: int = 1  # per-frame image encoder (ViT, own weights) + this many temporal layers
    heads: int = 4


@dataclass
class CodebookConfig:
    size: int = 1024
    dim: int | None = None  # None: the bridge's embed_dim
    decay: float = 0.99
    eps: float = 1e-5
    commitment_weight: float = 0.25
    cmcm_weight: float = 0.5  # CMG: cmcm = 0.5 * sum of the pair losses (Paper A's alpha is unverified)
    summary_weight: float = 1.0
    discrete_summary_weight: float = 1.0
    discrete_ste: bool = True  # the discrete InfoNCE reaches the tokens through the straight-through estimator
    fusion_lambda: float = 1.0  # S = S_cont + lambda * S_disc at retrieval time
    dead_code_threshold: int = 300  # batches without use before a code is restarted (0: never)
    kmeans_init: bool = False
    kmeans_iters: int = 10
    cmcm_margin: float = 0.0
    cmcm_symmetric: bool = False  # CMG: row softmax only; True averages both directions (ours)
    mm_ema: bool = False  # CMG extension: multimodal EMA update
    cross_commitment: bool = False  # CMG extension: commit to the paired modality's codes too


@dataclass
class FdtConfig:
    num_tokens: int = 16384
    dim: int = 512
    query_hidden: int | None = None  # None: same as dim
    pooling: Literal["max", "mean", "sum"] = "max"
    activation: Literal["sparsemax", "softmax", "sigmoid"] = "sparsemax"
    pad_mode: Literal["neg_inf", "zero"] = "neg_inf"  # "zero" reproduces the authors' x0 pad-mask quirk
    temperature: float = 1000.0
    temperature_decay: float = 1.0  # T = max(T0 * decay ** (step / every), floor); 1.0 = constant
    temperature_every: int = 2700
    temperature_floor: float = 0.01
    token_weight_decay: bool = True  # the authors' FDT table gets weight decay
    topk_sparsemax: bool = True  # partial top-k sparsemax (exact; falls back to larger k when needed)
    chunk_size: int = 8  # >0: memory-lean max-pool in chunks of this many tokens (bit-equal); 0: naive [B,T,C]
    temperature_staircase: bool = True  # the authors' solver recomputes T only when step % temperature_every == 0
    sparsemax_k: int = 64  # first k of top-k sparsemax; afterwards k follows the observed support


@dataclass
class BridgeConfig:
    name: Literal["clip", "codebook", "fdt"] = "clip"
    embed_dim: int = 128
    init_logit_scale: float = 1 / 0.07
    max_logit_scale: float = 100.0
    logit_scale_clamp: Literal["forward", "param"] = "forward"  # "param": clamp ln(scale) to [3, 6] (FDT)
    margin: float = 0.0  # optional margin on the positive logit (masked margin softmax)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    fdt: FdtConfig = field(default_factory=FdtConfig)


@dataclass
class ModelConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    batch_size: int = 128  # per process
    steps: int = 1000
    max_minutes: float = 0.0  # >0: stop (and save) when this wall-clock budget is spent
    lr: float = 1e-3
    warmup_start_lr: float = 0.0  # FDT warms up from 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    accum_steps: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_sync: Literal["overlap", "manual"] = "overlap"  # overlap: DDP during backward; manual: one all-reduce after
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    progress: bool = True


@dataclass
class EvalConfig:
    chunk_size: int = 4096
    zeroshot_templates: list[str] = field(
        default_factory=lambda: ["{}", "an emoji of {}", "a picture of {}", "an icon of {}"]
    )
    linear_probe_c: float = 1.0  # inverse L2 strength of the probe's logistic regression (standardised features)


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------
# Loading, validation and overrides
# ----------------------------------------------------------------------------------------------
T = typing.TypeVar("T")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_describe(a) for a in typing.get_args(tp) if a is not Ellipsis)}]"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}")
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not allowed; expected {_describe(tp)}")
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {value!r}")
        return None
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected {_describe(tp)} ({len(args)} values), got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {tp!r}")  # a programming error in this module


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = path or "top level"
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML/JSON-able mapping (tuples become lists)."""

    def plain(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(cfg))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings (values parsed as YAML: 3e-4, true, [1, 2], null) to a mapping."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a mapping")
        node[keys[-1]] = value
    return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe; ``inherit: other.yaml`` (relative to this file) is loaded first and overridden by this file."""
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; give a YAML file or a recipe name: {', '.join(recipe_names())}"
        )
    if path.resolve() in seen:
        raise ConfigError(f"{path}: inherit cycle through {', '.join(str(p) for p in seen)}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: inherit: expected a file name, got {parent!r}")
    return _deep_merge(read_yaml(path.parent / parent, (*seen, path.resolve())), data)


RECIPES = Path(__file__).parent / "configs"


def resolve_recipe(path: str | Path) -> Path:
    """A YAML file, or the name of a recipe shipped with the package (``emoji-fdt`` -> configs/emoji-fdt.yaml)."""
    path = Path(path)
    packaged = RECIPES / f"{path.name.removesuffix('.yaml')}.yaml"
    if not path.is_file() and path.parent == Path(".") and packaged.is_file():
        return packaged
    return path


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml") if not p.stem.endswith("base"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config or packaged recipe name (or the defaults), apply overrides, validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_recipe(path)
        data = read_yaml(path)
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(Config, data)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
