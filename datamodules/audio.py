"""Audio decoding, resampling and length policy.

Decoding goes through libsndfile (``soundfile``), which reads WAV, FLAC, OGG/Vorbis and, from
libsndfile 1.1 on, MP3. Resampling uses ``soxr``. Nothing here depends on torchaudio.
"""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf
import soxr

__all__ = ["AudioDecodeError", "AudioPolicy", "audio_duration", "load_audio"]


class AudioDecodeError(ValueError):
    """An audio file is missing, unreadable, or holds no samples. The message names the file."""


def _check_readable(path: str) -> None:
    if not os.path.isfile(path):
        raise AudioDecodeError(f"audio file not found: {path}")


def load_audio(path: str, sampling_rate: int) -> np.ndarray:
    """Decode an audio file to a mono float32 waveform at ``sampling_rate``.

    Channels are averaged to mono; the signal is resampled with soxr (high quality) when the file's
    rate differs from ``sampling_rate``.

    Args:
        path: audio file (any format libsndfile reads: wav, flac, ogg, mp3, ...).
        sampling_rate: target rate in Hz.

    Returns:
        A 1-D float32 array.

    Raises:
        AudioDecodeError: the file is missing, cannot be decoded, or is empty.
    """
    _check_readable(path)
    try:
        wave, file_rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, TypeError) as err:
        raise AudioDecodeError(f"cannot decode audio file {path}: {err}") from err
    if wave.shape[0] == 0:
        raise AudioDecodeError(f"audio file has no samples: {path}")
    mono = wave.mean(axis=1, dtype=np.float32)
    if file_rate != sampling_rate:
        mono = soxr.resample(mono, file_rate, sampling_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def audio_duration(path: str) -> float:
    """Duration of an audio file in seconds, read from its header without decoding the samples.

    Raises:
        AudioDecodeError: the file is missing or its header cannot be read.
    """
    _check_readable(path)
    try:
        return float(sf.info(path).duration)
    except (sf.SoundFileError, RuntimeError, TypeError) as err:
        raise AudioDecodeError(f"cannot read audio header of {path}: {err}") from err


class AudioPolicy:
    """How long a clip may be: crop long clips, zero-pad short ones.

    Training crops a random window (so every epoch can see a different part of a long clip);
    evaluation keeps the head of the clip, so results do not depend on a random draw. Padding is
    appended at the end.

    Args:
        max_seconds: longest clip kept, in seconds; ``None`` keeps clips whole.
        min_seconds: shorter clips are zero-padded at the end to this length.
    """

    def __init__(self, max_seconds: float | None = 30.0, min_seconds: float = 0.0):
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive or None, got {max_seconds}")
        if min_seconds < 0:
            raise ValueError(f"min_seconds must be >= 0, got {min_seconds}")
        if max_seconds is not None and min_seconds > max_seconds:
            raise ValueError(f"min_seconds {min_seconds} exceeds max_seconds {max_seconds}")
        self.max_seconds = max_seconds
        self.min_seconds = min_seconds

    def __repr__(self) -> str:
        return f"AudioPolicy(max_seconds={self.max_seconds}, min_seconds={self.min_seconds})"

    def apply(
        self, wave: np.ndarray, sampling_rate: int, train: bool, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """Crop and pad a 1-D waveform.

        Args:
            wave: mono waveform.
            sampling_rate: its rate in Hz (converts seconds to samples).
            train: random crop when ``True``, head crop otherwise.
            rng: source of the random crop offset; required when ``train`` and cropping happens.
        """
        if self.max_seconds is not None:
            max_len = max(1, round(self.max_seconds * sampling_rate))
            if len(wave) > max_len:
                start = 0
                if train:
                    if rng is None:
                        raise ValueError("a random crop needs an rng")
                    start = int(rng.integers(0, len(wave) - max_len + 1))
                wave = wave[start : start + max_len]
        min_len = round(self.min_seconds * sampling_rate)
        if len(wave) < min_len:
            wave = np.pad(wave, (0, min_len - len(wave)))
        return wave
