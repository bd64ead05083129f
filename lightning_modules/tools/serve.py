"""``python main.py serve``: a retrieval demo page and JSON API over an embedded collection.

Researchers judge retrieval by looking at it, as the case studies of Omni-Embed-Audio (arXiv
2604.18360) and the instruction-following demos of ALM2Vec do: type a caption, listen to what comes
back. The server loads a model (an export, :meth:`EmbeddingModel.from_pretrained`, or a checkpoint
with its config, :meth:`EmbeddingModel.from_checkpoint`) and a collection, the ``predict`` output
(``embeddings.safetensors`` + ``embeddings.json``, see :mod:`callbacks.prediction_writer`), once.
Every query is embedded on the fly by the model and ranked against the collection with the exact
engine of ``search`` (:func:`~lightning_modules.tools.search.topk_search`):

- a text query (optionally with an instruction) ranks the collection's **clips** (text→audio);
- an audio query, an uploaded file or a clip of the collection (re-embedded from its file with the
  query instruction), ranks the collection's **captions** (audio→text), each shown with its clip.

Relevance marks: the collection is labelled (every caption belongs to a clip), so when the query is
a clip of the collection its relevant results are that clip's captions, and when a text query equals
one of the collection's captions (ignoring case and spacing) its relevant results are the clips of
that caption. Each result then carries ``relevant: true/false``; otherwise ``null`` (unknown).

JSON API (errors are ``{"error": message}`` with a 4xx status, and the server keeps serving)::

    GET  /api/info                          collection size, width, limits, instructions (defaults, and
                                            whether they change the model's text / audio embeddings)
    GET  /api/collection                    [{"id": clip id, "captions": [...]}, ...] (for the page's lists)
    GET  /api/search?q=TEXT&k=10[&instruction=...]        text query
    GET  /api/search?clip=CLIP_ID&k=10[&instruction=...]  a collection clip as the query
    POST /api/search  (multipart: audio=<file>, k, instruction)   an uploaded audio query
    GET  /audio/CLIP_ID                     the clip's audio file
    GET  /                                  the page

A missing ``instruction`` means the default for the query's side (from the config's
``query_instruction`` / ``document_instruction``, or ``--text_instruction`` / ``--audio_instruction``);
an empty one means none. Search answers hold ``results`` (rank, score, clip, caption(s),
``audio_url``, ``relevant``), ``relevant_total`` and ``timing_ms`` (``embed``, ``search``).

Safety: the server binds to 127.0.0.1 unless told otherwise; audio is served only by clip id and only
from inside the collection's audio folder (the resolved file must lie under it); request bodies over
the upload limit are refused with 413 before they are read in full.

FastAPI, uvicorn and python-multipart are the optional extra ``pip install -e ".[serve]"``; only this
tool imports them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import torch
from safetensors import safe_open

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
except ImportError as err:  # the optional extra
    raise ImportError(f"python main.py serve needs the 'serve' extra: pip install -e \".[serve]\" ({err})") from err

from datamodules.audio import AudioDecodeError
from lightning_modules.tools.encoder import EmbeddingModel
from lightning_modules.tools.search import ids_path, read_embeddings, topk_search

PAGE = Path(__file__).with_name("static") / "serve.html"
DEFAULT_MAX_SECONDS = 10.0  # the data modules' default evaluation crop
#: multipart framing and the small form fields allowed on top of the upload limit.
FORM_OVERHEAD_BYTES = 64 * 1024
AUDIO_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}


class QueryError(Exception):
    """A request the server refuses: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def normalize_text(text: str) -> str:
    """The form under which a typed query matches a collection caption: case and spacing ignored."""
    return " ".join(text.split()).casefold()


@dataclass
class Collection:
    """An embedded collection as ``predict`` wrote it, with lookups the server needs.

    Args:
        path: the ``embeddings.safetensors`` file.
        audio: ``(N, D)`` clip embeddings.
        text: ``(M, D)`` caption embeddings.
        text_clip: ``(M,)`` row of ``audio`` each caption belongs to.
        clip_ids: the ``N`` clip ids.
        caption_ids: the ``M`` caption ids (``<clip id>#<index>``).
        captions: the ``M`` caption texts.
        audio_paths: the ``N`` clips' audio files (absolute), or ``None`` when the file lists none.
        audio_root: the only folder audio is served from (``None`` without audio paths).
    """

    path: Path
    audio: torch.Tensor
    text: torch.Tensor
    text_clip: torch.Tensor
    clip_ids: list[str]
    caption_ids: list[str]
    captions: list[str]
    audio_paths: list[str] | None
    audio_root: Path | None
    clip_row: dict[str, int] = field(init=False)
    clip_captions: list[list[int]] = field(init=False)
    caption_rows: dict[str, list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.clip_row = {clip: row for row, clip in enumerate(self.clip_ids)}
        self.clip_captions = [[] for _ in self.clip_ids]
        self.caption_rows = {}
        for row, (clip, text) in enumerate(zip(self.text_clip.tolist(), self.captions)):
            self.clip_captions[clip].append(row)
            self.caption_rows.setdefault(normalize_text(text), []).append(row)

    @property
    def width(self) -> int:
        return self.audio.shape[1]

    @classmethod
    def load(cls, path: str | Path, audio_root: str | Path | None = None) -> Collection:
        """Read a ``predict`` output; ``audio_root`` defaults to the deepest folder holding every clip.

        Raises:
            FileNotFoundError: the embeddings file, its JSON or ``audio_root`` does not exist.
            ValueError: the files do not fit together (row counts, caption texts, clip rows).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no embeddings file {path} (the embeddings.safetensors that predict writes)")
        if not ids_path(path).is_file():
            raise FileNotFoundError(f"no {ids_path(path)} beside {path}: the collection needs its ids and captions")
        audio, clip_ids, _ = read_embeddings(path, "audio")
        text, caption_ids, captions = read_embeddings(path, "text")
        with safe_open(str(path), framework="pt") as handle:
            if "text_clip" not in handle.keys():
                raise ValueError(f"{path} has no 'text_clip' tensor: which clip each caption belongs to")
            text_clip = handle.get_tensor("text_clip")
        if captions is None:
            raise ValueError(f"{ids_path(path)} lists no caption texts ('text': {{'texts': [...]}})")
        if audio.shape[1] != text.shape[1]:
            raise ValueError(f"{path}: clip embeddings are {audio.shape[1]} wide, captions {text.shape[1]}")
        if tuple(text_clip.shape) != (text.shape[0],) or (
            text_clip.numel() and (text_clip.min() < 0 or text_clip.max() >= audio.shape[0])
        ):
            raise ValueError(f"{path}: 'text_clip' must give a clip row in [0, {audio.shape[0]}) for each caption")
        audio_paths = json.loads(ids_path(path).read_text())["audio"].get("paths")
        if audio_paths is not None and len(audio_paths) != len(clip_ids):
            raise ValueError(f"{ids_path(path)} lists {len(audio_paths)} audio paths for {len(clip_ids)} clips")
        root = None
        if audio_root is not None:
            root = Path(audio_root).resolve()
            if not root.is_dir():
                raise FileNotFoundError(f"audio root {audio_root} is not a folder")
        elif audio_paths:
            root = Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in audio_paths])).resolve()
        return cls(path, audio.float(), text.float(), text_clip.long(), clip_ids, caption_ids, captions,
                   audio_paths, root)

    def audio_file(self, clip_id: str) -> Path:
        """The audio file of a clip, checked to lie inside :attr:`audio_root`.

        Raises:
            QueryError: 404 for an unknown clip or a collection without audio paths, 403 for a file
                outside the audio root (a symlink or a path leading out of it).
        """
        row = self.clip_row.get(clip_id)
        if row is None:
            raise QueryError(404, f"no clip {clip_id!r} in the collection")
        if self.audio_paths is None or self.audio_root is None:
            raise QueryError(404, f"{ids_path(self.path)} lists no audio files (re-run predict to add them)")
        resolved = Path(self.audio_paths[row]).resolve()
        if not resolved.is_relative_to(self.audio_root):
            raise QueryError(
                403, f"the audio of clip {clip_id!r} lies outside the collection's folder {self.audio_root}"
            )
        if not resolved.is_file():
            raise QueryError(404, f"the audio file of clip {clip_id!r} is missing: {resolved}")
        return resolved


class RetrievalService:
    """Embeds queries with the model and ranks them against a :class:`Collection` (see the module doc).

    Args:
        model: the embedding model; its width must be the collection's.
        collection: the embedded collection.
        text_instruction: default instruction of text queries (the training's document side).
        audio_instruction: default instruction of audio queries (the training's query side).
        max_seconds: crop of query audio (the evaluation crop the collection was embedded with);
            ``None`` keeps query audio whole.
        max_k: largest ``k`` a request may ask for.
        default_k: ``k`` when a request gives none.

    Raises:
        ValueError: the collection's embeddings are not as wide as the model's.
    """

    def __init__(
        self,
        model: EmbeddingModel,
        collection: Collection,
        text_instruction: str | None = None,
        audio_instruction: str | None = None,
        max_seconds: float | None = DEFAULT_MAX_SECONDS,
        max_k: int = 100,
        default_k: int = 10,
    ):
        width = model.head.output_size(model.backbone.hidden_size)
        if collection.width != width:
            raise ValueError(
                f"the collection {collection.path} holds {collection.width}-wide embeddings but the model embeds "
                f"to {width}: it was embedded by another model; run predict with this model"
            )
        if not 1 <= default_k <= max_k:
            raise ValueError(f"need 1 <= default_k <= max_k, got {default_k} and {max_k}")
        self.model = model.eval()
        self.collection = collection
        self.instructions = {"text": text_instruction, "audio": audio_instruction}
        self.max_seconds = max_seconds
        self.max_k = max_k
        self.default_k = default_k
        # One forward at a time: requests run in a thread pool and encode() switches module modes.
        self._lock = threading.Lock()
        self.instruction_aware = self._probe_instructions()

    def _probe_instructions(self) -> dict[str, bool]:
        """Whether an instruction changes the model's text and audio embeddings (a prompt template may
        have no place for one, as AuroLA's), found by embedding a probe with and without one."""
        probe = {"text": {"text": ["a probe"]}, "audio": {"audio": [np.zeros(self.model.sampling_rate, np.float32)]}}
        return {
            side: not torch.equal(self.model.encode(**inputs), self.model.encode(**inputs, instruction="Probe."))
            for side, inputs in probe.items()
        }

    def check_k(self, k: int | None) -> int:
        if k is None:
            return self.default_k
        if not 1 <= k <= self.max_k:
            raise QueryError(400, f"k must be between 1 and {self.max_k}, got {k}")
        return k

    def _instruction(self, side: str, instruction: str | None) -> str | None:
        if instruction is None:
            return self.instructions[side]
        return instruction or None

    def search_text(self, text: str | None, k: int | None = None, instruction: str | None = None) -> dict[str, Any]:
        """Rank the collection's clips for a text query."""
        if text is None or not text.strip():
            raise QueryError(400, "empty query: give q=<text>, clip=<clip id> or upload audio")
        k = self.check_k(k)
        instruction = self._instruction("text", instruction)
        start = time.perf_counter()
        with self._lock:
            query = self.model.encode(text=[text], instruction=instruction)
        embedded = time.perf_counter()
        scores, rows = topk_search(query, self.collection.audio, k)
        searched = time.perf_counter()
        c = self.collection
        relevant = {c.text_clip[row].item() for row in c.caption_rows.get(normalize_text(text), [])}
        results = [
            {
                "rank": rank,
                "score": score,
                "clip": c.clip_ids[row],
                "captions": [c.captions[i] for i in c.clip_captions[row]],
                "audio_url": self._audio_url(row),
                "relevant": (row in relevant) if relevant else None,
            }
            for rank, (score, row) in enumerate(zip(scores[0].tolist(), rows[0].tolist()), 1)
        ]
        query_record = {"kind": "text", "text": text, "instruction": instruction}
        return self._answer(query_record, "audio", results, len(relevant) or None, start, embedded, searched)

    def search_clip(self, clip_id: str, k: int | None = None, instruction: str | None = None) -> dict[str, Any]:
        """Rank the collection's captions for one of its clips, re-embedded from its audio file."""
        path = self.collection.audio_file(clip_id)
        row = self.collection.clip_row[clip_id]
        try:
            answer, rows = self._search_audio(str(path), k, instruction)
        except AudioDecodeError as err:
            raise QueryError(500, f"cannot decode the audio of clip {clip_id!r}: {err}") from err
        relevant = set(self.collection.clip_captions[row])
        for result, caption_row in zip(answer["results"], rows):
            result["relevant"] = caption_row in relevant
        answer["query"].update(kind="clip", clip=clip_id, audio_url=self._audio_url(row))
        answer["relevant_total"] = len(relevant)
        return answer

    def search_upload(
        self, data: bytes, filename: str, k: int | None = None, instruction: str | None = None
    ) -> dict[str, Any]:
        """Rank the collection's captions for an uploaded audio file (decoded like the training data)."""
        if not data:
            raise QueryError(400, f"the upload {filename!r} is empty")
        # libsndfile reads files; the suffix (letters and digits only) keeps format errors precise.
        suffix = os.path.splitext(filename)[1]
        suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""
        with tempfile.TemporaryDirectory(prefix="alm-embed-serve-") as folder:
            path = os.path.join(folder, f"upload{suffix}")
            with open(path, "wb") as handle:
                handle.write(data)
            try:
                answer, _ = self._search_audio(path, k, instruction)
            except AudioDecodeError as err:
                message = str(err).replace(path, repr(filename))
                raise QueryError(400, f"cannot decode the upload ({err.reason}): {message}") from err
        answer["query"].update(kind="audio", filename=filename)
        return answer

    def _search_audio(self, path: str, k: int | None, instruction: str | None) -> tuple[dict[str, Any], list[int]]:
        """The answer for an audio file (relevance unknown) and the caption rows of its results."""
        k = self.check_k(k)
        instruction = self._instruction("audio", instruction)
        start = time.perf_counter()
        with self._lock:
            query = self.model.encode(audio=[path], instruction=instruction, max_seconds=self.max_seconds)
        embedded = time.perf_counter()
        scores, rows = topk_search(query, self.collection.text, k)
        searched = time.perf_counter()
        c = self.collection
        results = []
        for rank, (score, row) in enumerate(zip(scores[0].tolist(), rows[0].tolist()), 1):
            clip = c.text_clip[row].item()
            results.append(
                {
                    "rank": rank,
                    "score": score,
                    "clip": c.clip_ids[clip],
                    "caption_id": c.caption_ids[row],
                    "caption": c.captions[row],
                    "audio_url": self._audio_url(clip),
                    "relevant": None,
                }
            )
        answer = self._answer({"instruction": instruction}, "text", results, None, start, embedded, searched)
        return answer, rows[0].tolist()

    def _audio_url(self, clip_row: int) -> str | None:
        if self.collection.audio_paths is None:
            return None
        return f"/audio/{quote(self.collection.clip_ids[clip_row], safe='')}"

    @staticmethod
    def _answer(
        query: dict[str, Any], target: str, results: list[dict[str, Any]], relevant_total: int | None,
        start: float, embedded: float, searched: float,
    ) -> dict[str, Any]:  # fmt: skip
        return {
            "query": query,
            "target": target,
            "results": results,
            "relevant_total": relevant_total,
            "timing_ms": {"embed": 1000 * (embedded - start), "search": 1000 * (searched - embedded)},
        }

    def info(self) -> dict[str, Any]:
        c = self.collection
        return {
            "collection": str(c.path),
            "clips": len(c.clip_ids),
            "captions": len(c.captions),
            "dim": c.width,
            "audio": c.audio_paths is not None,
            "instruction_aware": self.instruction_aware,
            "text_instruction": self.instructions["text"],
            "audio_instruction": self.instructions["audio"],
            "max_seconds": self.max_seconds,
            "max_k": self.max_k,
            "default_k": self.default_k,
        }

    def clips(self) -> list[dict[str, Any]]:
        c = self.collection
        return [
            {"id": clip, "captions": [c.captions[i] for i in rows]} for clip, rows in zip(c.clip_ids, c.clip_captions)
        ]


class BodyLimit:
    """ASGI middleware refusing request bodies over an upload limit with 413, counting bytes as they
    arrive (a client may send no ``Content-Length``), so that an oversized upload is never read in
    full. Bodies may exceed ``max_upload_bytes`` by :data:`FORM_OVERHEAD_BYTES` of multipart framing."""

    def __init__(self, app: Any, max_upload_bytes: int):
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.limit = max_upload_bytes + FORM_OVERHEAD_BYTES

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        announced = dict(scope["headers"]).get(b"content-length")
        if announced is not None and announced.isdigit() and int(announced) > self.limit:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        message = f"request body over the upload limit of {_megabytes(self.max_upload_bytes)} (--max_upload_mb)"
        body = json.dumps({"error": message})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body.encode()})


class _BodyTooLarge(Exception):
    pass


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.3g} MB"


def create_app(service: RetrievalService, max_upload_bytes: int = 20 * 2**20) -> FastAPI:
    """The FastAPI application of the page and the API (see the module docstring)."""
    app = FastAPI(title="alm-embed retrieval demo", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(BodyLimit, max_upload_bytes=max_upload_bytes)
    page = PAGE.read_text(encoding="utf-8")

    @app.exception_handler(QueryError)
    async def query_error(request: Request, err: QueryError) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        # loc is ("query", "k"): name the parameter.
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                             for e in err.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {**service.info(), "max_upload_bytes": max_upload_bytes}

    @app.get("/api/collection")
    def collection() -> list[dict[str, Any]]:
        return service.clips()

    @app.get("/api/search")
    def search(q: str | None = None, clip: str | None = None, k: int | None = None,
               instruction: str | None = None) -> dict[str, Any]:  # fmt: skip
        if q is not None and clip is not None:
            raise QueryError(400, "give either q=<text> or clip=<clip id>, not both")
        if clip is not None:
            return service.search_clip(clip, k, instruction)
        return service.search_text(q, k, instruction)

    @app.post("/api/search")
    async def search_audio(request: Request) -> dict[str, Any]:
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("audio")
        if upload is None or isinstance(upload, str):
            raise QueryError(400, "POST /api/search needs the audio file in the multipart field 'audio'")
        data = await upload.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise QueryError(413, f"the upload is over the limit of {_megabytes(max_upload_bytes)} (--max_upload_mb)")
        k = form.get("k")
        if k is not None and not (isinstance(k, str) and re.fullmatch(r"\s*-?\d+\s*", k)):
            raise QueryError(400, f"k must be an integer, got {k!r}")
        instruction = form.get("instruction")
        return await run_in_threadpool(
            service.search_upload, data, upload.filename or "upload", None if k is None else int(k),
            instruction if isinstance(instruction, str) else None,
        )

    @app.get("/audio/{clip_id:path}")
    def audio(clip_id: str) -> FileResponse:
        path = service.collection.audio_file(clip_id)
        return FileResponse(path, media_type=AUDIO_TYPES.get(path.suffix.lower(), "application/octet-stream"))

    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py serve",
        description="Serve a retrieval demo page and JSON API over a predict output (embeddings.safetensors).",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="exported model directory (python main.py export)")
    model.add_argument("--ckpt_path", help="Lightning checkpoint; its model comes from --config")
    parser.add_argument(
        "--config",
        help="recipe or run config.yaml: the model section builds a --ckpt_path model (default "
        "<log_dir>/config.yaml); its data section gives the default instructions and audio crop",
    )
    parser.add_argument("--embeddings", required=True, help="the collection: embeddings.safetensors of predict")
    parser.add_argument("--audio_root", help="folder audio is served from (default: the folder holding every clip)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--max_upload_mb", type=float, default=20.0, help="largest audio upload, in MB")
    parser.add_argument("--max_k", type=int, default=100, help="most results a query may ask for")
    parser.add_argument("--k", type=int, default=10, help="results when a query gives no k")
    parser.add_argument("--text_instruction", help="default instruction of text queries (else the config's "
                        "data.document_instruction)")
    parser.add_argument("--audio_instruction", help="default instruction of audio queries (else the config's "
                        "data.query_instruction)")
    parser.add_argument("--max_seconds", type=float, help="crop of query audio in seconds (else the config's "
                        f"data.eval_max_seconds, else {DEFAULT_MAX_SECONDS:g})")
    parser.add_argument("--device", default="cpu", help="torch device of the model")
    return parser


def app_from_args(args: list[str] | None = None) -> tuple[FastAPI, argparse.Namespace]:
    """Load the model and the collection named on the command line; the app and the options."""
    options = build_parser().parse_args(args)
    if options.max_upload_mb <= 0 or not math.isfinite(options.max_upload_mb):
        raise ValueError(f"--max_upload_mb must be positive, got {options.max_upload_mb}")
    collection = Collection.load(options.embeddings, options.audio_root)
    defaults = {"text": None, "audio": None, "max_seconds": DEFAULT_MAX_SECONDS}
    if options.config is not None:
        defaults.update(_data_defaults(options.config))
    if options.model is not None:
        model = EmbeddingModel.from_pretrained(options.model, options.device)
    else:
        model = EmbeddingModel.from_checkpoint(options.ckpt_path, options.config, options.device)
    service = RetrievalService(
        model,
        collection,
        text_instruction=options.text_instruction if options.text_instruction is not None else defaults["text"],
        audio_instruction=options.audio_instruction if options.audio_instruction is not None else defaults["audio"],
        max_seconds=options.max_seconds if options.max_seconds is not None else defaults["max_seconds"],
        max_k=options.max_k,
        default_k=options.k,
    )
    return create_app(service, round(options.max_upload_mb * 2**20)), options


def _data_defaults(config: str) -> dict[str, Any]:
    """Instructions and evaluation crop of a config's data section (none when it has no data section)."""
    import yaml

    from datamodules.check import load_datamodule

    with open(config, encoding="utf-8") as handle:
        if (yaml.safe_load(handle) or {}).get("data") is None:
            return {}
    data = load_datamodule([config])
    return {"text": data.document_instruction, "audio": data.query_instruction,
            "max_seconds": data.eval_policy.max_seconds}


def main(args: list[str] | None = None) -> int:
    """``python main.py serve``: load, then serve until interrupted."""
    app, options = app_from_args(args)
    print(f"serving {options.embeddings} on http://{options.host}:{options.port}/ (Ctrl+C stops)")
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
    return 0
