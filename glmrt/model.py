"""The Python API products embed: load once, then logits / generate / stream / chat.

Thread safety: a Model holds no per-generation state. Every call keeps its own KV cache and
sampler, and ONNX Runtime's InferenceSession.run is thread-safe, so concurrent calls from
several threads run side by side and each gets the output it would get alone.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np

from . import manifest as manifest_io
from .config import GlmConfig
from .errors import InputError
from .sampling import Sampler, SamplingParams
from .session import OrtDecoder
from .template import builtin_template, read_template, render
from .tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 512


@dataclasses.dataclass
class Generation:
    """What one generate call produced. finish_reason: 'stop' (an end token) or 'length'."""
    tokens: list[int]
    finish_reason: str | None = None
    stop_token: int | None = None


class Model:
    def __init__(self, path: str | Path, *, device: str = "cpu", verify: bool = True,
                 threads: int | None = None):
        self.folder = Path(path)
        self.manifest = manifest_io.read(self.folder, verify=verify)
        self.config = GlmConfig.from_dict(self.manifest["config"])
        self.tokenizer = Tokenizer(self.folder, self.manifest["tokenizer"])
        self.chat_template = read_template(self.folder, self.manifest["chat_template"]) \
            or builtin_template("glm4")
        self.eos_ids = frozenset(self.manifest["generation"]["eos_token_id"])
        self.max_context = self.config.max_position_embeddings
        self.decoder = OrtDecoder(self.folder, self.manifest, device=device, threads=threads)

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
            raise InputError(f"prompt of {ids.size} tokens is longer than the model's context "
                             f"({self.max_context})")
        return ids.astype(np.int64)

    def logits(self, token_ids) -> np.ndarray:
        """Scores for every position: (seq, vocab) float32; row t predicts token t+1."""
        ids = self._ids(token_ids)
        logits, _ = self.decoder.step(ids[None], self.decoder.empty_cache(), keep=ids.size)
        return logits[0]

    def stream(self, token_ids, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               repetition_penalty: float = 1.0, seed: int | None = None,
               result: Generation | None = None) -> Iterator[int]:
        """Yield new token ids one by one until an end token (not yielded) or the length
        limit. Pass `result` to learn the finish reason."""
        ids = self._ids(token_ids)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
        return self._run(ids, params, min(max_new_tokens, self.max_context - ids.size),
                         result if result is not None else Generation([]))

    def _run(self, ids: np.ndarray, params: SamplingParams, budget: int, res: Generation):
        sample = Sampler(params)
        history = list(ids)
        cache = self.decoder.empty_cache()
        step_ids = ids[None]
        res.finish_reason = "length"
        for _ in range(budget):
            logits, cache = self.decoder.step(step_ids, cache)            # (1, 1, V)
            token = sample(logits[0, -1], np.asarray(history))
            if token in self.eos_ids:
                res.finish_reason, res.stop_token = "stop", token
                return
            history.append(token)
            res.tokens.append(token)
            yield token
            step_ids = np.array([[token]], np.int64)

    def generate(self, token_ids, **kwargs) -> list[int]:
        """The new token ids (temperature 0 = greedy). Keywords as for `stream`."""
        return list(self.stream(token_ids, **kwargs))

    # ---- chat ------------------------------------------------------------------------------
    def render_prompt(self, messages, tools=None, add_generation_prompt: bool = True) -> str:
        """The prompt text the model's own chat template makes (as transformers renders it)."""
        return render(self.chat_template, messages, tools=tools,
                      add_generation_prompt=add_generation_prompt,
                      special_tokens=self.tokenizer.template_tokens())

    def chat_stream(self, messages, tools=None, *, result: Generation | None = None,
                    **kwargs) -> Iterator[str]:
        """Yield the reply's text in pieces that are whole UTF-8 characters."""
        ids = self.tokenizer.encode(self.render_prompt(messages, tools))
        dec = self.tokenizer.stream()
        for token in self.stream(ids, result=result, **kwargs):
            if piece := dec.push(token):
                yield piece
        if tail := dec.flush():
            yield tail

    def chat(self, messages, tools=None, **kwargs) -> dict:
        """The assistant's reply as a message dict {"role": "assistant", "content": ...}."""
        res = Generation([])
        text = "".join(self.chat_stream(messages, tools, result=res, **kwargs))
        return {"role": "assistant", "content": text, "finish_reason": res.finish_reason}
