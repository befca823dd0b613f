"""glmrt.engines: exported model -> an engine for one target GPU (TensorRT, ONNX Runtime).

Not built yet: see the engines issue. Each engine will live in its own folder keyed by GPU and
precision, with a manifest, and the runtime will load it through the same glmrt.load API."""
