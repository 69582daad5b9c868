"""The search server: a JSON API and one static page on Starlette + uvicorn.

Endpoints: ``GET /`` (the page), ``GET /health``, ``GET /info``, ``GET /search?q=&k=&mode=&explain=``,
``POST /search`` (JSON ``{"text": ...}`` or ``{"id": ...}`` plus ``k``, ``mode``, ``explain``), ``POST /search/upload``
(multipart ``file`` with ``modality`` image|audio), ``GET /items/{id}``, ``GET /items/{id}/thumbnail``,
``GET /items/{id}/audio``.

Safety: requests name items by integer id only, never by path; media is read from the index's own collection.
Uploads are capped while they stream (413 past the cap) and decoded by the model's own decoders (415 when that
fails). Every error is a 4xx JSON ``{"error": message}`` and the server keeps serving.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from codebridge.search.searcher import MODES, BadQuery, Searcher

MAX_K = 100
MAX_TEXT = 1000
THUMB = 160
ID_PATTERN = re.compile(r"\d{1,12}")
AUDIO_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}


def page() -> str:
    return resources.files("codebridge.search").joinpath("static/search.html").read_text()


# ------------------------------------------------------------------------------------------------ parameters
def parse_id(value: Any) -> int:
    """An item id: a non-negative integer (so no path, traversal or other name ever reaches the collection)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and ID_PATTERN.fullmatch(value):
        return int(value)
    raise HTTPException(400, f"id must be a non-negative integer item id, got {str(value)[:40]!r}")


def parse_k(value: Any) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise HTTPException(400, f"k must be an integer from 1 to {MAX_K}, got {str(value)[:40]!r}") from None
    if not 1 <= k <= MAX_K:
        raise HTTPException(400, f"k must be an integer from 1 to {MAX_K}, got {k}")
    return k


def parse_options(params: Any) -> tuple[int, str, bool]:
    """(k, mode, explain) from query parameters, form fields or a JSON object."""
    mode = params.get("mode", "dense")
    if mode not in MODES:
        raise HTTPException(400, f"mode must be one of {', '.join(MODES)}, got {str(mode)[:40]!r}")
    explain = params.get("explain", False)
    explain = explain if isinstance(explain, bool) else str(explain).lower() in ("1", "true", "yes")
    return parse_k(params.get("k", 10)), mode, explain


def parse_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise HTTPException(400, "text must be a non-empty string")
    if len(value) > MAX_TEXT:
        raise HTTPException(400, f"text is {len(value)} characters long; the limit is {MAX_TEXT}")
    return value


# ------------------------------------------------------------------------------------------------ app
def create_app(searcher: Searcher, max_upload: int = 10_000_000) -> Starlette:
    """The ASGI app serving ``searcher``; uploads above ``max_upload`` bytes are refused with 413."""

    def answer(hits: list[dict[str, Any]]) -> JSONResponse:
        return JSONResponse({"hits": hits})

    def search_get(request: Request) -> JSONResponse:
        k, mode, explain = parse_options(request.query_params)
        return answer(searcher.search("text", parse_text(request.query_params.get("q")), k, mode, explain))

    async def search_post(request: Request) -> JSONResponse:
        try:
            body = json.loads(await _read_capped(request, 64_000))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPException(400, f'the body is not valid JSON ({exc}); send {{"text": "..."}}') from None
        if not isinstance(body, dict) or ("text" in body) == ("id" in body):
            raise HTTPException(400, 'send a JSON object with exactly one of "text" or "id"')
        k, mode, explain = parse_options(body)
        if "id" in body:
            return answer(await run_in_threadpool(searcher.similar, parse_id(body["id"]), k, mode, explain))
        text = parse_text(body["text"])
        return answer(await run_in_threadpool(searcher.search, "text", text, k, mode, explain))

    async def search_upload(request: Request) -> JSONResponse:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(415, "send the file as multipart/form-data with a 'file' field")
        parser = MultiPartParser(request.headers, _capped(request, max_upload), max_files=1, max_fields=8)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise HTTPException(400, f"malformed upload: {exc.message}") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "the upload has no 'file' field")
        modality = form.get("modality", "image")
        if modality not in ("image", "audio"):
            raise HTTPException(400, f"modality must be image or audio, got {str(modality)[:40]!r}")
        data = await upload.read()
        k, mode, explain = parse_options(form)
        try:
            return answer(await run_in_threadpool(searcher.search, modality, data, k, mode, explain))
        except BadQuery as exc:
            status = 415 if exc.undecodable else 400
            raise HTTPException(status, f"{upload.filename or 'upload'}: {exc}") from None

    def item(request: Request) -> JSONResponse:
        return JSONResponse(searcher.item(parse_id(request.path_params["id"])))

    def thumbnail(request: Request) -> Response:
        sample = searcher.sample(parse_id(request.path_params["id"]))
        if not sample.has("image"):
            raise HTTPException(404, f"item {sample.key} has no image")
        image = searcher.model.preprocessors["image"].load(sample.media["image"])
        image.thumbnail((THUMB, THUMB))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    def audio(request: Request) -> Response:
        sample = searcher.sample(parse_id(request.path_params["id"]))
        if not sample.has("audio"):
            raise HTTPException(404, f"item {sample.key} has no audio")
        media = sample.media["audio"]
        suffix = Path(media).suffix.lower() if isinstance(media, str) else ".wav"
        return Response(_media_bytes(media), media_type=AUDIO_TYPES.get(suffix, "application/octet-stream"))

    routes = [
        Route("/", lambda r: HTMLResponse(page())),
        Route("/health", lambda r: JSONResponse({"status": "ok", "items": len(searcher.items)})),
        Route("/info", lambda r: JSONResponse(searcher.describe())),
        Route("/search", search_get, methods=["GET"]),
        Route("/search", search_post, methods=["POST"]),
        Route("/search/upload", search_upload, methods=["POST"]),
        Route("/items/{id}", item),
        Route("/items/{id}/thumbnail", thumbnail),
        Route("/items/{id}/audio", audio),
    ]
    handlers = {HTTPException: _http_error, BadQuery: _bad_query, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers)


def _media_bytes(media: str | bytes) -> bytes:
    """Bytes of a collection item's media (its path comes from the index's data spec, never from a request)."""
    return media if isinstance(media, bytes) else Path(media).read_bytes()


async def _capped(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body as it streams, stopped with 413 once it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the upload is {int(declared)} bytes; the limit is {limit} bytes")
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise HTTPException(413, f"the upload passed the limit of {limit} bytes")
        yield chunk


async def _read_capped(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in _capped(request, limit)])


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


async def _bad_query(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=404 if "unknown item id" in str(exc) else 400)


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


def serve(index: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload: int = 10_000_000) -> None:
    """Open ``index`` (refusing a model that does not match) and serve it until interrupted."""
    import uvicorn

    searcher = Searcher(index)
    print(f"serving {index} ({len(searcher.items)} items) on http://{host}:{port}/")
    uvicorn.run(create_app(searcher, max_upload), host=host, port=port, log_level="warning")
