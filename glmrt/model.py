"""The Python API products embed: load once, then logits / generate / stream / chat. A thin
facade: the decoder comes from the backend registry (glmrt/backends), tokens from the
generation loop (glmrt/generate.py), replies from the chat machinery (glmrt/chat.py).

Thread safety: every call gets the output it would get alone. A decoder whose capabilities
say `concurrent` (the CPU form: each generation owns its KV cache) runs calls side by side;
the others (device caches: the CUDA form, TensorRT) serve one generation at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from . import manifest as manifest_io
from .agent import SEARCH_SYSTEM_PROMPT, ToolRun, document_messages, resolve_citations, run_tools
from .backends import LoadOptions, open_decoder
from .chat import Delta, Prompter, stream_reply
from .config import GlmConfig
from .errors import ContextOverflowError, InputError
from .generate import Generation, run
from .sampling import SamplingParams
from .template import builtin_template, read_template
from .tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 512
__all__ = ["Model", "Generation", "Delta", "DEFAULT_MAX_NEW_TOKENS"]


class Model:
    default_max_new_tokens = DEFAULT_MAX_NEW_TOKENS

    def __init__(self, path: str | Path, *, device: str | None = None, verify: bool = True,
                 threads: int | None = None, max_context: int | None = None,
                 cuda_graph: bool = True, backend: str = "onnxruntime", burst: int | None = None):
        """device: cpu | cuda (default: the backend's first, cpu for onnxruntime); backend: a
        name in glmrt.backends.BACKENDS; threads: CPU threads; max_context: positions to
        reserve; burst: greedy decode steps queued per host synchronization where the decoder
        can (default 8 on CUDA: tokens then stream in groups of up to 8; 1 on the CPU)."""
        self.folder = Path(path)
        self.manifest = manifest_io.read(self.folder, verify=verify)
        self.config = GlmConfig.from_dict(self.manifest["config"])
        self.tokenizer = Tokenizer(self.folder, self.manifest["tokenizer"])
        template = read_template(self.folder, self.manifest["chat_template"]) or builtin_template("glm4")
        self.eos_ids = frozenset(self.manifest["generation"]["eos_token_id"])
        self.backend = backend
        self.decoder = open_decoder(self.folder, self.manifest, backend, LoadOptions(
            device=device, threads=threads, max_context=max_context, cuda_graph=cuda_graph,
            burst=burst, verify=verify))
        self.max_context = self.decoder.caps.max_context
        self.prompter = Prompter(self.tokenizer, template, self.max_context)

    @property
    def chat_template(self) -> str:
        """The Jinja source of the chat template in use (the checkpoint's, else glmrt's GLM-4)."""
        return self.prompter.template

    @chat_template.setter
    def chat_template(self, source: str) -> None:
        self.prompter.template = source

    # ---- tokens ----------------------------------------------------------------------------
    def _ids(self, token_ids) -> np.ndarray:
        try:
            ids = np.asarray(token_ids)
        except Exception:
            raise InputError("token_ids must be a sequence of integers") from None
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"token_ids must be a non-empty 1-D sequence of integers, "
                             f"got shape {ids.shape} dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            raise InputError(f"token id {int(ids[bad][0])} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        if ids.size > self.max_context:
            raise ContextOverflowError("prompt", int(ids.size), self.max_context)
        return ids.astype(np.int64)

    def logits(self, token_ids) -> np.ndarray:
        """Scores for every position: (seq, vocab) float32; row t predicts token t+1."""
        ids = self._ids(token_ids)
        with self.decoder.generation() as cache:
            return self.decoder.step(ids[None], cache, keep=ids.size)[0]

    def stream(self, token_ids, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               repetition_penalty: float = 1.0, seed: int | None = None,
               logits_processor=None, truncate: bool = False,
               result: Generation | None = None) -> Iterator[int]:
        """Yield new token ids one by one until an end token (not yielded) or the length
        limit. Pass `result` to learn the finish reason. `logits_processor(ids, logits)`
        may return changed logits (V,) before sampling; ids are the prompt and output so far.
        truncate=True keeps only the newest prompt tokens that leave room for one new token
        (otherwise a prompt over the context is an error)."""
        if truncate:
            token_ids = list(token_ids)[-(self.max_context - 1):]
        ids = self._ids(token_ids)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
        if logits_processor is not None and not callable(logits_processor):
            raise InputError("logits_processor must be callable (ids, logits) -> logits")
        return run(self.decoder, self.eos_ids, ids, params, min(max_new_tokens, self.max_context - ids.size),
                   result if result is not None else Generation([]), logits_processor)

    def generate(self, token_ids, **kwargs) -> list[int]:
        """The new token ids (temperature 0 = greedy). Keywords as for `stream`."""
        return list(self.stream(token_ids, **kwargs))

    # ---- chat ------------------------------------------------------------------------------
    def render_prompt(self, messages, tools=None, add_generation_prompt: bool = True) -> str:
        """The prompt text the model's own chat template makes (as transformers renders it).
        OpenAI-shaped tool calls and tool results are turned into GLM's form first."""
        return self.tokenizer.unshield(self.prompter.render(messages, tools, add_generation_prompt))

    def prompt_ids(self, messages, tools=None, *, truncate: bool = False, room: int = 1) -> list[int]:
        """Token ids of the rendered prompt. Special-token text inside messages stays text:
        only the template's own markers become control tokens. truncate=True drops the
        oldest non-system messages until the prompt leaves `room` tokens of context, and if
        the last message alone is still too long, keeps only its newest tokens (each step is
        reported as a TruncationWarning)."""
        return self.prompter.prompt(messages, tools, truncate, room)[1]

    def chat_stream(self, messages, tools=None, **kwargs) -> Iterator[Delta]:
        """Yield Delta("reasoning" | "content", text) as the reply is written (whole UTF-8
        characters; a possible tool call is held back until it is complete), then one
        Delta("done", message=..., usage=...) with the parsed assistant message (see chat)."""
        return stream_reply(self, messages, tools, **kwargs)

    def chat(self, messages, tools=None, **kwargs) -> dict:
        """The assistant's reply: {"role": "assistant", "content", "finish_reason"} plus
        "reasoning_content" (GLM-Z1) and "tool_calls" (OpenAI shape: id, type, function
        {name, arguments}; an "error" key when a call cannot be run as written)."""
        for delta in self.chat_stream(messages, tools, **kwargs):
            pass
        return delta.message

    def run_tools(self, messages, functions: dict, tools=None, *, max_rounds: int = 4,
                  **kwargs) -> ToolRun:
        """Chat, run the Python callables the model calls, feed results back, until it answers
        in text or after `max_rounds` rounds of calls. Specs come from the callables'
        signatures unless `tools` gives them."""
        return run_tools(self.chat, messages, functions, tools, max_rounds, **kwargs)

    def search_answer(self, question: str, documents, *, system: str = SEARCH_SYSTEM_PROMPT,
                      **kwargs) -> dict:
        """Answer from documents [{id, title, url, content}] passed as observations; the
        reply gains "citations": each 【n†source】 marker with the document it names."""
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": question}] + document_messages(documents)
        reply = self.chat(messages, **kwargs)
        reply["citations"] = resolve_citations(reply["content"], documents)
        return reply
