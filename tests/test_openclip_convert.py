"""OpenCLIP checkpoints converted by renaming keys: a tiny OpenCLIP-layout CLIP (an independent plain-torch
reference of OpenCLIP's VisionTransformer and text Transformer) saved the way OpenCLIP saves it, converted, and
loaded by ``transformers`` gives the reference's embeddings; its BPE file gives a CLIPTokenizer that tokenizes like
CLIP's SimpleTokenizer; codebridge trains on top (image tower locked), saves, loads offline; what does not convert
is refused in one line."""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from collections import Counter, OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from codebridge.cli import main
from codebridge.config import ConfigError, load_config
from codebridge.models.encoders import openclip_convert
from codebridge.models.encoders.openclip_convert import BPE_FILE, bytes_to_unicode, convert, find_bpe
from codebridge.models.model import CodeBridgeModel
from codebridge.train import train
from test_pretrained import hf_config, one_thread, shapes  # noqa: F401  (fixtures)

transformers = pytest.importorskip("transformers")
regex = pytest.importorskip("regex")

WORDS = ["a", "red", "green", "blue", "yellow", "circle", "square", "triangle"]
CONTEXT, EMBED = 12, 8
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def learn_merges(words: list[str], n: int) -> list[tuple[str, str]]:
    """A tiny BPE training: merge the most frequent adjacent pair ``n`` times (words end in ``</w>``)."""
    split = [(*w[:-1], w[-1] + "</w>") for w in words]
    merges = []
    for _ in range(n):
        pairs = Counter(p for w in split for p in itertools.pairwise(w))
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = []
        for w in split:
            out, i = [], 0
            while i < len(w):
                if w[i : i + 2] == best:
                    out, i = [*out, w[i] + w[i + 1]], i + 2
                else:
                    out, i = [*out, w[i]], i + 1
            merged.append(tuple(out))
        split = merged
    return merges


MERGES = learn_merges(WORDS, 60)  # every word becomes one token
VOCAB = [*bytes_to_unicode().values(), *(c + "</w>" for c in bytes_to_unicode().values()), *map("".join, MERGES)]
VOCAB += ["<start_of_text>", "<end_of_text>"]


def write_bpe(path: Path) -> Path:
    import gzip

    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2 tiny\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return path


def reference_tokenize(text: str) -> list[int]:
    """CLIP's SimpleTokenizer, plainly: lowercase, split, bytes to characters, merges by rank, ids by VOCAB."""
    ranks, byte = {m: i for i, m in enumerate(MERGES)}, bytes_to_unicode()
    ids = []
    for piece in regex.findall(PATTERN, " ".join(text.lower().split()), regex.IGNORECASE):
        word = [byte[b] for b in piece.encode()]
        word[-1] += "</w>"
        while len(word) > 1:
            pair = min(itertools.pairwise(word), key=lambda p: ranks.get(p, math.inf))
            if pair not in ranks:
                break
            i = next(i for i in range(len(word) - 1) if (word[i], word[i + 1]) == pair)
            word = [*word[:i], pair[0] + pair[1], *word[i + 2 :]]  # first occurrence, then again
        ids += [VOCAB.index(t) for t in word]
    return [len(VOCAB) - 2, *ids, len(VOCAB) - 1]


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResBlock(nn.Module):
    """OpenCLIP's ResidualAttentionBlock: pre-norm nn.MultiheadAttention and an MLP c_fc -> act -> c_proj."""

    def __init__(self, width: int, heads: int, mlp: int, quick_gelu: bool) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        act = QuickGELU() if quick_gelu else nn.GELU()
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp), gelu=act, c_proj=nn.Linear(mlp, width)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int, layers: int, quick_gelu: bool) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResBlock(width, heads, mlp, quick_gelu) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class Visual(nn.Module):
    """OpenCLIP's VisionTransformer: patches + class token + positions, ln_pre, blocks, ln_post(class), @ proj."""

    def __init__(self, quick_gelu: bool, width: int = 32, patch: int = 8, image: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = Transformer(width, 2, 4 * width, 2, quick_gelu)  # head_width 16
        self.proj = nn.Parameter(torch.randn(width, EMBED))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenCLIPReference(nn.Module):
    """OpenCLIP's CLIP: ``visual`` and the text transformer at the top level (causal, argmax-EOT pooling)."""

    def __init__(self, quick_gelu: bool, width: int = 24) -> None:
        super().__init__()
        self.visual = Visual(quick_gelu)
        self.token_embedding = nn.Embedding(len(VOCAB), width)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, width))
        self.transformer = Transformer(width, 2, 2 * width, 2, quick_gelu)  # mlp_ratio 2
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, EMBED))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        with torch.no_grad():  # nothing at its default (norms at 1/0 would hide a swapped weight/bias)
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        causal = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)
        x = self.ln_final(self.transformer(x, causal))
        return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ self.text_projection


def model_config(quick_gelu: bool) -> dict:
    return {
        "embed_dim": EMBED,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": len(VOCAB), "width": 24, "heads": 2, "layers": 2,
                     "mlp_ratio": 2.0},
    }  # fmt: skip


def write_openclip(folder: Path, quick_gelu: bool = True, fmt: str = "pt", **extra: torch.Tensor):
    """(reference model, checkpoint, model config) as OpenCLIP writes them: a training checkpoint .pt
    ({"state_dict": {"module.<key>": ...}}) or a bare .safetensors state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ref = OpenCLIPReference(quick_gelu).eval()
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()} | extra
    checkpoint = folder / f"epoch_1.{fmt}"
    if fmt == "pt":
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, checkpoint)
    else:
        save_file(state, str(checkpoint))
    config = folder / "model.json"
    config.write_text(json.dumps(model_config(quick_gelu)))
    return ref, checkpoint, config


@pytest.mark.parametrize(("quick_gelu", "fmt"), [(True, "pt"), (False, "safetensors")])
def test_converted_clip_gives_the_reference_embeddings(quick_gelu: bool, fmt: str, tmp_path: Path) -> None:
    ref, checkpoint, config = write_openclip(tmp_path / "oc", quick_gelu, fmt)
    out = tmp_path / "hf"
    assert convert(checkpoint, config, out, bpe=write_bpe(tmp_path / BPE_FILE))
    model, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # every key mapped, none left over
    assert model.config.vision_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    pixels = torch.randn(3, 3, 16, 16)
    ids = torch.randint(0, len(VOCAB) - 2, (3, CONTEXT))
    for row, end in enumerate((4, 11, 7)):  # OpenCLIP's layout: <sot> ... <eot>, then zeros
        ids[row, 0], ids[row, end], ids[row, end + 1 :] = len(VOCAB) - 2, len(VOCAB) - 1, 0
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        torch.testing.assert_close(image, ref.visual(pixels), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(text, ref.encode_text(ids), atol=1e-5, rtol=1e-5)
        real = torch.arange(CONTEXT) <= torch.tensor([[4], [11], [7]])  # hf-text's batch mask: same summary
        masked = model.text_projection(model.text_model(input_ids=ids, attention_mask=real.long()).pooler_output)
        torch.testing.assert_close(masked, text, atol=1e-5, rtol=1e-5)
        assert model.logit_scale.item() == pytest.approx(ref.logit_scale.item())
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 16, "width": 16} and processor["image_mean"][0] == 0.48145466


def test_tokenizer_from_the_bpe_file_tokenizes_like_clip(tmp_path: Path) -> None:
    from codebridge.data.modalities.text import TextPrep, Tokenizer

    _, checkpoint, config = write_openclip(tmp_path / "oc")
    convert(checkpoint, config, tmp_path / "hf", bpe=write_bpe(tmp_path / BPE_FILE))
    clip = transformers.CLIPTokenizer.from_pretrained(tmp_path / "hf")
    texts = ["a red circle", "Yellow  triangle, green square!", "blue squares 42 'd"]
    for text in texts:
        assert clip(text)["input_ids"] == reference_tokenize(text), text
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    ours = Tokenizer.pretrained(tmp_path / "hf", TextPrep(context_length=8))
    short, long = reference_tokenize("a red"), reference_tokenize("yellow triangle, green squares")
    ids, mask = ours.encode(["a red", "yellow triangle, green squares"])
    eot = len(VOCAB) - 1  # transformers' padding token is the end of text (pooling takes the first one)
    assert ids[0].tolist() == short + [eot] * (8 - len(short)) and mask[0].sum() == len(short)
    assert len(long) > 8 and ids[1].tolist() == [*long[:7], eot] and mask[1].all()  # truncation keeps it
    assert ours.decode(ids[0]) == "a red" and ours.token(short[2]) == "red"


def test_trains_locked_on_the_converted_towers_saves_and_loads_offline(
    shapes: dict[str, Path],  # noqa: F811 (test_pretrained's shapes data set)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, checkpoint, config = write_openclip(tmp_path / "oc")
    towers = tmp_path / "towers"
    assert main(["convert", "openclip", "--checkpoint", str(checkpoint), "--config", str(config),
                 "--bpe", str(write_bpe(tmp_path / BPE_FILE)), "--out", str(towers)]) == 0  # fmt: skip
    image = f"model.image={{encoder: hf-vision, path: {towers}, lock: true}}"
    run = train(hf_config(shapes, tmp_path / "run", towers, towers, image))
    cfg = load_config(run / "config.yaml")
    assert (cfg.prep.image.size, cfg.prep.image.mean[0]) == (16, 0.48145466)
    original = transformers.CLIPVisionModel.from_pretrained(towers).state_dict()
    trained = CodeBridgeModel.load(run / "model").state_dict()
    assert all(torch.equal(trained[f"encoders.image.hf.{k}"], v) for k, v in original.items())  # locked
    original_text = transformers.CLIPTextModel.from_pretrained(towers).state_dict()
    assert not all(torch.equal(trained[f"encoders.text.hf.{k}"], v) for k, v in original_text.items())
    assert json.loads((run / "eval.json").read_text())["text_to_image_R@1"] >= 0

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for f in towers.iterdir():  # the model folder alone suffices
        f.unlink()
    towers.rmdir()
    model = CodeBridgeModel.load(run / "model")
    emb = model.encode("text", ["a red circle", "a blue square"])
    assert emb.shape[0] == 2 and torch.isfinite(emb).all()
    assert model.tokenizer.encode(["a red circle"])[0][0].tolist()[:5] == reference_tokenize("a red circle")


def test_open_clip_torch_bpe_is_found_without_importing_open_clip(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "site" / "open_clip"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('open_clip needs torchvision')\n")
    write_bpe(package / BPE_FILE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_bpe() == package / BPE_FILE and "open_clip" not in sys.modules
    _, checkpoint, config = write_openclip(tmp_path / "oc")
    assert convert(checkpoint, config, tmp_path / "hf")  # the tokenizer comes from the package
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_without_a_bpe_file_only_the_image_tower_is_written(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(openclip_convert, "find_bpe", lambda: None)  # as where open_clip_torch is not installed
    _, checkpoint, config = write_openclip(tmp_path / "oc")
    out = tmp_path / "hf"
    assert main(["convert", "openclip", "--checkpoint", str(checkpoint), "--config", str(config),
                 "--out", str(out)]) == 0  # fmt: skip
    assert "serves hf-vision only; for hf-text rerun with --bpe" in capsys.readouterr().err
    assert not (out / "tokenizer.json").exists() and (out / "model.safetensors").is_file()
    from codebridge.data.modalities.text import TextPrep, Tokenizer

    with pytest.raises(ConfigError, match=r"hf: no tokenizer files .*codebridge convert openclip --bpe"):
        Tokenizer.pretrained(out, TextPrep())  # transformers would build an empty CLIPTokenizer, silently


RESNET = {"visual.layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1), "visual.attnpool.c_proj.weight": torch.zeros(4, 4)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra": RESNET}, r"epoch_1.pt: 2 unexpected keys \(visual.attnpool.*\): a ModifiedResNet image tower"),
        ({"extra": {"logit_bias": torch.zeros(())}}, r"1 unexpected keys \(logit_bias\): a logit bias \(SigLIP\)"),
        ({"config": {"text_cfg": {"layers": 3}}}, r"12 keys missing \(transformer.resblocks.2"),
        ({"config": {"vision_cfg": {"image_size": 32}}},
         r"visual.positional_embedding has shape \[5, 32\] but .*model.json implies \[17, 32\]"),
        ({"config": {"vision_cfg": {"layers": [3, 4, 6, 3]}}}, r"vision_cfg.layers is a list: a ModifiedResNet"),
        ({"config": {"vision_cfg": {"attentional_pool": True}}}, r"attentional_pool=True means an attentional"),
        ({"config": {"text_cfg": {"hf_model_name": "roberta-base"}}}, r"hf_model_name='roberta-base' means a Hugging"),
    ],
)  # fmt: skip
def test_what_does_not_convert_is_refused_in_one_line(change: dict, message: str, tmp_path: Path, capsys) -> None:
    _, checkpoint, config = write_openclip(tmp_path / "oc", **change.get("extra", {}))
    if "config" in change:
        raw = json.loads(config.read_text())
        for section, values in change["config"].items():
            raw[section] |= values
        config.write_text(json.dumps(raw))
    args = ["convert", "openclip", "--checkpoint", str(checkpoint), "--config", str(config), "--out", str(tmp_path)]
    assert main([*args[:-1], str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_missing_and_unreadable_files_are_named(tmp_path: Path) -> None:
    _, checkpoint, config = write_openclip(tmp_path / "oc")
    with pytest.raises(ConfigError, match=r"nope.pt: no such file; give an OpenCLIP checkpoint"):
        convert(tmp_path / "nope.pt", config, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"nope.json: no such file; give OpenCLIP's model config"):
        convert(checkpoint, tmp_path / "nope.json", tmp_path / "out")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"bad.pt: cannot read it as a state dict"):
        convert(tmp_path / "bad.pt", config, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"nope.gz: cannot read CLIP's BPE merges"):
        convert(checkpoint, config, tmp_path / "out", bpe=tmp_path / "nope.gz")
    assert not (tmp_path / "out").exists()
