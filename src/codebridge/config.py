"""Typed configuration: dataclasses loaded from YAML, with dotted ``--set a.b=value`` overrides.

Every field has a type and a default; an unknown key or a value of the wrong type is an error that
names the full dotted path of the field and what it accepts, so a typo never silently does nothing.

The rules live on the dataclasses, so a config defined in any module (a bridge's, an encoder's) is validated the
same way by ``from_dict``:
- a numeric field states its range with ``num(default, ge=..., gt=..., le=..., lt=...)``; floats must also be
  finite (``finite=False`` allows NaN/inf); for tuples and lists the range holds for every element;
- rules between fields are a ``check(self) -> list[str]`` method returning the broken rules as messages that name
  fields in braces (``"{heads} must divide {width}"``); ``from_dict`` fills in the full dotted path and value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from codebridge.files import atomic_write_text


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the field and what is allowed."""


class OutOfRange(ConfigError):
    """A value of the right type outside its field's range (not retried against other members of a union)."""


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric field: bounds (None: open) and whether NaN/inf are allowed."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True

    def admits(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return not self.finite
        if isinstance(x, int) and self.finite and abs(x) > sys.float_info.max:
            return False
        return not (
            (self.ge is not None and x < self.ge)
            or (self.gt is not None and x <= self.gt)
            or (self.le is not None and x > self.le)
            or (self.lt is not None and x >= self.lt)
        )

    def describe(self, kind: str) -> str:
        """E.g. "an integer >= 1", "a finite number >= 0 and < 1"."""
        ops = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        bounds = [f"{op} {v:g}" if isinstance(v, float) else f"{op} {v}" for op, v in ops if v is not None]
        return " and ".join([f"{kind} {bounds[0]}" if bounds else kind, *bounds[1:]])


RANGE = "range"  # the metadata key of a field's Range
FINITE = Range()  # every float field without a stated range


def num(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    finite: bool = True,
) -> Any:
    """A dataclass field with a default and a range, e.g. ``depth: int = num(4, ge=1)``."""
    return field(default=default, metadata={RANGE: Range(ge, gt, le, lt, finite)})


def broken(rules: dict[str, bool]) -> list[str]:
    """The messages of the rules that do not hold; ``check`` methods list their rules as message -> holds."""
    return [message for message, holds in rules.items() if not holds]


HEADS_DIVIDE_WIDTH = "{heads} must divide {width} (each head gets width / heads channels)"


# ----------------------------------------------------------------------------------------------
# Sections: one config per registered component, beside the fixed fields
# ----------------------------------------------------------------------------------------------
SECTIONS = "sections"  # the metadata key of a sections field: its lookup


def sections(lookup: Callable[[], dict[str, type]]) -> Any:
    """A field holding one config per registered component (``prep.image``, ``model.bridge.fdt``), written flat
    beside the other fields. ``lookup()`` maps each registered name to its config dataclass; it imports the
    components, so it is called lazily (this module imports none of them). Use it in a ``Sectioned`` dataclass."""
    return field(default_factory=dict, metadata={SECTIONS: lookup})


def sections_field(cls: type) -> dataclasses.Field | None:
    """The ``sections`` field of a config dataclass, if it has one."""
    return next((f for f in dataclasses.fields(cls) if SECTIONS in f.metadata), None)


def section_types(cls: type) -> dict[str, type]:
    """The sections a config dataclass holds beside its fields: registered name -> config type ({} if none)."""
    f = sections_field(cls)
    return f.metadata[SECTIONS]() if f else {}


class Choice:
    """A section whose config type is chosen by its ``encoder`` key (``model.text: {encoder: hf-text, ...}``):
    ``options()`` maps each name to its config type; without the key the section is ``default``'s. A chosen
    config type declares the key as a field (``encoder: str = "hf-text"``), so it is written back; the default's
    type need not (its key is dropped)."""

    def __init__(self, default: str, options: Callable[[], dict[str, type]], key: str = "encoder") -> None:
        self.default, self.options, self.key = default, options, key

    def __call__(self) -> Any:
        return self.options()[self.default]()

    def pick(self, value: Any, path: str) -> tuple[type, Any]:
        """(config type, value to build it from) for a section's mapping; a ConfigError naming the choices."""
        options = self.options()
        name = value.get(self.key, self.default) if isinstance(value, dict) else self.default
        if name not in options:
            raise ConfigError(f"{path}.{self.key}: {name!r} is not allowed; expected one of {', '.join(options)}")
        kind = options[name]
        if isinstance(value, dict) and self.key in value and self.key not in {f.name for f in dataclasses.fields(kind)}:
            value = {k: v for k, v in value.items() if k != self.key}
        return kind, value


class Sectioned:
    """Base of a config dataclass with a ``sections`` field: ``cfg.image`` reads and writes that field's
    ``"image"`` entry, and every registered section not given gets its defaults, so code reads
    ``cfg.prep.image.size`` whichever module defines the section."""

    def __post_init__(self) -> None:
        f = sections_field(type(self))
        given = getattr(self, f.name)
        kinds = f.metadata[SECTIONS]()
        filled = {name: given[name] if name in given else kind() for name, kind in kinds.items()}
        object.__setattr__(self, f.name, {**filled, **given})

    def __getattr__(self, name: str) -> Any:  # only called when ordinary lookup fails
        if name.startswith("_") or name == SECTIONS:
            raise AttributeError(name)
        f = sections_field(type(self))
        found = self.__dict__.get(f.name, {})
        if name not in found:
            kinds = f.metadata[SECTIONS]()
            if name not in kinds:
                raise AttributeError(
                    f"{type(self).__name__} has no field or section {name!r}; sections: {', '.join(kinds)}"
                )
            found[name] = kinds[name]()  # registered after this config was made
        return found[name]

    def __setattr__(self, name: str, value: Any) -> None:
        f = sections_field(type(self))
        if name not in self.__dataclass_fields__ and name in self.__dict__.get(f.name, {}):  # type: ignore[attr-defined]
            self.__dict__[f.name][name] = value
        else:
            object.__setattr__(self, name, value)


def _modality_preps() -> dict[str, type]:
    from codebridge.data.modalities import prep_configs

    return prep_configs()


def _encoder_configs() -> dict[str, type]:
    from codebridge.data.modalities import encoder_configs

    return encoder_configs()


def _bridge_configs() -> dict[str, type]:
    from codebridge.models.bridges import bridge_configs

    return bridge_configs()


# ----------------------------------------------------------------------------------------------
# Preprocessing (saved next to the weights so a loaded model preprocesses exactly like training)
# ----------------------------------------------------------------------------------------------
@dataclass
class PrepConfig(Sectioned):
    """``prep.<modality>``: each registered modality's preprocessing config (data/modalities/)."""

    sections: Mapping[str, Any] = sections(_modality_preps)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
LEGACY_CACHE_MB = 2048.0  # what an old `data.cache: true` becomes: the budget of the emoji recipes


@dataclass
class DataConfig:
    train: str = "emoji-style:train"  # a built-in suite[:split] or a CSV/TSV/JSONL/WebDataset spec
    val: str | None = "emoji-style:test"
    root: str | None = None  # built-in data location; default $CODEBRIDGE_HOME or ~/.cache/codebridge
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])
    skip_bad: bool = False  # skip (and count, and log) unreadable samples instead of stopping
    num_workers: int = num(0, ge=0)
    prefetch: int = num(2, ge=1)  # batches each DataLoader worker prepares ahead (prefetch_factor); 0 workers: unused
    cache_mb: float = num(0.0, ge=0)  # MiB of decoded inputs kept (per worker) so later epochs skip decoding
    shuffle_buffer: int = num(1000, ge=0)  # streamed shards: samples held to shuffle within shards (0 or 1: none)
    resampled: bool = False  # streamed shards drawn with replacement, endless; an epoch is data.epoch_samples
    epoch_samples: int = num(0, ge=0)  # resampled: samples per epoch over all ranks (OpenCLIP's --train-num-samples)
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_audio_key: str = "audio"
    csv_video_key: str = "video"
    csv_separator: str | None = None  # None: ',' for .csv, tab for .tsv

    @staticmethod
    def upgrade(data: dict[str, Any]) -> dict[str, Any]:
        """``data.cache: bool`` (before 0.2: an unbounded cache, on by default) becomes ``data.cache_mb``."""
        if isinstance(data.get("cache"), bool) and "cache_mb" not in data:
            data["cache_mb"] = LEGACY_CACHE_MB if data.pop("cache") else 0.0
        return data

    def check(self) -> list[str]:
        distinct = 0 < len(set(self.modalities)) == len(self.modalities)
        one_character = self.csv_separator is None or len(self.csv_separator) == 1
        return broken(
            {
                "{modalities} must name at least one modality, each once": distinct,
                "{csv_separator} must be one character (e.g. ',' or a tab) or null": one_character,
                "{epoch_samples} must be set (> 0) when {resampled} is true": self.epoch_samples > 0
                or not self.resampled,
            }
        )


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
@dataclass
class BridgeConfig(Sectioned):
    name: str = "clip"  # a registered bridge (models/bridges/, or one added with @BRIDGES.register); checked below
    embed_dim: int = num(128, ge=1)
    init_logit_scale: float = num(1 / 0.07, gt=0)
    max_logit_scale: float = num(100.0, gt=0)
    logit_scale_clamp: Literal["forward", "param"] = "forward"  # "param": clamp ln(scale) to [3, 6] (FDT)
    margin: float = num(0.0, ge=0)  # optional margin on the positive logit (masked margin softmax)
    sections: Mapping[str, Any] = sections(_bridge_configs)  # model.bridge.<name>: each bridge's own config

    def __post_init__(self) -> None:
        from codebridge.models.bridges import bridge_class  # lazy: the registry imports torch and the bridges

        bridge_class(self.name)
        super().__post_init__()


@dataclass
class ModelConfig(Sectioned):
    """``model.<modality>``: the config of each registered modality's encoder; ``model.bridge``: the bridge's."""

    sections: Mapping[str, Any] = sections(_encoder_configs)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    batch_size: int = num(128, ge=1)  # per process
    steps: int = num(1000, ge=1)
    max_minutes: float = num(0.0, ge=0)  # >0: stop (and save) when this wall-clock budget is spent
    lr: float = num(1e-3, gt=0)
    warmup_start_lr: float = num(0.0, ge=0)  # FDT warms up from 1e-4
    min_lr: float = num(0.0, ge=0)
    warmup_steps: int = num(100, ge=0)
    weight_decay: float = num(0.1, ge=0)
    betas: tuple[float, float] = num((0.9, 0.98), ge=0, lt=1)
    eps: float = num(1e-8, gt=0)
    grad_clip: float = num(1.0, ge=0)  # 0: off
    accum_steps: int = num(1, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False  # torch.compile each encoder (inductor; on CPU it needs a C++ compiler)
    grad_sync: Literal["overlap", "manual"] = "overlap"  # overlap: DDP during backward; manual: one all-reduce after
    grad_checkpointing: list[str] = field(default_factory=list)  # modalities whose towers recompute activations
    shard: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 shards each tower's parameters over the ranks (torchrun)
    log_every: int = num(10, ge=1)
    eval_every: int = num(0, ge=0)  # 0: only at the end
    checkpoint_every: int = num(200, ge=0)  # 0: only at the end
    keep_checkpoints: int = num(2, ge=0)  # 0: all
    progress: bool = True
    dist_timeout_minutes: float = num(30.0, gt=0)  # torchrun: how long ranks wait for a frozen one (docs/training.md)

    def check(self) -> list[str]:
        return broken({"{min_lr} must not exceed {lr}": self.min_lr <= self.lr})


@dataclass
class EvalConfig:
    chunk_size: int = num(4096, ge=1)
    zeroshot_templates: list[str] = field(
        default_factory=lambda: ["{}", "an emoji of {}", "a picture of {}", "an icon of {}"]
    )
    # inverse L2 strength of the probe's logistic regression (standardised features)
    linear_probe_c: float = num(1.0, gt=0)

    def check(self) -> list[str]:
        return broken(
            {
                "{zeroshot_templates} must hold at least one template": bool(self.zeroshot_templates),
                "{zeroshot_templates}: every template needs a '{}' where the class name goes": all(
                    "{}" in t for t in self.zeroshot_templates
                ),
            }
        )


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = num(0, ge=0, lt=2**64)
    data: DataConfig = field(default_factory=DataConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> list[str]:
        """Rules across sections, stated by each modality the run uses (e.g. the ViT's patches must tile the
        images); an unregistered modality is named with the registered ones."""
        from codebridge.data.modalities import check_modalities  # lazy: the modalities import torch

        rules: dict[str, bool] = {
            "{train.grad_checkpointing} must name modalities of {data.modalities}": set(
                self.train.grad_checkpointing
            ).issubset(self.data.modalities)
        }
        for spec in check_modalities(self.data.modalities):
            rules.update(spec.rules(self))
        return broken(rules)


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


def _coerce(value: Any, tp: Any, path: str, rng: Range | None = None) -> Any:
    """Check ``value`` against the annotation ``tp`` (numbers also against ``rng``); return it converted."""
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
                return _coerce(value, option, path, rng)
            except OutOfRange:
                raise
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
        return [_coerce(v, item, f"{path}[{i}]", rng) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected {_describe(tp)} ({len(args)} values), got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]", rng) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return _in_range(value, rng, "an integer", path)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        with contextlib.suppress(OverflowError):  # an integer beyond any float is out of every range
            value = float(value)
        rng = rng or FINITE
        return _in_range(value, rng, "a finite number" if rng.finite else "a number", path)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {tp!r}")  # a programming error in this module


def _in_range(value: Any, rng: Range | None, kind: str, path: str) -> Any:
    if rng is not None and not rng.admits(value):
        raise OutOfRange(f"{path}: {value!r} is out of range; expected {rng.describe(kind)}")
    return value


def field_range(f: dataclasses.Field) -> Range | None:
    """The range ``num`` gave a field (None: any value of its type; floats must still be finite)."""
    return f.metadata.get(RANGE)


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping: unknown keys, wrong types, values out of range and broken ``check``
    rules are a ``ConfigError`` naming the full dotted path (``path`` is this section's)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if hasattr(cls, "upgrade"):  # a section renames fields of older versions (old run and model folders load)
        data = cls.upgrade(dict(data))
    flat = sections_field(cls)
    kinds = section_types(cls)
    fields.pop(flat.name if flat else "", None)
    unknown = sorted(set(data) - set(fields) - set(kinds))
    if unknown:
        where = path or "top level"
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join([*fields, *kinds])}")

    def dotted(key: str) -> str:
        return f"{path}.{key}" if path else key

    kwargs = {k: _coerce(v, hints[k], dotted(k), field_range(fields[k])) for k, v in data.items() if k in fields}
    if flat:
        kwargs[flat.name] = {k: _coerce_section(v, kinds[k], dotted(k)) for k, v in data.items() if k in kinds}
    obj = cls(**kwargs)
    problems = obj.check() if hasattr(obj, "check") else []
    if problems:
        raise ConfigError("; ".join(_name_fields(p, obj, path) for p in problems))
    return obj


def _coerce_section(value: Any, kind: Any, path: str) -> Any:
    if isinstance(kind, Choice):
        kind, value = kind.pick(value, path)
    return _coerce(value, kind, path)


def _name_fields(message: str, obj: Any, path: str) -> str:
    """Replace each ``{a.b}`` of a ``check`` message with ``path.a.b=value``."""

    def named(match: re.Match[str]) -> str:
        value = obj
        for part in match[1].split("."):
            value = getattr(value, part)
        shown = list(value) if isinstance(value, tuple) else value
        return f"{path}.{match[1]}={shown!r}" if path else f"{match[1]}={shown!r}"

    return re.sub(r"\{([A-Za-z_][\w.]*)\}", named, message)


def validate(cfg: T) -> T:
    """Check a config built or changed in Python exactly as a loaded one is checked."""
    return from_dict(type(cfg), to_dict(cfg))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML/JSON-able mapping (tuples become lists)."""

    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            out = {}
            for f in dataclasses.fields(x):
                value = plain(getattr(x, f.name))
                out.update(value if SECTIONS in f.metadata else {f.name: value})  # sections are written flat
            return out
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
    key, raw = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(k.strip() for k in keys):
        raise ConfigError(f"override {item!r}: {key.strip()!r} is not a dotted field name such as train.lr")
    try:
        return keys, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({problem}); "
            "write e.g. 3e-4, true, null, [1, 2] or a quoted 'string'"
        ) from None


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
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and _same_choice(merged[key], value):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _same_choice(base: dict[str, Any], top: dict[str, Any]) -> bool:
    """Whether ``top`` merges into ``base``: a section naming its encoder replaces an inherited one that does not
    name the same encoder (an inherited ViT's depth means nothing to a pretrained tower)."""
    return "encoder" not in top or top["encoder"] == base.get("encoder")


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
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
