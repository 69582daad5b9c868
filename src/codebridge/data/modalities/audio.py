"""Audio preprocessing in torch: decode (soundfile), mono mixdown, band-limited resampling, then log-mel features
or (``prep.audio.features: waveform``, for pretrained speech towers) the waveform itself.

``log_mel`` uses a centred STFT (reflect padding), so a clip of N samples gives ``N // hop_length + 1`` frames;
the audio encoder sizes its positions from the same formula.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import soundfile as sf
import torch

from codebridge.config import num
from codebridge.data.modalities.base import Entry, Modality, encoder_name, register_modality
from codebridge.data.modalities.source import DecodeError, Source, as_file, decoding

if TYPE_CHECKING:
    from codebridge.config import Config, PrepConfig
    from codebridge.data.modalities.text import Tokenizer

LOG_EPS = 1e-6
NORM_EPS = 1e-2  # std floor of utterance normalisation (log units): a constant channel's float noise stays ~0
WAVE_VAR_EPS = 1e-7  # variance floor of waveform normalisation, as transformers' Wav2Vec2FeatureExtractor
ZERO_CROSSINGS = 16  # half-width of the resampling kernel, in zero crossings of its sinc
ROLLOFF = 0.95  # lowpass cutoff as a fraction of the lower Nyquist frequency
MAX_GAIN_DB = 6.0  # train-time random gain range (+-)
RATES = (1000, 768_000)  # sample rates accepted from a file header, in Hz
SHORT_DATA = re.compile(r"^data\s*:\s*(\d+) \(should be (\d+)\)", re.MULTILINE)  # libsndfile's log of a short WAV
STREAMING_SIZES = (0, 0xFFFFFFFF)  # data sizes of WAVs written to a pipe: unknown length, not truncated
MAX_KERNEL = 1 << 24  # resampling filter taps (64 MiB of float32): beyond it the rate ratio is not a usable fraction


@dataclass
class AudioPrep:
    """``prep.audio``."""

    sample_rate: int = num(16000, ge=1)
    n_mels: int = num(40, ge=1)
    n_fft: int = num(400, ge=1)  # 25 ms at 16 kHz
    hop_length: int = num(160, ge=1)  # 10 ms at 16 kHz
    max_seconds: float = num(2.0, gt=0)
    # utterance: each mel channel (waveform: the samples) to zero mean, unit variance per clip
    normalize: Literal["none", "utterance"] = "none"
    features: Literal["log-mel", "waveform"] = "log-mel"  # waveform: the samples, for a pretrained tower (hf-audio)


@lru_cache(maxsize=8)
def _resample_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc filters [new, 1, K] (one per output phase) and their left reach in input samples.

    Output sample m = k*new + j lies at input position k*orig + j*orig/new; its filter weights input
    k*orig + r - reach with h(r - reach - j*orig/new), h a Hann-windowed sinc lowpass at ``ROLLOFF`` times
    the lower of the two Nyquist frequencies (so downsampling does not alias).
    """
    cutoff = ROLLOFF * min(1.0, new / orig)  # in cycles per input sample, relative to the input Nyquist
    reach = math.ceil(ZERO_CROSSINGS / cutoff)
    t = torch.arange(-reach, reach + orig, dtype=torch.float64)[None] - torch.arange(new, dtype=torch.float64)[
        :, None
    ] * (orig / new)  # [new, K]: distance of each tap from the output position
    window = torch.where(t.abs() <= reach, torch.cos(t * math.pi / (2 * reach)) ** 2, 0.0)
    kernel = cutoff * torch.sinc(cutoff * t) * window
    return kernel.float()[:, None], reach


def check_complete(log: str) -> None:
    """Refuse a WAV whose data chunk claims more bytes than the file holds: libsndfile would silently return the
    part that is there."""
    if (short := SHORT_DATA.search(log)) and int(short[1]) not in STREAMING_SIZES and int(short[1]) > int(short[2]):
        raise DecodeError(f"is truncated: its header promises {short[1]} bytes of samples, the file holds {short[2]}")


def check_rate(rate: int, target: int) -> None:
    """Refuse a header's sample rate that is absurd or whose ratio to ``target`` needs a giant polyphase filter."""
    fix = f"convert the file to a common rate, e.g. ffmpeg -i IN -ar {target} OUT.wav"
    if not RATES[0] <= rate <= RATES[1]:
        raise DecodeError(f"sample rate {rate} Hz is outside {RATES[0]}..{RATES[1]} Hz; {fix}")
    g = math.gcd(rate, target)
    if (rate // g) * (target // g) > MAX_KERNEL:
        raise DecodeError(f"sample rate {rate} Hz has no small ratio to {target} Hz for exact resampling; {fix}")


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """[N] at ``orig_rate`` -> [ceil(N * new_rate / orig_rate)] at ``new_rate`` (band-limited, polyphase)."""
    if orig_rate == new_rate:
        return wave
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    kernel, reach = _resample_kernel(orig, new)
    x = torch.nn.functional.pad(wave[None, None], (reach, reach + orig))
    y = torch.nn.functional.conv1d(x, kernel, stride=orig)  # [1, new, blocks]: phase j of block k
    return y[0].T.reshape(-1)[: math.ceil(wave.numel() * new / orig)]


@lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """HTK mel triangles [n_fft // 2 + 1, n_mels], 0 Hz to Nyquist, peak 1 (no area normalisation)."""
    mel = torch.linspace(0.0, 2595.0 * math.log10(1.0 + sample_rate / 2 / 700.0), n_mels + 2, dtype=torch.float64)
    edges = 700.0 * (10 ** (mel / 2595.0) - 1.0)  # [n_mels + 2] Hz
    freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)[:, None]
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs - left) / (centre - left)
    falling = (right - freqs) / (right - centre)
    return torch.minimum(rising, falling).clamp(min=0).float()


def log_mel(wave: torch.Tensor, prep: AudioPrep) -> torch.Tensor:
    """[N] waveform at ``prep.sample_rate`` -> [N // hop_length + 1, n_mels] log(mel power + 1e-6)."""
    frames, half = wave.numel() // prep.hop_length + 1, prep.n_fft // 2
    if wave.numel() <= half:  # reflect padding needs more samples than it pads: zero-extend, keep the frame count
        wave = torch.nn.functional.pad(wave, (0, half + 1 - wave.numel()))
    spec = torch.stft(
        wave,
        prep.n_fft,
        prep.hop_length,
        window=torch.hann_window(prep.n_fft, dtype=wave.dtype),
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )  # [n_fft // 2 + 1, F]
    mel = spec.abs().square().T @ mel_filterbank(prep.sample_rate, prep.n_fft, prep.n_mels)
    return torch.log(mel[:frames] + LOG_EPS)


def normalize_utterance(mel: torch.Tensor) -> torch.Tensor:
    """[F, n_mels] -> each channel at zero mean and unit variance over the clip's frames (cepstral mean and
    variance normalisation). Why: raw log-mel sits around -10 with a spread set by loudness and the recording,
    which the encoder's first convolution would otherwise have to learn away; a constant channel becomes ~0."""
    centred = mel - mel.mean(dim=0, keepdim=True)
    return centred / centred.std(dim=0, unbiased=False, keepdim=True).clamp_min(NORM_EPS)


def normalize_waveform(wave: torch.Tensor) -> torch.Tensor:
    """[N] -> zero mean, unit variance over the clip: what a speech checkpoint's feature extractor does when its
    ``do_normalize`` is true (transformers' ``zero_mean_unit_var_norm``, before any padding)."""
    centred = wave - wave.mean()
    return centred / torch.sqrt(centred.square().mean() + WAVE_VAR_EPS)


class AudioProcessor:
    """Decode audio files and turn waveforms into log-mel features [F, n_mels] (``prep.features: waveform``: the
    samples [N]), at most ``max_seconds`` long."""

    def __init__(self, prep: AudioPrep) -> None:
        self.prep = prep
        self.max_samples = int(prep.max_seconds * prep.sample_rate)

    def load(self, src: Source) -> torch.Tensor:
        """Decode WAV/FLAC/OGG (path or bytes), average the channels, resample -> FloatTensor[N]; any failure
        (and a sample rate that cannot be resampled) is a ``DecodeError``."""
        with decoding("audio", src), sf.SoundFile(as_file(src)) as f:
            check_complete(f.extra_info)
            data, rate = f.read(dtype="float32", always_2d=True), f.samplerate  # [N, channels]
            if data.shape[0] == 0:
                raise DecodeError("has no samples")
            check_rate(rate, self.prep.sample_rate)
            return resample(torch.from_numpy(data).mean(dim=1), rate, self.prep.sample_rate)

    def __call__(self, wave: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Crop to ``max_seconds`` (random window at train, the start at eval), random gain at train, log-mel
        (unless ``prep.audio.features`` is waveform), then ``prep.audio.normalize``."""
        start = 0
        if train and wave.numel() > self.max_samples:
            start = int(torch.randint(wave.numel() - self.max_samples + 1, (), generator=generator))
        wave = wave[start : start + self.max_samples]
        if train:
            gain_db = MAX_GAIN_DB * (2 * torch.rand((), generator=generator).item() - 1)
            wave = wave * 10 ** (gain_db / 20)
        if self.prep.features == "waveform":
            return normalize_waveform(wave) if self.prep.normalize == "utterance" else wave
        mel = log_mel(wave, self.prep)
        return normalize_utterance(mel) if self.prep.normalize == "utterance" else mel

    def decode(self, src: Source) -> torch.Tensor:
        return self.load(src)

    def from_user(self, item: Any) -> torch.Tensor:
        """A path, bytes, or a mono waveform at prep.audio.sample_rate (a 1-D array or tensor)."""
        if isinstance(item, (np.ndarray, torch.Tensor)):
            wave = torch.as_tensor(item, dtype=torch.float32)
            if wave.ndim != 1:
                raise ValueError(
                    f"a waveform must be 1-D mono samples at prep.audio.sample_rate, got shape {tuple(wave.shape)}"
                )
            return wave
        return self.load(item)

    def entry(self, raw: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> Entry:
        x = self(raw, train, generator)
        key = "waveform" if self.prep.features == "waveform" else "mel"
        return {key: x, "mask": torch.ones(x.shape[0], dtype=torch.bool)}


@register_modality
class AudioModality(Modality):
    """Speech and sounds: ``{"mel": [B,F,n_mels], "mask": [B,F]}`` (right-padded) for models/encoders/audio.py, or
    ``{"waveform": [B,N], "mask": [B,N]}`` (``prep.audio.features: waveform``) for a pretrained tower (hf_audio.py)."""

    name = "audio"
    extensions = ("wav", "flac", "ogg", "mp3")
    prep = AudioPrep
    encoder = "audio"
    stream = 2  # the seed stream it always had

    def processor(self, prep: PrepConfig, tokenizer: Tokenizer | None) -> AudioProcessor:
        return AudioProcessor(prep.audio)

    def describe(self, cfg: Config) -> str:
        if encoder_name(cfg, self.name) != self.encoder:  # a pretrained tower describes itself
            return super().describe(cfg)
        enc = cfg.model.audio
        return f"transformer width {enc.width}, depth {enc.depth} on {cfg.prep.audio.n_mels} log-mel bands"

    def rules(self, cfg: Config) -> dict[str, bool]:
        own = encoder_name(cfg, self.name) == self.encoder
        return {
            "{prep.audio.features} needs a pretrained speech tower (model.audio.encoder: hf-audio); "
            "the audio encoder reads log-mel": not own or cfg.prep.audio.features == "log-mel"
        }
