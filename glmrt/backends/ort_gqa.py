"""The gqa form on ONNX Runtime (export --target cuda): GroupQueryAttention with the KV cache
preallocated on the device, one buffer per layer and K/V bound with IOBinding as both past and
present, so each step updates it in place. Only the scored logits come back to the host, or for
greedy decoding only the chosen id (the graph's `next_token`, an ArgMax). Decode steps replay
as CUDA graphs. Greedy decoding runs in bursts: several steps queued back to back, each fed on
the device the id the step before chose, with one host synchronization per burst. The buffers
belong to the decoder, so generations take turns on them (a lock).

CUDA graph ids (ORT's `gpu_graph_id` run option, one captured graph per id):
  GRAPH_NONE (-1)       prefill: shapes vary, never captured
  GRAPH_DECODE (1)      one decode step bound to the d_* buffers
  GRAPH_BURST + i (2..) step i of a burst, bound to slot i of the burst buffers
  GRAPH_BATCH + b       a batched decode step over slot rows 0..b-1 (continuous batching)
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from ..contract import numpy_dtype, past_key, past_value, present_key, present_value
from ..errors import GlmrtError
from .base import Cache, Capabilities, Decoder
from .ort_session import make_session

GRAPH_NONE, GRAPH_DECODE, GRAPH_BURST, GRAPH_BATCH = -1, 1, 2, 1000
MAX_SLOTS = 64
BUCKETS = (1, 2, 4, 8, 16, 32, 64)      # batch sizes a batched decode step is rounded up to


class OrtGqaDecoder(Decoder):
    def __init__(self, folder: Path, manifest: dict, device: str, threads: int | None,
                 max_context: int | None, cuda_graph: bool, burst: int | None = None,
                 initializers: dict | None = None):
        import onnxruntime as ort
        self.ort_mod = ort
        self.device = device
        self.cuda_graph = cuda_graph and device == "cuda"
        self.ort = make_session(folder, manifest, device, threads, self.cuda_graph, initializers)
        cfg = manifest["config"]
        self.layers = cfg["num_hidden_layers"]
        kv = next(t for t in self.ort.contract["inputs"] if t.name == past_key(0))
        self.kv_dtype = numpy_dtype(kv.dtype)
        max_context = min(max_context or cfg["max_position_embeddings"], cfg["max_position_embeddings"])
        self.row_shape = (kv.dims[1], max_context, kv.dims[3])    # one sequence: (kv_heads, max_seq, head_dim)
        self.row_bytes = int(np.prod(self.row_shape)) * np.dtype(self.kv_dtype).itemsize
        self.where = where = "cuda" if device == "cuda" else "cpu"
        self.kv = None                          # the single-generation cache, made on first use
        self.slot_kv = None                     # open_slots: (slots, kv_heads, max_seq, head_dim) each
        self.vocab = cfg["vocab_size"]
        self.lock = threading.Lock()
        # decode-step buffers at fixed addresses (what a CUDA graph replays)
        self.d_ids = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1), np.int64), where, 0)
        self.d_seqlens = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.int32), where, 0)
        self.d_total = ort.OrtValue.ortvalue_from_numpy(np.zeros((), np.int32), "cpu", 0)
        self.d_index = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.int64), where, 0)
        self.d_logits = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, self.vocab), np.float32, where, 0)
        # exports since the device argmax: greedy steps copy one id back, not the logits
        self.device_greedy = any(t.name == "next_token" for t in self.ort.contract["outputs"])
        self.d_next = ort.OrtValue.ortvalue_from_shape_and_type((1, 1), np.int64, where, 0)
        self.decode_binding = None
        self._buckets = {}                      # batch size -> its bound buffers (step_batch)
        # Greedy bursts (exports with next_token): steps per burst; 1 = a sync per token. On
        # the CPU provider every step runs to completion anyway, so bursts only delay tokens.
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
            raise GlmrtError(f"burst={burst!r}; expected a positive number of decode steps")
        self._bursts = None                     # the per-step bindings, made on first use
        self.caps = Capabilities(
            max_context=max_context, device_argmax=self.device_greedy, batch=MAX_SLOTS,
            burst=(burst or (8 if device == "cuda" else 1)) if self.device_greedy else 1)

    def kv_buffers(self) -> list:
        """The single-generation cache, one (1, kv_heads, max_seq, head_dim) OrtValue per layer
        and K/V (another decoder, the cuda engine, decodes into the same buffers)."""
        self._single()
        return self.kv

    def _single(self):
        """The single-generation cache buffers and the decode binding, made on first use (a
        model loaded with slots never needs them)."""
        if self.kv is None:
            new = self.ort_mod.OrtValue.ortvalue_from_shape_and_type
            self.kv = [new((1, *self.row_shape), self.kv_dtype, self.where, 0) for _ in range(2 * self.layers)]
            self.decode_binding = self._bind(self.ort.session.io_binding(), self.d_ids, self.d_seqlens,
                                             self.d_total, self.d_index, self.d_logits, self.d_next)

    def describe(self) -> dict:
        return {"backend": "onnxruntime", "form": "gqa", "device": self.device, "cuda_graph": self.cuda_graph,
                "settings": self.ort.settings, "graph": str(self.ort.graph),
                "greedy": "device argmax" if self.device_greedy else "host argmax"}

    def _bind(self, b, ids, seqlens, total, index, logits, next_token, rows=None):
        """Bind one step's inputs and outputs: OrtValues, or (address, shape, dtype) of a slot
        inside a bigger buffer (the greedy bursts chain steps through such slots). The cache is
        the single-generation buffers, or rows=(first, count) of the slot buffers."""
        def bind(name, v, output=False):
            if isinstance(v, tuple):
                ptr, shape, dtype = v
                (b.bind_output if output else b.bind_input)(name, self.where, 0, dtype, shape, ptr)
            else:
                (b.bind_ortvalue_output if output else b.bind_ortvalue_input)(name, v)

        for name, v in (("input_ids", ids), ("seqlens_k", seqlens),
                        ("total_sequence_length", total), ("logits_index", index)):
            bind(name, v)
        for j in range(2 * self.layers):
            past, present = (past_key, present_key) if j % 2 == 0 else (past_value, present_value)
            if rows is None:
                kv = self.kv[j]
            else:                # (count, kv_heads, max_seq, head_dim) from row `first` on
                kv = (self._slot(self.slot_kv[j].data_ptr(), rows[0], self.row_bytes),
                      [rows[1], *self.row_shape], self.kv_dtype)
            bind(past(j // 2), kv)
            bind(present(j // 2), kv, output=True)
        bind("logits", logits, output=True)
        if self.device_greedy:
            bind("next_token", next_token, output=True)
        return b

    # ---- greedy bursts ----------------------------------------------------------------------
    # One (burst,) int64 buffer of ids and one (burst,) int32 buffer of sequence lengths on the
    # device. Step i reads its input id from slot i-1 (step 0 from the last slot, which the host
    # fills) and writes its argmax into slot i, so each step feeds the next without the host;
    # its seqlens_k is slot i, filled by the host once per burst.
    @staticmethod
    def _slot(base: int, i: int, itemsize: int) -> int:
        """The device address of slot i of a buffer starting at `base`."""
        return base + itemsize * i

    def _make_bursts(self):
        """One binding per step of a burst, at fixed addresses: one CUDA graph per step."""
        ort, k = self.ort_mod, self.caps.burst
        self.b_ids = ort.OrtValue.ortvalue_from_numpy(np.zeros(k, np.int64), self.where, 0)
        self.b_seqlens = ort.OrtValue.ortvalue_from_numpy(np.zeros(k, np.int32), self.where, 0)
        # total_sequence_length lives on the host: constant under a CUDA graph (see _run)
        self.b_total = [ort.OrtValue.ortvalue_from_numpy(np.array(self.caps.max_context, np.int32), "cpu", 0)
                        for _ in range(k)]
        ids, seq = self.b_ids.data_ptr(), self.b_seqlens.data_ptr()
        return [self._bind(self.ort.session.io_binding(),
                           (self._slot(ids, (i - 1) % k, 8), [1, 1], np.int64),      # input: previous slot
                           (self._slot(seq, i, 4), [1], np.int32), self.b_total[i], self.d_index,
                           self.d_logits,
                           (self._slot(ids, i, 8), [1, 1], np.int64))                # output: own slot
                for i in range(k)]

    def greedy_burst(self, last: int, cache: Cache, n: int) -> list[int]:
        if cache.slot is not None:                  # slots decode in step_batch, not bursts
            return super().greedy_burst(last, cache, n)
        """n greedy decode steps (1 <= n <= burst) after cache.length tokens, the first fed
        `last`: the n chosen ids. The steps are queued without waiting on the device and the
        host synchronizes once, after the last; steps past a stop token only write cache
        positions beyond the text, which a later write overwrites."""
        k = self.caps.burst
        if not 1 <= n <= k:
            raise GlmrtError(f"a burst of {n} steps; this decoder runs 1 to {k}")
        past = cache.length
        self.check_room(cache, n)
        if self._bursts is None:
            self._bursts = self._make_bursts()
        ids = np.zeros(k, np.int64)
        ids[k - 1] = last
        self.b_ids.update_inplace(ids)
        self.b_seqlens.update_inplace(np.arange(past, past + k, dtype=np.int32))  # step i: length past+i+1
        for i in range(n):
            ro = self.ort_mod.RunOptions()
            if self.cuda_graph:
                ro.add_run_config_entry("gpu_graph_id", str(GRAPH_BURST + i))
            else:
                self.b_total[i].update_inplace(np.array(past + i + 1, np.int32))
            if i < n - 1:       # return once queued; the last step's run waits for all of them
                ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
            self.ort.session.run_with_iobinding(self._bursts[i], ro)
        cache.length = past + n
        return self.b_ids.numpy()[:n].tolist()

    # ---- steps ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def generation(self):
        """Own the device cache for one generation."""
        with self.lock:
            self._single()
            yield Cache(0, None)

    # ---- slots: continuous batching -----------------------------------------------------------
    # One buffer per layer and K/V holds every slot's cache, (slots, kv_heads, max_seq,
    # head_dim); slot i is row i. A prefill step binds its row alone; a batched decode step
    # binds rows 0..b-1, b the smallest bucket holding the highest slot asked for, with one
    # CUDA graph per bucket (GRAPH_BATCH + b). Rows in the bucket that are not asked for run
    # too, on a dummy token written past their cached tokens, which stay intact.
    def open_slots(self, n: int) -> list[Cache]:
        if not 1 <= n <= MAX_SLOTS:
            raise GlmrtError(f"slots={n}; this decoder holds 1 to {MAX_SLOTS}")
        new = self.ort_mod.OrtValue.ortvalue_from_shape_and_type
        self.slot_kv = [new((n, *self.row_shape), self.kv_dtype, self.where, 0) for _ in range(2 * self.layers)]
        self.slots = [Cache(0, None, i) for i in range(n)]
        self._buckets = {}
        return list(self.slots)

    def _bucket(self, b: int) -> dict:
        """Fixed-address buffers and the binding for a batched decode step over rows 0..b-1."""
        if b not in self._buckets:
            ort, where = self.ort_mod, self.where
            d = {"ids": ort.OrtValue.ortvalue_from_numpy(np.zeros((b, 1), np.int64), where, 0),
                 "seqlens": ort.OrtValue.ortvalue_from_numpy(np.zeros(b, np.int32), where, 0),
                 "total": ort.OrtValue.ortvalue_from_numpy(np.zeros((), np.int32), "cpu", 0),
                 "logits": ort.OrtValue.ortvalue_from_shape_and_type((b, 1, self.vocab), np.float32, where, 0),
                 "next": ort.OrtValue.ortvalue_from_shape_and_type((b, 1), np.int64, where, 0)}
            d["binding"] = self._bind(self.ort.session.io_binding(), d["ids"], d["seqlens"], d["total"],
                                      self.d_index, d["logits"], d["next"], rows=(0, b))
            self._buckets[b] = d
        return self._buckets[b]

    def _run_batch(self, ids: np.ndarray, caches: list[Cache]) -> dict:
        rows = [c.slot for c in caches]
        if self.slot_kv is None or None in rows:
            raise GlmrtError("step_batch takes the caches open_slots returned")
        for c in caches:
            self.check_room(c, 1)
        n = len(self.slots)
        b = next(k for k in BUCKETS + (n,) if k >= max(rows) + 1)
        b = min(b, n)
        d = self._bucket(b)
        step_ids = np.zeros((b, 1), np.int64)
        lengths = np.array([min(c.length, self.caps.max_context - 1) for c in self.slots[:b]], np.int32)
        for c in self.slots[:b]:
            c.length = min(c.length, self.caps.max_context - 1)     # an idle full row gives up its last
        step_ids[rows, 0] = np.asarray(ids, np.int64)
        d["ids"].update_inplace(step_ids)
        d["seqlens"].update_inplace(lengths)                       # each row writes at its own length
        d["total"].update_inplace(np.array(self.caps.max_context if self.cuda_graph else lengths.max() + 1,
                                           np.int32))
        ro = self.ort_mod.RunOptions()
        if self.cuda_graph:
            ro.add_run_config_entry("gpu_graph_id", str(GRAPH_BATCH + b))
        self.ort.session.run_with_iobinding(d["binding"], ro)
        for c in caches:
            c.length += 1
        return d

    def step_batch(self, ids: np.ndarray, caches: list[Cache]) -> np.ndarray:
        d = self._run_batch(ids, caches)
        return d["logits"].numpy()[[c.slot for c in caches], 0]           # (B, V), a copy (fancy index)

    def step_batch_greedy(self, ids: np.ndarray, caches: list[Cache]) -> list[int]:
        if not self.device_greedy:
            return super().step_batch_greedy(ids, caches)
        d = self._run_batch(ids, caches)
        return d["next"].numpy()[[c.slot for c in caches], 0].tolist()

    def step(self, ids: np.ndarray, cache: Cache, keep: int = 1) -> np.ndarray:
        """ids (1, seq) after cache.length tokens -> host logits (1, keep, V), the caller's own
        (on the CPU provider an OrtValue's numpy() is a view the next step would overwrite)."""
        out = self._run(ids, cache, keep)[0].numpy()
        return out.copy() if self.where == "cpu" else out

    def step_greedy(self, ids: np.ndarray, cache: Cache) -> int:
        """Like step, but only the argmax of the last position comes back. The logits stay on
        the device (exports without `next_token`: host argmax)."""
        out = self._run(ids, cache, 1)
        if not self.device_greedy:
            return int(np.argmax(out[0].numpy()[0, -1]))
        return int(out[1].numpy()[0, -1])

    def _run(self, ids: np.ndarray, cache: Cache, keep: int):
        """One prefill or decode step: [logits, next_token] as device values."""
        ort = self.ort_mod
        batch, seq = ids.shape
        if batch != 1:
            raise GlmrtError("the gqa form runs batch 1")
        self.check_room(cache, seq)
        total = cache.length + seq
        rows = None if cache.slot is None else (cache.slot, 1)
        if seq == 1 and keep == 1 and rows is None:
            self.d_ids.update_inplace(ids.astype(np.int64))
            self.d_seqlens.update_inplace(np.array([total - 1], np.int32))
            # A CUDA graph replays host values as captured: give GroupQueryAttention the
            # buffer's length, constant, and let seqlens_k (on the device) carry the position.
            self.d_total.update_inplace(np.array(self.caps.max_context if self.cuda_graph else total, np.int32))
            ro = ort.RunOptions()
            if self.cuda_graph:
                ro.add_run_config_entry("gpu_graph_id", str(GRAPH_DECODE))
            self.ort.session.run_with_iobinding(self.decode_binding, ro)
            cache.length = total
            return [self.d_logits, self.d_next]
        where = self.where
        logits = ort.OrtValue.ortvalue_from_shape_and_type((1, keep, self.vocab), np.float32, where, 0)
        next_token = ort.OrtValue.ortvalue_from_shape_and_type((1, keep), np.int64, where, 0)
        b = self._bind(self.ort.session.io_binding(),
                       ort.OrtValue.ortvalue_from_numpy(ids.astype(np.int64), where, 0),
                       ort.OrtValue.ortvalue_from_numpy(np.array([total - 1], np.int32), where, 0),
                       ort.OrtValue.ortvalue_from_numpy(np.array(total, np.int32), "cpu", 0),
                       ort.OrtValue.ortvalue_from_numpy(np.arange(seq - keep, seq, dtype=np.int64), where, 0),
                       logits, next_token, rows)
        ro = ort.RunOptions()
        if self.cuda_graph:
            ro.add_run_config_entry("gpu_graph_id", str(GRAPH_NONE))        # prefill shapes vary
        self.ort.session.run_with_iobinding(b, ro)
        cache.length = total
        return [logits, next_token]
