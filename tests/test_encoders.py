import pytest
import torch
import torch.nn.functional as F

from codebridge.config import Config, ConfigError, validate
from codebridge.models.encoders import ENCODERS
from codebridge.models.encoders.image import ImageEncoderConfig
from codebridge.models.encoders.layers import attend

torch.set_num_threads(1)
B, D = 3, 32


def small_config(**prep) -> Config:
    cfg = Config()
    cfg.model.image.patch_size, cfg.model.image.width, cfg.model.image.depth, cfg.model.image.heads = 8, D, 2, 4
    cfg.model.text.width, cfg.model.text.depth, cfg.model.text.heads = D, 2, 4
    cfg.model.audio.width, cfg.model.audio.depth, cfg.model.audio.heads = D, 2, 4
    cfg.model.video.heads = 4
    cfg.prep.image.size = cfg.prep.video.size = 16
    cfg.prep.video.frames = 4
    for key, value in prep.items():
        section, name = key.split("__")
        setattr(getattr(cfg.prep, section), name, value)
    return cfg


def build(modality: str, cfg: Config | None = None, **kwargs):
    torch.manual_seed(0)
    return ENCODERS.get(modality)(cfg or small_config(), **kwargs).eval()


def test_registry_has_every_modality():
    assert ENCODERS.names() == ["audio", "hf-audio", "hf-text", "hf-video", "hf-vision", "image", "text", "video"]


def test_image_shapes():
    enc = build("image")
    f = enc({"pixels": torch.randn(B, 3, 16, 16)})
    assert enc.width == D
    assert f.tokens.shape == (B, 4, D)  # (16 / 8)^2 patches, CLS excluded
    assert f.mask.dtype == torch.bool and f.mask.all() and f.mask.shape == (B, 4)
    assert f.summary.shape == (B, D)


def test_image_size_must_tile_into_patches():
    cfg = small_config(image__size=20)
    with pytest.raises(ConfigError, match=r"prep.image.size=20.*model.image.patch_size=8"):
        ENCODERS.get("image")(cfg)


def test_image_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match="built for 2x2"):
        build("image")({"pixels": torch.randn(1, 3, 32, 32)})


def test_freeze_patch_embed_freezes_only_conv1():
    cfg = small_config()
    cfg.model.image.freeze_patch_embed = True
    enc = ENCODERS.get("image")(cfg)
    frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
    assert frozen == {"vit.conv1.weight"}


def test_vit_b32_builds_and_runs():
    cfg = Config()
    cfg.model.image = ImageEncoderConfig(patch_size=32, width=768, depth=12, heads=12)
    cfg.prep.image.size = 224
    enc = build("image", cfg)
    # OpenCLIP's ViT-B-32 visual tower has 87,849,216 parameters, 768 x 512 of them in its output projection.
    assert sum(p.numel() for p in enc.parameters()) == 87_849_216 - 768 * 512
    with torch.no_grad():
        f = enc({"pixels": torch.randn(1, 3, 224, 224)})
    assert f.tokens.shape == (1, 49, 768) and f.summary.shape == (1, 768)
    assert torch.isfinite(f.summary).all()


def text_inputs(lengths: list[int], total: int, vocab: int = 50) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (len(lengths), total), generator=g)  # padding holds random ids on purpose
    mask = torch.arange(total)[None] < torch.tensor(lengths)[:, None]
    return {"ids": ids, "mask": mask}


def test_text_shapes_and_mask():
    enc = build("text", vocab_size=50)
    inputs = text_inputs([5, 16, 1], 16)
    f = enc(inputs)
    assert f.tokens.shape == (3, 16, D) and f.summary.shape == (3, D)
    assert torch.equal(f.mask, inputs["mask"])
    assert enc.token_embedding.num_embeddings == 50


def test_text_vocab_defaults_to_prep():
    assert build("text").token_embedding.num_embeddings == Config().prep.text.vocab_size


@pytest.mark.parametrize("causal", [False, True])
def test_text_padding_never_changes_summary(causal):
    cfg = small_config()
    cfg.model.text.causal = causal
    enc = build("text", cfg, vocab_size=50)
    padded = text_inputs([5, 9], 16)
    with torch.no_grad():
        f_padded = enc(padded)
        for row, length in enumerate([5, 9]):
            alone = {"ids": padded["ids"][row : row + 1, :length], "mask": torch.ones(1, length, dtype=torch.bool)}
            f_alone = enc(alone)
            assert torch.allclose(f_padded.summary[row], f_alone.summary[0], atol=1e-5)
            assert torch.allclose(f_padded.tokens[row, :length], f_alone.tokens[0], atol=1e-5)


def test_text_causal_summary_is_eot_and_ignores_the_future():
    cfg = small_config()
    cfg.model.text.causal = True
    enc = build("text", cfg, vocab_size=50)
    inputs = text_inputs([4, 7], 8)
    with torch.no_grad():
        f = enc(inputs)
        assert torch.equal(f.summary, f.tokens[torch.arange(2), torch.tensor([3, 6])])
        changed = {"ids": inputs["ids"].clone(), "mask": inputs["mask"]}
        changed["ids"][:, 3] = (changed["ids"][:, 3] + 1) % 50
        g = enc(changed)
    assert torch.allclose(f.tokens[:, :3], g.tokens[:, :3], atol=1e-6)
    assert not torch.allclose(f.tokens[:, 3:], g.tokens[:, 3:], atol=1e-3)


def test_text_longer_than_context_is_a_clear_error():
    with pytest.raises(ValueError, match="context_length=16"):
        build("text", vocab_size=50)(text_inputs([17], 17))


def audio_inputs(lengths: list[int], total: int, n_mels: int = 40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    mel = torch.randn(len(lengths), total, n_mels, generator=g) * 3  # padding holds noise on purpose
    mask = torch.arange(total)[None] < torch.tensor(lengths)[:, None]
    return {"mel": mel, "mask": mask}


@pytest.mark.parametrize(("subsample", "expected"), [(1, 30), (2, 15), (4, 8), (8, 4)])
def test_audio_subsampling_shapes_and_mask(subsample, expected):
    cfg = small_config()
    cfg.model.audio.subsample = subsample
    enc = build("audio", cfg)
    f = enc(audio_inputs([30, 13], 30))
    assert f.tokens.shape == (2, expected, D) and f.summary.shape == (2, D)
    lengths = [-(-n // subsample) for n in (30, 13)]  # a real frame survives iff its stride centre is real
    assert f.mask.sum(1).tolist() == lengths
    assert f.mask[:, 0].all() and not f.mask[1, lengths[1] :].any()


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
@pytest.mark.parametrize("length", [37, 38])  # odd and even lengths meet the stride boundary differently
def test_audio_padding_never_changes_summary(positions, length):
    cfg = small_config()
    cfg.model.audio.positions = positions
    enc = build("audio", cfg)
    padded = audio_inputs([length], 64)
    alone = {"mel": padded["mel"][:, :length], "mask": torch.ones(1, length, dtype=torch.bool)}
    with torch.no_grad():
        f_padded, f_alone = enc(padded), enc(alone)
    n = f_alone.tokens.shape[1]
    assert int(f_padded.mask.sum()) == n
    assert torch.allclose(f_padded.tokens[:, :n], f_alone.tokens, atol=1e-5)
    assert torch.allclose(f_padded.summary, f_alone.summary, atol=1e-5)


def test_audio_subsample_must_be_power_of_two():
    cfg = small_config()
    cfg.model.audio.subsample = 3
    with pytest.raises(ConfigError, match=r"model\.audio\.subsample=3 must be a power of two"):
        validate(cfg)


def test_audio_longer_than_max_seconds_is_a_clear_error():
    cfg = small_config(audio__max_seconds=0.1)  # 1600 samples / hop 160 -> 11 frames
    with pytest.raises(ValueError, match=r"12 mel frames.*max_seconds allows \(11\)"):
        build("audio", cfg)(audio_inputs([12], 12))


def test_video_shapes():
    enc = build("video")
    f = enc({"frames": torch.randn(2, 4, 3, 16, 16)})
    assert enc.width == D
    assert f.tokens.shape == (2, 4, D) and f.mask.all() and f.mask.shape == (2, 4)
    assert torch.allclose(f.summary, f.tokens.mean(1))


def test_video_frame_weights_are_shared():
    enc = build("video")
    frames = torch.randn(2, 4, 3, 16, 16)
    with torch.no_grad():
        per_frame = enc.frame_features(frames)
        for t in range(4):
            assert torch.allclose(per_frame[:, t], enc.frame_encoder(frames[:, t]).summary, atol=1e-6)
    more_frames = build("video", small_config(video__frames=8))
    extra = sum(p.numel() for p in more_frames.parameters()) - sum(p.numel() for p in enc.parameters())
    assert extra == 4 * D  # only the temporal position table grows with the frame count


def test_video_temporal_order_matters():
    enc = build("video")
    frames = torch.randn(1, 4, 3, 16, 16)
    with torch.no_grad():
        forward, backward = enc({"frames": frames}), enc({"frames": frames.flip(1)})
    assert not torch.allclose(forward.summary, backward.summary, atol=1e-4)


def test_every_encoder_gets_gradients():
    cfg = small_config()
    inputs = {
        "image": {"pixels": torch.randn(2, 3, 16, 16)},
        "text": text_inputs([3, 8], 8),
        "audio": audio_inputs([20, 11], 20),
        "video": {"frames": torch.randn(2, 4, 3, 16, 16)},
    }
    for modality, batch in inputs.items():
        enc = ENCODERS.get(modality)(cfg).train()
        summary = enc(batch).summary
        (summary * torch.randn_like(summary)).sum().backward()  # a plain sum of a LayerNorm output is constant
        missing = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"{modality}: no gradient for {missing}"


def test_cpu_attention_under_bf16_autocast_runs_in_fp32_and_returns_bf16() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8).bfloat16().requires_grad_() for _ in range(3))
    allowed = torch.rand(2, 1, 1, 9) > 0.3
    allowed[..., 0] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attend(q, k, v, allowed)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed).bfloat16()
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    y.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()
    plain = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    assert torch.equal(attend(*plain, None), F.scaled_dot_product_attention(*plain))  # fp32: untouched


@pytest.mark.parametrize("radius", [0, 1])
def test_local_attention_keeps_patch_tokens_local(radius):
    """With attention_radius r, a patch token after `depth` blocks depends only on the patches within r * depth
    rows and columns: changing a farther patch leaves it exactly as it was, while the (global) summary changes."""
    cfg = small_config(image__size=48)  # 6 x 6 patches of 8 px, depth 2
    cfg.model.image.attention_radius = radius
    enc = build("image", cfg)
    pixels = torch.randn(1, 3, 48, 48)
    changed = pixels.clone()
    changed[..., 40:, 40:] += 1.0  # the bottom-right patch (row 5, col 5)
    with torch.no_grad():
        a, b = enc({"pixels": pixels}), enc({"pixels": changed})
    reach = radius * cfg.model.image.depth
    rows, cols = torch.arange(36) // 6, torch.arange(36) % 6
    near = ((5 - rows) <= reach) & ((5 - cols) <= reach)
    moved = (a.tokens - b.tokens).abs().amax(-1)[0] > 1e-6
    assert torch.equal(moved, near)
    assert not torch.allclose(a.summary, b.summary)


def test_global_attention_mixes_every_patch():
    """The default (attention_radius None): one changed patch reaches every patch token."""
    enc = build("image", small_config(image__size=48))
    pixels = torch.randn(1, 3, 48, 48)
    changed = pixels.clone()
    changed[..., 40:, 40:] += 1.0
    with torch.no_grad():
        moved = (enc({"pixels": pixels}).tokens - enc({"pixels": changed}).tokens).abs().amax(-1)[0] > 1e-6
    assert moved.all()
