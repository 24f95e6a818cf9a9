"""The HTTP API: Kyutai's `/tts`, OpenAI's `/v1/audio/speech`, jobs, voices, models, health, a web page.

Every request that makes audio becomes a streaming `pocket_tts.synthesize` job;
the response relays the job's audio stream as it is generated (tasks.audio_stream)
and the worker still stores the finished file. A client that goes away while
its audio streams cancels the job. Errors are JSON with one line that names no
path, host or broker detail.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from gateway import audio
from gateway.jobs import JobQueue, QueueTimeout, job_failure
from gateway.limits import BodySizeLimit
from gateway.openai_voices import catalog_voice, voice_map
from gateway.voices import VoiceUploadError, store_uploaded_voice, voice_files
from pocket_tts.catalog import DEFAULT_LANGUAGE, PREDEFINED_VOICES
from tasks.audio_stream import AttemptChanged, Relay
from worker_config.gateway import GatewaySettings, load_gateway_settings

PAGE = Path(__file__).parent / "static" / "index.html"
MODEL_ID = "pocket-tts"
# OpenAI's speech model names, accepted so that existing clients work unchanged: one fleet, one model.
OPENAI_MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
URL_PREFIXES = ("http://", "https://", "hf://")
_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
logger = logging.getLogger("uvicorn.error")  # the server's log, in its format


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class StreamBroken(Exception):
    """The job failed after its audio started (its message is safe to show a client)."""


class RelayedAudio(StreamingResponse):
    """A job's audio, relayed as it is generated.

    Once the audio has started the status cannot change: when the job then fails, the connection
    is closed before the body's last chunk, so that clients see an incomplete response rather than
    a complete, shorter file, and one line is logged (uvicorn adds its own line, no traceback).
    """

    def __init__(self, job_id: str, content: AsyncIterator[bytes], **kwargs):
        super().__init__(content, **kwargs)
        self.job_id = job_id

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        except StreamBroken as exc:
            logger.warning("job %s: audio stream cut: %s", self.job_id, exc)


class SpeechRequest(BaseModel):
    """OpenAI's `POST /v1/audio/speech` body."""

    model_config = ConfigDict(extra="ignore")  # e.g. `instructions`: accepted, not used
    model: str
    input: str
    voice: str
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: Literal["audio", "sse"] = "audio"


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    voice: str | None = None
    format: Literal["wav", "flac", "ogg"] = "wav"
    temperature: float | None = None


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or load_gateway_settings()
    service = settings.service
    # A fleet serves one model: the workers' POCKET_TTS_LANGUAGE, or a custom config ("custom").
    language = service.language or ("custom" if service.config else DEFAULT_LANGUAGE)
    response_formats = audio.supported_formats()
    state: dict[str, JobQueue] = {}

    @asynccontextmanager
    async def lifespan(_app):
        state["queue"] = JobQueue(service, settings.queue_timeout, settings.job_queue)
        yield
        await state["queue"].close()

    app = FastAPI(title="Pocket TTS gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )

    def queue() -> JobQueue:
        return state["queue"]

    # ------------------------------------------------------------------ errors
    def error_response(path: str, status: int, message: str) -> JSONResponse:
        if path.startswith("/v1/"):  # OpenAI's error shape, which its clients parse
            kind = "invalid_request_error" if status < 500 else "server_error"
            return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status)
        return JSONResponse({"detail": message}, status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(request.url.path, exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "body"
        return error_response(request.url.path, 422, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(RedisError)
    @app.exception_handler(OperationalError)
    async def queue_unreachable(request: Request, exc: Exception):
        return error_response(request.url.path, 503, "the job queue is unreachable; try again later")

    # ------------------------------------------------------------------ keys
    def authorize(request: Request) -> None:
        if not settings.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not _known_key(token.strip().encode(), settings.api_keys):
            raise ApiError(401, "a valid API key is required: Authorization: Bearer <key>")

    def audio_token(job_id: str) -> str:
        """Lets an <audio> element, which cannot send headers, fetch one job's audio."""
        return hmac.new(settings.api_keys[0], job_id.encode(), hashlib.sha256).hexdigest()

    def audio_url(job_id: str) -> str:
        url = f"/v1/jobs/{job_id}/audio"
        return f"{url}?token={audio_token(job_id)}" if settings.api_keys else url

    def authorize_audio(request: Request, job_id: str) -> None:
        token = request.query_params.get("token")
        if settings.api_keys and token is not None:
            if not hmac.compare_digest(token.encode(), audio_token(job_id).encode()):
                raise ApiError(401, "invalid audio token")
            return
        authorize(request)

    keyed = [Depends(authorize)]

    # ------------------------------------------------------------------ requests -> jobs
    def checked_text(text: str) -> str:
        if not text.strip():
            raise ApiError(400, "text cannot be empty")
        if len(text) > service.max_text_chars:
            raise ApiError(400, f"text is {len(text)} characters long; the limit is {service.max_text_chars}")
        return text

    def checked_voice(voice: str | None) -> str | None:
        """The worker resolves voices (catalog name, or a file inside the voices dir); names that
        no file system takes are refused here."""
        if voice is not None and any(ord(c) < 32 for c in voice):
            raise ApiError(400, "a voice name cannot contain control characters")
        return voice

    async def start_streaming_job(text: str, voice: str | None, format: str = "wav", temperature=None):
        """Send the job and wait for its first entry: errors found before any audio become 4xx/5xx."""
        task_id = await queue().submit(checked_text(text), checked_voice(voice), format, temperature)
        entries = queue().entries(task_id)
        try:
            first = await anext(entries)
        except QueueTimeout as exc:
            await queue().cancel(task_id)
            raise ApiError(504, str(exc)) from None
        except BaseException:  # the request itself was cancelled
            await queue().cancel(task_id)
            raise
        if b"error" in first:
            failure = job_failure(first[b"error"].decode(), first[b"reason"].decode())
            raise ApiError(failure.status, failure.reason)
        return task_id, int(first.get(b"rate", 0)), _pcm_pieces(first, entries)

    def owned_by_client(task_id: str, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The response body of the request that started the job: if it stops early (the client
        disconnected), the job is cancelled."""

        async def relay():
            finished = False
            try:
                async for chunk in body:
                    yield chunk
                finished = True
            finally:
                if not finished:
                    await queue().cancel(task_id)

        return relay()

    async def wav_body(rate: int, pieces: AsyncIterator[bytes]):
        yield audio.streaming_wav_header(rate)
        async for piece in pieces:
            yield piece

    async def sse_body(task_id: str, rate: int, pieces: AsyncIterator[bytes], wav: bool):
        """OpenAI's speech events: base64 audio deltas, then `speech.audio.done`."""

        def event(payload: dict) -> bytes:
            return f"data: {json.dumps(payload)}\n\n".encode()

        if wav:
            yield event({"type": "speech.audio.delta", "audio": base64.b64encode(audio.streaming_wav_header(rate)).decode()})
        try:
            async for piece in pieces:
                yield event({"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()})
        except StreamBroken as exc:  # events can say it: the stream ends cleanly with an error event
            logger.warning("job %s: audio stream cut: %s", task_id, exc)
            yield event({"type": "error", "error": {"message": str(exc)}})
            return
        yield event({"type": "speech.audio.done", "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}})

    async def encoded_body(rate: int, pieces: AsyncIterator[bytes], response_format: str):
        """Each piece encoded as it arrives (in a thread: an Opus piece takes a few ms)."""
        encoder = await run_in_threadpool(audio.StreamEncoder, rate, response_format)
        try:
            async for piece in pieces:
                if data := await run_in_threadpool(encoder.encode, piece):
                    yield data
            yield await run_in_threadpool(encoder.finish)
        finally:
            encoder.close()

    # ------------------------------------------------------------------ routes
    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        if not await queue().redis_reachable():
            return JSONResponse({"status": "unhealthy", "redis": False, "workers": 0}, 503)
        workers = await queue().live_workers()
        status = 200 if workers else 503
        return JSONResponse({"status": "healthy" if workers else "no workers", "redis": True, "workers": workers}, status)

    @app.post("/tts", dependencies=keyed)
    async def tts(
        text: str | None = Form(None), voice_url: str | None = Form(None), voice_wav: UploadFile | None = File(None)
    ):
        """Kyutai's form contract: text, and optionally a voice name (voice_url) or an audio upload (voice_wav)."""
        text = checked_text(text or "")
        if voice_url is not None and voice_wav is not None:
            raise ApiError(400, "give voice_url or voice_wav, not both")
        voice = voice_url
        if voice_url is not None and voice_url.startswith(URL_PREFIXES):
            raise ApiError(400, "this server does not fetch voices from URLs: name a voice, or upload it as voice_wav")
        if voice_wav is not None:
            voice = await stored_voice(voice_wav)
        task_id, rate, pieces = await start_streaming_job(text, voice)
        return RelayedAudio(
            task_id,
            owned_by_client(task_id, wav_body(rate, pieces)),
            media_type="audio/wav",
            headers={"Content-Disposition": "attachment; filename=generated_speech.wav", "X-Job-Id": task_id},
        )

    @app.post("/v1/audio/speech", dependencies=keyed)
    async def speech(body: SpeechRequest):
        if body.model not in (MODEL_ID, *OPENAI_MODEL_ALIASES):
            raise ApiError(400, f"unknown model {body.model!r}; use one of {', '.join((MODEL_ID, *OPENAI_MODEL_ALIASES))}")
        if body.response_format not in response_formats:
            raise ApiError(
                400, f"response_format {body.response_format!r} is not supported; use one of {', '.join(response_formats)}"
            )
        if body.speed != 1.0:
            raise ApiError(400, f"speed {body.speed:g} is not supported: only 1.0 (the model speaks at one pace)")
        if body.stream_format == "sse" and body.response_format not in audio.STREAMED_FORMATS:
            raise ApiError(400, f"stream_format 'sse' needs response_format {' or '.join(audio.STREAMED_FORMATS)}")
        voice = catalog_voice(body.voice, language, service.default_voice)  # OpenAI's names: ours
        task_id, rate, pieces = await start_streaming_job(body.input, voice)
        media_type = audio.FORMATS[body.response_format][0]
        if body.stream_format == "sse":
            content, media_type = sse_body(task_id, rate, pieces, wav=body.response_format == "wav"), "text/event-stream"
        elif body.response_format == "wav":
            content = wav_body(rate, pieces)
        elif body.response_format == "pcm":
            content = pieces
        else:
            content = encoded_body(rate, pieces, body.response_format)
        return RelayedAudio(task_id, owned_by_client(task_id, content), media_type=media_type, headers={"X-Job-Id": task_id})

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        ids = (MODEL_ID, *OPENAI_MODEL_ALIASES)
        return {
            "object": "list",
            "data": [{"id": i, "object": "model", "owned_by": "kyutai", "language": language} for i in ids],
        }

    @app.get("/v1/voices", dependencies=keyed)
    async def voices():
        # Catalog voice states exist for every shipped model, none for a custom one.
        catalog = [] if language == "custom" else list(PREDEFINED_VOICES)
        return {
            "default": service.default_voice,
            "languages": {language: {"default_voice": service.default_voice, "voices": catalog}},
            "files": await run_in_threadpool(voice_files, service.voices_dir),
            "openai": voice_map(language, service.default_voice),  # OpenAI's voice names -> the voice spoken
            "uploads": settings.uploads_dir is not None,
        }

    async def stored_voice(upload: UploadFile) -> str:
        if settings.uploads_dir is None:
            raise ApiError(400, "voice uploads are disabled on this server (no voices directory configured)")
        data = await upload.read(settings.max_voice_bytes + 1)
        if len(data) > settings.max_voice_bytes:
            raise ApiError(413, f"the voice upload is larger than {settings.max_voice_bytes} bytes")
        try:
            return await run_in_threadpool(
                store_uploaded_voice, data, settings.uploads_dir, settings.max_voice_seconds
            )
        except VoiceUploadError as exc:
            raise ApiError(exc.status, str(exc)) from None

    @app.post("/v1/voices", dependencies=keyed, status_code=201)
    async def upload_voice(file: UploadFile = File(...)):
        """Store an audio file as a voice; returns the name to use as `voice` in requests."""
        return {"voice": await stored_voice(file)}

    @app.post("/v1/jobs", dependencies=keyed, status_code=202)
    async def create_job(body: JobRequest):
        task_id = await queue().submit(checked_text(body.text), checked_voice(body.voice), body.format, body.temperature)
        return {"id": task_id, "status_url": f"/v1/jobs/{task_id}", "audio_url": audio_url(task_id)}

    async def known_job(job_id: str) -> str:
        if not _JOB_ID.fullmatch(job_id) or not await queue().exists(job_id):
            raise ApiError(404, "no such job")
        return job_id

    async def job_status(job_id: str) -> dict:
        state_name, result = await queue().state(job_id)
        status = {"id": job_id, "audio_url": audio_url(job_id)}
        if state_name == "SUCCESS":
            return {**status, "status": "done"}
        if state_name == "FAILURE":
            failure = job_failure(type(result).__name__, " ".join(str(result).split()))
            return {**status, "status": "failed", "error": failure.reason}
        if state_name == "REVOKED":
            return {**status, "status": "cancelled"}
        samples, rate = await queue().progress(job_id)
        if state_name == "PENDING" and not samples:
            return {**status, "status": "queued"}
        return {**status, "status": "running", "progress": {"audio_seconds": round(samples / rate, 2) if rate else 0.0}}

    @app.get("/v1/jobs/{job_id}", dependencies=keyed)
    async def get_job(job_id: str):
        return await job_status(await known_job(job_id))

    @app.delete("/v1/jobs/{job_id}", dependencies=keyed, status_code=202)
    async def cancel_job(job_id: str):
        await queue().cancel(await known_job(job_id))
        return {"id": job_id, "status": "cancelling"}

    @app.get("/v1/jobs/{job_id}/audio")
    async def job_audio(request: Request, job_id: str):
        """The stored file once the job is done; while it runs, its audio as it is generated (WAV)."""
        authorize_audio(request, job_id)
        await known_job(job_id)
        state_name, result = await queue().state(job_id)
        if state_name == "SUCCESS":
            return stored_file(str(result))
        if state_name in ("FAILURE", "REVOKED"):
            raise ApiError(409, f"job {job_id} has no audio: it {'failed' if state_name == 'FAILURE' else 'was cancelled'}")
        entries = queue().entries(job_id)
        try:
            first = await anext(entries)
        except QueueTimeout as exc:
            raise ApiError(504, str(exc)) from None
        if b"error" in first:
            raise ApiError(409, f"job {job_id} has no audio: it failed")
        if b"end" in first:  # finished between the two reads
            return stored_file(str((await queue().state(job_id))[1]))
        return RelayedAudio(job_id, wav_body(int(first[b"rate"]), _pcm_pieces(first, entries)), media_type="audio/wav")

    def stored_file(result: str) -> Response:
        storage = service.storage_dir.resolve()
        path = Path(result).resolve()
        if not path.is_relative_to(storage) or not path.is_file():  # only ever serve the shared storage
            raise ApiError(410, "the audio of this job is no longer stored")
        return FileResponse(path, media_type=audio.STORED_MEDIA_TYPES.get(path.suffix[1:], "application/octet-stream"))

    return app


async def _pcm_pieces(first: dict, entries: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """The job's audio, each sample once: a redelivered job's replayed start is skipped."""
    relay = Relay()
    entry = first
    while True:
        if b"pcm" in entry:
            try:
                pcm = relay.new_audio(entry)
            except AttemptChanged as exc:
                raise StreamBroken(str(exc)) from None
            if pcm:
                yield pcm
        elif b"end" in entry:
            return
        else:
            raise StreamBroken(job_failure(entry[b"error"].decode(), entry[b"reason"].decode()).reason)
        entry = await anext(entries)


def _known_key(token: bytes, keys: tuple[bytes, ...]) -> bool:
    """Constant-time comparison against every key (the time does not say which key nearly matched)."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key)
    return matched
