"""A live `glmrt serve` app for tests: uvicorn on a free loopback port in a thread of the test
process (so a test can steer the real model through the app factory's logits_processor_for),
stopped and joined when the `with` block ends, failure or not."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from glmrt.serve.app import create_app


@contextlib.contextmanager
def live_server(model, **create_app_kwargs):
    """Yields the base URL (http://127.0.0.1:PORT); the app is create_app(model, **kwargs)."""
    app = create_app(model, **create_app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop"
