"""Audio decoding, resampling and length policy.

Decoding goes through libsndfile (``soundfile``), which reads WAV, FLAC, OGG/Vorbis and, from
libsndfile 1.1 on, MP3. Resampling uses ``soxr``. Nothing here depends on torchaudio.

With an :class:`AudioPolicy`, :func:`load_audio` decodes only the window the policy keeps: it
seeks to the crop's first frame and reads the window's frames, so a 2-hour clip cropped to 10 s
costs 10 s of decoding and memory. Audio that is not a file on disk (a member of a WebDataset tar)
is decoded from its bytes: give them as ``data`` and a ``path`` that names them in messages (its
extension still tells an unsupported format from a corrupt one). Every failure is an :class:`AudioDecodeError` whose ``reason``
is one of :data:`datamodules.bad_samples.AUDIO_REASONS` (or ``missing_file``).
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import soundfile as sf
import soxr

from datamodules.bad_samples import (
    DECODE_ERROR,
    EMPTY_FILE,
    MISSING_FILE,
    NO_SAMPLES,
    NON_FINITE,
    UNREADABLE_HEADER,
    UNSUPPORTED_FORMAT,
)

__all__ = ["AudioDecodeError", "AudioPolicy", "audio_duration", "decode_all", "load_audio"]

#: errors soundfile raises for files it cannot open or decode.
_SOUNDFILE_ERRORS = (sf.SoundFileError, RuntimeError, TypeError)
#: file extensions of formats libsndfile decodes (its format names and their common aliases);
#: a file with any other extension that fails to open is an ``unsupported_format``.
_DECODABLE_EXTENSIONS = frozenset(f".{name.lower()}" for name in sf.available_formats()) | {
    ".aif",
    ".aifc",
    ".oga",
    ".opus",
    ".wave",
}
#: audio read past the end of a cropped window before resampling it: enough for soxr's "HQ" filter,
#: so that a head crop is bit-identical to the head of the whole resampled clip.
RESAMPLER_LOOKAHEAD_SECONDS = 0.1


class AudioDecodeError(ValueError):
    """An audio file is missing, unreadable, or holds no usable samples. The message names the file.

    Attributes:
        reason: why, one of :data:`datamodules.bad_samples.REASONS`.
        path: the audio file.
    """

    def __init__(self, message: str, reason: str = DECODE_ERROR, path: str = ""):
        super().__init__(message)
        self.reason = reason
        self.path = path


def _message(err: Exception) -> str:
    """libsndfile's own words, without the file name soundfile prefixes them with."""
    return getattr(err, "error_string", None) or str(err)


def _header_reason(path: str, err: Exception) -> str:
    """``unsupported_format`` or ``unreadable_header`` for a file libsndfile failed to open."""
    message = str(err).lower()
    if os.path.splitext(path)[1].lower() not in _DECODABLE_EXTENSIONS or "unimplemented" in message:
        return UNSUPPORTED_FORMAT
    return UNREADABLE_HEADER


def _open(path: str, data: bytes | None = None) -> sf.SoundFile:
    """Open an audio file, or the audio ``data`` that ``path`` names, and check its header announces
    samples; the caller closes it."""
    if data is None and not os.path.isfile(path):
        raise AudioDecodeError(f"audio file not found: {path}", MISSING_FILE, path)
    if (len(data) if data is not None else os.path.getsize(path)) == 0:
        raise AudioDecodeError(f"audio file is empty (0 bytes): {path}", EMPTY_FILE, path)
    try:
        handle = sf.SoundFile(path if data is None else io.BytesIO(data))
    except _SOUNDFILE_ERRORS as err:
        reason = _header_reason(path, err)
        raise AudioDecodeError(f"cannot read audio header of {path}: {_message(err)}", reason, path) from err
    if handle.frames == 0:
        handle.close()
        raise AudioDecodeError(f"audio file has no samples: {path}", NO_SAMPLES, path)
    return handle


def load_audio(
    path: str,
    sampling_rate: int,
    policy: AudioPolicy | None = None,
    train: bool = False,
    rng: np.random.Generator | None = None,
    data: bytes | None = None,
) -> np.ndarray:
    """Decode an audio file to a mono float32 waveform at ``sampling_rate``.

    Channels are averaged to mono; the signal is resampled with soxr (high quality) when the file's
    rate differs from ``sampling_rate``. With a ``policy`` only the window it keeps is read from the
    file (see :meth:`AudioPolicy.window`), then resampled, cut to the policy's length and padded;
    for a clip no longer than ``policy.max_seconds``, and for the head crop of a longer one, this
    equals ``policy.apply`` on the whole decoded clip.

    Args:
        path: audio file (any format libsndfile reads: wav, flac, ogg, mp3, ...).
        sampling_rate: target rate in Hz.
        policy: crop/pad rule; ``None`` decodes the whole file.
        train: random window (``True``) or the head of the clip (``False``).
        rng: source of the random window's offset; required when ``train`` and the clip is cropped.
        data: the file's bytes, when it is not on disk (e.g. a tar member); ``path`` then only names it.

    Returns:
        A 1-D float32 array.

    Raises:
        AudioDecodeError: the file is missing or empty, its header is unreadable or announces no
            samples, its format is unsupported, its samples cannot be decoded (e.g. it is
            truncated) or are not finite; ``reason`` says which.
    """
    with _open(path, data) as handle:
        file_rate, frames = handle.samplerate, handle.frames
        start, count = (0, frames) if policy is None else policy.window(frames, file_rate, sampling_rate, train, rng)
        try:
            if start:
                handle.seek(start)
            wave = handle.read(count, dtype="float32", always_2d=True)
        except _SOUNDFILE_ERRORS as err:
            raise AudioDecodeError(f"cannot decode audio file {path}: {_message(err)}", DECODE_ERROR, path) from err
    if not np.isfinite(wave).all():
        raise AudioDecodeError(f"audio file holds NaN or infinite samples: {path}", NON_FINITE, path)
    mono = wave.mean(axis=1, dtype=np.float32)
    if file_rate != sampling_rate:
        mono = soxr.resample(mono, file_rate, sampling_rate, quality="HQ")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    return mono if policy is None else policy.fit(mono, sampling_rate)


def audio_duration(path: str, data: bytes | None = None) -> float:
    """Duration of an audio file (or of its bytes ``data``, named by ``path``) in seconds, read from
    its header without decoding the samples.

    Raises:
        AudioDecodeError: the file is missing or empty, its header cannot be read or announces no
            samples, or its format is unsupported; ``reason`` says which.
    """
    with _open(path, data) as handle:
        return handle.frames / handle.samplerate


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

    def _max_frames(self, rate: int) -> int | None:
        """Longest clip kept, in frames at ``rate``; ``None`` when clips are kept whole."""
        return None if self.max_seconds is None else max(1, round(self.max_seconds * rate))

    def window(
        self, frames: int, file_rate: int, sampling_rate: int, train: bool, rng: np.random.Generator | None = None
    ) -> tuple[int, int]:
        """The frames of a clip to decode: ``(first frame, frame count)`` at the file's rate.

        A clip no longer than ``max_seconds`` is read whole. A longer one is cropped: at a random
        offset drawn from ``rng`` when ``train``, at its head otherwise. When the file's rate differs
        from ``sampling_rate``, the window reaches :data:`RESAMPLER_LOOKAHEAD_SECONDS` past
        ``max_seconds`` (where the clip allows), which :meth:`fit` cuts off after resampling: the
        resampler's filter then sees the same samples as when the whole clip is resampled, so a head
        crop equals the head of the whole resampled clip.

        Args:
            frames: length of the clip in frames at ``file_rate``.
            file_rate: the file's rate in Hz.
            sampling_rate: the rate the window will be resampled to.
            train: random crop when ``True``, head crop otherwise.
            rng: source of the random crop offset; required when ``train`` and cropping happens.
        """
        keep = self._max_frames(file_rate)
        if keep is None or frames <= keep:
            return 0, frames
        start = 0
        if train:
            if rng is None:
                raise ValueError("a random crop needs an rng")
            start = int(rng.integers(0, frames - keep + 1))
        margin = 0 if file_rate == sampling_rate else math.ceil(RESAMPLER_LOOKAHEAD_SECONDS * file_rate)
        return start, min(frames - start, keep + margin)

    def fit(self, wave: np.ndarray, sampling_rate: int) -> np.ndarray:
        """Cut a decoded window to at most ``max_seconds`` (keeping its head), then zero-pad it at
        the end to ``min_seconds``."""
        max_len = self._max_frames(sampling_rate)
        if max_len is not None and len(wave) > max_len:
            wave = wave[:max_len]
        min_len = round(self.min_seconds * sampling_rate)
        if len(wave) < min_len:
            wave = np.pad(wave, (0, min_len - len(wave)))
        return wave

    def apply(
        self, wave: np.ndarray, sampling_rate: int, train: bool, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """Crop and pad a 1-D waveform already in memory (:func:`load_audio` does the same while
        decoding only the window).

        Args:
            wave: mono waveform.
            sampling_rate: its rate in Hz (converts seconds to samples).
            train: random crop when ``True``, head crop otherwise.
            rng: source of the random crop offset; required when ``train`` and cropping happens.
        """
        start, count = self.window(len(wave), sampling_rate, sampling_rate, train, rng)
        return self.fit(wave[start : start + count], sampling_rate)


def decode_all(path: str, block_frames: int = 1 << 20) -> float:
    """Decode every sample of an audio file, block by block (memory of one block), and return its
    duration in seconds: what ``check-data --decode`` runs on each clip.

    Finds what a header scan cannot: samples that fail to decode (a truncated FLAC), fewer samples
    than the header announces (a truncated WAV), NaN or infinite samples.

    Raises:
        AudioDecodeError: as :func:`load_audio`; ``no_samples`` when nothing decodes.
    """
    with _open(path) as handle:
        announced, rate, decoded = handle.frames, handle.samplerate, 0
        try:
            for block in handle.blocks(blocksize=block_frames, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    raise AudioDecodeError(f"audio file holds NaN or infinite samples: {path}", NON_FINITE, path)
                decoded += len(block)
        except _SOUNDFILE_ERRORS as err:
            raise AudioDecodeError(f"cannot decode audio file {path}: {_message(err)}", DECODE_ERROR, path) from err
    if decoded == 0:
        raise AudioDecodeError(f"audio file has no samples: {path}", NO_SAMPLES, path)
    if decoded < announced:
        raise AudioDecodeError(
            f"cannot decode audio file {path}: the header announces {announced} frames, {decoded} decode", DECODE_ERROR, path
        )
    return decoded / rate
