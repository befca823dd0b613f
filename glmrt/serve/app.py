"""The ASGI app around the protocol layer (glmrt/serve/protocol.py): routes, the API key, body
limits, streaming as server-sent events, the chat page, health and metrics. `create_app` is the
one factory: `glmrt serve` runs it under uvicorn, and a Ray Serve replica can build the same app.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models[/{id}]
    GET /health (never needs the key)   GET /metrics (Prometheus)   GET / (the chat page)

Every response carries `x-glmrt-replica`, the instance that served it (also a label in /metrics).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import socket
import threading
from importlib import resources
from pathlib import Path
from typing import Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .metrics import Metrics
from .protocol import ApiError, Job, Served, as_api_error, chat_job, completion_job
from .worker import END, Run

REPLICA_HEADER = "x-glmrt-replica"
ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
OPEN_ROUTES = {"/health", "/"}      # the page is static: it asks for the key and sends it itself


def create_app(model_or_loader, *, model_name: str | None = None, api_key: str | None = None,
               replica: str | None = None, max_body_bytes: int | None = None,
               default_max_tokens: int | None = None,
               logits_processor_for: Callable[[dict], object] | None = None) -> Starlette:
    """model_or_loader: a loaded glmrt Model, or a callable that returns one (called once, in a
    thread, when the app starts). api_key: every route but /health (and the static page) needs
    `Authorization: Bearer KEY`; load it with glmrt.load(..., slots=N, max_queue=M) to bound
    and batch the generations (a full queue answers 429). replica: this instance's name (default
    host-pid). max_body_bytes: default 64 bytes per
    token of context, at least 1 MiB. logits_processor_for(body): tests only, a processor that
    steers the real model (clients cannot send one)."""
    service = Service(model_or_loader, model_name=model_name, api_key=api_key,
                      replica=replica or f"{socket.gethostname()}-{os.getpid()}",
                      max_body_bytes=max_body_bytes, default_max_tokens=default_max_tokens,
                      processor_for=logits_processor_for)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        yield
        await anyio.to_thread.run_sync(service.close)

    routes = [Route("/", service.page), Route("/health", service.health), Route("/metrics", service.metrics_text),
              Route("/v1/models", service.models), Route("/v1/models/{model_id:path}", service.model),
              Route("/v1/chat/completions", service.chat, methods=["POST"]),
              Route("/v1/completions", service.completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                        Exception: _server_error})
    app.state.service = service
    app.add_middleware(_Edge, service=service)
    return app


class Service:
    """What the routes share: the model, the runs in flight, the counters, draining."""

    def __init__(self, model_or_loader, *, model_name, api_key, replica, max_body_bytes,
                 default_max_tokens, processor_for):
        self.source, self.model_name = model_or_loader, model_name
        self.api_key, self.replica = api_key, replica
        self.max_body_bytes, self.default_max_tokens = max_body_bytes, default_max_tokens
        self.processor_for = processor_for
        self.served: Served | None = None
        self.metrics: Metrics | None = None
        self.runs: set[Run] = set()
        self.lock = threading.Lock()
        self.draining = False
        self.page_html = resources.files("glmrt.serve").joinpath("page.html").read_text(encoding="utf-8")

    async def start(self):
        from ..model import Model
        model = self.source
        if not isinstance(model, Model):            # a loader: load in a thread, once
            model = await anyio.to_thread.run_sync(model)
        name = self.model_name or Path(model.folder).name
        self.served = Served(model, name, default_max_tokens=self.default_max_tokens)
        if self.max_body_bytes is None:
            self.max_body_bytes = max(1 << 20, 64 * model.max_context)
        self.metrics = Metrics(self.replica, name)

    # -- load and shutdown ---------------------------------------------------------------------
    def load_now(self) -> tuple[int, int]:
        """(generations running, requests waiting for a slot)."""
        scheduler = self.served.model.scheduler if self.served is not None else None
        if scheduler is not None:
            load = scheduler.load()
            return load["active"], load["waiting"]
        with self.lock:
            return len(self.runs), 0

    def begin_drain(self, grace: float):
        """Refuse new generations; after `grace` seconds, cut the ones still running."""
        self.draining = True
        t = threading.Timer(grace, self.cancel_all, args=("shutdown",))
        t.daemon = True
        t.start()

    def cancel_all(self, reason: str = "shutdown"):
        with self.lock:
            runs = list(self.runs)
        for r in runs:
            r.cancel(reason)

    def close(self, timeout: float = 5.0):
        """Cut every run and wait (up to `timeout` s in all) for their threads."""
        self.draining = True
        self.cancel_all("shutdown")
        with self.lock:
            runs = list(self.runs)
        for r in runs:
            r.thread.join(timeout / max(1, len(runs)))

    def _launch(self, job: Job) -> Run:
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        run = Run(job, asyncio.get_running_loop(), on_end=self._ended)
        with self.lock:
            self.runs.add(run)
        return run.start()

    def _ended(self, run: Run):
        job = run.job
        with self.lock:
            self.runs.discard(run)
        self.metrics.generation(
            job.usage if job.t_done is not None else None,
            None if job.t_first is None else job.t_first - run.t_start,
            None if job.t_done is None or job.t_first is None else job.t_done - job.t_first,
            cancelled=run.cancelled.is_set() and job.t_done is None and run.error is None)

    # -- routes ------------------------------------------------------------------------------
    async def page(self, request: Request):
        return HTMLResponse(self.page_html)

    async def health(self, request: Request):
        if self.served is None or self.draining:
            return JSONResponse({"status": "unavailable", "replica": self.replica}, 503)
        return JSONResponse({"status": "ok", "model": self.served.name, "replica": self.replica})

    async def metrics_text(self, request: Request):
        return PlainTextResponse(self.metrics.render(*self.load_now()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: Request):
        return JSONResponse(self.served.models())

    async def model(self, request: Request):
        if request.path_params["model_id"] != self.served.name:
            raise ApiError(404, f"the model {request.path_params['model_id']!r} does not exist",
                           param="model", code="model_not_found")
        return JSONResponse(self.served.card())

    async def chat(self, request: Request):
        body = await self._json(request)
        job = chat_job(self.served, body, self._processor(body))
        return _GenerationResponse(job, self._launch(job))

    async def completions(self, request: Request):
        body = await self._json(request)
        job = completion_job(self.served, body, self._processor(body))
        return _GenerationResponse(job, self._launch(job))

    def _processor(self, body):
        return self.processor_for(body) if self.processor_for is not None and isinstance(body, dict) else None

    async def _json(self, request: Request):
        limit = self.max_body_bytes
        too_big = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_big
        try:
            return json.loads(data)
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None


class _GenerationResponse(Response):
    """Waits for the run's first item (so a refusal still gets its own status), then answers
    with one JSON object or a stream of server-sent events; a client that disconnects cancels
    the run (its generator is closed and its slot freed)."""

    def __init__(self, job: Job, run: Run):
        self.job, self.run = job, run
        self.background = None

    async def __call__(self, scope, receive, send):
        run = self.run

        async def watch(cancel_scope):
            while True:
                try:
                    message = await receive()
                except Exception:  # noqa: BLE001  the host lost the client (Ray's proxy: its receive task cancelled)
                    message = {"type": "http.disconnect"}
                if message["type"] == "http.disconnect":
                    run.cancel("disconnect")
                    cancel_scope.cancel()
                    return
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, tg.cancel_scope)
                await self._respond(send)
                tg.cancel_scope.cancel()
        except OSError:                # the client went away while we wrote
            pass
        finally:
            run.cancel("disconnect")   # no effect on a run that has ended

    async def _respond(self, send):
        job, run = self.job, self.run
        first = await run.get()
        if first is END:
            first = ApiError(503, "the server is shutting down", code="shutting_down")
        if isinstance(first, BaseException):
            return await _send_error(send, as_api_error(first))
        if not job.stream:
            item = first
            while not (getattr(item, "kind", None) == "done"):
                if item is END or isinstance(item, BaseException):
                    return await _send_error(send, as_api_error(item) if item is not END else
                                             ApiError(503, "the reply was cut short", code="shutting_down"))
                item = await run.get()
            return await _send_json(send, 200, job.response(item))
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})
        events = job.first_chunks()
        item = first
        while item is not END:
            if isinstance(item, BaseException):
                events.append(as_api_error(item).body())
            else:
                events += job.chunks(item)
            if events:
                await send({"type": "http.response.body", "more_body": True, "body": b"".join(
                    b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\n\n" for e in events)})
                events = []
            item = await run.get()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _send_json(send, status: int, obj, headers: dict | None = None):
    body = json.dumps(obj, ensure_ascii=False).encode()
    hs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hs})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send, e: ApiError):
    await _send_json(send, e.status, e.body(), e.headers)


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), e.status, headers=e.headers)


async def _api_error(request: Request, exc: ApiError):
    return _error_response(exc)


async def _http_error(request: Request, exc: HTTPException):
    if exc.status_code == 404:
        return _error_response(ApiError(404, f"no route {request.method} {request.url.path}",
                                        code="unknown_route"))
    return _error_response(ApiError(exc.status_code, str(exc.detail)))


async def _server_error(request: Request, exc: Exception):
    return _error_response(as_api_error(exc))


class _Edge:
    """Pure ASGI middleware: the API key, the replica header, the request counter."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service, status = self.service, 500
        replica = service.replica.encode()

        async def tagged(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), replica)]}
            await send(message)
        path = scope["path"]
        try:
            if service.api_key and path not in OPEN_ROUTES and not _authorized(scope, service.api_key):
                return await _send_error(tagged, ApiError(
                    401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"}))
            await self.app(scope, receive, tagged)
        finally:
            if service.metrics is not None:
                route = path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
                service.metrics.request(route, status)


def _authorized(scope, key: str) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False
