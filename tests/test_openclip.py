"""The OpenCLIP adapter used the way CLIP_benchmark uses an OpenCLIP model (zero-shot classifier from templates,
then image features from a DataLoader of preprocessed images; retrieval with normalised features)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from codebridge.models.model import CodeBridgeModel
from codebridge.openclip import create_model_and_transforms, get_tokenizer
from search_fixtures import caption, make_collection, make_model

N = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("openclip")
    make_collection(root / "data", N)
    return root, make_model(root / "model", bridge="fdt")


def zero_shot_classifier(model, tokenizer, classnames, templates, device):
    """CLIP_benchmark's zeroshot_classification.zero_shot_classifier, step for step."""
    with torch.no_grad():
        weights = []
        for classname in classnames:
            texts = tokenizer([template.format(c=classname) for template in templates]).to(device)
            class_embeddings = model.encode_text(texts)
            class_embedding = F.normalize(class_embeddings, dim=-1).mean(dim=0)
            class_embedding /= class_embedding.norm()
            weights.append(class_embedding)
        return torch.stack(weights, dim=1).to(device)


class Images(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(Image.open(self.paths[i]).convert("RGBA")), i


def test_clip_benchmark_style_zero_shot_and_retrieval(folder):
    root, model_dir = folder
    model, _, preprocess = create_model_and_transforms(model_dir)
    tokenizer = get_tokenizer(model_dir)
    classnames = [caption(i) for i in range(N)]
    classifier = zero_shot_classifier(model, tokenizer, classnames, ["{c}", "a picture of {c}"], "cpu")
    loader = DataLoader(Images([root / "data" / f"{i}.png" for i in range(N)], preprocess), batch_size=3)
    logits, features = [], []
    with torch.no_grad():
        for images, _ in loader:
            image_features = F.normalize(model.encode_image(images), dim=-1)
            features.append(image_features)
            logits.append(100.0 * image_features @ classifier)
    assert torch.cat(logits).shape == (N, N)

    # the same numbers as the codebridge API gives for the same files and captions
    native = CodeBridgeModel.load(model_dir)
    paths = [str(root / "data" / f"{i}.png") for i in range(N)]
    torch.testing.assert_close(torch.cat(features), F.normalize(native.encode("image", paths), dim=-1))
    text = model.encode_text(tokenizer(classnames[:3]))
    torch.testing.assert_close(text, native.encode("text", classnames[:3]))
    image_out, text_out, scale = model(torch.stack([preprocess(Image.open(paths[0]))]), tokenizer(classnames[0]))
    assert image_out.norm(dim=-1).item() == pytest.approx(1.0) and text_out.shape == (1, text.shape[1])
    assert scale.item() > 0


def test_tokenizer_and_towers_are_checked(folder):
    _, model_dir = folder
    tokenizer = get_tokenizer(model_dir)
    ids = tokenizer("one caption")
    assert ids.dtype == torch.long and ids.shape == (1, tokenizer.context_length)
    with pytest.raises(ValueError, match="tokens per text"):
        tokenizer(["x"], context_length=tokenizer.context_length + 1)
