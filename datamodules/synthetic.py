"""Deterministic compositional audio–caption data for demos and tests.

A clip holds 1–3 sound events of distinct types played one after another, each repeated 1–3 times,
over faint background noise. Captions say which events occur, in which order and how often
("a low hum followed by two high beeps"). The ten event types differ in pitch range, pitch motion
and temporal texture, so even a tiny randomly initialised audio model can learn to tell them apart.

Validation and test clips never repeat an (event, count) sequence within their split, so no two of
their captions describe the same content; training clips may repeat a sequence with new audio.

Two extra test sets probe what the captions encode. ``hard``: pairs of clips with the same events
in opposite order, with a hard-negative file whose query is a caption of one clip and whose
negative is its mirror (Omni-Embed-Audio's HNSR, arXiv 2604.18360). ``qa``: a question per test
clip (which sound comes first, or how often the first sound occurs) with 3–4 choices, for QA by
retrieval. Two zero-shot classification sets: ``zs``, new clips of one event type each (repeated
1–3 times), labelled with it; ``zs_multi``, the test clips labelled with the set of their event types.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from datamodules.datamodule import RetrievalDataModule
from datamodules.eval_sets import EvalSet

__all__ = ["EVENT_TYPES", "SAMPLING_RATE", "SyntheticDataModule", "make_synthetic_dataset"]

SAMPLING_RATE = 16_000
#: bump when the generator's output changes, so cached datasets are rebuilt.
GENERATOR_VERSION = 3
_CAPTIONS_PER_CLIP = 5
_MIN_SECONDS, _MAX_SECONDS = 1.0, 3.0
#: prompts of the classification sets (two, to exercise prompt ensembling).
ZS_TEMPLATES = ["This is a sound of {label}.", "the sound of a {label}"]


def _time(n: int) -> np.ndarray:
    return np.arange(n) / SAMPLING_RATE


def _fade(x: np.ndarray, seconds: float = 0.01) -> np.ndarray:
    """Raised-cosine onset and offset, so tonal events do not start or end with a click."""
    k = min(len(x) // 2, int(seconds * SAMPLING_RATE))
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, k))
    x[:k] *= ramp
    x[len(x) - k :] *= ramp[::-1]
    return x


def _hum(rng: np.random.Generator, n: int) -> np.ndarray:
    t, f0 = _time(n), rng.uniform(90, 130)
    return _fade(sum(a * np.sin(2 * np.pi * h * f0 * t) for h, a in ((1, 1.0), (2, 0.5), (3, 0.25))) / 1.75)


def _beep(rng: np.random.Generator, n: int) -> np.ndarray:
    return _fade(np.sin(2 * np.pi * rng.uniform(1800, 2200) * _time(n)))


def _sweep(start: float, stop: float, n: int) -> np.ndarray:
    # Exponential sweep: equal time per octave, as pitch is heard.
    t = _time(n)
    k = np.log(stop / start) / t[-1]
    return _fade(np.sin(2 * np.pi * start * np.expm1(k * t) / k))


def _rising(rng: np.random.Generator, n: int) -> np.ndarray:
    return _sweep(rng.uniform(400, 600), rng.uniform(3000, 4000), n)


def _falling(rng: np.random.Generator, n: int) -> np.ndarray:
    return _sweep(rng.uniform(3000, 4000), rng.uniform(400, 600), n)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    return _fade(rng.uniform(-1, 1, n))


def _clicks(rng: np.random.Generator, n: int) -> np.ndarray:
    x = np.zeros(n)
    period = int(rng.uniform(0.02, 0.03) * SAMPLING_RATE)
    pulse = np.exp(-np.arange(32) / 4.0) * np.sign(rng.standard_normal(32))
    for start in range(0, n - len(pulse), period):
        x[start : start + len(pulse)] += pulse
    return x


def _siren(rng: np.random.Generator, n: int) -> np.ndarray:
    t = _time(n)
    rate, depth = rng.uniform(4, 6), rng.uniform(200, 300)
    phase = 2 * np.pi * (rng.uniform(850, 950) * t - depth / (2 * np.pi * rate) * np.cos(2 * np.pi * rate * t))
    return _fade(np.sin(phase))


def _buzz(rng: np.random.Generator, n: int) -> np.ndarray:
    return _fade(0.6 * np.sign(np.sin(2 * np.pi * rng.uniform(180, 220) * _time(n))))


def _knock(rng: np.random.Generator, n: int) -> np.ndarray:
    t = _time(n)
    body = np.sin(2 * np.pi * rng.uniform(220, 280) * t) * np.exp(-t / 0.02)
    transient = rng.uniform(-1, 1, n) * np.exp(-t / 0.003)
    return body + 0.5 * transient


def _chord(rng: np.random.Generator, n: int) -> np.ndarray:
    t, root = _time(n), rng.uniform(400, 480)
    return _fade(sum(np.sin(2 * np.pi * root * r * t) for r in (1.0, 1.26, 1.5)) / 3)


@dataclass(frozen=True)
class _EventType:
    tag: str
    plural_tag: str
    names: tuple[tuple[str, str], ...]  # (singular, plural) phrasings, interchangeable in captions
    description: str
    seconds: tuple[float, float]
    synth: Callable[[np.random.Generator, int], np.ndarray]


def _names(*pairs: str) -> tuple[tuple[str, str], ...]:
    """``"singular/plural"`` strings as pairs."""
    return tuple(tuple(pair.split("/")) for pair in pairs)


EVENT_TYPES: tuple[_EventType, ...] = (
    _EventType(
        "hum", "hums", _names("low hum/low hums", "deep hum/deep hums", "low drone/low drones"),
        "a steady low-pitched tone", (0.35, 0.5), _hum,
    ),
    _EventType(
        "beep", "beeps",
        _names("high beep/high beeps", "high-pitched beep/high-pitched beeps", "electronic beep/electronic beeps"),
        "a short high-pitched tone", (0.12, 0.2), _beep,
    ),
    _EventType(
        "rising chirp", "rising chirps",
        _names("rising chirp/rising chirps", "upward sweep/upward sweeps", "rising whistle/rising whistles"),
        "a tone sweeping up in pitch", (0.3, 0.45), _rising,
    ),
    _EventType(
        "falling chirp", "falling chirps",
        _names("falling chirp/falling chirps", "downward sweep/downward sweeps", "falling whistle/falling whistles"),
        "a tone sweeping down in pitch", (0.3, 0.45), _falling,
    ),
    _EventType(
        "noise burst", "noise bursts",
        _names("burst of noise/bursts of noise", "noise burst/noise bursts", "hiss of static/hisses of static"),
        "a broadband hiss", (0.2, 0.3), _noise,
    ),
    _EventType(
        "click train", "click trains",
        _names("rapid train of clicks/rapid trains of clicks", "click train/click trains",
               "rattle of clicks/rattles of clicks"),
        "a quick series of sharp clicks", (0.25, 0.35), _clicks,
    ),
    _EventType(
        "siren", "sirens", _names("wailing siren/wailing sirens", "siren/sirens", "warbling tone/warbling tones"),
        "a tone wobbling up and down", (0.45, 0.6), _siren,
    ),
    _EventType(
        "buzz", "buzzes", _names("harsh buzz/harsh buzzes", "buzzer/buzzers", "electric buzz/electric buzzes"),
        "a rough square-wave drone", (0.3, 0.4), _buzz,
    ),
    _EventType(
        "knock", "knocks", _names("knock/knocks", "dull knock/dull knocks", "wooden knock/wooden knocks"),
        "a short dull thud", (0.1, 0.12), _knock,
    ),
    _EventType(
        "chord", "chords", _names("chord/chords", "musical chord/musical chords", "sustained chord/sustained chords"),
        "three notes sounding together", (0.4, 0.5), _chord,
    ),
)  # fmt: skip

_NUMBER = {1: "one", 2: "two", 3: "three"}
_TIMES = {2: "twice", 3: "three times"}


# --------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _count_phrase(event: _EventType, count: int, rng: np.random.Generator) -> str:
    singular, plural = event.names[rng.integers(len(event.names))]
    if count == 1:
        forms = [_article(singular), _article(singular), f"a single {singular}", f"one {singular}"]
    else:
        forms = [f"{_NUMBER[count]} {plural}", f"{_article(singular)} repeated {_TIMES[count]}",
                 f"{_article(singular)} {_TIMES[count]}"]  # fmt: skip
        if count == 2:
            forms.append(f"a pair of {plural}")
    return forms[rng.integers(len(forms))]


def _sequence_phrase(parts: list[str], rng: np.random.Generator) -> str:
    if len(parts) == 1:
        templates = ["{0}", "the sound of {0}", "{0} over faint background noise", "{0} in a quiet room",
                     "you can hear {0}"]  # fmt: skip
    elif len(parts) == 2:
        templates = ["{0} followed by {1}", "{0}, then {1}", "first {0}, then {1}", "{1} after {0}",
                     "{0} and then {1}", "{0} before {1}"]  # fmt: skip
    else:
        templates = ["{0}, then {1}, then {2}", "{0} followed by {1} and then {2}", "first {0}, next {1}, finally {2}",
                     "{0}, {1} and finally {2}", "{0}, after that {1}, and then {2}"]  # fmt: skip
    text = templates[rng.integers(len(templates))].format(*parts)
    return text[0].upper() + text[1:]


def _paraphrases(events: list[tuple[_EventType, int]], rng: np.random.Generator) -> list[str]:
    captions: list[str] = []
    for _ in range(200):  # every sequence has far more than 5 wordings, so this ends early
        caption = _sequence_phrase([_count_phrase(e, c, rng) for e, c in events], rng)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == _CAPTIONS_PER_CLIP:
                break
    return captions


def _short_caption(events: list[tuple[_EventType, int]]) -> str:
    return " then ".join(e.tag if c == 1 else f"{_NUMBER[c]} {e.plural_tag}" for e, c in events)


def _long_caption(events: list[tuple[_EventType, int]], seconds: float) -> str:
    def describe(event: _EventType, count: int) -> str:
        times = "" if count == 1 else f", heard {_TIMES[count]}"
        return f"{_article(event.names[0][0])} ({event.description}){times}"

    parts = [describe(e, c) for e, c in events]
    if len(parts) == 1:
        body = f"It contains only {parts[0]}."
    elif len(parts) == 2:
        body = f"It starts with {parts[0]}, followed by {parts[1]}."
    else:
        body = f"It starts with {parts[0]}, continues with {parts[1]}, and ends with {parts[2]}."
    return f"A {seconds:.1f}-second synthetic recording. {body} Faint background noise is audible throughout."


# --------------------------------------------------------------------------- audio


def _layout(events: list[tuple[_EventType, int]], rng: np.random.Generator) -> list[tuple[_EventType, int, int]]:
    """Onset (in samples, from the first event) and length of every event instance."""
    placed, cursor = [], 0.0
    for event, count in events:
        for _ in range(count):
            length = rng.uniform(*event.seconds)
            placed.append((event, round(cursor * SAMPLING_RATE), round(length * SAMPLING_RATE)))
            cursor += length + rng.uniform(0.06, 0.1)
        cursor += rng.uniform(0.1, 0.2)
    return placed


def _render(events: list[tuple[_EventType, int]], rng: np.random.Generator) -> np.ndarray | None:
    """Mix a clip, or ``None`` when the events do not fit in the longest clip length."""
    placed = _layout(events, rng)
    lead = rng.uniform(0.05, 0.2)
    end = lead + max(start + n for _, start, n in placed) / SAMPLING_RATE + 0.05
    if end > _MAX_SECONDS:
        return None
    seconds = max(end, rng.uniform(_MIN_SECONDS, _MAX_SECONDS))
    wave = rng.normal(0.0, rng.uniform(0.002, 0.01), round(seconds * SAMPLING_RATE))
    offset = round((lead + rng.uniform(0.0, seconds - end)) * SAMPLING_RATE)
    for event, start, n in placed:
        wave[offset + start : offset + start + n] += rng.uniform(0.25, 0.7) * event.synth(rng, n)
    return (wave / max(1.0, np.abs(wave).max() / 0.99)).astype(np.float32)


def _draw_events(rng: np.random.Generator) -> list[tuple[_EventType, int]]:
    num_events = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
    kinds = rng.choice(len(EVENT_TYPES), size=num_events, replace=False)
    return [(EVENT_TYPES[k], int(rng.integers(1, 4))) for k in kinds]


def _make_clip(rng: np.random.Generator, taken: set | None) -> tuple[list[tuple[_EventType, int]], np.ndarray]:
    """Draw events until they fit in a clip (and, when ``taken`` is given, are new to the split)."""
    for _ in range(10_000):
        events = _draw_events(rng)
        key = tuple((e.tag, c) for e, c in events)
        if taken is not None and key in taken:
            continue
        wave = _render(events, rng)
        if wave is not None:
            if taken is not None:
                taken.add(key)
            return events, wave
    raise ValueError("ran out of distinct event sequences; use fewer validation/test clips")


def _write_split(folder: str, split: str, size: int, seed: int, unique: bool) -> str:
    rng = np.random.default_rng([seed, ["train", "val", "test"].index(split)])
    taken: set | None = set() if unique else None
    os.makedirs(os.path.join(folder, "audio"), exist_ok=True)
    manifest = os.path.join(folder, f"{split}.jsonl")
    with open(manifest, "w", encoding="utf-8") as handle:
        for i in range(size):
            events, wave = _make_clip(rng, taken)
            clip_id = f"{split}_{i:05d}"
            audio = f"audio/{clip_id}.wav"
            sf.write(os.path.join(folder, audio), wave, SAMPLING_RATE, subtype="PCM_16")
            seconds = len(wave) / SAMPLING_RATE
            row = {
                "id": clip_id,
                "audio": audio,
                "caption": _paraphrases(events, rng),
                "caption_long": _long_caption(events, seconds),
                "caption_short": _short_caption(events),
                "tags": [e.tag for e, _ in events],
                "events": [{"type": e.tag, "count": c} for e, c in events],
                "duration": round(seconds, 3),
            }
            handle.write(json.dumps(row) + "\n")
    return manifest


def _write_hard_split(folder: str, pairs: int, seed: int) -> tuple[str, str]:
    """Clip pairs with mirrored event order, and the hard-negative triples linking them."""
    rng = np.random.default_rng([seed, 3])
    taken: set = set()
    manifest, triples = os.path.join(folder, "hard.jsonl"), os.path.join(folder, "hard_negatives.jsonl")
    with open(manifest, "w", encoding="utf-8") as rows, open(triples, "w", encoding="utf-8") as negatives:
        for i in range(pairs):
            for _ in range(10_000):
                events = _draw_events(rng)
                mirrored = events[::-1]
                keys = tuple((e.tag, c) for e, c in events), tuple((e.tag, c) for e, c in mirrored)
                if len(events) < 2 or keys[0] in taken or keys[1] in taken:
                    continue
                waves = [_render(events, rng), _render(mirrored, rng)]
                if all(wave is not None for wave in waves):
                    taken.update(keys)
                    break
            else:
                raise ValueError("ran out of distinct event sequences; use fewer hard pairs")
            ids = [f"hard_{i:05d}a", f"hard_{i:05d}b"]
            captions = [_paraphrases(events, rng), _paraphrases(mirrored, rng)]
            for clip_id, wave, texts, clip_events in zip(ids, waves, captions, (events, mirrored)):
                audio = f"audio/{clip_id}.wav"
                sf.write(os.path.join(folder, audio), wave, SAMPLING_RATE, subtype="PCM_16")
                row = {"id": clip_id, "audio": audio, "caption": texts, "tags": [e.tag for e, _ in clip_events]}
                rows.write(json.dumps(row) + "\n")
            for (target, negative), texts in zip((ids, ids[::-1]), captions):
                negatives.write(json.dumps({"query": texts[0], "target": target, "negative": negative}) + "\n")
    return manifest, triples


def _write_qa(folder: str, test_manifest: str, seed: int) -> str:
    """One question per test clip: the first sound's type (``order``) or its count (``count``)."""
    rng = np.random.default_rng([seed, 4])
    manifest = os.path.join(folder, "qa.jsonl")
    with open(test_manifest, encoding="utf-8") as source, open(manifest, "w", encoding="utf-8") as handle:
        for i, line in enumerate(source):
            clip = json.loads(line)
            first = clip["events"][0]
            if i % 2 == 0:
                others = [e.tag for e in EVENT_TYPES if e.tag != first["type"]]
                choices = [first["type"], *rng.choice(others, size=3, replace=False).tolist()]
                rng.shuffle(choices)
                question, answer, category = "Which sound is heard first?", first["type"], "order"
            else:
                choices = ["once", "twice", "three times"]
                question = f"How many times is the first sound, the {first['type']}, heard?"
                answer, category = choices[first["count"] - 1], "count"
            row = {"id": f"qa_{i:05d}", "audio": clip["audio"], "question": question, "answer": answer,
                   "choices": choices, "category": category}  # fmt: skip
            handle.write(json.dumps(row) + "\n")
    return manifest


def _write_classification(folder: str, test_manifest: str, size: int, seed: int) -> tuple[str, str]:
    """Single-label clips (one event type each, the types in turn) and the test clips as multi-label rows."""
    rng = np.random.default_rng([seed, 5])
    single, multi = os.path.join(folder, "zs.jsonl"), os.path.join(folder, "zs_multi.jsonl")
    with open(single, "w", encoding="utf-8") as handle:
        for i in range(size):
            event = EVENT_TYPES[i % len(EVENT_TYPES)]
            # One event of at most three repeats always fits in a clip.
            wave = _render([(event, int(rng.integers(1, 4)))], rng)
            clip_id = f"zs_{i:05d}"
            audio = f"audio/{clip_id}.wav"
            sf.write(os.path.join(folder, audio), wave, SAMPLING_RATE, subtype="PCM_16")
            handle.write(json.dumps({"id": clip_id, "audio": audio, "label": event.tag}) + "\n")
    with open(test_manifest, encoding="utf-8") as source, open(multi, "w", encoding="utf-8") as handle:
        for line in source:
            clip = json.loads(line)
            row = {"id": f"zs_multi_{clip['id']}", "audio": clip["audio"], "labels": clip["tags"]}
            handle.write(json.dumps(row) + "\n")
    return single, multi


def make_synthetic_dataset(
    root: str, seed: int = 0, num_train: int = 400, num_val: int = 60, num_test: int = 100, num_hard_pairs: int = 20
) -> dict[str, str]:
    """Write the synthetic dataset under ``root`` and return ``{split: manifest path}``.

    Besides ``train``, ``val`` and ``test``, the result names ``hard`` (mirrored clip pairs),
    ``hard_negatives`` (their triples), ``qa`` (questions on the test clips), ``zs`` (``num_test //
    2`` single-event clips labelled with their event type) and ``zs_multi`` (the test clips labelled
    with their event types).

    Each parameter set gets its own sub-folder; a finished folder is reused at once. The folder is
    built under a temporary name and renamed when complete, so concurrent callers (several ranks)
    and interrupted runs never see a half-written dataset.

    Args:
        root: parent folder of the generated datasets.
        seed: fixes every clip and caption.
        num_train: training clips.
        num_val: validation clips.
        num_test: test clips.
        num_hard_pairs: mirrored clip pairs of the ``hard`` set.
    """
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    if min(sizes.values()) < 0 or num_hard_pairs < 0:
        raise ValueError(f"split sizes must be >= 0, got {sizes} and num_hard_pairs={num_hard_pairs}")
    name = f"v{GENERATOR_VERSION}-seed{seed}-{num_train}-{num_val}-{num_test}-{num_hard_pairs}"
    folder = os.path.join(root, name)
    extras = ("hard", "hard_negatives", "qa", "zs", "zs_multi")
    manifests = {split: os.path.join(folder, f"{split}.jsonl") for split in (*sizes, *extras)}
    if os.path.isfile(os.path.join(folder, "COMPLETE")):
        return manifests
    os.makedirs(root, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{name}-", dir=root)
    try:
        for split, size in sizes.items():
            _write_split(scratch, split, size, seed, unique=split != "train")
        _write_hard_split(scratch, num_hard_pairs, seed)
        _write_qa(scratch, os.path.join(scratch, "test.jsonl"), seed)
        _write_classification(scratch, os.path.join(scratch, "test.jsonl"), num_test // 2, seed)
        with open(os.path.join(scratch, "COMPLETE"), "w", encoding="utf-8") as handle:
            json.dump({"version": GENERATOR_VERSION, "seed": seed, **sizes, "hard_pairs": num_hard_pairs}, handle)
        os.rename(scratch, folder)
    except OSError:
        if not os.path.isfile(os.path.join(folder, "COMPLETE")):  # lost a race only if the winner finished
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifests


class SyntheticDataModule(RetrievalDataModule):
    """Retrieval data over generated compositional clips (see the module docstring).

    The data are generated in :meth:`prepare_data` (or on first use) and cached under ``root``.
    The predict split is the test split. Testing runs these named sets: ``synthetic`` (the test
    clips, with caption→caption retrieval and embedding diagnostics), ``synthetic_order`` (mirrored
    clip pairs with hard negatives; left out when ``num_hard_pairs`` is 0), ``synthetic_qa`` (QA by
    retrieval on the test clips, per category ``order`` / ``count``), and two zero-shot
    classification sets over the ten event types: ``synthetic_zs`` (single-event clips, top-1 /
    top-5) and ``synthetic_zs_multi`` (the test clips, mAP), left out for fewer than 2 test clips.

    Args:
        root: cache folder of generated datasets.
        seed: seed of the generated data and of the training order and draws.
        num_train: training clips.
        num_val: validation clips.
        num_test: test clips.
        num_hard_pairs: mirrored clip pairs of the ``synthetic_order`` test set.
        extra_test_sets: test on ``synthetic_order`` and ``synthetic_qa`` too; ``False`` tests on
            ``synthetic`` alone (the re-ranker evaluates one set).
        **kwargs: the loader, cropping and instruction settings of :class:`RetrievalDataModule`
            (``batch_size``, ``num_workers``, ``train_max_seconds``, ``caption_fields``,
            ``bucket_by_duration``, ...); the manifests are the generated ones.
    """

    def __init__(
        self,
        root: str = ".cache/synthetic",
        seed: int = 0,
        num_train: int = 400,
        num_val: int = 60,
        num_test: int = 100,
        num_hard_pairs: int = 20,
        extra_test_sets: bool = True,
        **kwargs,
    ):
        manifests = sorted(
            k for k, v in kwargs.items() if (k.endswith(("_manifest", "_sets")) or k == "audio_dir") and v
        )
        if manifests:
            raise ValueError(f"SyntheticDataModule generates its own manifests; remove {manifests}")
        super().__init__(seed=seed, **kwargs)
        self.root = root
        self.extra_test_sets = extra_test_sets
        self.sizes = {
            "num_train": num_train, "num_val": num_val, "num_test": num_test, "num_hard_pairs": num_hard_pairs
        }  # fmt: skip

    def _generate(self) -> None:
        paths = make_synthetic_dataset(self.root, self.seed, **self.sizes)
        self.manifests.update(train=paths["train"], val=paths["val"], predict=paths["test"])
        sets = {"synthetic": EvalSet(paths["test"], text_text=True, diagnostics=True)}
        if self.extra_test_sets:
            if self.sizes["num_hard_pairs"]:
                sets["synthetic_order"] = EvalSet(paths["hard"], hard_negatives=paths["hard_negatives"])
            sets["synthetic_qa"] = EvalSet(paths["qa"], task="qa")
            if self.sizes["num_test"] >= 2:
                sets["synthetic_zs"] = EvalSet(paths["zs"], task="classification", templates=ZS_TEMPLATES)
                sets["synthetic_zs_multi"] = EvalSet(paths["zs_multi"], task="classification", templates=ZS_TEMPLATES)
        self.named_sets["test"] = sets

    def prepare_data(self) -> None:
        self._generate()

    def setup(self, stage: str | None = None) -> None:
        # prepare_data runs on one process per node only; the others find the finished cache here.
        self._generate()
        super().setup(stage)
