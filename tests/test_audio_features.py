"""Audio: log-mel against a numpy reference built from the formulas, resampling, decoding, cropping."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from codebridge.data.modalities.audio import AudioPrep, AudioProcessor, log_mel, resample

PREP = AudioPrep(sample_rate=16000, n_mels=40, n_fft=400, hop_length=160, max_seconds=1.0)


def reference_log_mel(x: np.ndarray, prep: AudioPrep) -> np.ndarray:
    """Centred frames (reflect padding), periodic Hann window, |DFT|^2, HTK mel triangles, log(. + 1e-6)."""
    n_fft, hop, sr = prep.n_fft, prep.hop_length, prep.sample_rate
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([padded[s : s + n_fft] * window for s in range(0, len(padded) - n_fft + 1, hop)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # [F, n_fft/2+1]

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595 * np.log10(1 + f / 700)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700 * (10 ** (m / 2595) - 1)

    edges = mel_to_hz(np.linspace(0, hz_to_mel(np.array(sr / 2)), prep.n_mels + 2))
    bins = np.arange(n_fft // 2 + 1) * sr / n_fft
    filters = np.zeros((n_fft // 2 + 1, prep.n_mels))
    for m in range(prep.n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(bins):
            if lo < f <= mid:
                filters[k, m] = (f - lo) / (mid - lo)
            elif mid < f < hi:
                filters[k, m] = (hi - f) / (hi - mid)
    return np.log(power @ filters + 1e-6)


def peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave.numpy() * np.hanning(wave.numel())))
    return float(np.fft.rfftfreq(wave.numel(), 1 / rate)[spectrum.argmax()])


def sine(hz: float, rate: int, seconds: float) -> torch.Tensor:
    return torch.sin(2 * math.pi * hz * torch.arange(int(rate * seconds), dtype=torch.float64) / rate).float()


def test_log_mel_matches_the_numpy_reference() -> None:
    x = 0.1 * np.random.default_rng(0).standard_normal(8000).astype(np.float32) + 0.3 * sine(440, 16000, 0.5).numpy()
    ours = log_mel(torch.from_numpy(x), PREP)
    ref = reference_log_mel(x, PREP)
    assert ours.shape == ref.shape == (8000 // 160 + 1, 40)
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-3, rtol=1e-4)


def test_log_mel_of_very_short_and_silent_audio() -> None:
    assert log_mel(torch.zeros(7), PREP).shape == (1, 40)
    assert torch.allclose(log_mel(torch.zeros(1600), PREP), torch.tensor(math.log(1e-6)))


@pytest.mark.parametrize(("orig", "new", "hz"), [(22050, 16000, 440.0), (8000, 16000, 1000.0), (48000, 16000, 3000.0)])
def test_resampling_keeps_frequency_and_length_ratio(orig: int, new: int, hz: float) -> None:
    x = sine(hz, orig, 1.0)
    y = resample(x, orig, new)
    assert y.numel() == math.ceil(x.numel() * new / orig)
    assert abs(peak_hz(y, new) - hz) <= 1.0
    expected = sine(hz, new, 1.0)
    middle = slice(new // 10, -new // 10)  # away from the edges, where the signal starts abruptly
    assert (y[middle] - expected[middle]).abs().max() < 1e-2


def test_downsampling_removes_frequencies_above_the_new_nyquist() -> None:
    """A 10 kHz tone cannot exist at 16 kHz: a band-limited resampler removes it instead of aliasing it to 6 kHz."""
    y = resample(sine(10000, 44100, 1.0), 44100, 16000)
    middle = y[1600:-1600]
    assert middle.pow(2).mean().sqrt() < 1e-2  # the tone had RMS 0.71


def write_audio(path: Path | io.BytesIO, data: np.ndarray, rate: int, fmt: str) -> None:
    sf.write(path, data, rate, format=fmt)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_load_mixes_down_and_resamples(tmp_path: Path, fmt: str) -> None:
    left = sine(440, 22050, 0.5).numpy()
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    path = tmp_path / f"a.{fmt.lower()}"
    write_audio(path, stereo, 22050, fmt)
    proc = AudioProcessor(PREP)
    for src in (str(path), path.read_bytes()):
        wave = proc.load(src)
        assert wave.dtype == torch.float32 and wave.shape == (8000,)
        assert abs(peak_hz(wave, 16000) - 440) <= 2.0
        assert abs(wave[800:-800].abs().max().item() - 0.5) < 0.05  # the average of a unit sine and silence


@pytest.mark.parametrize("content", [b"", b"RIFF0000WAVEjunk", None])
def test_load_rejects_bad_files_with_the_reason(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "bad.wav"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"does not exist|cannot decode audio|empty"):
        AudioProcessor(PREP).load(str(path))


def test_crop_start_at_eval_random_window_at_train() -> None:
    proc = AudioProcessor(PREP)
    wave = torch.linspace(-0.5, 0.5, 40000)  # 2.5 s: longer than max_seconds
    frames = 16000 // 160 + 1
    eval_mel = proc(wave, train=False)
    assert eval_mel.shape == (frames, 40)
    assert torch.equal(eval_mel, log_mel(wave[:16000], PREP))
    draws = [proc(wave, train=True, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert all(d.shape == (frames, 40) for d in draws)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    short = proc(wave[:4000], train=True, generator=torch.Generator().manual_seed(0))
    assert short.shape == (4000 // 160 + 1, 40)  # shorter clips are not padded here (collate pads)


def test_utterance_normalisation_matches_a_per_channel_reference_and_removes_gain() -> None:
    prep = dataclasses.replace(PREP, normalize="utterance")
    wave = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, 12000).astype(np.float32))
    mel = AudioProcessor(prep)(wave, train=False)
    raw = log_mel(wave, PREP).double().numpy()
    ref = (raw - raw.mean(axis=0)) / raw.std(axis=0)
    np.testing.assert_allclose(mel.double().numpy(), ref, atol=1e-4)
    louder = AudioProcessor(prep)(4 * wave, train=False)  # a gain is a constant shift in every log-mel channel
    torch.testing.assert_close(louder, mel, atol=1e-3, rtol=0)
    assert not torch.allclose(AudioProcessor(PREP)(4 * wave, train=False), AudioProcessor(PREP)(wave, train=False))
    silence = AudioProcessor(prep)(torch.zeros(8000), train=False)
    assert silence.shape == (51, 40) and silence.abs().max() < 1e-3  # constant channels: no amplified float noise
