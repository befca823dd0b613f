"""CpuDecoder: the decoder interface (glmrt/backends/base.py) on glmrt's own CPU engine.

Decode steps (one new token) run the compiled engine (engine.c through engine.py): the whole
step in C on `threads` threads, reading the weights in place from the memory-mapped
model.onnx.data. Prefill (several tokens) runs on ONNX Runtime's CPU form of the same export
(--target cpu: the gqa form, its MatMulNBits with int8 activations, as the engine's), which
writes the KV cache buffers the engine reads and appends to: (1, kv_heads, max_context,
head_dim) float32 per layer and K/V. The buffers belong to the decoder: generations take turns.

Both compute with int8 activations, per block, on the same weights; they differ in the order of
fp32 sums (docs/CPU_ENGINE.md). One slot (slots=1) is the same cache: the scheduler's thread
calls the slot methods, and nothing else may step while it runs.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from ...config import GlmConfig
from ...engine import linear_roles
from ...errors import ArtifactError, GlmrtError
from ..base import Cache, Capabilities, Decoder
from . import compiler
from .engine import NativeEngine


class CpuDecoder(Decoder):
    def __init__(self, folder: Path, manifest: dict, engine_path: Path, engine: dict, *,
                 threads: int | None = None, max_context: int | None = None):
        from ...host import physical_cores
        from ..ort_gqa import OrtGqaDecoder
        cfg = GlmConfig.from_dict(manifest["config"])
        threads = threads or physical_cores()
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise GlmrtError(f"threads={threads!r}; expected a positive number of CPU threads")
        self.ort = OrtGqaDecoder(folder, manifest, "cpu", threads, max_context, False)
        max_context = self.ort.caps.max_context
        buffers = self.ort.kv_buffers()                   # (1, kv_heads, max_context, head_dim) float32 each
        kv = [(int(buffers[2 * i].data_ptr()), int(buffers[2 * i + 1].data_ptr()))
              for i in range(cfg.num_hidden_layers)]
        self.native = NativeEngine(Path(engine_path) / engine["library"], engine["weights"], folder, cfg, kv,
                                   max_context, threads, engine["files"][engine["library"]]["sha256"])
        self.engine_path, self.engine, self.threads = Path(engine_path), engine, threads
        self.logits = np.zeros(cfg.vocab_size, np.float32)     # (V,) what the engine writes
        self.lock = threading.Lock()
        self.caps = Capabilities(max_context=max_context, device_argmax=True)

    def describe(self) -> dict:
        e = self.engine
        return {"backend": "cpu", "form": "gqa", "device": "cpu", "cuda_graph": False,
                "settings": {"isa": e["isa"], "threads": self.threads, "prefill": "onnxruntime",
                             "activations": "int8", "compiler": e["compiler_version"]},
                "greedy": "engine argmax", "engine": str(self.engine_path)}

    def streamed_bytes(self) -> int:
        """Every tensor the engine reads but the embedding (one row a step), fp16 scale copies
        at half their stored bytes."""
        index, total = self.engine["weights"], 0
        halved = {r["scales"] for r in linear_roles(index) if r["scale_values"] == "float16"}
        for name, t in index["tensors"].items():
            if name != index["embed"]:
                total += t["bytes"] // 2 if name in halved else t["bytes"]
        return total

    @contextlib.contextmanager
    def generation(self):
        with self.lock:
            yield Cache(0, None)

    def _decode(self, ids: np.ndarray, cache: Cache) -> int:
        self.check_room(cache, 1)
        best = self.native.step(int(ids[0, 0]), cache.length, self.logits)
        cache.length += 1
        return best

    def _prefill(self, run, ids: np.ndarray, cache: Cache, *args):
        """ONNX Runtime's form on the one cache (a slot's cache is that cache too)."""
        own = Cache(cache.length)
        out = run(ids, own, *args)
        cache.length = own.length
        return out

    def step(self, ids: np.ndarray, cache: Cache, keep: int = 1) -> np.ndarray:
        if ids.shape[0] != 1:
            raise GlmrtError("the cpu engine runs batch 1")
        if ids.shape[1] == 1 and keep == 1:
            self._decode(ids, cache)
            return self.logits.copy()[None, None]                 # (1, 1, V), the caller's own
        return self._prefill(self.ort.step, ids, cache, keep)     # prefill: ONNX Runtime's form

    def step_greedy(self, ids: np.ndarray, cache: Cache) -> int:
        if ids.shape == (1, 1):
            return self._decode(ids, cache)
        return self._prefill(self.ort.step_greedy, ids, cache)

    # ---- one slot: the scheduler (and so `glmrt serve`) on one sequence at a time -----------
    def open_slots(self, n: int) -> list[Cache]:
        if n != 1:
            from ...errors import InputError
            raise InputError(f"slots={n}: the cpu engine decodes one sequence at a time (slots=1; serve --slots 1)")
        return [Cache(0, None, 0)]

    def step_batch(self, ids: np.ndarray, caches: list[Cache]) -> np.ndarray:
        self._decode(np.asarray(ids, np.int64).reshape(1, 1), caches[0])
        return self.logits.copy()[None]                            # (1, V)

    def step_batch_greedy(self, ids: np.ndarray, caches: list[Cache]) -> list[int]:
        return [self._decode(np.asarray(ids, np.int64).reshape(1, 1), caches[0])]

    def close(self) -> None:
        self.native.close()


def find_engine(folder: Path, precision: str) -> Path:
    """The engine for the best instruction set this CPU runs that has been built, else a
    one-line error saying what exists and how to build."""
    from ...engine import ENGINES, engine_dir
    from ...manifest import MANIFEST
    for isa in compiler.ISAS:
        where = engine_dir(folder, "cpu", precision, isa=isa)
        if compiler.runs_here(isa) and (where / MANIFEST).is_file():
            return where
    found = sorted(p.parent.parent.name for p in Path(folder).glob(f"{ENGINES}/cpu-*/{precision}/{MANIFEST}"))
    have = f" (there are engines for {', '.join(found)}, which this CPU does not run)" if found else ""
    raise ArtifactError(f"{folder}: no cpu engine for this CPU{have}; build one: glmrt build {folder} --backend cpu")


def check_engine(em: dict, where: Path, folder: Path) -> None:
    """Refuse, in one line, an engine this machine cannot run or this glmrt cannot drive."""
    import platform

    from ...engine import source_matches
    rebuild = f"rebuild it here: glmrt build {folder} --backend cpu --overwrite"
    if em.get("kind") != "cpu-engine":
        raise ArtifactError(f"{where}: not a cpu engine (kind {em.get('kind')!r})")
    if em["machine"] != platform.machine():
        raise ArtifactError(f"{where}: built for {em['machine']}, this machine is {platform.machine()}; {rebuild}")
    missing = sorted(set(em["cpu_flags"]) - compiler.cpu_flags())
    if missing:
        raise ArtifactError(f"{where}: built for {em['isa']}, and this CPU lacks {' '.join(missing)}; {rebuild}")
    if em["abi"] != compiler.ABI:
        raise ArtifactError(f"{where}: built for engine ABI {em['abi']}, this glmrt drives {compiler.ABI}; {rebuild}")
    if not source_matches(em, folder):
        raise ArtifactError(f"{where}: built from another export of {folder} (the model's manifest changed); {rebuild}")


def open_engine(folder: Path, manifest: dict, options) -> CpuDecoder:
    """The registry's loader: the engine built for this CPU (glmrt build --backend cpu)."""
    from ...engine import read_engine
    where = find_engine(folder, manifest["precision"]["name"])
    em = read_engine(where, options.verify)
    check_engine(em, where, folder)
    return CpuDecoder(folder, manifest, where, em, threads=options.threads, max_context=options.max_context)
