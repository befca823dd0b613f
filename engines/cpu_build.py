"""`glmrt build --backend cpu`: glmrt's own decode engine for this CPU, from a `--target cpu`
export (the gqa form in fp32) of precision int4 or int8 (symmetric MatMulNBits, fp32 scales,
any block of 16 or more; the lm_head in the weights' bits, as that target exports it):

  index    every tensor the engine reads in model.onnx.data (engines/weight_index.py)
  compile  kernels/engine.c with this machine's C compiler for one instruction set (--isa auto:
           the best this CPU runs; glmrt/backends/cpu_engine/compiler.py)
  check    where this CPU runs that instruction set: the engine's GEMV on layer 0's four
           matrices and the lm_head, against numpy on the same int8 x and the dequantized
           weights (float64), before the engine is written

Writes engines/cpu-<isa>/<precision>/ with engine.so, engine.c (the source compiled) and a
manifest: source hash, instruction set and the CPU flags it needs, compiler and flags, the
weight index, the check.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from glmrt.backends.cpu_engine import compiler
from glmrt.config import GlmConfig
from glmrt.engine import engine_dir, linear_roles
from glmrt.engines.weight_index import Reads, index_export
from glmrt.errors import GlmrtError

REFUSE = "the cpu engine runs int4 and int8 exports of --target cpu (symmetric MatMulNBits, fp32 scales)"
# the engine's GEMV against float64 numpy on the same quantized x: only the order of the fp32
# sums differs (measured 1e-7 .. 6e-7 on the test checkpoints)
CHECK_TOL = 1e-5


def _check_precision(model_dir: Path, prec: dict) -> None:
    q = prec.get("quantization") or {}
    if prec["name"] not in ("int4", "int8") or q.get("form") != "matmulnbits":
        raise GlmrtError(f"{model_dir} is a {prec['name']} export; {REFUSE}")
    if not q["symmetric"] or q["scale_dtype"] != "float32":
        raise GlmrtError(f"{model_dir}: {REFUSE}; this {prec['name']} export is {q['bits']}-bit, "
                         f"{'symmetric' if q['symmetric'] else 'asymmetric'}, {q['scale_dtype']} scales")


READS = Reads("cpu", "cpu", REFUSE, _check_precision, {1: "float32", 2: "uint8"}, floats=False, int8_layers=True)


def plan(model_dir: Path, man: dict, options):
    """The engine folder for the instruction set asked for (or this CPU's best) and how to fill it."""
    isa = compiler.host_isa() if options.isa == "auto" else compiler.check_isa(options.isa)
    cfg = GlmConfig.from_dict(man["config"])
    index, linear, block = index_export(Path(model_dir), man, cfg, READS)
    q = man["precision"]["quantization"]
    for role in linear_roles(index):
        # fp16 values in fp32 scales (glmrt's MatMulNBits since session 16): read as fp16 copies
        form = (q.get("lm_head_form") or q) if role is index["lm_head"] else q
        role["scale_values"] = form.get("scale_values") or form["scale_dtype"]
    out = engine_dir(model_dir, "cpu", man["precision"]["name"], isa=isa)

    def make(tmp: Path) -> dict:
        t0 = time.perf_counter()
        source = compiler.source_text()
        built = compiler.compile_library(source, isa, tmp / "engine.so")
        # (--isa auto: this CPU's best; a compiler too old for its flags says so in one line, and
        # --isa names an older instruction set)
        (tmp / "engine.c").write_text(source, encoding="utf-8")
        entry = {"kind": "cpu-engine", "backend": "cpu", "library": "engine.so", "source_file": "engine.c",
                 "isa": isa, "machine": platform.machine(), "cpu_flags": list(compiler.ISAS[isa][2]),
                 "abi": compiler.ABI, "source_sha256": compiler.sha256(source), **built,
                 "formats": {"linear": linear, "block": block, "lm_head": index["lm_head"]["format"],
                             "scales": index["lm_head"]["scale_values"]},
                 "weights": index, "selfcheck": None}
        if compiler.runs_here(isa):
            report = check(tmp / "engine.so", Path(model_dir), index, cfg)
            entry["selfcheck"] = report
            bad = [r for r in report if not r["ok"]]
            if bad:
                raise GlmrtError(f"the cpu engine's GEMV failed its check ({isa}): "
                                 + "; ".join(f"{r['name']} rel. error {r['rel_err']:.2e} > {r['tol']:.0e}" for r in bad))
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        return entry
    return out, make


def quantize_x(x: np.ndarray, block: int) -> np.ndarray:
    """The engine's int8 x, dequantized: per block of `block`, scale amax / 127, round half even."""
    k = x.size
    xp = np.zeros(-(-k // block) * block, np.float32)
    xp[:k] = x
    xb = xp.reshape(-1, block)                                            # (blocks, block)
    amax = np.abs(xb).max(1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(xb * inv), -127, 127)
    return (q.astype(np.float64) * (amax.astype(np.float64) / 127)).reshape(-1)[:k]


def dequantize(w: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """MatMulNBits symmetric blocks as stored, (n, kb, block * bits / 8) bytes -> float64 (n, k):
    the exporter's own dequantize on the unpacked codes."""
    from glmrt.export.quant import MatMulNBits, QTensor
    n, kb, per = w.shape
    codes = np.stack([w & 0x0F, w >> 4], axis=-1).reshape(n, -1) if bits == 4 else w.reshape(n, -1)
    return MatMulNBits(bits, per * 8 // bits, True, "float32").dequantize(QTensor(codes, scales, None, k))


def check(library: Path, folder: Path, index: dict, cfg: GlmConfig, seed: int = 0) -> list[dict]:
    """Layer 0's matrices and the lm_head through the engine's GEMV against numpy."""
    from glmrt.backends.cpu_engine.engine import WeightFile, gemv, linear, load_library
    lib, wf = load_library(library), WeightFile(folder, index)
    rng = np.random.default_rng(seed)
    H, I, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim
    report = []
    for name, role, k in (("qkv", index["layers"][0]["qkv"], H), ("o", index["layers"][0]["o"], heads),
                          ("gate_up", index["layers"][0]["gate_up"], H), ("down", index["layers"][0]["down"], I),
                          ("lm_head", index["lm_head"], H)):
        x = rng.standard_normal(k).astype(np.float32)
        lin = linear(wf, role, k)
        got = gemv(lib, lin, x)
        want = dequantize(wf.array(role["w"]), wf.array(role["scales"]), lin.bits, k) @ quantize_x(x, lin.block)
        if role.get("bias"):
            want = want + wf.array(role["bias"])
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
        report.append({"name": name, "rel_err": err, "tol": CHECK_TOL, "ok": bool(err <= CHECK_TOL)})
    return report
