"""glmrt.export: Hugging Face GLM-4-0414 checkpoint -> ONNX model folder (no torch)."""
