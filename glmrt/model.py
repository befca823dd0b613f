"""The Python API products embed: load once, then logits / generate / stream / chat.

Thread safety: every call gets the output it would get alone. With the CPU ("concat") form a
Model holds no per-generation state: each call keeps its own KV cache and sampler and calls
run side by side (InferenceSession.run is thread-safe). With the device-cache ("gqa") form the
cache buffers are the model's: calls take turns, one generation at a time.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from . import manifest as manifest_io
from .config import GlmConfig
from .errors import ContextOverflowError, InputError, TruncationWarning
from .sampling import Sampler, SamplingParams
from .session import make_decoder
from .agent import SEARCH_SYSTEM_PROMPT, ToolRun, document_messages, resolve_citations, run_tools
from .reply import ASSISTANT, THINK_CLOSE, THINK_OPEN, parse_reply, to_glm_messages
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
                 threads: int | None = None, max_context: int | None = None,
                 cuda_graph: bool = True, backend: str = "onnxruntime", burst: int | None = None):
        """burst: greedy decode steps queued per host synchronization on the device-cache
        (gqa) form; default 8 on CUDA (tokens then stream in groups of up to 8), 1 on the CPU."""
        self.folder = Path(path)
        self.manifest = manifest_io.read(self.folder, verify=verify)
        self.config = GlmConfig.from_dict(self.manifest["config"])
        self.tokenizer = Tokenizer(self.folder, self.manifest["tokenizer"])
        self.chat_template = read_template(self.folder, self.manifest["chat_template"]) \
            or builtin_template("glm4")
        self.eos_ids = frozenset(self.manifest["generation"]["eos_token_id"])
        if backend == "tensorrt":
            self.decoder = _tensorrt_decoder(self.folder, self.manifest, verify)
        elif backend == "onnxruntime":
            self.decoder = make_decoder(self.folder, self.manifest, device, threads, max_context, cuda_graph,
                                        burst)
        else:
            raise InputError(f"backend={backend!r}; expected 'onnxruntime' or 'tensorrt'")
        self.max_context = getattr(self.decoder, "max_context", self.config.max_position_embeddings)

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
            logits, _ = self.decoder.step(ids[None], cache, keep=ids.size)
        return logits[0]

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
        return self._run(ids, params, min(max_new_tokens, self.max_context - ids.size),
                         result if result is not None else Generation([]), logits_processor)

    def _run(self, ids: np.ndarray, params: SamplingParams, budget: int, res: Generation,
             processor):
        sample = Sampler(params)
        history = np.empty(ids.size + budget, np.int64)      # prompt + output, filled as it grows
        history[:ids.size] = ids
        n = ids.size
        step_ids = ids[None]
        res.finish_reason = "length"
        # plain greedy on a device-cache decoder: the argmax is taken on the device, and after
        # the prompt, steps run in bursts that feed each chosen id back on the device
        greedy = getattr(self.decoder, "step_greedy", None) if (
            processor is None and params.temperature == 0.0 and params.repetition_penalty == 1.0) else None
        burst = self.decoder.greedy_burst if greedy is not None and getattr(self.decoder, "burst", 1) > 1 else None
        left = budget
        with self.decoder.generation() as cache:
            while left > 0:
                if burst is not None and cache > 0:
                    k = min(self.decoder.burst, left)
                    tokens = burst(int(step_ids[0, -1]), cache, k)
                    cache += k
                elif greedy is not None:
                    token, cache = greedy(step_ids, cache)
                    tokens = (token,)
                else:
                    logits, cache = self.decoder.step(step_ids, cache)        # (1, 1, V)
                    row = logits[0, -1]
                    if processor is not None:
                        row = np.asarray(processor(history[:n].copy(), row.copy()), np.float32)
                    tokens = (sample(row, history[:n]),)
                for token in tokens:
                    left -= 1
                    if token in self.eos_ids:
                        res.finish_reason, res.stop_token = "stop", token
                        return
                    history[n] = token
                    n += 1
                    res.tokens.append(token)
                    yield token
                step_ids = np.array([[token]], np.int64)

    def generate(self, token_ids, **kwargs) -> list[int]:
        """The new token ids (temperature 0 = greedy). Keywords as for `stream`."""
        return list(self.stream(token_ids, **kwargs))

    # ---- chat ------------------------------------------------------------------------------
    def render_prompt(self, messages, tools=None, add_generation_prompt: bool = True) -> str:
        """The prompt text the model's own chat template makes (as transformers renders it).
        OpenAI-shaped tool calls and tool results are turned into GLM's form first."""
        return self.tokenizer.unshield(self._render(messages, tools, add_generation_prompt))

    def _render(self, messages, tools=None, add_generation_prompt: bool = True) -> str:
        """The prompt with user-typed special-token text shielded (see Tokenizer.shield)."""
        tok = self.tokenizer
        return render(self.chat_template, tok.shield(to_glm_messages(messages)), tools=tok.shield(tools),
                      add_generation_prompt=add_generation_prompt, special_tokens=tok.template_tokens())

    def prompt_ids(self, messages, tools=None, *, truncate: bool = False, room: int = 1) -> list[int]:
        """Token ids of the rendered prompt. Special-token text inside messages stays text:
        only the template's own markers become control tokens. truncate=True drops the
        oldest non-system messages until the prompt leaves `room` tokens of context, and if
        the last message alone is still too long, keeps only its newest tokens (each step is
        reported as a TruncationWarning)."""
        return self._prompt(messages, tools, truncate, room)[1]

    def _prompt(self, messages, tools, truncate: bool, room: int) -> tuple[str, list[int]]:
        """(shielded prompt text, its token ids); see prompt_ids."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InputError("messages must be a non-empty list of {'role', 'content'} dicts")
        messages, dropped = list(messages), 0
        while True:
            text = self._render(messages, tools)
            ids = self.tokenizer.encode_shielded(text)
            if not truncate or len(ids) + room <= self.max_context:
                break                  # too long without truncate: stream() says so
            drop = next((i for i, m in enumerate(messages[:-1]) if m.get("role") != "system"), None)
            if drop is None:
                messages[-1] = self._cut_last(messages[-1], len(ids) + room - self.max_context)
                continue
            del messages[drop]
            dropped += 1
        if dropped:
            warnings.warn(f"dropped the {dropped} oldest message(s) to fit the context "
                          f"({self.max_context} tokens)", TruncationWarning, stacklevel=3)
        return text, ids

    def _cut_last(self, message: dict, excess: int) -> dict:
        """The message with the oldest tokens of its content cut so the prompt shrinks by at
        least `excess` tokens (re-rendering checks the result)."""
        content = message.get("content")
        tokens = self.tokenizer.encode_literal(content) if isinstance(content, str) else []
        keep = len(tokens) - excess
        if keep <= 0:
            raise InputError(f"the system message, tools and template leave no room in the context "
                             f"({self.max_context} tokens) for the last message; shorten them")
        warnings.warn(f"the last message was cut to its newest {keep} of {len(tokens)} tokens to fit "
                      f"the context ({self.max_context} tokens)", TruncationWarning, stacklevel=4)
        return {**message, "content": self.tokenizer.decode(tokens[-keep:], skip_special=False)}

    def chat_stream(self, messages, tools=None, **kwargs) -> Iterator[Delta]:
        """Yield Delta("reasoning" | "content", text) as the reply is written (whole UTF-8
        characters; a possible tool call is held back until it is complete), then one
        Delta("done", message=...) with the parsed assistant message (see chat)."""
        truncate = kwargs.pop("truncate", False)
        new = kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        room = min(new, 64) if isinstance(new, int) and not isinstance(new, bool) and new > 0 else 1
        text, ids = self._prompt(messages, tools, truncate, room)
        thinking = text.rstrip().endswith(THINK_OPEN)
        res = Generation([])
        dec = self.tokenizer.stream(skip_special=False)
        split = _Splitter(thinking)
        for token in self.stream(ids, result=res, **kwargs):
            yield from split.feed(dec.push(token))
        yield from split.feed(dec.flush())
        reply = parse_reply(split.text, tools, thinking=thinking,
                            truncated=res.finish_reason == "length")
        yield from split.finish(reply)
        yield Delta("done", message={**reply.as_message(), "finish_reason": res.finish_reason},
                    usage={"prompt_tokens": len(ids), "completion_tokens": len(res.tokens)
                           + (res.stop_token is not None)})

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


def _tensorrt_decoder(folder: Path, manifest: dict, verify: bool):
    """The engine built for this GPU and the model's precision (glmrt build --backend tensorrt)."""
    from .engine import engine_dir, read_engine
    from .errors import ArtifactError
    from .gpu import detect
    from .trt_runtime import TrtDecoder
    gpu = detect()
    where = engine_dir(folder, "tensorrt", manifest["precision"]["name"], gpu_name=gpu.name,
                       compute_capability=gpu.compute_capability)
    if not where.is_dir():
        raise ArtifactError(f"{where}: no TensorRT engine for {gpu.name} ({gpu.sm}); build one: "
                            f"glmrt build {folder} --backend tensorrt")
    return TrtDecoder(where, read_engine(where, verify), manifest)


@dataclasses.dataclass
class Delta:
    kind: str                  # "reasoning", "content" or "done"
    text: str = ""
    message: dict | None = None    # done: the parsed assistant message and its finish_reason
    usage: dict | None = None      # done: prompt_tokens, completion_tokens (a stop token counts)


class _Splitter:
    """Turns the growing reply text into reasoning and content deltas as they become certain.

    Reasoning runs until </think> (held back while a tag may be forming). Content that does
    not start with whitespace may be a marker-less tool call, so it is held until the end;
    leading and trailing whitespace is held so the deltas join to the parsed content."""

    def __init__(self, thinking: bool):
        self.text = ""
        self.thinking = thinking
        self.sent = {"reasoning": 0, "content": 0}

    def _views(self):
        body, content = self.text, ""
        reasoning = None
        if self.thinking:
            if body.lstrip().startswith(THINK_OPEN):
                body = body.lstrip()[len(THINK_OPEN):]
            if THINK_CLOSE in body:
                reasoning, content = body.split(THINK_CLOSE, 1)
            else:
                reasoning = _hold_partial_tag(body, THINK_CLOSE)
        else:
            content = body
        return reasoning, content

    def feed(self, piece: str):
        if not piece:
            return
        self.text += piece
        reasoning, content = self._views()
        if reasoning is not None:
            yield from self._emit("reasoning", reasoning.strip())
        if content[:1].isspace():
            visible = _hold_partial_tag(content.split(ASSISTANT, 1)[0], ASSISTANT).strip()
            yield from self._emit("content", visible)

    def _emit(self, kind: str, visible: str):
        if len(visible) > self.sent[kind]:
            yield Delta(kind, visible[self.sent[kind]:])
            self.sent[kind] = len(visible)

    def finish(self, reply):
        if reply.reasoning is not None:
            yield from self._emit("reasoning", reply.reasoning)
        yield from self._emit("content", reply.content)


def _hold_partial_tag(text: str, tag: str) -> str:
    """text without a trailing prefix of `tag` (it may be the start of the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return text[:-n]
    return text
