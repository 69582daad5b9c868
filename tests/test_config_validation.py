"""Config validation by class: every field of ``Config`` gets a value of the wrong type, and every numeric field
values just outside its range and NaN/inf; each must be a ``ConfigError`` naming the full dotted path.

The cases are generated from the dataclasses themselves, so a field added anywhere (also in a component's own
config class) is covered without touching this file.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

import pytest

from codebridge.cli import main
from codebridge.config import (
    Choice,
    Config,
    ConfigError,
    field_range,
    from_dict,
    load_config,
    recipe_names,
    resolve_recipe,
    section_types,
    sections_field,
    to_dict,
    validate,
)


@dataclasses.dataclass(frozen=True)
class Case:
    """A config mapping that must be rejected, and what the message must contain."""

    name: str
    data: dict[str, Any]
    needle: str


def default_type(kind: Any) -> Any:
    """A section's config type; for a ``Choice`` among encoders, its default's (the others need their key)."""
    return kind.options()[kind.default] if isinstance(kind, Choice) else kind


def fields_of(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """(dotted path, annotation, field) of every field, sections and their fields alike (a registered section
    such as ``prep.image`` comes with the field that holds the sections)."""
    hints = typing.get_type_hints(cls)
    flat = sections_field(cls)
    named = [(f.name, hints[f.name], f) for f in dataclasses.fields(cls) if f is not flat]
    for name, tp, f in [*named, *((name, default_type(kind), flat) for name, kind in section_types(cls).items())]:
        path = prefix + name
        yield path, tp, f
        if dataclasses.is_dataclass(tp):
            yield from fields_of(tp, path + ".")


def members(tp: Any) -> tuple[Any, ...]:
    """The non-null types of an annotation (``int | None`` -> (int,))."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return tuple(a for a in typing.get_args(tp) if a is not type(None))
    return (tp,)


def number_type(tp: Any) -> tuple[type | None, int | None]:
    """(int or float, element count) for a numeric field or a tuple/list of numbers; (None, None) otherwise."""
    (tp,) = members(tp)[:1]
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        kind, _ = number_type(args[0])
        return kind, len(args) if origin is tuple else 1
    return (tp, None) if tp in (int, float) else (None, None)


def nested(path: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": value}} for "a.b"."""
    for key in reversed(path.split(".")):
        value = {key: value}
    return value


def wrong_type(tp: Any) -> Any:
    """A value no member of ``tp`` accepts: text for numbers, a number for everything else."""
    kind, count = number_type(tp)
    return "abc" if kind is not None and count is None else 3


def outside(kind: type, f: dataclasses.Field) -> Iterator[tuple[str, Any]]:
    """Values just outside the field's range, and NaN/inf for floats."""
    rng = field_range(f)
    step = (lambda v, d: v + d) if kind is int else (lambda v, d: math.nextafter(v, d * math.inf))
    if rng is not None:
        for bound, value in (
            ("ge", None if rng.ge is None else step(rng.ge, -1)),
            ("gt", rng.gt),
            ("le", None if rng.le is None else step(rng.le, 1)),
            ("lt", rng.lt),
        ):
            if value is not None:
                yield bound, kind(value) if kind is int else float(value)
    if kind is float and (rng is None or rng.finite):
        yield "nan", math.nan
        yield "inf", math.inf
        yield "huge", 10**400  # an integer no float can hold


def inside(kind: type, f: dataclasses.Field) -> Iterator[tuple[str, Any]]:
    """The closed bounds themselves: the range must accept them."""
    rng = field_range(f)
    for bound, value in (("ge", None if rng is None else rng.ge), ("le", None if rng is None else rng.le)):
        if value is not None:
            yield bound, kind(value)


def with_element(f: dataclasses.Field, count: int | None, value: Any) -> Any:
    """``value`` as the field's value, or as the first element of its default tuple/list."""
    if count is None:
        return value
    default = list(f.default) if f.default not in (dataclasses.MISSING, None) else [value] * count
    return [value, *default[1:]] if default else [value]


def generated_cases() -> list[Case]:
    cases = []
    for path, tp, f in fields_of(Config):
        cases.append(Case(f"{path}:wrong-type", nested(path, wrong_type(tp)), f"{path}: "))
        kind, count = number_type(tp)
        if kind is None:
            continue
        where = path if count is None else f"{path}[0]"
        for bound, value in outside(kind, f):
            cases.append(Case(f"{path}:{bound}", nested(path, with_element(f, count, value)), f"{where}: "))
    return cases


FIELDS = list(fields_of(Config))
CASES = generated_cases()
BOUNDARIES = [
    (f"{path}:{bound}", nested(path, with_element(f, count, value)), path)
    for path, tp, f in fields_of(Config)
    for kind, count in [number_type(tp)]
    if kind is not None
    for bound, value in inside(kind, f)
]


def test_the_generator_covers_every_field_and_range():
    """A guard on the generator itself: it yields a case for every field and the ranges are really declared."""
    paths = {path for path, _, _ in FIELDS}  # as CASES saw them (a test module may register a modality later)
    assert {c.name.split(":")[0] for c in CASES} == paths
    assert len(paths) > 100
    assert sum(c.name.endswith((":ge", ":gt", ":le", ":lt")) for c in CASES) > 50
    print(f"{len(CASES)} generated cases over {len(paths)} fields, {len(BOUNDARIES)} boundaries")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_field_rejects_bad_values_by_name(case: Case):
    with pytest.raises(ConfigError) as err:
        from_dict(Config, case.data)
    assert case.needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("name", "data", "path"), BOUNDARIES, ids=[b[0] for b in BOUNDARIES])
def test_closed_bounds_are_inside_the_range(name: str, data: dict[str, Any], path: str):
    try:
        from_dict(Config, data)
    except ConfigError as exc:  # a bound may still break a rule between fields (width 1 with 4 heads), not its range
        assert "out of range" not in str(exc), exc


def test_out_of_range_messages_say_what_is_allowed():
    with pytest.raises(ConfigError, match=r"^model\.image\.depth: -1 is out of range; expected an integer >= 1$"):
        load_config(None, ["model.image.depth=-1"])
    with pytest.raises(ConfigError, match=r"^train\.lr: nan is out of range; expected a finite number > 0$"):
        load_config(None, ["train.lr=nan"])
    with pytest.raises(
        ConfigError, match=r"^train\.betas\[1\]: 1\.0 is out of range; expected a finite number >= 0 and < 1$"
    ):
        load_config(None, ["train.betas=[0.9, 1]"])


def test_defaults_and_every_recipe_validate():
    assert from_dict(Config, to_dict(Config())) == Config()
    for name in recipe_names():
        cfg = load_config(resolve_recipe(name))
        assert validate(cfg) == cfg


# Every rule of a ``check`` method: (overrides, message). The message names full paths and values.
RULES = [
    (["model.image.heads=3"], "model.image.heads=3 must divide model.image.width=128"),
    (["model.text.heads=3"], "model.text.heads=3 must divide model.text.width=128"),
    (["model.audio.heads=3"], "model.audio.heads=3 must divide model.audio.width=128"),
    (["model.video.heads=5", "data.modalities=[video, text]"], "model.video.heads=5 must divide model.image.width=128"),
    (["model.audio.subsample=3"], "model.audio.subsample=3 must be a power of two"),
    (["data.csv_separator=',,'"], "data.csv_separator=',,' must be one character"),
    (["data.csv_separator=''"], "data.csv_separator='' must be one character"),
    (["data.modalities=[]"], "data.modalities=[] must name at least one modality"),
    (
        ["data.modalities=[image, image]"],
        "data.modalities=['image', 'image'] must name at least one modality, each once",
    ),
    (["prep.image.crop_scale=[0.9, 0.5]"], "prep.image.crop_scale=[0.9, 0.5] must be (min, max) with min <= max"),
    (["train.min_lr=0.01"], "train.min_lr=0.01 must not exceed train.lr=0.001"),
    (["eval.zeroshot_templates=[]"], "eval.zeroshot_templates=[] must hold at least one template"),
    (["eval.zeroshot_templates=['{}', 'an emoji']"], "every template needs a '{}'"),
    (["prep.image.size=30"], "prep.image.size=30 must be a multiple of model.image.patch_size=4"),
    (["prep.video.size=30", "data.modalities=[video, text]"], "prep.video.size=30 must be a multiple of model.image"),
]


@pytest.mark.parametrize(("overrides", "needle"), RULES, ids=[r[1].split(" ")[0] for r in RULES])
def test_every_cross_field_rule_names_the_fields(overrides: list[str], needle: str):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_cross_section_rules_apply_only_to_used_modalities():
    assert load_config(None, ["prep.video.size=30"]).prep.video.size == 30  # image-text: no video frames to tile
    assert load_config(None, ["prep.image.size=30", "data.modalities=[video, text]"]).prep.image.size == 30


def test_rules_report_every_broken_rule_of_a_section_at_once():
    with pytest.raises(ConfigError, match=r"model\.audio\.heads=3 must divide .*; model\.audio\.subsample=3"):
        load_config(None, ["model.audio.heads=3", "model.audio.subsample=3"])


def test_a_yaml_file_with_a_bad_value_names_file_and_field(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  image: {width: 64, heads: 5}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: model\.image\.heads=5 must divide model\.image\.width=64"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lr=[1,", "override 'train.lr=[1,': the value is not valid YAML"),
        ("train.lr={a: [}", "the value is not valid YAML"),
        ("=3", "override '=3': '' is not a dotted field name"),
        ("train..lr=1", "override 'train..lr=1': 'train..lr' is not a dotted field name"),
        ("train.=1", "'train.' is not a dotted field name"),
    ],
)
def test_malformed_overrides_are_config_errors(override: str, needle: str):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override", ["model.image.heads=3", "train.lr=nan", "model.image.depth=-1", "train.lr=[1,", "train..lr=1"]
)
def test_cli_train_rejects_a_bad_config_before_writing_anything(
    override: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--set", f"output_dir={tmp_path / 'run'}", "--set", override])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
