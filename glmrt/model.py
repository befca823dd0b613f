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
from .scheduler import Request
from .template import builtin_template, read_template
from .tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 512
__all__ = ["Model", "Generation", "Delta", "DEFAULT_MAX_NEW_TOKENS"]


class Model:
    default_max_new_tokens = DEFAULT_MAX_NEW_TOKENS

    def __init__(self, path: str | Path, *, device: str | None = None, verify: bool = True,
                 threads: int | None = None, max_context: int | None = None,
                 cuda_graph: bool = True, backend: str = "onnxruntime", burst: int | None = None,
                 slots: int | None = None, max_queue: int | None = None, prefill_chunk: int | None = None):
        """device: cpu | cuda (default: the backend's first, cpu for onnxruntime); backend: a
        name in glmrt.backends.BACKENDS; threads: CPU threads; max_context: positions to
        reserve (per slot); burst: greedy decode steps queued per host synchronization where the
        decoder can (default 8 on CUDA: tokens then stream in groups of up to 8; 1 on the CPU).

        slots=N: continuous batching (glmrt/scheduler.py). KV caches for N sequences; calls from
        any number of threads are scheduled onto free slots and every decode step advances all
        of them in one batched call; up to `max_queue` (default 64) more wait in order, beyond
        that a call raises QueueFullError. Prompts are prefilled in chunks of `prefill_chunk`
        tokens (default 128 on the CPU, 512 on CUDA) between decode steps, and a prompt that
        begins with a slot's cached tokens prefills only the rest. Call close() to stop it."""
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
        self.scheduler = None
        if slots is not None:
            for name, v in (("slots", slots), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "max_queue" else 1)):
                    raise InputError(f"{name}={v!r} must be a positive integer")
            from .scheduler import Scheduler  # noqa: PLC0415
            chunk = prefill_chunk or (512 if self.decoder.describe()["device"] == "cuda" else 128)
            self.scheduler = Scheduler(self.decoder, slots, max_queue=64 if max_queue is None else max_queue,
                                       prefill_chunk=chunk)
        elif max_queue is not None or prefill_chunk is not None:
            raise InputError("max_queue and prefill_chunk apply with slots=N (continuous batching)")

    def close(self) -> None:
        """Stop the scheduler's thread (slots); requests still running end with an error."""
        if self.scheduler is not None:
            self.scheduler.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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
        if self.scheduler is not None:
            return next(self.scheduler.submit(Request(ids, SamplingParams(), 0, self.eos_ids, Generation([]),
                                                      score=True)))
        with self.decoder.generation() as cache:
            return self.decoder.step(ids[None], cache, keep=ids.size)[0]

    def stream(self, token_ids, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               repetition_penalty: float = 1.0, seed: int | None = None,
               logits_processor=None, truncate: bool = False, stop_tokens=None,
               result: Generation | None = None) -> Iterator[int]:
        """Yield new token ids one by one until an end token (not yielded) or the length
        limit. Pass `result` to learn the finish reason. `logits_processor(ids, logits)`
        may return changed logits (V,) before sampling; ids are the prompt and output so far.
        truncate=True keeps only the newest prompt tokens that leave room for one new token
        (otherwise a prompt over the context is an error). stop_tokens: ids that end this
        generation too, beside the model's own stop ids."""
        if truncate:
            token_ids = list(token_ids)[-(self.max_context - 1):]
        ids = self._ids(token_ids)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
        if logits_processor is not None and not callable(logits_processor):
            raise InputError("logits_processor must be callable (ids, logits) -> logits")
        eos = self.eos_ids
        if stop_tokens is not None:
            try:
                eos = eos | frozenset(int(t) for t in stop_tokens)
            except (TypeError, ValueError):
                raise InputError("stop_tokens must be a sequence of token ids") from None
        res = result if result is not None else Generation([])
        budget = min(max_new_tokens, self.max_context - ids.size)
        if self.scheduler is not None and budget > 0:
            return self.scheduler.submit(Request(ids, params, budget, eos, res, logits_processor))
        return run(self.decoder, eos, ids, params, budget, res, logits_processor)

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
