"""`glmrt serve`: an OpenAI-compatible server for GLM-4-0414 models, with a chat page.
Installed with the `serve` extra; `import glmrt` never imports this package.

  protocol.py   the OpenAI API in glmrt's terms: requests -> jobs, deltas -> responses and
                stream chunks, errors (no web framework)
  worker.py     one generation per thread, its deltas handed to the event loop; cancelling
  app.py        create_app: the ASGI app (Starlette) around the protocol
  run.py        serve(): uvicorn on a socket, SIGTERM drains within a grace period
  ray_app.py    `glmrt serve --ray`: the app as Ray Serve replicas (the ray extra), health
                checks, autoscaling bounds, what a client sees when a replica dies
  metrics.py    Prometheus text for GET /metrics
  page.html     the chat page served at /
"""
