"""Drive an exported decoder graph through ONNX Runtime: one call per prefill or decode step.

Two decoders, picked by the manifest's attention form (glmrt.contract):
  ConcatDecoder  the KV cache is a list of numpy arrays owned by each generation, so one session
                 serves many concurrent generations (InferenceSession.run is thread-safe).
  GqaDecoder     the KV cache is one preallocated buffer per layer on the device, bound with
                 IOBinding as both past and present so GroupQueryAttention updates it in place;
                 only the scored logits come back to the host, or for greedy decoding
                 (`step_greedy`) only the chosen id, the argmax taken in the graph. Decode
                 steps can be replayed as a CUDA graph. Greedy decoding can run in bursts
                 (`greedy_burst`): several steps queued back to back, each fed on the device
                 the id the step before chose, with one synchronization per burst, so the
                 device does not wait on the host between tokens. Generations take turns on
                 the buffers (a lock).
Both offer `generation()` (a context that yields a fresh cache) and `step()`.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np

from .contract import contract_from_dict, past_key, past_value, present_key, present_value
from .errors import ArtifactError, GlmrtError

NUMPY_DTYPE = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}

# ONNX Runtime switches glmrt picks for CUDA sessions unless the environment already sets them.
# ORT_ENABLE_XQA=0: GroupQueryAttention's decode step on ORT's flash path instead of its XQA
# kernel, 8 us per layer faster on the H200 with GLM-Z1-9B shapes at every context measured
# (same on GLM-4-32B shapes; bench/RESULTS.md). ORT reads them when a session makes its kernels.
CUDA_ORT_DEFAULTS = {"ORT_ENABLE_XQA": "0"}
_ENV_LOCK = threading.Lock()            # models loaded from several threads set them in turn


@contextlib.contextmanager
def ort_settings(defaults: dict):
    """Set each default the environment leaves unset, for the duration of session creation
    only; yields the values in force (the environment's own where it sets them)."""
    with _ENV_LOCK:
        added = {k: v for k, v in defaults.items() if k not in os.environ}
        os.environ.update(added)
        try:
            yield {k: os.environ[k] for k in defaults}
        finally:
            for k in added:
                os.environ.pop(k, None)


def make_session(folder: Path, manifest: dict, device: str, threads: int | None,
                 cuda_graph: bool = False):
    import onnxruntime as ort
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    elif device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise GlmrtError("device='cuda' needs onnxruntime-gpu with a CUDA device "
                             "(pip install 'glmrt[gpu]'); this onnxruntime offers "
                             f"{', '.join(ort.get_available_providers())}")
        opts = {"enable_cuda_graph": "1"} if cuda_graph else {}
        providers = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
    else:
        raise GlmrtError(f"device={device!r}; expected 'cpu' or 'cuda'")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # ORT fuses DequantizeLinear -> MatMul into MatMulNBits with int8 activations
    # (accuracy level 4) unless told otherwise: keep the exported numerics.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        so.intra_op_num_threads = threads
    graph = optimized_graph(folder, manifest, device) or folder / manifest["graph"]
    try:
        with ort_settings(CUDA_ORT_DEFAULTS if device == "cuda" else {}) as settings:
            session = ort.InferenceSession(str(graph), so, providers=providers)
    except Exception as e:  # ORT raises its own pybind exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{graph}: ONNX Runtime cannot load it ({first[:300]})") from None
    contract = contract_from_dict(manifest["io"])
    names = {i.name for i in session.get_inputs()}
    want = {t.name for t in contract["inputs"]}
    if names != want:
        raise ArtifactError(f"{graph}: graph inputs do not match the manifest's IO contract "
                            f"(differ on {sorted(names ^ want)[:4]})")
    session.graph_path = graph
    session.ort_settings = settings
    return session, contract


def optimized_graph(folder: Path, manifest: dict, device: str):
    """The graph `glmrt build --backend onnxruntime --device DEVICE` saved for this model, if
    one exists and was built from this very export (by manifest checksum)."""
    from .engine import engine_dir, read_engine, source_matches
    where = engine_dir(folder, "onnxruntime", manifest["precision"]["name"], device=device)
    if not (where / "manifest.json").is_file():
        return None
    em = read_engine(where, verify=False)
    return where / em["graph"] if source_matches(em, folder) else None


def make_decoder(folder: Path, manifest: dict, device: str = "cpu", threads: int | None = None,
                 max_context: int | None = None, cuda_graph: bool = True, burst: int | None = None):
    form = manifest["io"].get("form", "concat")
    if form == "gqa":
        return GqaDecoder(folder, manifest, device, threads, max_context, cuda_graph, burst)
    return ConcatDecoder(folder, manifest, device, threads)


class ConcatDecoder:
    def __init__(self, folder: Path, manifest: dict, device: str = "cpu", threads: int | None = None):
        self.session, self.contract = make_session(folder, manifest, device, threads)
        self.layers = manifest["config"]["num_hidden_layers"]
        kv = next(t for t in self.contract["inputs"] if t.name == past_key(0))
        if kv.dtype not in NUMPY_DTYPE:
            raise ArtifactError(f"{folder}: KV cache dtype {kv.dtype} cannot be bound from numpy "
                                f"on the {device} provider")
        self.kv_dtype = NUMPY_DTYPE[kv.dtype]
        self.kv_heads, self.head_dim = kv.dims[1], kv.dims[3]
        self.output_names = [t.name for t in self.contract["outputs"]]

    @contextlib.contextmanager
    def generation(self):
        yield self.empty_cache()

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        # per layer: key, value, each (batch, kv_heads, 0, head_dim)
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        return [z] * (2 * self.layers)

    def step(self, ids: np.ndarray, cache: list[np.ndarray], keep: int = 1):
        """ids (batch, seq) int64 after `past` cached tokens -> logits (batch, keep, V) float32,
        the new cache (batch, kv_heads, past + seq, head_dim) per layer and K/V."""
        batch, seq = ids.shape
        past = cache[0].shape[2]
        feeds = {"input_ids": ids,
                 "attention_mask": np.ones((batch, past + seq), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)),
                 "logits_index": np.arange(seq - keep, seq, dtype=np.int64)}
        for i in range(self.layers):
            feeds[past_key(i)], feeds[past_value(i)] = cache[2 * i], cache[2 * i + 1]
        out = self.session.run(self.output_names, feeds)
        return out[0], out[1:]


class GqaDecoder:
    """Device-resident KV cache for the "gqa" form; see the module docstring."""

    def __init__(self, folder: Path, manifest: dict, device: str, threads: int | None,
                 max_context: int | None, cuda_graph: bool, burst: int | None = None):
        import onnxruntime as ort
        self.ort = ort
        self.device = device
        self.cuda_graph = cuda_graph and device == "cuda"
        self.session, self.contract = make_session(folder, manifest, device, threads, self.cuda_graph)
        cfg = manifest["config"]
        self.layers = cfg["num_hidden_layers"]
        kv = next(t for t in self.contract["inputs"] if t.name == past_key(0))
        self.kv_dtype = NUMPY_DTYPE[kv.dtype]
        self.max_context = min(max_context or cfg["max_position_embeddings"], cfg["max_position_embeddings"])
        shape = (1, kv.dims[1], self.max_context, kv.dims[3])     # (batch, kv_heads, max_seq, head_dim)
        where = "cuda" if device == "cuda" else "cpu"
        self.kv = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, where, 0)
                   for _ in range(2 * self.layers)]
        self.vocab = cfg["vocab_size"]
        self.where = where
        self.lock = threading.Lock()
        # decode-step buffers at fixed addresses (what a CUDA graph replays)
        self.d_ids = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1), np.int64), where, 0)
        self.d_seqlens = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.int32), where, 0)
        self.d_total = ort.OrtValue.ortvalue_from_numpy(np.zeros((), np.int32), "cpu", 0)
        self.d_index = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.int64), where, 0)
        self.d_logits = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, self.vocab), np.float32, where, 0)
        # exports since the device argmax: greedy steps copy one id back, not the logits
        self.device_greedy = any(t.name == "next_token" for t in self.contract["outputs"])
        self.d_next = ort.OrtValue.ortvalue_from_shape_and_type((1, 1), np.int64, where, 0)
        self.decode_binding = self._bind(self.session.io_binding(), self.d_ids, self.d_seqlens,
                                         self.d_total, self.d_index, self.d_logits, self.d_next)
        # Greedy bursts (exports with next_token): steps per burst; 1 = a sync per token. On
        # the CPU provider every step runs to completion anyway, so bursts only delay tokens.
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
            raise GlmrtError(f"burst={burst!r}; expected a positive number of decode steps")
        self.burst = (burst or (8 if device == "cuda" else 1)) if self.device_greedy else 1
        self._bursts = None                     # the per-step bindings, made on first use

    def _bind(self, b, ids, seqlens, total, index, logits, next_token):
        """Bind one step's inputs and outputs: OrtValues, or (address, shape, dtype) of a slot
        inside a bigger buffer (the greedy bursts chain steps through such slots)."""
        def bind(name, v, output=False):
            if isinstance(v, tuple):
                ptr, shape, dtype = v
                (b.bind_output if output else b.bind_input)(name, self.where, 0, dtype, shape, ptr)
            else:
                (b.bind_ortvalue_output if output else b.bind_ortvalue_input)(name, v)

        for name, v in (("input_ids", ids), ("seqlens_k", seqlens),
                        ("total_sequence_length", total), ("logits_index", index)):
            bind(name, v)
        for i in range(self.layers):
            b.bind_ortvalue_input(past_key(i), self.kv[2 * i])
            b.bind_ortvalue_input(past_value(i), self.kv[2 * i + 1])
            b.bind_ortvalue_output(present_key(i), self.kv[2 * i])
            b.bind_ortvalue_output(present_value(i), self.kv[2 * i + 1])
        b.bind_ortvalue_output("logits", logits)
        if self.device_greedy:
            bind("next_token", next_token, output=True)
        return b

    def _check_room(self, total: int) -> None:
        if total > self.max_context:
            raise GlmrtError(f"{total} tokens exceed the cache of {self.max_context} positions "
                             "(load with a larger max_context)")

    def _make_bursts(self):
        """One binding per step of a burst. Step i reads its input id from slot i-1 of one
        (burst,) int64 device buffer and writes its argmax into slot i, so each step feeds the
        next without the host (step 0 reads the last slot, which the host fills); its seqlens_k
        is slot i of a (burst,) int32 buffer the host fills once per burst. Fixed addresses,
        one CUDA graph per step."""
        ort, k = self.ort, self.burst
        self.b_ids = ort.OrtValue.ortvalue_from_numpy(np.zeros(k, np.int64), self.where, 0)
        self.b_seqlens = ort.OrtValue.ortvalue_from_numpy(np.zeros(k, np.int32), self.where, 0)
        # total_sequence_length lives on the host: constant under a CUDA graph (see _run)
        self.b_total = [ort.OrtValue.ortvalue_from_numpy(np.array(self.max_context, np.int32), "cpu", 0)
                        for _ in range(k)]
        ids, seq = self.b_ids.data_ptr(), self.b_seqlens.data_ptr()
        return [self._bind(self.session.io_binding(), (ids + 8 * ((i - 1) % k), [1, 1], np.int64),
                           (seq + 4 * i, [1], np.int32), self.b_total[i], self.d_index, self.d_logits,
                           (ids + 8 * i, [1, 1], np.int64))
                for i in range(k)]

    def greedy_burst(self, last: int, past: int, n: int) -> list[int]:
        """n greedy decode steps (1 <= n <= burst) after `past` cached tokens, the first fed
        `last`: the n chosen ids. The steps are queued without waiting on the device and the
        host synchronizes once, after the last; steps past a stop token only write cache
        positions beyond the text, which a later write overwrites."""
        if not 1 <= n <= self.burst:
            raise GlmrtError(f"a burst of {n} steps; this decoder runs 1 to {self.burst}")
        self._check_room(past + n)
        if self._bursts is None:
            self._bursts = self._make_bursts()
        k = self.burst
        ids = np.zeros(k, np.int64)
        ids[k - 1] = last
        self.b_ids.update_inplace(ids)
        self.b_seqlens.update_inplace(np.arange(past, past + k, dtype=np.int32))  # step i: length past+i+1
        for i in range(n):
            ro = self.ort.RunOptions()
            if self.cuda_graph:
                ro.add_run_config_entry("gpu_graph_id", str(2 + i))
            else:
                self.b_total[i].update_inplace(np.array(past + i + 1, np.int32))
            if i < n - 1:       # return once queued; the last step's run waits for all of them
                ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
            self.session.run_with_iobinding(self._bursts[i], ro)
        return self.b_ids.numpy()[:n].tolist()

    @contextlib.contextmanager
    def generation(self):
        """Own the device cache for one generation; the cache handle is its length."""
        with self.lock:
            yield 0

    def step(self, ids: np.ndarray, past: int, keep: int = 1):
        """ids (1, seq) after `past` cached tokens -> host logits (1, keep, V), new length."""
        out, total = self._run(ids, past, keep)
        return out[0].numpy(), total

    def step_greedy(self, ids: np.ndarray, past: int) -> tuple[int, int]:
        """Like step, but only the argmax of the last position comes back: (token id, new
        length). The logits stay on the device (exports without `next_token`: host argmax)."""
        out, total = self._run(ids, past, 1)
        if not self.device_greedy:
            return int(np.argmax(out[0].numpy()[0, -1])), total
        return int(out[1].numpy()[0, -1]), total

    def _run(self, ids: np.ndarray, past: int, keep: int):
        """One prefill or decode step; ([logits, next_token] as device values, new length)."""
        ort = self.ort
        batch, seq = ids.shape
        total = past + seq
        if batch != 1:
            raise GlmrtError("the gqa form runs batch 1")
        self._check_room(total)
        if seq == 1 and keep == 1:
            self.d_ids.update_inplace(ids.astype(np.int64))
            self.d_seqlens.update_inplace(np.array([total - 1], np.int32))
            # A CUDA graph replays host values as captured: give GroupQueryAttention the
            # buffer's length, constant, and let seqlens_k (on the device) carry the position.
            self.d_total.update_inplace(np.array(self.max_context if self.cuda_graph else total, np.int32))
            ro = ort.RunOptions()
            if self.cuda_graph:
                ro.add_run_config_entry("gpu_graph_id", "1")
            self.session.run_with_iobinding(self.decode_binding, ro)
            return [self.d_logits, self.d_next], total
        where = self.where
        logits = ort.OrtValue.ortvalue_from_shape_and_type((1, keep, self.vocab), np.float32, where, 0)
        next_token = ort.OrtValue.ortvalue_from_shape_and_type((1, keep), np.int64, where, 0)
        b = self._bind(self.session.io_binding(),
                       ort.OrtValue.ortvalue_from_numpy(ids.astype(np.int64), where, 0),
                       ort.OrtValue.ortvalue_from_numpy(np.array([total - 1], np.int32), where, 0),
                       ort.OrtValue.ortvalue_from_numpy(np.array(total, np.int32), "cpu", 0),
                       ort.OrtValue.ortvalue_from_numpy(np.arange(seq - keep, seq, dtype=np.int64), where, 0),
                       logits, next_token)
        ro = ort.RunOptions()
        if self.cuda_graph:
            ro.add_run_config_entry("gpu_graph_id", "-1")        # prefill shapes vary: no graph
        self.session.run_with_iobinding(b, ro)
        return [logits, next_token], total
