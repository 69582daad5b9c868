"""A codebridge model behind the OpenCLIP interface, for tools written for OpenCLIP (CLIP_benchmark, clip-retrieval).

    model, _, preprocess = create_model_and_transforms("runs/x/model")
    tokenizer = get_tokenizer("runs/x/model")
    image_features = model.encode_image(torch.stack([preprocess(pil) for pil in images]))
    text_features = model.encode_text(tokenizer(["a dog", "a cat"]))

As in OpenCLIP, ``preprocess`` maps a PIL image to a [3, S, S] tensor (the model's eval transform), the tokenizer
maps strings to a LongTensor [N, context_length] (padding id 0), and ``encode_*`` return the retrieval embeddings
(``normalize=True`` L2-normalises them, as OpenCLIP's flag does). Only image and text are exposed: OpenCLIP has no
other towers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from codebridge.data.modalities import modality
from codebridge.models.model import CodeBridgeModel, prepare_batch

PAD_ID = 0


class OpenCLIPModel(nn.Module):
    """``encode_image``, ``encode_text`` and ``forward(image, text)`` with OpenCLIP's signatures."""

    def __init__(self, model: CodeBridgeModel) -> None:
        super().__init__()
        missing = {"image", "text"} - set(model.modalities)
        if missing:
            raise ValueError(f"the OpenCLIP interface needs image and text towers; this model lacks {sorted(missing)}")
        self.model = model

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.model.encode("image", {"pixels": image}, batch_size=max(1, len(image)))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        entry = {"ids": text, "mask": text != PAD_ID}
        features = self.model.encode("text", entry, batch_size=max(1, len(text)))
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self, image: torch.Tensor | None = None, text: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(normalised image features, normalised text features, logit scale), as OpenCLIP's CLIP.forward."""
        image_features = None if image is None else self.encode_image(image, normalize=True)
        text_features = None if text is None else self.encode_text(text, normalize=True)
        return image_features, text_features, self.model.bridge.logit_scale().detach()


class Preprocess:
    """PIL image (any mode) -> FloatTensor [3, S, S] with the model's eval transform."""

    def __init__(self, model: CodeBridgeModel) -> None:
        self.prep = model.preprocessors

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Both halves of the image preprocessing here (the loader's uint8 crop, then ``on_device``), since OpenCLIP
        tools stack and move these tensors themselves; the model takes float pixels as already normalised."""
        entry = prepare_batch(self.prep, "image", [image])
        return modality("image").on_device(entry, self.prep.prep)["pixels"][0]


class OpenCLIPTokenizer:
    """str or list[str] -> LongTensor [N, context_length], OpenCLIP's ``tokenizer(texts)``."""

    def __init__(self, model: CodeBridgeModel) -> None:
        self.prep = model.preprocessors
        self.context_length = model.cfg.prep.text.context_length

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        if context_length not in (None, self.context_length):
            raise ValueError(f"this model reads {self.context_length} tokens per text, not {context_length}")
        return prepare_batch(self.prep, "text", [texts] if isinstance(texts, str) else list(texts))["ids"]


def create_model_and_transforms(
    model_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[OpenCLIPModel, Preprocess, Preprocess]:
    """(model, train preprocess, eval preprocess), as ``open_clip.create_model_and_transforms``; both transforms
    are the eval one (the adapter is for using a trained model, not for training it)."""
    model = CodeBridgeModel.load(model_dir, map_location=device)
    preprocess = Preprocess(model)
    return OpenCLIPModel(model).eval(), preprocess, preprocess


def get_tokenizer(model_dir: str | Path) -> OpenCLIPTokenizer:
    """The tokenizer of a model folder, as ``open_clip.get_tokenizer``."""
    return OpenCLIPTokenizer(CodeBridgeModel.load(model_dir))
