import pytest

from codebridge.config import Config, ConfigError, from_dict, load_config, save_config


def test_defaults_load():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.bridge.name == "clip"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\nmodel:\n  bridge:\n    name: fdt\n")
    cfg = load_config(path, ["train.lr=3e-4", "data.modalities=[image, audio]", "train.betas=[0.9, 0.95]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.bridge.name == "fdt"
    assert cfg.data.modalities == ["image", "audio"]
    assert cfg.train.betas == (0.9, 0.95)


def test_int_is_accepted_for_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lrr=1", "train: unknown key(s) lrr"),
        ("train.steps=abc", "train.steps: expected an integer"),
        ("train.steps=1.5", "train.steps: expected an integer"),
        ("model.bridge.name=vq", "model.bridge.name: 'vq' is not allowed; expected one of 'clip', 'codebook', 'fdt'"),
        ("train.progress=3", "train.progress: expected true or false"),
        ("train.betas=[1]", "train.betas: expected tuple"),
        ("data.modalities=image", "data.modalities: expected list"),
    ],
)
def test_errors_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  image:\n    depth: deep\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.image.depth: expected an integer"):
        load_config(path)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.lr"])


def test_round_trip(tmp_path):
    cfg = load_config(None, ["model.bridge.fdt.num_tokens=64"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_inherit_merges_deeply(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.01\n  steps: 7\nmodel:\n  bridge:\n    name: fdt\n")
    (tmp_path / "child.yaml").write_text("inherit: base.yaml\ntrain:\n  lr: 0.5\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.lr, cfg.train.steps, cfg.model.bridge.name) == (0.5, 7, "fdt")


def test_inherit_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="inherit cycle"):
        load_config(tmp_path / "a.yaml")


def test_packaged_recipe_by_name():
    cfg = load_config("emoji-fdt")
    assert cfg.model.bridge.name == "fdt"
    with pytest.raises(ConfigError, match="emoji-clip"):
        load_config("emoji-nope")


def test_an_old_config_with_data_cache_loads() -> None:
    """Run and model folders written before data.cache_mb (data.cache: true/false) still load."""
    assert from_dict(Config, {"data": {"cache": True}}).data.cache_mb == 2048.0
    assert from_dict(Config, {"data": {"cache": False}}).data.cache_mb == 0.0
    with pytest.raises(ConfigError, match="cache"):
        from_dict(Config, {"data": {"cache": "yes"}})
