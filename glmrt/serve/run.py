"""`glmrt serve`: load a model folder, bind a socket, run the app under uvicorn until SIGTERM or
Ctrl-C, then drain: new connections are refused at once, replies in flight may finish for
`grace` seconds, the rest are cut (their streams end with an error event), and the process
exits 0.
"""
from __future__ import annotations

import signal
import socket
import sys

import uvicorn

from .. import load
from ..errors import InputError
from .app import create_app


def serve(*, model: str, host: str = "127.0.0.1", port: int = 8080, backend: str = "onnxruntime",
          device: str | None = None, threads: int | None = None, slots: int = 4, max_queue: int = 64,
          api_key: str | None = None, name: str | None = None, grace: float = 10.0,
          verify: bool = True, log_level: str = "warning") -> None:
    """Serve an exported model folder over HTTP until told to stop."""
    if slots < 1 or max_queue < 0 or grace < 0:
        raise InputError(f"--slots {slots} must be >= 1, --max-queue {max_queue} and --grace {grace} >= 0")
    sock = _bind(host, port)
    m = load(model, backend=backend, device=device, threads=threads, verify=verify, slots=slots,
             max_queue=max_queue)
    app = create_app(m, model_name=name, api_key=api_key)
    server = _draining_server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=grace + 5,
                                             lifespan="on"), app.state.service, grace)
    where = sock.getsockname()
    url = f"http://{'[' + where[0] + ']' if ':' in where[0] else where[0]}:{where[1]}"
    print(f"glmrt serve: {url} (model {m.folder}, {slots} slots, queue {max_queue}"
          f"{', API key required' if api_key else ''}); chat page at {url}/", file=sys.stderr, flush=True)
    # uvicorn re-raises the signal that stopped it once it has drained; after a clean drain
    # that signal has done its job, so it must not kill the process with a non-zero status.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    print("glmrt serve: stopped", file=sys.stderr, flush=True)


def _draining_server(config, service, grace: float):
    """uvicorn's Server, with the drain started as soon as the stop signal arrives."""
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not service.draining:
                service.begin_drain(grace)
            super().handle_exit(sig, frame)
    return Server(config)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
