"""OpenCLIP checkpoints -> a ``transformers`` CLIPModel folder that ``hf-vision`` and ``hf-text`` load.

``open_clip`` cannot be imported here (it needs torchvision, which has no CPU wheel in the registry), so its state
dicts are converted by renaming keys. Only the layout OpenCLIP's ``CLIP`` class gives a ViT image tower and its own
text transformer converts (the one ``transformers`` CLIP computes exactly); anything else (ModifiedResNet, timm or
Hugging Face towers, attentional pooling, layer scale, SigLIP's custom text) is refused with one line naming the
file and what does not match. The text tokenizer is CLIP's BPE (``bpe_simple_vocab_16e6.txt.gz``), rebuilt into
``transformers`` CLIPTokenizer files exactly as OpenCLIP's ``SimpleTokenizer`` numbers its vocabulary.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codebridge.config import ConfigError
from codebridge.files import atomic_dir

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenCLIP's defaults (constants.py)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_MERGES = 49152 - 256 - 2  # SimpleTokenizer keeps the first 48894 merges of the file
SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # transformers' names of OpenCLIP's <start_of_text>, <end_of_text>
DOCS = "see docs/pretrained.md, OpenCLIP checkpoints"

# Options of OpenCLIP's vision_cfg / text_cfg / model config that change the computation: (section, field) ->
# (the value that converts, what another value means).
UNSUPPORTED = {
    ("vision_cfg", "timm_model_name"): (None, "a timm image tower"),
    ("vision_cfg", "attentional_pool"): (False, "an attentional pooler (CoCa)"),
    ("vision_cfg", "ls_init_value"): (None, "layer scale"),
    ("vision_cfg", "no_ln_pre"): (False, "no ln_pre"),
    ("vision_cfg", "pos_embed_type"): ("learnable", "fixed position embeddings"),
    ("vision_cfg", "pool_type"): ("tok", "pooling other than the class token"),
    ("vision_cfg", "global_average_pool"): (False, "average pooling"),
    ("vision_cfg", "input_patchnorm"): (False, "patch normalisation"),
    ("vision_cfg", "act_kwargs"): (None, "a custom activation"),
    ("vision_cfg", "norm_kwargs"): (None, "a custom norm"),
    ("text_cfg", "hf_model_name"): (None, "a Hugging Face text tower"),
    ("text_cfg", "hf_tokenizer_name"): (None, "a tokenizer other than CLIP's BPE"),
    ("text_cfg", "tokenizer_kwargs"): (None, "tokenizer options"),
    ("text_cfg", "embed_cls"): (False, "a CLS embedding (CoCa)"),
    ("text_cfg", "no_causal_mask"): (False, "no causal mask"),
    ("text_cfg", "pool_type"): ("argmax", "pooling other than the end-of-text token"),
    ("text_cfg", "proj_type"): ("linear", "a text projection other than linear"),
    ("text_cfg", "proj_bias"): (False, "a text projection bias"),
    ("text_cfg", "ls_init_value"): (None, "layer scale"),
    ("text_cfg", "act_kwargs"): (None, "a custom activation"),
    ("text_cfg", "norm_kwargs"): (None, "a custom norm"),
    ("", "custom_text"): (False, "a custom text tower (CustomTextCLIP: CoCa, SigLIP, ...)"),
    ("", "init_logit_bias"): (None, "a logit bias (SigLIP)"),
}

# Unexpected checkpoint keys -> what the checkpoint is (the first match explains a refusal).
KNOWN_OTHERS = (
    ("visual.layer1.", "a ModifiedResNet image tower (RN50, ...)"),
    ("visual.attnpool.", "a ModifiedResNet image tower (RN50, ...)"),
    ("visual.trunk.", "a timm image tower"),
    ("visual.attn_pool.", "an attentional pooler (CoCa)"),
    ("text.transformer.", "a Hugging Face text tower"),
    ("text.", "a custom text tower (CustomTextCLIP: CoCa, SigLIP, ...)"),
    ("text_decoder.", "a CoCa text decoder"),
    ("logit_bias", "a logit bias (SigLIP)"),
)

# OpenCLIP name prefix -> transformers CLIPModel name prefix (resblock internals: BLOCK).
RENAMES = (
    ("visual.conv1.", "vision_model.embeddings.patch_embedding."),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.", "vision_model.pre_layrnorm."),
    ("visual.ln_post.", "vision_model.post_layernorm."),
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
    ("token_embedding.", "text_model.embeddings.token_embedding."),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.", "text_model.final_layer_norm."),
    ("logit_scale", "logit_scale"),
)
BLOCK = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}  # transposed


@dataclass(frozen=True)
class Towers:
    """The sizes of an OpenCLIP ViT-and-text-transformer model (its model config, OpenCLIP's defaults filled in)."""

    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    context_length: int
    vocab_size: int
    text_width: int
    text_heads: int
    text_layers: int
    text_mlp: int
    quick_gelu: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _square(value: Any, field: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{where}: {field}={list(value)} is not square; only square images convert")
        value = value[0]
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: {field}={value!r} must be a positive integer")
    return value


def read_config(path: Path) -> Towers:
    """OpenCLIP's model-config JSON (``ViT-B-32.json``) or a hub ``open_clip_config.json`` (``model_cfg`` and
    ``preprocess_cfg``); a ConfigError for what does not convert."""
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: no such file; give OpenCLIP's model config (e.g. open_clip/model_configs/*.json)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object (OpenCLIP's model config)")
    model, prep = raw.get("model_cfg", raw), raw.get("preprocess_cfg", {})
    vision, text = model.get("vision_cfg"), model.get("text_cfg")
    if "embed_dim" not in model or not isinstance(vision, dict) or not isinstance(text, dict):
        raise ConfigError(f"{where}: an OpenCLIP model config needs embed_dim, vision_cfg and text_cfg")
    if isinstance(vision.get("layers", 12), (list, tuple)):
        raise ConfigError(
            f"{where}: vision_cfg.layers is a list: a ModifiedResNet image tower (RN50, ...); "
            f"only ViT image towers convert ({DOCS})"
        )
    sections = {"": model, "vision_cfg": vision, "text_cfg": text}
    for (section, field), (value, meaning) in UNSUPPORTED.items():
        if sections[section].get(field, value) not in (value, {}):
            name = f"{section}.{field}" if section else field
            raise ConfigError(f"{where}: {name}={sections[section][field]!r} means {meaning}, which does not convert")
    v_width, t_width = vision.get("width", 768), text.get("width", 512)
    head_width = vision.get("head_width", 64)
    if v_width % head_width:
        raise ConfigError(f"{where}: vision_cfg.width={v_width} is not a multiple of head_width={head_width}")
    return Towers(
        embed_dim=model["embed_dim"],
        image_size=_square(vision.get("image_size", 224), "vision_cfg.image_size", where),
        patch_size=_square(vision.get("patch_size", 16), "vision_cfg.patch_size", where),
        vision_width=v_width,
        vision_layers=vision.get("layers", 12),
        vision_heads=v_width // head_width,
        vision_mlp=int(v_width * vision.get("mlp_ratio", 4.0)),
        context_length=text.get("context_length", 77),
        vocab_size=text.get("vocab_size", 49408),
        text_width=t_width,
        text_heads=text.get("heads", 8),
        text_layers=text.get("layers", 12),
        text_mlp=int(t_width * text.get("mlp_ratio", 4.0)),
        quick_gelu=bool(model.get("quick_gelu", False)),
        mean=tuple(prep.get("mean", vision.get("image_mean", OPENAI_MEAN))),
        std=tuple(prep.get("std", vision.get("image_std", OPENAI_STD))),
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` (.safetensors, or .pt/.bin through ``torch.load(weights_only=True)``), unwrapped
    from ``{"state_dict": ...}`` and the ``module.`` prefix that OpenCLIP's training checkpoints carry."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; give an OpenCLIP checkpoint (.safetensors, .pt or .bin)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file or a pickle with more than tensors: one line, never a traceback
        raise ConfigError(f"{path}: cannot read it as a state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: holds no state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def expected_shapes(t: Towers) -> dict[str, tuple[int, ...]]:
    """Every OpenCLIP key of the model ``t`` describes, with its shape."""
    vw, tw, grid = t.vision_width, t.text_width, t.image_size // t.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "logit_scale": (),
        "visual.conv1.weight": (vw, 3, t.patch_size, t.patch_size),
        "visual.class_embedding": (vw,),
        "visual.positional_embedding": (grid * grid + 1, vw),
        "visual.proj": (vw, t.embed_dim),
        "token_embedding.weight": (t.vocab_size, tw),
        "positional_embedding": (t.context_length, tw),
        "text_projection": (tw, t.embed_dim),
    }
    for norm, width in (("visual.ln_pre", vw), ("visual.ln_post", vw), ("ln_final", tw)):
        shapes |= {f"{norm}.weight": (width,), f"{norm}.bias": (width,)}
    towers = (("visual.transformer", vw, t.vision_mlp, t.vision_layers), ("transformer", tw, t.text_mlp, t.text_layers))
    for prefix, w, mlp, layers in towers:
        for n in range(layers):
            b = f"{prefix}.resblocks.{n}."
            shapes |= {
                f"{b}ln_1.weight": (w,),
                f"{b}ln_1.bias": (w,),
                f"{b}attn.in_proj_weight": (3 * w, w),
                f"{b}attn.in_proj_bias": (3 * w,),
                f"{b}attn.out_proj.weight": (w, w),
                f"{b}attn.out_proj.bias": (w,),
                f"{b}ln_2.weight": (w,),
                f"{b}ln_2.bias": (w,),
                f"{b}mlp.c_fc.weight": (mlp, w),
                f"{b}mlp.c_fc.bias": (mlp,),
                f"{b}mlp.c_proj.weight": (w, mlp),
                f"{b}mlp.c_proj.bias": (w,),
            }
    return shapes


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_keys(state: dict[str, torch.Tensor], t: Towers, checkpoint: Path, config: Path) -> None:
    """A ConfigError naming the first way ``state`` differs from the layout ``config`` describes."""
    expected = expected_shapes(t)
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        what = next((m for p, m in KNOWN_OTHERS for k in unexpected if k.startswith(p)), None)
        what = what or ("layer scale" if any(".ls_" in k for k in unexpected) else "not OpenCLIP's ViT layout")
        raise ConfigError(
            f"{checkpoint}: {len(unexpected)} unexpected keys ({_listed(unexpected)}): {what}; only OpenCLIP "
            f"ViT image towers with OpenCLIP's text transformer convert ({DOCS})"
        )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConfigError(
            f"{checkpoint}: {len(missing)} keys missing ({_listed(missing)}) that {config} implies; "
            "give the model config the checkpoint was trained with"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ConfigError(
                f"{checkpoint}: {key} has shape {list(state[key].shape)} but {config} implies {list(shape)}; "
                "give the model config the checkpoint was trained with"
            )


def _renamed(key: str) -> str:
    for old, new in RENAMES:
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    for old, new in BLOCK.items():
        key = key.replace(f".{old}", f".{new}")
    return key


def to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP names -> CLIPModel names: attention's packed in_proj split into q/k/v, projections transposed."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in PROJECTIONS:
            out[PROJECTIONS[key]] = value.t().contiguous()
        elif ".attn.in_proj_" in key:
            block, kind = _renamed(key).split(".attn.in_proj_")
            for name, part in zip("qkv", value.chunk(3), strict=True):
                out[f"{block}.self_attn.{name}_proj.{kind}"] = part.clone()
        else:
            out[_renamed(key)] = value.contiguous()
    return out


def clip_config(t: Towers) -> dict[str, Any]:
    """The ``transformers`` CLIPConfig of ``t`` (same activation, sizes, eps 1e-5 as OpenCLIP's LayerNorm)."""
    act = "quick_gelu" if t.quick_gelu else "gelu"  # OpenCLIP's nn.GELU is the exact (erf) GELU, like "gelu"
    common = {"hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": t.embed_dim}
    vision = {
        "hidden_size": t.vision_width,
        "intermediate_size": t.vision_mlp,
        "num_hidden_layers": t.vision_layers,
        "num_attention_heads": t.vision_heads,
        "image_size": t.image_size,
        "patch_size": t.patch_size,
    }
    text = {
        "hidden_size": t.text_width,
        "intermediate_size": t.text_mlp,
        "num_hidden_layers": t.text_layers,
        "num_attention_heads": t.text_heads,
        "max_position_embeddings": t.context_length,
        "vocab_size": t.vocab_size,
        # OpenCLIP's two special tokens are the vocabulary's last ids; pooling takes the first end-of-text
        "bos_token_id": t.vocab_size - 2,
        "eos_token_id": t.vocab_size - 1,
        "pad_token_id": t.vocab_size - 1,
    }
    return {"projection_dim": t.embed_dim, "vision_config": vision | common, "text_config": text | common}


def preprocessor_config(t: Towers) -> dict[str, Any]:
    """CLIPImageProcessor's settings (OpenCLIP: bicubic resize of the short side, centre crop, mean/std)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": t.image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": t.image_size, "width": t.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(t.mean),
        "image_std": list(t.std),
        "do_convert_rgb": True,
    }


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (the first 256 tokens, in this order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, map(chr, printable + [256 + i for i in range(len(others))]), strict=True))


def bpe_vocabulary(bpe: Path) -> tuple[dict[str, int], list[str]]:
    """SimpleTokenizer's vocabulary and merges from CLIP's BPE file: the 256 byte characters, the same with
    ``</w>``, one token per merge (header line skipped, at most 48894), then start- and end-of-text."""
    opener: Any = gzip.open if bpe.suffix == ".gz" else open
    try:
        with opener(bpe, "rt", encoding="utf-8") as file:
            lines = file.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise ConfigError(f"{bpe}: cannot read CLIP's BPE merges ({exc}); give {BPE_FILE}") from None
    merges = [m for m in lines[1 : MAX_MERGES + 1] if m.strip()]
    if any(len(m.split()) != 2 for m in merges):
        raise ConfigError(f"{bpe}: a merge line is not two symbols; give CLIP's {BPE_FILE}")
    base = list(bytes_to_unicode().values())
    tokens = [*base, *(b + "</w>" for b in base), *(m.replace(" ", "") for m in merges), SOT, EOT]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tokenizer(bpe: Path, folder: Path, t: Towers) -> None:
    """CLIPTokenizer files (tokenizer.json, tokenizer_config.json, vocab.json, merges.txt) from CLIP's BPE file."""
    from transformers import CLIPTokenizer

    vocab, merges = bpe_vocabulary(bpe)
    if len(vocab) != t.vocab_size:
        raise ConfigError(
            f"{bpe}: gives {len(vocab)} tokens but text_cfg.vocab_size is {t.vocab_size}; "
            f"give the BPE file the model was trained with ({BPE_FILE})"
        )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=t.context_length)
    tokenizer.save_pretrained(str(folder))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def find_bpe() -> Path | None:
    """``open_clip``'s BPE file when the package is installed (``pip install --no-deps open_clip_torch``), found
    without importing ``open_clip`` (which needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    return path if path.is_file() else None


def convert(checkpoint: Path, config: Path, out: Path, bpe: Path | None = None) -> bool:
    """Write ``out`` (a CLIPModel folder) from an OpenCLIP checkpoint and its model config; the tokenizer from
    ``bpe`` (default: ``open_clip``'s, when installed). Returns whether the text tokenizer was written: without
    it only the image tower (``hf-vision``) can use the folder."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig

    towers = read_config(config)
    state = read_state_dict(checkpoint)
    check_keys(state, towers, checkpoint, config)
    bpe = bpe or find_bpe()
    with atomic_dir(out) as tmp:
        if bpe is not None:
            write_tokenizer(bpe, tmp, towers)
        CLIPConfig(**clip_config(towers)).save_pretrained(str(tmp))
        save_file(to_transformers(state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(towers), indent=2))
    return bpe is not None
