"""glmrt: a compiled edge runtime for the GLM-4-0414 family (GLM-4-9B/32B-0414, GLM-Z1).

    m = glmrt.load("model-folder")       # made by `glmrt export`
    m.chat([{"role": "user", "content": "Hi"}])

Importing glmrt pulls in numpy only; onnxruntime and tokenizers load with a model.

Modules (docs/ARCHITECTURE.md has the whole pipeline and the words used for it):
  model.py       the API facade: load, logits, generate, stream, chat, tools, search
  generate.py    the generation loop: greedy on the device, bursts, sampling on the host
  scheduler.py   continuous batching (slots=N): one thread advances every running sequence
  chat.py        prompts from the chat template (truncation), reply deltas, parsing glue
  reply.py       what the model wrote: reasoning, content, GLM-4-0414 tool calls (pure)
  agent.py       running Python tools the model calls; search answers with citations
  sampling.py    temperature, top-k, top-p, repetition penalty, seeds
  template.py    the checkpoint's Jinja chat template, sandboxed, as transformers renders it
  tokenizer.py   the byte-level BPE tokenizer and a streaming UTF-8-safe decoder
  backends/      the decoder interface (base.py) and the registry of what runs a model:
                 ONNX Runtime (concat and gqa forms), TensorRT, glmrt's own CUDA engine
                 (cuda_engine/: kernels compiled per GPU by NVRTC, the driver API)
  precision.py   the precision and target registry every stage reads
  config.py      GlmConfig, read from config.json by exact keys
  contract.py    the IO contract: graph inputs and outputs, shared by every stage
  manifest.py    manifest.json: what every artifact says about itself; safe output folders
  engine.py      engine folders inside a model folder and the checks before loading one
  gpu.py         which GPU this is (NVML, the CUDA driver, nvidia-smi)
  host.py        CPU cores, memory, the host's copy rate
  benchmark.py   `glmrt bench`: prefill, decode, % of the bandwidth ceiling
  evaluate.py    `glmrt eval`: perplexity through the runtime's logits
  reference.py   the float64 numpy forward: the spec every backend is tested against
  cli.py         the `glmrt` command: each subcommand calls one library function
  errors.py      the error types (one line each, no tracebacks in the CLI)
  serve/         `glmrt serve`: OpenAI-compatible server and chat page (the serve extra;
                 `import glmrt` never imports it), and its Ray Serve replicas (the ray extra)
glmrt.export (export/) writes model folders; glmrt.engines (engines/) builds engines.
"""
__version__ = "0.1.0"

from .errors import ArtifactError, CheckpointError, ConfigError, GlmrtError, InputError  # noqa: E402,F401


from .reply import parse_reply  # noqa: E402,F401  (pure: usable without a model)
from .sampling import SamplingParams  # noqa: E402,F401


def load(path, **kwargs):
    """Load an exported model folder. See glmrt.model.Model for the keyword arguments."""
    from .model import Model
    return Model(path, **kwargs)
