"""Audio decoding, resampling and the crop/pad policy."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from datamodules.audio import AudioDecodeError, AudioPolicy, audio_duration, load_audio

TARGET_RATE = 16_000
TONE_HZ = 440.0

FORMATS = ["wav", "flac", "ogg"]
if "MP3" in sf.available_formats():  # libsndfile >= 1.1 reads and writes MP3
    FORMATS.append("mp3")


def _tone(rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * TONE_HZ * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def _dominant_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("rate,channels", [(8000, 1), (44100, 2)])
def test_decode_to_mono_target_rate(tmp_path, ext, rate, channels):
    tone = _tone(rate)
    data = tone if channels == 1 else np.stack([tone, tone], axis=1)
    path = tmp_path / f"tone.{ext}"
    sf.write(path, data, rate)

    wave = load_audio(str(path), TARGET_RATE)

    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - TARGET_RATE) <= 1
    assert abs(_dominant_hz(wave, TARGET_RATE) - TONE_HZ) < 3
    if ext in ("wav", "flac"):  # lossless: the samples themselves must match the resampled tone
        reference = _tone(TARGET_RATE)[: len(wave)]
        middle = slice(800, len(wave) - 800)  # resampler edge effects
        assert np.corrcoef(wave[middle], reference[middle])[0, 1] > 0.999


def test_channels_are_averaged(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([_tone(TARGET_RATE, amplitude=0.5), _tone(TARGET_RATE, amplitude=0.3)], axis=1),
             TARGET_RATE, subtype="FLOAT")  # fmt: skip
    np.testing.assert_allclose(load_audio(str(path), TARGET_RATE), _tone(TARGET_RATE, amplitude=0.4), atol=1e-6)


def test_same_rate_is_not_resampled(tmp_path):
    path = tmp_path / "exact.wav"
    tone = _tone(TARGET_RATE)
    sf.write(path, tone, TARGET_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(str(path), TARGET_RATE), tone)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nowhere.wav"
    with pytest.raises(AudioDecodeError, match="nowhere.wav") as info:
        load_audio(str(path), TARGET_RATE)
    assert info.value.reason == "missing_file"
    with pytest.raises(AudioDecodeError, match="nowhere.wav"):
        audio_duration(str(path))


def test_undecodable_file_names_the_file(tmp_path):
    path = tmp_path / "broken.flac"
    path.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(AudioDecodeError, match="broken.flac") as info:
        load_audio(str(path), TARGET_RATE)
    assert isinstance(info.value, ValueError) and info.value.reason == "unreadable_header"
    with pytest.raises(AudioDecodeError, match="broken.flac"):
        audio_duration(str(path))


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), TARGET_RATE)
    with pytest.raises(AudioDecodeError, match="empty.wav") as info:
        load_audio(str(path), TARGET_RATE)
    assert info.value.reason == "no_samples"


def test_duration_reads_header(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(path, _tone(8000, seconds=2.5), 8000)
    assert audio_duration(str(path)) == pytest.approx(2.5)


def test_eval_crop_is_the_head():
    wave = np.arange(50, dtype=np.float32)
    np.testing.assert_array_equal(AudioPolicy(max_seconds=2.0).apply(wave, 10, train=False), wave[:20])


def test_train_crop_is_random_but_seeded():
    wave = np.arange(1000, dtype=np.float32)
    policy = AudioPolicy(max_seconds=1.0)

    def crop(seed: int) -> np.ndarray:
        return policy.apply(wave, 100, train=True, rng=np.random.default_rng(seed))

    assert len(crop(0)) == 100
    np.testing.assert_array_equal(crop(0), crop(0))
    starts = {int(crop(seed)[0]) for seed in range(10)}
    assert len(starts) > 1
    for seed in range(10):  # a crop is a contiguous window of the input
        np.testing.assert_array_equal(np.diff(crop(seed)), np.ones(99))


def test_short_clips_are_padded_at_the_end_and_never_cropped():
    wave = np.ones(5, dtype=np.float32)
    out = AudioPolicy(max_seconds=2.0, min_seconds=1.0).apply(wave, 10, train=True, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out, np.r_[np.ones(5), np.zeros(5)].astype(np.float32))
    assert out.dtype == np.float32


def test_no_max_keeps_everything():
    wave = np.ones(12345, dtype=np.float32)
    assert len(AudioPolicy(max_seconds=None).apply(wave, 10, train=True)) == 12345


@pytest.mark.parametrize("max_seconds,min_seconds", [(0.0, 0.0), (-1.0, 0.0), (1.0, -0.5), (1.0, 2.0)])
def test_policy_rejects_bad_lengths(max_seconds, min_seconds):
    with pytest.raises(ValueError):
        AudioPolicy(max_seconds, min_seconds)
