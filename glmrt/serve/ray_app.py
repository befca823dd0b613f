"""`glmrt serve --ray`: the same server on Ray Serve, one replica per GPU (or per few CPU cores),
on one machine or across the machines of a Ray cluster. Each replica loads the model once, with
its own slots, and serves the ASGI app `create_app` makes (app.py: one OpenAI layer, not two).
Ray's proxy routes each request to a replica and streams its server-sent events back; Ray
autoscales the replicas between bounds on ongoing requests per replica, and replaces a replica
whose process died or whose health check failed.

    glmrt serve MODEL --ray --replicas 2                           # a Ray of its own, here
    glmrt serve MODEL --ray --ray-address auto --min-replicas 1 --max-replicas 8 --gpus-per-replica 1
    serve run glmrt.serve.ray_app:build_app model=MODEL replicas=2    # Ray's own CLI
    serve deploy config.yaml     # import_path: glmrt.serve.ray_app:build_app, args: {model: ...}

A replica with a GPU (`gpus_per_replica`) sees only that GPU (Ray sets CUDA_VISIBLE_DEVICES), so
device 0 of ONNX Runtime or TensorRT is the replica's own GPU, and the engine it loads is the one
built for that GPU (engines/<gpu>-sm<cc>/..., chosen per machine by glmrt.gpu.detect): replicas
on different GPU kinds each load their own engine from the same model folder.

Installed with the `ray` extra; nothing else in glmrt imports this module.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import typing

import numpy as np
import ray
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.responses import JSONResponse

from ..errors import GlmrtError, InputError, QueueFullError
from .app import create_app
from .protocol import RETRY_AFTER_S, ApiError, as_api_error

APP_NAME = "glmrt"


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """One deployment of a model folder; the defaults are `glmrt serve`'s. The folder's path
    (absolute: replicas do not run in the caller's directory) must hold the same model on every
    machine that may run a replica."""
    model: str
    name: str | None = None              # the model id clients send (default: the folder's name)
    backend: str = "onnxruntime"
    device: str | None = None            # default: cuda when the replica has a GPU, else the backend's
    threads: int | None = None           # CPU threads (default: the replica's CPUs on the CPU)
    slots: int = 4                       # generations decoded at once, per replica
    max_queue: int = 64                  # more that may wait on a replica
    router_queue: int = 64               # more (at least 1) that may wait at each Ray proxy while every
                                         # replica is full; beyond that it answers 429 (Retry-After: 1); -1: no bound
    api_key: str | None = None
    verify: bool = True
    replicas: int | None = None          # a fixed number; or autoscale between min and max:
    min_replicas: int | None = None
    max_replicas: int | None = None
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    grace: float = 10.0                  # seconds a stopping replica's replies may run on
    health_period_s: float = 10.0        # Ray asks each replica this often ...
    health_timeout_s: float = 30.0       # ... and replaces it when the answer is no, or late
    stall_s: float = 60.0                # generations waiting this long on no progress: unhealthy
    autoscaling: dict | None = None      # more of Ray's autoscaling_config (upscale_delay_s, ...)

    def __post_init__(self):
        if self.slots < 1 or self.max_queue < 0 or self.grace < 0:
            raise InputError(f"slots {self.slots} must be >= 1, max_queue {self.max_queue} and "
                             f"grace {self.grace} >= 0")
        if self.router_queue == 0 or self.router_queue < -1:       # Ray takes -1 or a positive bound
            raise InputError(f"router_queue {self.router_queue}: at least 1, or -1 for no bound")
        if self.replicas is not None and (self.min_replicas is not None or self.max_replicas is not None):
            raise InputError("give either replicas (a fixed number) or min/max replicas (autoscaling), not both")
        lo, hi = self.bounds
        if not 0 <= lo <= hi or hi < 1 or (self.replicas is not None and self.replicas < 1):
            raise InputError(f"replicas: min {lo}, max {hi}; expected 0 <= min <= max and max >= 1")
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise InputError("gpus_per_replica and cpus_per_replica must be >= 0")
        if min(self.health_period_s, self.health_timeout_s, self.stall_s) <= 0:
            raise InputError("health_period_s, health_timeout_s and stall_s must be > 0")

    @property
    def bounds(self) -> tuple[int, int]:
        """(min, max) replicas: equal for a fixed number."""
        if self.replicas is not None:
            return self.replicas, self.replicas
        lo = 1 if self.min_replicas is None else self.min_replicas
        return lo, (max(lo, 1) if self.max_replicas is None else self.max_replicas)

    @classmethod
    def from_args(cls, args: dict) -> "RayOptions":
        """From `serve run ... key=value` (every value a string) or a config file's `args`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise InputError(f"unknown argument(s) {', '.join(unknown)}; expected {', '.join(fields)}")
        if "model" not in args:
            raise InputError("the argument model=FOLDER is required")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in args.items()})


def _coerce(key: str, value, hint):
    """A value as the field's type, from a string where `serve run` gave one."""
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    kind = kinds[0]
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null", "") and type(None) in typing.get_args(hint):
        return None
    if kind is str:
        return value
    if kind is dict:
        try:
            return json.loads(value)
        except ValueError:
            raise InputError(f"{key}={value!r}: expected a JSON object") from None
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        return kind(value)
    except ValueError:
        raise InputError(f"{key}={value!r}: expected {kind.__name__}") from None


def application(options: RayOptions, *, logits_processor_for=None):
    """The Ray Serve application (bound deployment) for `options`. logits_processor_for(model):
    tests only, returns create_app's hook that steers the real model (clients cannot)."""
    lo, hi = options.bounds
    scaling = ({"num_replicas": lo} if lo == hi else
               {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                       # a replica is as busy as it should be when its slots are
                                       "target_ongoing_requests": options.slots, **(options.autoscaling or {})}})
    actor = {"num_cpus": options.cpus_per_replica}
    if options.gpus_per_replica:
        actor["num_gpus"] = options.gpus_per_replica
    return Replica.options(
        **scaling, ray_actor_options=actor,
        # Ray's router sends a replica no more than its model takes (running + waiting); beyond
        # that requests wait in each proxy's queue for the first replica with room, at most
        # router_queue of them: the next is answered 429 with Retry-After, as a full replica does
        max_ongoing_requests=options.slots + options.max_queue,
        max_queued_requests=options.router_queue,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
        graceful_shutdown_timeout_s=options.grace, graceful_shutdown_wait_loop_s=min(2.0, options.grace or 2.0),
        health_check_period_s=options.health_period_s, health_check_timeout_s=options.health_timeout_s,
    ).bind(options, logits_processor_for)


def build_app(args: dict):
    """The application builder `serve run glmrt.serve.ray_app:build_app model=...` and a Serve
    config file's import_path call (args: RayOptions' fields)."""
    return application(RayOptions.from_args(args))


# ---- one replica ---------------------------------------------------------------------------
@serve.deployment(name="glmrt")
@serve.ingress()
class Replica:
    """Loads the model once (in the replica's process, on the replica's GPU) and serves
    create_app's app over it, named for the Ray replica (`x-glmrt-replica`, /metrics)."""

    def __init__(self, options: RayOptions, logits_processor_for=None):
        from .. import load
        context = serve.get_replica_context()
        self.replica = context.replica_id.to_full_id_str()
        self.options = options
        gpus = ray.get_gpu_ids()
        device = options.device or ("cuda" if gpus else None)
        threads = options.threads
        if threads is None and device in (None, "cpu") and options.cpus_per_replica >= 1:
            threads = math.floor(options.cpus_per_replica)
        self.model = load(options.model, backend=options.backend, device=device, threads=threads,
                          verify=options.verify, slots=options.slots, max_queue=options.max_queue)
        d = self.model.decoder.describe()
        where = f" (GPU {', '.join(map(str, gpus))} of its machine)" if gpus else ""
        print(f"glmrt replica {self.replica}: {options.model} on {d['backend']}/{d['device']}{where}, "
              f"{options.slots} slots", file=sys.stderr, flush=True)
        self.liveness = Liveness(self.model, stall_s=options.stall_s,
                                 probe_timeout_s=options.health_timeout_s / 2)
        self.processor_for = logits_processor_for(self.model) if logits_processor_for else None

    def __serve_build_asgi_app__(self):
        o = self.options
        return create_app(self.model, model_name=o.name, api_key=o.api_key, replica=self.replica,
                          logits_processor_for=self.processor_for)

    async def check_health(self):
        """Ray's health check: raises when the model no longer answers (Ray then replaces this
        replica). In a thread: the event loop keeps serving meanwhile."""
        await asyncio.to_thread(self.liveness.check)

    def __del__(self):
        model = getattr(self, "model", None)
        if model is not None:
            model.close()


class Liveness:
    """Whether a model loaded with slots still answers, in bounded time: its scheduler's thread
    runs and has not failed; with generations running or waiting, it made progress (a prefill
    chunk or a decode step) within `stall_s`; idle, a one-token generation comes back within
    `probe_timeout_s`."""

    def __init__(self, model, *, stall_s: float, probe_timeout_s: float):
        self.model, self.stall_s, self.probe_timeout_s = model, stall_s, probe_timeout_s
        self.progress, self.t_progress = -1, time.monotonic()
        # a prompt no chat begins with: the probe reuses no slot's cached tokens
        self.probe_ids = np.array([min(model.eos_ids)], np.int64)

    def check(self) -> None:
        s = self.model.scheduler
        if s is None:
            raise GlmrtError("the model was loaded without slots")
        if s.failure is not None:
            raise GlmrtError(f"the model failed: {s.failure}")
        if not s.thread.is_alive():
            raise GlmrtError("the model's scheduler thread has stopped")
        now, progress = time.monotonic(), s.stats["prefilled"] + s.stats["decode_steps"]
        if progress != self.progress:
            self.progress, self.t_progress = progress, now
        load = s.load()
        if load["active"] or load["waiting"]:
            if now - self.t_progress > self.stall_s:
                raise GlmrtError(f"the model made no progress for {now - self.t_progress:.0f} s with "
                                 f"{load['active']} generations running and {load['waiting']} waiting")
            return
        answer: list = []

        def probe():
            try:
                answer.append(self.model.generate(self.probe_ids, max_new_tokens=1, temperature=0))
            except Exception as e:  # noqa: BLE001  reported below
                answer.append(e)
        t = threading.Thread(target=probe, name="glmrt-health", daemon=True)
        t.start()
        t.join(self.probe_timeout_s)
        if not answer:
            raise GlmrtError(f"the model did not answer a one-token generation within {self.probe_timeout_s:g} s")
        if isinstance(answer[0], Exception):
            raise GlmrtError(f"a one-token generation failed: {answer[0]}")


# ---- Ray's proxy ---------------------------------------------------------------------------
class ReplicaLoss:
    """ASGI middleware for Ray's HTTP proxy: what a client sees when the replica serving its
    request dies, or when the proxy's own queue is full. Ray's proxy sends nothing in the first
    case, so its HTTP server answers a bare 500 before the response started and drops the
    connection after; here the first becomes a 502 in OpenAI's error shape and a started stream
    of server-sent events ends with an error event, as a reply cut short by a shutdown does (the
    openai client raises APIError on it). A 429 of the proxy's own (router_queue reached: no
    replica named it) gets the body a full replica gives, code "queue_full", and keeps its
    headers (Retry-After, X-Request-ID)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = ended = events = False
        busy = None                     # the proxy's own 429: its headers; the body and Retry-After replaced below

        async def watched(message):
            nonlocal started, ended, events, busy
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                if message.get("status") == 429 and not any(k.lower() == b"x-glmrt-replica" for k, _ in headers):
                    busy = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers      # X-Request-ID
                            if k.lower() not in (b"content-type", b"content-length", b"date", b"server", b"retry-after")}
                    return
                started = True
                events = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
            elif busy is not None:
                return                  # Ray's text for it
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)
        await self.app(scope, receive, watched)
        if busy is not None:            # a full replica's answer (protocol.as_api_error), Ray's other headers kept
            full = as_api_error(QueueFullError("every replica's slots and queue are taken, and so is the proxy's "
                                               "queue; send the request again later"))
            return await JSONResponse(full.body(), full.status, headers={**busy, **full.headers})(scope, receive, send)
        if ended or (started and not events):
            return                     # answered, or nothing to add to a body cut short
        lost = ApiError(502, "the replica serving this request stopped before it finished (its process "
                             "died or was replaced); send the request again", code="replica_lost")
        if not started:               # a client that left gets nothing either way (the server drops it)
            return await JSONResponse(lost.body(), lost.status)(scope, receive, send)
        await send({"type": "http.response.body", "more_body": False,
                    "body": b"data: " + json.dumps(lost.body()).encode() + b"\n\n"})


def proxy_middlewares() -> list:
    """Ray's proxies take their middleware from a function named in their environment when they
    start (PROXY_ENV): a Ray that `glmrt serve --ray` starts has it; set it for `ray start` on
    each machine of a cluster."""
    from starlette.middleware import Middleware
    return [Middleware(ReplicaLoss)]


PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "glmrt.serve.ray_app:proxy_middlewares"}


# ---- the command ---------------------------------------------------------------------------
def deploy(options: RayOptions, *, host: str = "127.0.0.1", port: int = 8080, logits_processor_for=None) -> str:
    """Start Ray Serve's proxies on host:port (port 0: a free one) on the Ray this process is
    connected to, and deploy `options` as the application "glmrt" at /. Returns the proxy's URL
    once every replica is up (a Serve already running on the cluster keeps its own address)."""
    from ray.serve.context import _get_global_client
    serve.start(http_options={"host": host, "port": _free_port(host, 0) if port == 0 else port},
                logging_config={"log_level": "WARNING"})
    try:
        serve.run(application(options, logits_processor_for=logits_processor_for), name=APP_NAME,
                  route_prefix="/", logging_config={"log_level": "WARNING"})
    except RuntimeError as e:           # the deployment failed: say why in one line
        raise GlmrtError(f"the replicas did not start: {str(e).strip().splitlines()[-1][:500]}") from None
    http = _get_global_client().http_config
    return f"http://{'[' + http.host + ']' if ':' in http.host else http.host}:{http.port}"


def serve_on_ray(*, host: str = "127.0.0.1", port: int = 8080, ray_address: str | None = None, **options) -> None:
    """`glmrt serve MODEL --ray`: deploy RayOptions(**options) on Ray Serve (a Ray started here,
    or the cluster at `ray_address`, "auto" for the one this machine is in), answer on host:port
    until SIGTERM or Ctrl-C, then take the application down (replies in flight get `grace` s)."""
    from .. import manifest
    if os.path.isdir(options["model"]):   # replicas do not run in this directory: the full path
        options["model"] = os.path.abspath(options["model"])
    options, address = RayOptions(**options), ray_address
    own_ray = address is None
    if own_ray:                          # a Ray of our own, here: the folder and the port must be
        manifest.read(options.model, verify=False)
        port = _free_port(host, port)
        for k, v in PROXY_ENV.items():   # its processes inherit this environment
            os.environ.setdefault(k, v)
    ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = deploy(options, host=host, port=port)
        lo, hi = options.bounds
        replicas = f"{lo} replicas" if lo == hi else f"{lo} to {hi} replicas"
        print(f"glmrt serve: {url} on Ray Serve ({replicas} of {options.model}, {options.slots} slots each, "
              f"{options.gpus_per_replica:g} GPU(s) per replica); chat page at {url}/", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        try:
            if own_ray:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
    print("glmrt serve: stopped", file=sys.stderr, flush=True)


def _free_port(host: str, port: int) -> int:
    """`port`, checked free (Ray's proxy binds it itself); 0 picks a free one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.bind(address)
            return s.getsockname()[1]
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
