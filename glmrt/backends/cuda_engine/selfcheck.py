"""Every kernel of a decode step checked against numpy on a device, one at a time, with
synthetic inputs of the model's own shapes: what `glmrt build` runs when the GPU it builds for
is present, what the GPU stage (bench/cuda_engine_check.py) prints, and what the tests run in
the CPU emulation. Each check reports its largest error relative to the largest reference
value (float64 numpy on the same fp16 / int4 inputs) and passes under a stated tolerance;
on a GPU it can also time each kernel alone (weights cycled through copies larger than L2).

The numpy side restates the formats independently of the exporter: MatMulNBits int4 bytes
(even k in the low nibble, (q - 8) * scale per block), RMSNorm, interleaved partial RoPE,
grouped-query attention, SwiGLU, first-index argmax; tests/test_cuda_engine.py checks these
against export/quant.py and glmrt/reference.py.
"""
from __future__ import annotations

import time

import numpy as np

from ...errors import GlmrtError
from .args import AttnArgs, GemvArgs
from .sources import SMOKE, Shapes, translation_unit
from .step import DEFAULT_CONFIG, Formats, attention_launches, attention_split, decode_kernels, engine_kernels, gemv_grid, rope_table

# tolerances, relative to the largest reference value
# (int4_a8: against the same int8 x, so the same bar as int4 with fp16 x)
TOL = {"int4": 3e-3, "int4_a8": 3e-3, "int8": 1.5e-3, "int4_mma": 3e-3, "fp8": 3e-3, "f16": 2e-3, "bf16": 2e-3, "f16_kn": 2e-3, "f16_kn_mma": 2e-3, "attention": 1e-3, "smoke": 0.0,
       # the tensor-core attention (attention_mma): Q and P in fp16 as the mma takes them, each split's
       # output in fp16 for the merge; measured up to 7.9e-4 in the emulation (18 runs: 3 shapes x 6
       # seeds), up to 5.3e-4 on an H200 at GLM-Z1-9B and GLM-4-32B shapes (12 runs)
       "attention_mma": 2e-3}
EPS = 1e-5


# ---- numpy: what the kernels compute ---------------------------------------------------------
def random_int4(rng, n: int, k: int, block: int):
    """MatMulNBits bytes (n, kb, block/2) and fp16 scales (n, kb) of random codes."""
    kb = -(-k // block)
    packed = rng.integers(0, 256, (n, kb, block // 2), dtype=np.uint8)
    scales = (0.004 + 0.02 * rng.random((n, kb), dtype=np.float32)).astype(np.float16)
    return packed, scales


# a byte's two codes minus 8 as float64, low nibble first
_NIBBLES = np.stack([(np.arange(256) & 15) - 8.0, (np.arange(256) >> 4) - 8.0], -1)


def dequant_int4(packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """(n, k) float64: (code - 8) * scale, codes unpacked low nibble first (a byte's pair looked
    up at once: unpacking, converting and shifting apart took 4x longer, 15 s for GLM-4-32B's
    gate_up on 2 cores)."""
    n, kb, half = packed.shape
    out = _NIBBLES[np.asarray(packed, np.uint8)].reshape(n, kb, 2 * half)
    out *= scales.astype(np.float64)[..., None]
    return out.reshape(n, -1)[:, :k]


def random_int8(rng, n: int, k: int, block: int):
    """MatMulNBits 8-bit bytes (n, kb, block), a stored byte q + 128, and fp16 scales (n, kb)."""
    kb = -(-k // block)
    codes = rng.integers(0, 256, (n, kb, block), dtype=np.uint8)
    scales = (0.0003 + 0.0015 * rng.random((n, kb), dtype=np.float32)).astype(np.float16)
    return codes, scales


def dequant_int8(codes: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """(n, k) float64: (byte - 128) * scale."""
    n, kb, block = codes.shape
    out = (codes.astype(np.float64) - 128.0) * scales.astype(np.float64)[..., None]
    return out.reshape(n, -1)[:, :k]


# MatMulNBits formats: (random codes and scales, their dequantization); nbits_bytes: their sizes
NBITS = {"int4": (random_int4, dequant_int4), "int8": (random_int8, dequant_int8)}


def nbits_bytes(fmt: str, n: int, k: int, block: int) -> tuple[int, int]:
    """(weight bytes, scale bytes) of an (n, k) MatMulNBits matrix: 4 or 8 bits in blocks along K."""
    kb = -(-k // block)
    return n * kb * (block if fmt == "int8" else block // 2), n * kb * 2


def e4m3_values() -> np.ndarray:
    """The 256 fp8 e4m3 (fn) codes as float64: sign, 4 exponent bits (bias 7), 3 mantissa bits;
    exponent 0 subnormal (m / 8 * 2^-6); 0x7f and 0xff NaN."""
    b = np.arange(256)
    e, m = (b >> 3) & 0xF, (b & 7).astype(np.float64)
    v = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    v = np.where(b & 0x80, -v, v)
    v[(b & 0x7F) == 0x7F] = np.nan
    return v


E4M3 = e4m3_values()


def random_fp8(rng, n: int, k: int):
    """e4m3 codes (n, k) as bytes (no NaN) and fp16 scales (n,), values up to about 1."""
    codes = rng.integers(0, 256, (n, k), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] ^= 0x01                   # NaN -> 416 (0x7e)
    scales = (0.0005 + 0.002 * rng.random(n, dtype=np.float32)).astype(np.float16)
    return codes, scales


def dequant_fp8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(n, k) float64: e4m3 value * the row's scale."""
    return E4M3[codes] * scales.astype(np.float64)[:, None]


def random_half_bits(rng, shape, bf16: bool = False) -> np.ndarray:
    """Random fp16 (or bf16) bit patterns: a random sign and mantissa, small exponents
    (magnitudes below 1/16, no inf or NaN). Random integers whose high byte is mapped through
    a table: drawing float32 values and converting them took ~40 s for GLM's 151552 x 4096
    lm_head on 2 cores (most of a build's kernel checks), this ~3 s."""
    n = int(np.prod(shape))
    bits = rng.integers(0, 1 << 32, (n + 1) // 2, dtype=np.uint32).view(np.uint16)[:n].reshape(shape)
    hb = np.arange(256, dtype=np.uint16)
    # fp16 s eeeee mm|mmmmmmmm: exponent 3..10 (2^-12 .. 2^-5); bf16 s eeeeeee|e mmmmmmm: the
    # high byte's 7 exponent bits 57..60 (exponent 114..121, 2^-13 .. 2^-6)
    table = ((hb & 0x80) | (57 + (hb & 3)) if bf16 else (hb & 0x83) | ((((hb >> 2) & 7) + 3) << 2)).astype(np.uint8)
    high = bits.view(np.uint8).reshape(-1, 2)[:, 1]        # little-endian: the second byte is the high one
    high[...] = table[high]
    return bits


def bf16_bits(v) -> np.ndarray:
    """float values -> bf16 bits (uint16), rounded to nearest even (the exporter's conversion)."""
    from glmrt.export.checkpoint import f32_to_bf16
    return f32_to_bf16(np.asarray(v, np.float32))


def bf16_values(bits) -> np.ndarray:
    """bf16 bits (uint16) -> float64."""
    from glmrt.export.checkpoint import bf16_to_f32
    return bf16_to_f32(np.asarray(bits, np.uint16)).astype(np.float64)


def quant_a8(v: np.ndarray, group: int = 32) -> np.ndarray:
    """x as an int4_a8 GEMV multiplies it (float64, v's shape): each 32 values (zero-padded) as
    int8 q = rint(x * 127 / absmax) times absmax / 127, in float32 as the kernel computes them.
    Rows of a 2-D v are quantized apart when their length is a multiple of `group` (bench/
    a8_sensitivity.py tries other groups)."""
    shape = np.shape(v)
    v = np.asarray(v, np.float32).reshape(-1)
    n = v.size
    u = np.pad(v, (0, -n % group)).reshape(-1, group)
    amax = np.abs(u).max(axis=1, keepdims=True)
    inv = np.where(amax > 1e-30, np.float32(127) / np.where(amax > 1e-30, amax, np.float32(1)), np.float32(0))
    q = np.rint(u * inv.astype(np.float32))
    return (q.astype(np.float64) * (amax / np.float32(127)).astype(np.float64)).reshape(-1)[:n].reshape(shape)


def rms_norm(v: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * np.asarray(w, np.float64)


def rope(x: np.ndarray, table: np.ndarray, p: int, rot: int) -> np.ndarray:
    """x (heads, hd): pairs (2i, 2i+1) of the first `rot` dims rotated by table[p, i]."""
    c, s = table[p, :, 0].astype(np.float64), table[p, :, 1].astype(np.float64)
    out = np.array(x, np.float64)
    x0, x1 = out[:, 0:rot:2].copy(), out[:, 1:rot:2].copy()
    out[:, 0:rot:2] = x0 * c - x1 * s
    out[:, 1:rot:2] = x1 * c + x0 * s
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q (nh, hd), k and v (nkv, L, hd) -> (nh, hd); query head j reads KV head j // group."""
    nh, hd = q.shape
    g = nh // k.shape[0]
    kk = np.repeat(k.astype(np.float64), g, axis=0)
    vv = np.repeat(v.astype(np.float64), g, axis=0)
    s = np.einsum("hd,hld->hl", q.astype(np.float64), kk) * hd ** -0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hl,hld->hd", p / p.sum(-1, keepdims=True), vv)


def dequantized_weights(model, em: dict, cfg, dtype=np.float64) -> dict:
    """The checkpoint-keyed weights the engine computes with, in `dtype` (float64: the spec;
    float32 halves the memory for real shapes): its index into model.onnx.data read back and
    dequantized (int4), the fused matrices split."""
    from pathlib import Path
    idx = em["weights"]
    data = np.memmap(Path(model) / idx["file"], np.uint8, mode="r")

    def raw(name):
        t = idx["tensors"][name]
        a = np.array(data[t["offset"]:t["offset"] + t["bytes"]]).view(t["dtype"]).reshape(t["shape"])
        return bf16_values(a) if t.get("onnx") == "bfloat16" else a

    def matrix(m, k):
        if m["format"] in NBITS:
            w, deq = raw(m["w"]), NBITS[m["format"]][1]
            return np.concatenate([deq(w[r:r + 4096], raw(m["scales"])[r:r + 4096], k).astype(dtype)
                                   for r in range(0, w.shape[0], 4096)])
        if m["format"] == "fp8":
            w = raw(m["w"])
            return np.concatenate([dequant_fp8(w[r:r + 4096], raw(m["scales"])[r:r + 4096]).astype(dtype)
                                   for r in range(0, w.shape[0], 4096)])
        w = raw(m["w"]).astype(dtype)
        return w if m["format"] in ("f16", "bf16") else w.T          # f16_kn: stored as W^T

    nh, nkv, hd, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    w = {"model.embed_tokens.weight": raw(idx["embed"]).astype(dtype),
         "model.norm.weight": raw(idx["norm"]).astype(dtype),
         "lm_head.weight": matrix(idx["lm_head"], H)}
    for i, lw in enumerate(idx["layers"]):
        p = f"model.layers.{i}."
        qkv = matrix(lw["qkv"], H)
        for name, rows in zip("qkv", np.split(qkv, [nh * hd, (nh + nkv) * hd])):
            w[p + f"self_attn.{name}_proj.weight"] = rows
        if lw["qkv"]["bias"]:
            for name, b in zip("qkv", np.split(raw(lw["qkv"]["bias"]).astype(dtype), [nh * hd, (nh + nkv) * hd])):
                w[p + f"self_attn.{name}_proj.bias"] = b
        w[p + "self_attn.o_proj.weight"] = matrix(lw["o"], nh * hd)
        w[p + "mlp.gate_up_proj.weight"] = matrix(lw["gate_up"], H)
        w[p + "mlp.down_proj.weight"] = matrix(lw["down"], cfg.intermediate_size)
        for key, role in (("input_layernorm", "input_norm"), ("post_self_attn_layernorm", "post_attn_norm"),
                          ("post_attention_layernorm", "pre_mlp_norm"), ("post_mlp_layernorm", "post_mlp_norm")):
            w[p + key + ".weight"] = raw(lw[role]).astype(dtype)
    return w


def rel(a, b) -> float:
    """The largest difference over the reference's largest value; inf where either holds a NaN
    (a NaN would slip through the max() of several errors: max(1e-4, nan) is 1e-4)."""
    b = np.asarray(b, np.float64)
    scale = np.abs(b).max()
    err = float(np.abs(np.asarray(a, np.float64) - b).max() / (scale if scale else 1.0))
    return err if np.isfinite(err) else float("inf")


# ---- the device side ---------------------------------------------------------------------
def image_for(device, source: str) -> bytes:
    """What device.load takes for this source: a cubin for the GPU's architecture, or the
    source itself (the emulation)."""
    if device.image_kind == "source":
        return source.encode()
    from .nvrtc import compile_cubin
    major, minor = device.compute_capability
    return compile_cubin(source, 10 * major + minor).cubin


class _Ctx:
    def __init__(self, device, shapes: Shapes, formats: Formats, kernels: list, handles: dict, seed: int,
                 max_seq: int, chunk: int, splits: int, config: dict = DEFAULT_CONFIG):
        self.dev, self.s, self.f, self.config = device, shapes, formats, config
        self.spec = {k.name: k for k in kernels}
        self.h = handles
        self.rng = np.random.default_rng(seed)
        self.max_seq, self.chunk, self.splits = max_seq, chunk, splits
        self.ptrs: list[int] = []
        self.keep: list = []

    def put(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a)
        p = self.dev.alloc(a.nbytes)
        self.ptrs.append(p)
        self.dev.upload(p, a)
        self.keep.append(a)
        return p

    def zeros(self, nbytes: int) -> int:
        p = self.dev.alloc(nbytes)
        self.ptrs.append(p)
        self.dev.zero(p, nbytes)
        return p

    def get(self, p: int, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        self.dev.download(p, out)
        return out

    def free(self):
        self.dev.synchronize()
        for p in self.ptrs:
            self.dev.free(p)
        self.ptrs, self.keep = [], []

    @property
    def lin(self) -> str:
        """The layers' kernel format as compiled (the name the tolerances and reports use)."""
        return self.spec["o_proj"].fmt

    def xin(self, v, fmt: str | None = None) -> np.ndarray:
        """x as the GEMV of weight format `fmt` (the layers' by default) multiplies it:
        rounded to fp16, or quantized to int8 per 32 values (int4 with int8 x)."""
        if self.f.kernel(fmt or self.f.linear) == "int4_a8":
            return quant_a8(v)
        return np.asarray(v).astype(np.float16).astype(np.float64)

    def grid(self, name: str) -> int:
        return gemv_grid(self.spec[name], self.s, self.config, self.dev, self.h[name])

    def gemv(self, name: str, a: GemvArgs) -> None:
        k = self.spec[name]
        a.eps, a.max_seq = EPS, self.max_seq
        self.dev.launch(self.h[name], (self.grid(name),), k.threads, k.smem, a)

    def weights(self, fmt: str, n: int, k: int):
        """(fields for GemvArgs, dequantized (n, k) float64, bytes read per launch)."""
        if fmt in NBITS:
            make, deq = NBITS[fmt]
            codes, scales = make(self.rng, n, k, self.f.block)
            return ({"w": self.put(codes), "scales": self.put(scales)}, deq(codes, scales, k),
                    codes.nbytes + scales.nbytes)
        if fmt == "bf16":
            bits = random_half_bits(self.rng, (n, k), bf16=True)
            return {"w": self.put(bits), "scales": 0}, bf16_values(bits), bits.nbytes
        if fmt == "fp8":
            codes, scales = random_fp8(self.rng, n, k)
            return ({"w": self.put(codes), "scales": self.put(scales)}, dequant_fp8(codes, scales),
                    codes.nbytes + scales.nbytes)
        # fp16 (n, k), or W^T (k, n) made in that layout (f16_kn)
        stored = random_half_bits(self.rng, (n, k) if fmt == "f16" else (k, n)).view(np.float16)
        w = stored if fmt == "f16" else stored.T
        return {"w": self.put(stored), "scales": 0}, w.astype(np.float64), w.nbytes

    def zero_weights(self, fmt: str, n: int, k: int):
        """(fields for GemvArgs, bytes read per launch) of zero-filled weights (timing)."""
        if fmt in NBITS:
            w, sc = nbits_bytes(fmt, n, k, self.f.block)
            return {"w": self.zeros(w), "scales": self.zeros(sc)}, w + sc
        if fmt == "fp8":
            return {"w": self.zeros(n * k), "scales": self.zeros(n * 2)}, n * k + n * 2
        return {"w": self.zeros(n * k * 2), "scales": 0}, n * k * 2

    def vec16(self, n: int, center: float = 0.0, spread: float = 1.0) -> np.ndarray:
        return (center + spread * self.rng.standard_normal(n)).astype(np.float16)

    def vec32(self, n: int) -> np.ndarray:
        return self.rng.standard_normal(n).astype(np.float32)


def launch_attention(device, handles: dict, specs: dict, kv_heads: int, splits: int, rows: int, args) -> None:
    """The attention and, when its splits are merged apart (merge "spread"), attention_merge."""
    for launch in attention_launches(specs, handles, kv_heads, splits, rows, args):
        device.launch(*launch)


def _result(name: str, err: float, tol: float, **detail) -> dict:
    return {"name": name, "rel_err": err, "tol": tol, "ok": bool(np.isfinite(err) and err <= tol), **detail}


# ---- the checks: one per kernel of the decode step ---------------------------------------------
def check_qkv(c: _Ctx, first: bool) -> dict:
    s, name = c.s, "qkv_first" if first else "qkv"
    H, N, hd, nh, nkv = s.hidden, s.qkv, s.head_dim, s.heads, s.kv_heads
    wf, wd, _ = c.weights(c.f.linear, N, H)
    bias = c.vec16(N, 0.0, 0.1) if first else None     # with a bias here, without in the other
    norm_x, norm_y = c.vec16(H, 1.0, 0.1), c.vec16(H, 1.0, 0.1)
    pos, pos_add = 7, 2
    p = pos + pos_add
    table = rope_table_for(c)
    cache = nkv * c.max_seq * hd * 2
    a = GemvArgs(**wf, bias=c.put(bias) if first else 0, norm_x=c.put(norm_x), x_out=c.zeros(4 * H),
                 q=c.zeros(4 * nh * hd), k_cache=c.zeros(cache), v_cache=c.zeros(cache), rope=c.put(table),
                 pos=c.put(np.array([pos], np.int32)), pos_add=pos_add)
    if first:
        tok = s.vocab - 3
        row = c.vec16(H)
        if c.f.embed == "embed_norm_bf16":          # a bf16 table (bf16 exports)
            row = bf16_bits(row)
        a.embed = c.zeros(s.vocab * H * 2)
        c.dev.upload(a.embed + tok * H * 2, row)
        c.keep.append(row)
        a.tokens = c.put(np.array([tok], np.int32))
        x = bf16_values(row) if c.f.embed == "embed_norm_bf16" else row.astype(np.float64)
    else:
        x_in, y_in = c.vec32(H), c.vec32(H)
        a.x_in, a.y_in, a.norm_y = c.put(x_in), c.put(y_in), c.put(norm_y)
        x = x_in.astype(np.float64) + rms_norm(y_in, norm_y, EPS)
    c.gemv(name, a)
    h = c.xin(rms_norm(x, norm_x, EPS))
    y = wd @ h + (bias.astype(np.float64) if first else 0.0)
    q = rope(y[:nh * hd].reshape(nh, hd), table, p, s.rot)
    k = rope(y[nh * hd:(nh + nkv) * hd].reshape(nkv, hd), table, p, s.rot)
    v = y[(nh + nkv) * hd:].reshape(nkv, hd)
    kc = c.get(a.k_cache, (nkv, c.max_seq, hd), np.float16)
    vc = c.get(a.v_cache, (nkv, c.max_seq, hd), np.float16)
    errs = {"q": rel(c.get(a.q, (nh, hd), np.float32), q), "k": rel(kc[:, p], k), "v": rel(vc[:, p], v),
            "x_out": rel(c.get(a.x_out, H, np.float32), x)}
    untouched = bool(np.all(kc[:, :p] == 0) and np.all(kc[:, p + 1:] == 0) and np.all(vc[:, :p] == 0))
    err = max(errs.values()) if untouched else float("inf")
    return _result(f"{name} ({c.lin}, {'embedding' if first else 'residual add'} + norm -> "
                   f"qkv{' + bias' if first else ''}, RoPE, cache append)", err, TOL[c.lin],
                   errors=errs, other_positions_untouched=untouched)


def rope_table_for(c: _Ctx) -> np.ndarray:
    class _Cfg:                                   # default RoPE (theta 10000, no YaRN)
        def __init__(self, rot):
            self.rot = rot

        def rope_inv_freq(self):
            return 1.0 / 10000.0 ** (np.arange(0, self.rot, 2, dtype=np.float64) / self.rot), 1.0
    return rope_table(_Cfg(c.s.rot), c.max_seq)


def merging(spec: dict) -> str:
    """How the attention's splits are merged, in words."""
    if "attention_merge" in spec:
        return "a block per query head merging"
    mg = spec["attention"].merge_group
    return f"merged in two levels, {mg} splits then their partials" if mg else "the last split merging"


def check_attention(c: _Ctx) -> dict:
    """Lengths on one split, on several of `chunk` positions, and past chunk x splits (each
    split's share grown), the whole cache included; the counters re-armed after each. The cache
    rows past each length hold NaN (memory never written, or another sequence's): a kernel must
    not let them into its sums, not even times a zero probability."""
    s = c.s
    nh, nkv, hd = s.heads, s.kv_heads, s.head_dim
    spec, splits, chunk = c.spec["attention"], c.splits, c.chunk
    q = c.vec32(nh * hd)
    kc = c.vec16(nkv * c.max_seq * hd).reshape(nkv, c.max_seq, hd)
    vc = c.vec16(nkv * c.max_seq * hd).reshape(nkv, c.max_seq, hd)
    out = c.zeros(4 * nh * hd)
    blocks = spec.counters(nkv)
    a = AttnArgs(q=c.put(q), k_cache=c.put(kc), v_cache=c.put(vc), part_o=c.zeros(4 * nh * splits * hd),
                 part_ml=c.zeros(4 * nh * splits * 2), out=out, counter=c.zeros(4 * blocks), pos_add=1,
                 max_seq=c.max_seq, chunk=chunk, splits=splits)
    errs = {}
    for length in sorted({min(c.max_seq, n) for n in (1, 37, chunk, chunk + 1, 2 * chunk + 77, chunk * splits + 77,
                                                       c.max_seq)}):
        a.pos = c.put(np.array([length - 1 - a.pos_add], np.int32))
        for base, cache in ((a.k_cache, kc), (a.v_cache, vc)):
            past = cache.copy()
            past[:, length:] = np.nan
            c.dev.upload(base, past)
            c.keep.append(past)          # an upload's source lives until the next sync
        c.dev.zero(out, 4 * nh * hd)
        stage = getattr(c.dev, "in_flight", None)
        if stage:       # the emulation: q and this token's K, V land at the kernel's wait, as the QKV kernel's
            row = lambda base, h: base + 2 * (h * c.max_seq + length - 1) * hd       # noqa: E731
            stage([(a.q, 4 * nh * hd)] + [(row(base, h), 2 * hd) for base in (a.k_cache, a.v_cache) for h in range(nkv)])
        launch_attention(c.dev, c.h, c.spec, nkv, splits, 1, a)
        ref = attention(q.reshape(nh, hd), kc[:, :length], vc[:, :length])
        errs[length] = rel(c.get(out, (nh, hd), np.float32), ref)
    counters = c.get(a.counter, blocks, np.uint32)
    err = max(errs.values()) if not counters.any() else float("inf")
    return _result(f"attention{' on the tensor cores' if spec.mma else ''} (GQA {nh}/{nkv}, {spec.hpb} query heads a "
                   f"block, split over the context in "
                   f"{splits} splits of {chunk}+ positions, "
                   f"{merging(c.spec)})", err,
                   TOL["attention_mma" if spec.mma else "attention"],
                   errors_by_length=errs, counters_after=counters.tolist())


def check_o_proj(c: _Ctx) -> dict:
    s = c.s
    K, N = s.heads * s.head_dim, s.hidden
    wf, wd, _ = c.weights(c.f.linear, N, K)
    x = c.vec32(K)
    a = GemvArgs(**wf, y_in=c.put(x), y=c.zeros(4 * N))
    c.gemv("o_proj", a)
    ref = wd @ c.xin(x)
    return _result(f"o_proj ({c.lin}, fp32 in -> store)", rel(c.get(a.y, N, np.float32), ref), TOL[c.lin])


def check_gate_up(c: _Ctx) -> dict:
    s = c.s
    H, I = s.hidden, s.inter
    wf, wd, _ = c.weights(c.f.linear, 2 * I, H)
    x_in, y_in = c.vec32(H), c.vec32(H)
    norm_y, norm_x = c.vec16(H, 1.0, 0.1), c.vec16(H, 1.0, 0.1)
    a = GemvArgs(**wf, x_in=c.put(x_in), y_in=c.put(y_in), norm_y=c.put(norm_y), norm_x=c.put(norm_x),
                 x_out=c.zeros(4 * H), act=c.zeros(2 * I))
    c.gemv("gate_up", a)
    x = x_in.astype(np.float64) + rms_norm(y_in, norm_y, EPS)
    h = c.xin(rms_norm(x, norm_x, EPS))
    gu = wd @ h
    g, u = gu[:I], gu[I:]
    act = g / (1 + np.exp(-g)) * u
    errs = {"act": rel(c.get(a.act, I, np.float16), act), "x_out": rel(c.get(a.x_out, H, np.float32), x)}
    return _result(f"gate_up ({c.lin}, residual add + norm -> SwiGLU)", max(errs.values()),
                   TOL[c.lin], errors=errs)


def check_down(c: _Ctx) -> dict:
    s = c.s
    wf, wd, _ = c.weights(c.f.linear, s.hidden, s.inter)
    x = c.vec16(s.inter)
    a = GemvArgs(**wf, h_in=c.put(x), y=c.zeros(4 * s.hidden))
    c.gemv("down", a)
    ref = wd @ c.xin(x)
    return _result(f"down ({c.lin}, fp16 in -> store)", rel(c.get(a.y, s.hidden, np.float32), ref), TOL[c.lin])


def check_lm_head(c: _Ctx) -> dict:
    """Logits and the argmax, with a tie between two rows far apart (the first must win),
    launched twice (the last block re-arms the counter)."""
    s, fmt = c.s, c.f.lm_head
    H, V = s.hidden, s.vocab
    x_in, y_in = c.vec32(H), c.vec32(H)
    norm_y, norm_x = c.vec16(H, 1.0, 0.1), c.vec16(H, 1.0, 0.1)
    x = x_in.astype(np.float64) + rms_norm(y_in, norm_y, EPS)
    h = c.xin(rms_norm(x, norm_x, EPS), fmt)
    first, second = 3, V - 5                         # equal rows, both beat every other row
    if fmt == "int4":
        packed, scales = random_int4(c.rng, V, H, c.f.block)
        code = np.where(h > 0, 15, 0).astype(np.uint8)                 # (q - 8) = 7 or -8, with h's sign
        kp = packed.shape[1] * c.f.block
        code = np.pad(code, (0, kp - H), constant_values=8).reshape(-1, c.f.block)
        tied = (code[:, 0::2] | (code[:, 1::2] << 4)).astype(np.uint8)
        packed[first] = packed[second] = tied
        scales[first] = scales[second] = np.float16(0.05)
        wf = {"w": c.put(packed), "scales": c.put(scales)}
        wd = _Rows(lambda r: dequant_int4(packed[r], scales[r], H), V)
    elif fmt == "int8":                              # an int8 lm_head (export --lm-head int8)
        codes, scales = random_int8(c.rng, V, H, c.f.block)
        codes[first] = codes[second] = np.where(h > 0, 228, 28).astype(np.uint8).reshape(-1, c.f.block)   # +-100
        scales[first] = scales[second] = np.float16(0.005)
        wf = {"w": c.put(codes), "scales": c.put(scales)}
        wd = _Rows(lambda r: dequant_int8(codes[r], scales[r], H), V)
    elif fmt == "fp8":                               # an fp8 lm_head (export --quantize-lm-head)
        codes, scales = random_fp8(c.rng, V, H)
        codes[first] = codes[second] = np.where(h > 0, 0x38, 0xB8).astype(np.uint8)     # e4m3 +-1.0
        scales[first] = scales[second] = np.float16(0.5)
        wf = {"w": c.put(codes), "scales": c.put(scales)}
        wd = _Rows(lambda r: dequant_fp8(codes[r], scales[r]), V)
    elif fmt == "bf16":
        w = random_half_bits(c.rng, (V, H), bf16=True)
        w[first] = w[second] = bf16_bits(np.where(h > 0, 0.5, -0.5))
        wf = {"w": c.put(w), "scales": 0}
        wd = _Rows(lambda r: bf16_values(w[r]), V)
    elif fmt == "f16":
        w = random_half_bits(c.rng, (V, H)).view(np.float16)
        w[first] = w[second] = np.where(h > 0, 0.5, -0.5).astype(np.float16)
        wf = {"w": c.put(w), "scales": 0}
        wd = w
    else:                                            # f16_kn: W^T (H, V), made in that layout
        wt = random_half_bits(c.rng, (H, V)).view(np.float16)
        wt[:, first] = wt[:, second] = np.where(h > 0, 0.5, -0.5).astype(np.float16)
        wf = {"w": c.put(wt), "scales": 0}
        wd = _Rows(lambda r: wt[:, r].T, V)
    grid = c.grid("lm_head")
    a = GemvArgs(**wf, x_in=c.put(x_in), y_in=c.put(y_in), norm_y=c.put(norm_y), norm_x=c.put(norm_x),
                 x_out=c.zeros(4 * H), y=c.zeros(4 * V), part_val=c.zeros(4 * grid), part_idx=c.zeros(4 * grid),
                 counter=c.zeros(4), token_out=c.zeros(4))
    tokens = []
    for _ in range(2):
        c.gemv("lm_head", a)
        tokens.append(int(c.get(a.token_out, 1, np.int32)[0]))
    logits = c.get(a.y, V, np.float32)
    ref = np.concatenate([wd[i:i + 8192].astype(np.float64) @ h for i in range(0, V, 8192)])
    err = rel(logits, ref)
    if fmt == "int8":     # also on the other rows' own scale (bar 1.5e-3; up to 3.7e-4 in the emulation):
        rest = np.ones(V, bool)    # a zero point off by one moves them 2.9e-3, the planted rows 3e-4
        rest[[first, second]] = False
        err = max(err, rel(logits[rest], ref[rest]))
    counter = int(c.get(a.counter, 1, np.uint32)[0])
    ok = tokens == [first, first] and int(np.argmax(logits)) == first and counter == 0
    kfmt = c.spec["lm_head"].fmt
    return _result(f"lm_head ({kfmt}, residual add + final norm -> logits + argmax, tie between rows "
                   f"{first} and {second})", err if ok else float("inf"), TOL[kfmt],
                   tokens=tokens, logits_err=err, counter_after=counter)


class _Rows:
    """Rows of a big matrix made (dequantized) on demand: the lm_head reference in slices,
    never a whole float64 copy of 151552 x H."""

    def __init__(self, make, n):
        self.make, self.n = make, n

    def __getitem__(self, r):
        return self.make(r)


CHECKS = {"qkv_first": lambda c: check_qkv(c, True), "qkv": lambda c: check_qkv(c, False),
          "attention": check_attention, "o_proj": check_o_proj, "gate_up": check_gate_up,
          "down": check_down, "lm_head": check_lm_head}


def run_checks(device, shapes: Shapes, formats: Formats, *, seed: int = 0, max_seq: int | None = None,
               chunk: int | None = None, splits: int | None = None, only=None, log=None,
               config: dict = DEFAULT_CONFIG) -> list[dict]:
    """Compile the decode step's kernels for this model and check each against numpy; a
    check that raises is reported as failed with its error, and the others still run."""
    kernels = decode_kernels(shapes, formats, config)
    source = translation_unit(shapes, kernels)
    handles = device.load(image_for(device, source), {k.name: k.smem for k in kernels})
    att = {**config.get("attention", {})}
    att.update({k: v for k, v in (("chunk", chunk), ("splits", splits)) if v is not None})
    tile = next(k for k in kernels if k.name == "attention").tile
    chunk, splits = attention_split({"attention": att}, 1 << 30, tile)
    max_seq = max_seq or 2 * chunk * splits + 64      # lengths past chunk x splits: each split's share grows
    chunk, splits = attention_split({"attention": att}, max_seq, tile)
    ctx = lambda: _Ctx(device, shapes, formats, kernels, handles, seed, max_seq, chunk, splits, config)  # noqa: E731
    return [_run_check(ctx(), name, check, log) for name, check in CHECKS.items() if not only or name in only]


def _run_check(c: _Ctx, name: str, check, log) -> dict:
    """check(c) as a report row (a check that raises fails with its error), its device memory freed."""
    t = time.perf_counter()
    try:
        r = check(c)
    except Exception as e:  # the report names it; the next check still runs
        r = _result(name, float("inf"), 0.0, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    finally:
        try:
            c.free()
        except Exception:  # a failed kernel can leave the device unusable; the report says so
            pass
    r["kernel"], r["seconds"] = name, round(time.perf_counter() - t, 3)
    if log:
        log(format_result(r))
    return r


# ---- the batched steps' kernels (engines built with --max-batch) -----------------------------------
def check_bucket(c: _Ctx, rows: int) -> dict:
    """One bucket's kernels with `rows` rows, each row a slot with its own position and cache
    (slot_stride): the row norms, the five GEMVs (their x fp16 from the norm or the previous
    kernel, as in the batched step) and the attention (grid z = row, lengths differing)."""
    from .step import bucket_name
    s, M = c.s, rows
    H, I, V, N, nh, nkv, hd = s.hidden, s.inter, s.vocab, s.qkv, s.heads, s.kv_heads, s.head_dim
    name = lambda n: bucket_name(n, rows)                                     # noqa: E731
    errs = {}
    # row_norm: x_new = x_in + rms(y_in) w_y; h = rms(x_new) w_x (fp16)
    x_in, y_in = c.rng.standard_normal((M, H)).astype(np.float32), c.rng.standard_normal((M, H)).astype(np.float32)
    norm_y, norm_x = c.vec16(H, 1.0, 0.1), c.vec16(H, 1.0, 0.1)
    a = GemvArgs(x_in=c.put(x_in), y_in=c.put(y_in), norm_y=c.put(norm_y), norm_x=c.put(norm_x),
                 x_out=c.zeros(4 * M * H), act=c.zeros(2 * M * H), eps=EPS, max_seq=c.max_seq)
    c.dev.launch(c.h["row_norm"], (M,), c.spec["row_norm"].threads, 0, a)
    x = x_in.astype(np.float64) + rms_norm(y_in, norm_y, EPS)
    errs["row_norm x"] = rel(c.get(a.x_out, (M, H), np.float32), x)
    errs["row_norm h"] = rel(c.get(a.act, (M, H), np.float16), rms_norm(x, norm_x, EPS))
    # row_embed
    toks = (np.arange(M) * 37 + 5) % V
    table = c.vec16(V * H).reshape(V, H)
    if c.f.embed == "embed_norm_bf16":
        table = bf16_bits(table)
    a = GemvArgs(embed=c.put(table), tokens=c.put(toks.astype(np.int32)), norm_x=c.put(norm_x),
                 x_out=c.zeros(4 * M * H), act=c.zeros(2 * M * H), eps=EPS, max_seq=c.max_seq)
    c.dev.launch(c.h["row_embed"], (M,), c.spec["row_embed"].threads, 0, a)
    e = bf16_values(table[toks]) if c.f.embed == "embed_norm_bf16" else table[toks].astype(np.float64)
    errs["row_embed h"] = rel(c.get(a.act, (M, H), np.float16), rms_norm(e, norm_x, EPS))
    # qkv: row m is slot m at its own position
    h = c.rng.standard_normal((M, H)).astype(np.float16)
    wf, wd, _ = c.weights(c.f.linear, N, H)
    bias = c.vec16(N, 0.0, 0.1)
    pos = (np.arange(M) * 11 + 3).astype(np.int32)
    stride = nkv * c.max_seq * hd
    table_r = rope_table_for(c)
    a = GemvArgs(**wf, bias=c.put(bias), h_in=c.put(h), q=c.zeros(4 * M * nh * hd), k_cache=c.zeros(2 * M * stride),
                 v_cache=c.zeros(2 * M * stride), rope=c.put(table_r), pos=c.put(pos), slot_stride=stride)
    c.gemv(name("qkv"), a)
    y = h.astype(np.float64) @ wd.T + bias.astype(np.float64)
    kc = c.get(a.k_cache, (M, nkv, c.max_seq, hd), np.float16)
    vc = c.get(a.v_cache, (M, nkv, c.max_seq, hd), np.float16)
    qg = c.get(a.q, (M, nh, hd), np.float32)
    for m in range(M):
        p = int(pos[m])
        errs[f"qkv q row {m}"] = rel(qg[m], rope(y[m, :nh * hd].reshape(nh, hd), table_r, p, s.rot))
        errs[f"qkv k row {m}"] = rel(kc[m, :, p], rope(y[m, nh * hd:(nh + nkv) * hd].reshape(nkv, hd), table_r, p, s.rot))
        errs[f"qkv v row {m}"] = rel(vc[m, :, p], y[m, (nh + nkv) * hd:].reshape(nkv, hd))
    written = np.zeros(kc.shape, bool)
    written[np.arange(M), :, pos] = True
    untouched = bool(np.all(kc[~written] == 0) and np.all(vc[~written] == 0))
    # attention over each row's own cache and length
    kc2 = c.vec16(M * stride).reshape(M, nkv, c.max_seq, hd)
    vc2 = c.vec16(M * stride).reshape(M, nkv, c.max_seq, hd)
    lens = np.minimum(c.max_seq, np.array([1 + 97 * (m + 1) % c.max_seq for m in range(M)]))
    q = c.rng.standard_normal((M, nh * hd)).astype(np.float32)
    spec = c.spec["attention"]
    blocks = spec.counters(nkv)
    att = AttnArgs(q=c.put(q), k_cache=c.put(kc2), v_cache=c.put(vc2), pos=c.put((lens - 1).astype(np.int32)),
                   part_o=c.zeros(4 * M * nh * c.splits * hd), part_ml=c.zeros(8 * M * nh * c.splits),
                   out=c.zeros(4 * M * nh * hd), counter=c.zeros(4 * M * blocks), pos_add=0, max_seq=c.max_seq,
                   chunk=c.chunk, splits=c.splits, slot_stride=stride)
    launch_attention(c.dev, c.h, c.spec, nkv, c.splits, M, att)
    out = c.get(att.out, (M, nh, hd), np.float32)
    for m in range(M):
        errs[f"attention row {m}"] = rel(out[m], attention(q[m].reshape(nh, hd), kc2[m][:, :lens[m]], vc2[m][:, :lens[m]]))
    # o_proj (fp32 in), gate_up (fp16 in -> SwiGLU), down (fp16 in)
    K = nh * hd
    wf, wd, _ = c.weights(c.f.linear, H, K)
    xo = c.rng.standard_normal((M, K)).astype(np.float32)
    a = GemvArgs(**wf, y_in=c.put(xo), y=c.zeros(4 * M * H))
    c.gemv(name("o_proj"), a)
    errs["o_proj"] = rel(c.get(a.y, (M, H), np.float32), c.xin(xo) @ wd.T)
    wf, wd, _ = c.weights(c.f.linear, 2 * I, H)
    a = GemvArgs(**wf, h_in=c.put(h), act=c.zeros(2 * M * I))
    c.gemv(name("gate_up"), a)
    gu = h.astype(np.float64) @ wd.T
    errs["gate_up"] = rel(c.get(a.act, (M, I), np.float16), gu[:, :I] / (1 + np.exp(-gu[:, :I])) * gu[:, I:])
    wf, wd, _ = c.weights(c.f.linear, H, I)
    xd = c.rng.standard_normal((M, I)).astype(np.float16)
    a = GemvArgs(**wf, h_in=c.put(xd), y=c.zeros(4 * M * H))
    c.gemv(name("down"), a)
    errs["down"] = rel(c.get(a.y, (M, H), np.float32), xd.astype(np.float64) @ wd.T)
    # lm_head: logits and each row's argmax
    wf, wd, _ = c.weights(c.f.lm_head, V, H)            # f16_kn stored as W^T, wd (V, H) either way
    grid = c.grid(name("lm_head"))
    a = GemvArgs(**wf, h_in=c.put(h), y=c.zeros(4 * M * V), part_val=c.zeros(4 * M * grid),
                 part_idx=c.zeros(4 * M * grid), counter=c.zeros(4), token_out=c.zeros(4 * M))
    c.gemv(name("lm_head"), a)
    logits = c.get(a.y, (M, V), np.float32)
    errs["lm_head"] = rel(logits, np.concatenate([h.astype(np.float64) @ wd[i:i + 8192].T for i in range(0, V, 8192)], 1))
    tokens_ok = c.get(a.token_out, M, np.int32).tolist() == np.argmax(logits, 1).tolist()
    tol = TOL[c.spec[name("o_proj")].fmt]
    err = max(errs.values()) if untouched and tokens_ok else float("inf")
    return _result(f"bucket of {rows} rows ({c.spec[name('o_proj')].fmt}): row norms, qkv into each slot's cache, "
                   "attention per slot, o_proj, gate_up, down, lm_head + argmax", err, tol, errors=errs,
                   other_positions_untouched=untouched, argmax_ok=tokens_ok)


def run_bucket_checks(device, shapes: Shapes, formats: Formats, slots: int, *, seed: int = 0, log=None,
                      config: dict = DEFAULT_CONFIG, max_seq: int = 320) -> list[dict]:
    """The kernels of an engine for `slots` sequences that batched steps run, bucket by bucket,
    against numpy (what `glmrt build --max-batch N` checks on the GPU it builds for)."""
    from .step import slot_buckets
    kernels = engine_kernels(shapes, formats, config, slots)
    handles = device.load(image_for(device, translation_unit(shapes, kernels)), {k.name: k.smem for k in kernels})
    tile = next(k for k in kernels if k.name == "attention").tile
    chunk, splits = attention_split(config, max_seq, tile)
    return [_run_check(_Ctx(device, shapes, formats, kernels, handles, seed, max_seq, chunk, splits, config),
                       f"bucket {rows}", lambda c, rows=rows: check_bucket(c, rows), log)
            for rows in slot_buckets(slots)[1:]]


def format_result(r: dict) -> str:
    verdict = "PASS" if r["ok"] else "FAIL"
    extra = f"  ({r['error']})" if "error" in r else ""
    return f"{verdict}  {r['name']}: max rel err {r['rel_err']:.2e} (tol {r['tol']:.0e}){extra}"


def smoke(device) -> dict:
    """Compile, load and run one trivial kernel: is the toolchain and driver path sound?"""
    import ctypes

    class SmokeArgs(ctypes.Structure):
        _fields_ = [("x", ctypes.c_uint64), ("n", ctypes.c_int32)]
    handle = device.load(image_for(device, SMOKE), {"smoke": 0})["smoke"]
    x = np.arange(1000, dtype=np.float32)
    p = device.alloc(x.nbytes)
    device.upload(p, x)
    device.synchronize()
    device.launch(handle, (4,), 256, 0, SmokeArgs(p, x.size))
    out = np.empty_like(x)
    device.download(p, out)
    device.free(p)
    return _result("smoke (compile, load, launch one kernel)", rel(out, 2 * x + 1), 0.0)


def time_kernels(device, shapes: Shapes, formats: Formats, *, launches: int = 50, l2_bytes: int = 256 << 20,
                 contexts=(128, 8192), log=None, config: dict = DEFAULT_CONFIG, only=None) -> list[dict]:
    """Each GEMV alone (a graph of `launches` launches over weight copies larger than L2) and
    the attention at each context: microseconds per launch and the weight bytes per second."""
    kernels = decode_kernels(shapes, formats, config)
    source = translation_unit(shapes, kernels)
    handles = device.load(image_for(device, source), {k.name: k.smem for k in kernels})
    max_seq = max(contexts) + 64
    att_spec = next(k for k in kernels if k.name == "attention")
    chunk, splits = attention_split(config, max_seq, att_spec.tile)
    c = _Ctx(device, shapes, formats, kernels, handles, 1, max_seq, chunk, splits, config)
    s, rows = shapes, []
    shapes_of = {"qkv": (s.qkv, s.hidden, c.f.linear), "o_proj": (s.hidden, s.heads * s.head_dim, c.f.linear),
                 "gate_up": (2 * s.inter, s.hidden, c.f.linear), "down": (s.hidden, s.inter, c.f.linear),
                 "lm_head": (s.vocab, s.hidden, c.f.lm_head)}
    try:
        common = dict(x_in=c.put(c.vec32(s.hidden)), y_in=c.put(c.vec32(max(s.hidden, s.heads * s.head_dim))),
                      h_in=c.put(c.vec16(s.inter)), norm_y=c.put(c.vec16(s.hidden, 1.0, 0.1)),
                      norm_x=c.put(c.vec16(s.hidden, 1.0, 0.1)), x_out=c.zeros(4 * s.hidden),
                      y=c.zeros(4 * max(s.vocab, s.hidden)), act=c.zeros(2 * s.inter), q=c.zeros(4 * s.heads * s.head_dim),
                      k_cache=c.zeros(s.kv_heads * max_seq * s.head_dim * 2),
                      v_cache=c.zeros(s.kv_heads * max_seq * s.head_dim * 2), rope=c.put(rope_table_for(c)),
                      pos=c.put(np.array([5], np.int32)), part_val=c.zeros(4 * 65536), part_idx=c.zeros(4 * 65536),
                      counter=c.zeros(4), token_out=c.zeros(4))
        for name, (n, k, fmt) in shapes_of.items():
            if only and name not in only:
                continue
            wf, nbytes = c.zero_weights(fmt, n, k)     # timing only: the values do not matter, random ones cost seconds
            copies = [wf] + [c.zero_weights(fmt, n, k)[0] for _ in range(min(15, max(0, -(-l2_bytes // nbytes) - 1)))]
            args = [GemvArgs(**w, **common, eps=EPS, max_seq=max_seq) for w in copies]
            spec = c.spec[name]
            grid = c.grid(name)

            def record(args=args, spec=spec, grid=grid, name=name):
                for i in range(launches):
                    device.launch(handles[name], (grid,), spec.threads, spec.smem, args[i % len(args)])
            rows.append(_time(device, record, launches, f"{name} ({c.f.kernel(fmt)}, {n} x {k})", nbytes, grid, log))
        blocks = att_spec.blocks_x(s.kv_heads)
        att = AttnArgs(q=c.put(c.vec32(s.heads * s.head_dim)), k_cache=common["k_cache"], v_cache=common["v_cache"],
                       part_o=c.zeros(4 * s.heads * splits * s.head_dim), part_ml=c.zeros(8 * s.heads * splits),
                       out=c.zeros(4 * s.heads * s.head_dim), counter=c.zeros(4 * att_spec.counters(s.kv_heads)),
                       pos_add=0, max_seq=max_seq,
                       chunk=chunk, splits=splits)
        for ctx in contexts if not only or "attention" in only else ():
            a = AttnArgs.from_buffer_copy(att)
            a.pos = c.put(np.array([ctx - 1], np.int32))
            kv_bytes = 2 * s.kv_heads * ctx * s.head_dim * 2
            per = -(-ctx // splits)
            used = -(-ctx // max(chunk, -(-per // att_spec.tile) * att_spec.tile))

            def record(a=a):
                for _ in range(launches):
                    launch_attention(device, handles, c.spec, s.kv_heads, splits, 1, a)
            rows.append(_time(device, record, launches, f"attention, context {ctx}", kv_bytes, (blocks, used), log))
    finally:
        c.free()
    return rows


def _time_launches(device, launches: list, reps: int, what: str) -> dict:
    """A decode step's launch list (handle, grid, threads, smem, args[, pdl]) captured `reps`
    times as one graph and timed: the step benches' row."""
    def record():
        for _ in range(reps):
            for h, *rest in launches:
                device.launch(h, *rest)
    return _time(device, record, reps, what, 0, len(launches), None)


def _time(device, record, launches: int, what: str, nbytes: int, grid, log) -> dict:
    graph = device.capture(record)
    device.replay(graph)                                   # warm-up
    device.synchronize()
    times = []
    for _ in range(5):
        timer = device.timer()
        if timer is None:
            t = time.perf_counter()
            device.replay(graph)
            device.synchronize()
            times.append(1e3 * (time.perf_counter() - t))
        else:
            with timer:
                device.replay(graph)
            times.append(timer.ms)
    us = 1e3 * float(np.median(times)) / launches
    row = {"kernel": what, "us": us, "bytes": nbytes, "tbps": nbytes / (us * 1e-6) / 1e12,
           "grid": list(grid) if isinstance(grid, tuple) else grid}
    if log:
        log(f"{what:55s} {us:9.2f} us  {nbytes / 1e6:9.2f} MB  {row['tbps']:5.2f} TB/s  grid {grid}")
    return row


# ---- the whole decode step, timed ----------------------------------------------------------------
ROLES = ("qkv", "attention", "o_proj", "gate_up", "down", "lm_head")


def synthetic_config(shapes: Shapes, layers: int):
    """A GlmConfig of these shapes (default RoPE, half the head rotated) and `layers` layers."""
    from ...config import GlmConfig
    return GlmConfig.from_hf({
        "model_type": "glm4", "vocab_size": shapes.vocab, "hidden_size": shapes.hidden,
        "intermediate_size": shapes.inter, "num_hidden_layers": layers, "num_attention_heads": shapes.heads,
        "num_key_value_heads": shapes.kv_heads, "head_dim": shapes.head_dim, "max_position_embeddings": 32768,
        "partial_rotary_factor": shapes.rot / shapes.head_dim})


class _Weights(dict):
    def __getitem__(self, name):
        return 0 if name is None else dict.__getitem__(self, name)


class Unfit(GlmrtError):
    """A configuration whose kernels do not compile or do not fit this GPU (shared memory, registers)."""


class StepBench:
    """A whole decode step (DecodeStep's launch list) on zero-filled weights of the model's
    shapes, each layer its own (the weights stream from DRAM as in the real model), timed as a
    CUDA graph of `reps` steps; variants replace chosen kernels by empty ones (Stub) of the
    same launch shape, or run only the first layers, so that the time a kernel costs inside
    the step, and the step's cost beyond its kernels, are measured rather than guessed."""

    def __init__(self, device, shapes: Shapes, formats: Formats, layers: int, max_context: int, fill: str = "zero",
                 weights: tuple | None = None):
        """fill: the weights' bytes, "zero" or "random" (every byte random in 0x00..0x3b: int4 codes of
        every value, fp16 values of at most 0.93, no inf or NaN). weights: a model's own instead,
        (name -> device address, the engine's weight index, its GlmConfig): every layer of it, its
        memory left to its owner."""
        self.dev, self.s, self.f, self.layers, self.max_context = device, shapes, formats, layers, max_context
        self.cfg = synthetic_config(shapes, layers)
        self.ptrs, self.w, self._images = [], _Weights(), {}
        s = shapes
        if weights is not None:
            self.w, self.wmap, self.cfg = weights
            self.layers = len(self.wmap["layers"])
            self._alloc_kv(max_context)
            return
        if fill not in ("zero", "random"):
            raise ValueError(f"fill={fill!r}: 'zero' or 'random'")
        block = np.random.default_rng(0).integers(0, 256, 1 << 24, dtype=np.uint8) & 0x3B if fill == "random" else None

        def alloc(name, nbytes):
            p = device.alloc(nbytes)
            device.zero(p, nbytes)
            for at in range(0, nbytes if block is not None else 0, block.size if block is not None else 1):
                device.upload(p + at, block[:min(block.size, nbytes - at)])
            self.ptrs.append(p)
            self.w[name] = p
            return name

        def linear(name, n, k, fmt):
            if fmt in NBITS:
                w, sc = nbits_bytes(fmt, n, k, formats.block)
                return {"w": alloc(name, w), "scales": alloc(name + ".s", sc), "bias": None}
            if fmt == "fp8":
                return {"w": alloc(name, n * k), "scales": alloc(name + ".s", n * 2), "bias": None}
            return {"w": alloc(name, n * k * 2), "scales": None, "bias": None}
        lin = formats.linear
        self.wmap = {"embed": alloc("embed", s.vocab * s.hidden * 2), "norm": alloc("norm", s.hidden * 2),
                     "lm_head": linear("lm_head", s.vocab, s.hidden, "f16" if formats.lm_head == "f16_kn" else formats.lm_head),
                     "layers": []}
        for i in range(layers):
            lw = {"qkv": linear(f"{i}.qkv", s.qkv, s.hidden, lin), "o": linear(f"{i}.o", s.hidden, s.heads * s.head_dim, lin),
                  "gate_up": linear(f"{i}.gu", 2 * s.inter, s.hidden, lin), "down": linear(f"{i}.down", s.hidden, s.inter, lin)}
            lw["qkv"]["bias"] = alloc(f"{i}.qkv.b", s.qkv * 2)
            for role in ("input_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm"):
                lw[role] = alloc(f"{i}.{role}", s.hidden * 2)
            self.wmap["layers"].append(lw)
        self._alloc_kv(max_context)

    def _alloc_kv(self, max_context: int) -> None:
        s, device = self.s, self.dev
        per = s.kv_heads * max_context * s.head_dim * 2
        self.kv = []
        for _ in range(self.layers):
            self.kv.append((device.alloc(per), device.alloc(per)))
            self.ptrs += list(self.kv[-1])
            device.zero(self.kv[-1][0], per)
            device.zero(self.kv[-1][1], per)
        device.synchronize()

    def time(self, config: dict = DEFAULT_CONFIG, contexts=(128, 8192), reps: int = 3, log=None,
             variants: bool = True, label: str = "full", burst: int = 1) -> list[dict]:
        """The full step at each context; with `variants`, at the first context also: every
        kernel stubbed (launches only), each role stubbed alone, and the first half of the
        layers only (each row: us per step). burst > 1 (no variants): a graph holds `burst`
        steps as the runtime's bursts do (each step feeding the next its token), `reps` of them."""
        from .sources import Stub
        from .step import DecodeStep
        from .sources import translation_unit as tu
        if burst > 1 and variants:
            raise ValueError("bursts are timed whole: variants=False")
        kernels = decode_kernels(self.s, self.f, config)
        stubs = [Stub("stub_" + k.name, k.args, k.threads, k.smem) for k in kernels] if variants else []
        source = tu(self.s, kernels + stubs)
        try:                                # compiled once per source (a tuner times a configuration again)
            image = self._images.get(source) or self._images.setdefault(source, image_for(self.dev, source))
            handles = self.dev.load(image, {k.name: k.smem for k in kernels + stubs})
        except GlmrtError as e:
            raise Unfit(f"{e}") from e
        step = DecodeStep(self.dev, {k.name: (k, handles[k.name]) for k in kernels}, self.w, self.wmap, self.kv,
                          self.cfg, self.max_context, burst, config)
        role_of = {handles[k.name]: ("qkv" if k.name == "qkv_first" else k.name) for k in kernels}
        stub_of = {handles[k.name]: handles["stub_" + k.name] for k in kernels} if variants else {}
        rows = []
        try:
            base = [launch for i in range(burst) for launch in step.launches(i)]
            per_layer = (len(base) - 1) // self.layers

            def run(what, launches, ctx):
                ctl = np.zeros(2 + burst, np.int32)
                ctl[0] = ctx - 1
                self.dev.upload(step.buf["ctl"], ctl)
                self.dev.synchronize()
                r = _time_launches(self.dev, launches, reps, f"step, {what}, context {ctx}")
                r["us"] /= burst
                r.update(what=what, context=ctx, nodes=len(launches) // burst)
                if log:
                    log(f"{r['kernel']:60s} {r['us']:9.1f} us  {1e6 / r['us']:7.1f} tok/s  ({len(launches)} kernels)")
                rows.append(r)
                return r

            def stubbed(roles):
                return [(stub_of[h], *rest) if role_of[h] in roles else (h, *rest) for h, *rest in base]
            for ctx in contexts:
                run(label, base, ctx)
            if variants:
                ctx = contexts[0]
                run("every kernel empty (launches only)", stubbed(ROLES), ctx)
                for role in ROLES:
                    run(f"{role} empty", stubbed((role,)), ctx)
                half = self.layers // 2
                run(f"first {half} layers + lm_head", base[:half * per_layer] + base[-1:], ctx)
                if log:
                    full = next(r["us"] for r in rows if r["what"] == label and r["context"] == ctx)
                    empty = next(r["us"] for r in rows if r["what"].startswith("every kernel"))
                    hl = rows[-1]["us"]
                    log(f"   launches alone: {empty:.0f} us per step ({empty / len(base):.2f} us per kernel)")
                    log(f"   one layer in the step: {(full - hl) / (self.layers - half):.1f} us")
                    for role in ROLES:
                        r = next(x for x in rows if x["what"] == f"{role} empty")
                        n = self.layers if role not in ("lm_head",) else 1
                        log(f"   {role:10s} costs {full - r['us']:7.1f} us per step in it ({(full - r['us']) / n:.2f} us each)")
        finally:
            step.free()
        return rows

    def batch_time(self, slots: int, config: dict = DEFAULT_CONFIG, contexts=(128,), reps: int = 3, log=None,
                   variants: bool = True) -> list[dict]:
        """The batched step of every bucket of an engine for `slots` sequences (all rows at the
        same context); with `variants`, the largest bucket again with each kernel role empty."""
        from .sources import Stub
        from .sources import translation_unit as tu
        from .step import DecodeStep
        kernels = engine_kernels(self.s, self.f, config, slots)
        stubs = [Stub("stub_" + k.name, k.args, k.threads, k.smem) for k in kernels]
        handles = self.dev.load(image_for(self.dev, tu(self.s, kernels + stubs)),
                                {k.name: k.smem for k in kernels + stubs})
        step = DecodeStep(self.dev, {k.name: (k, handles[k.name]) for k in kernels}, self.w, self.wmap, self.kv,
                          self.cfg, self.max_context, 1, config, slots=slots)
        role_of = {handles[k.name]: k.name.rsplit("_b", 1)[0] if getattr(k, "m", 1) > 1 else
                   ("qkv" if k.name == "qkv_first" else k.name) for k in kernels}
        stub_of = {handles[k.name]: handles["stub_" + k.name] for k in kernels}
        stride = self.s.kv_heads * self.max_context * self.s.head_dim
        kv = []
        for _ in range(self.layers):
            pair = (self.dev.alloc(2 * slots * stride), self.dev.alloc(2 * slots * stride))
            for p in pair:
                self.dev.zero(p, 2 * slots * stride)
            kv.append(pair)
        rows = []
        try:
            def run(what, launches, ctx, b):
                ctl = np.zeros(3 * slots, np.int32)
                ctl[:b] = ctx - 1
                self.dev.upload(step.buf["bctl"], ctl)
                self.dev.synchronize()
                r = _time_launches(self.dev, launches, reps, f"batched step, {b} rows, {what}, context {ctx}")
                r.update(what=what, context=ctx, rows=b, nodes=len(launches))
                if log:
                    log(f"{r['kernel']:70s} {r['us']:9.1f} us  {b * 1e6 / r['us']:8.1f} tok/s in all")
                rows.append(r)
                return r
            for ctx in contexts:
                for b in step.buckets:
                    run("full", step.batch_launches(b, kv, stride), ctx, b)
            if variants:
                b, ctx = step.buckets[-1], contexts[0]
                base = step.batch_launches(b, kv, stride)
                roles = sorted({role_of[h] for h, *_ in base})
                full = next(r["us"] for r in rows if r["rows"] == b and r["context"] == ctx)
                for role in roles:
                    r = run(f"{role} empty", [(stub_of[h], *rest) if role_of[h] == role else (h, *rest)
                                              for h, *rest in base], ctx, b)
                    n = sum(1 for h, *_ in base if role_of[h] == role)
                    if log:
                        log(f"   {role:10s} costs {full - r['us']:7.1f} us per step in it "
                            f"({(full - r['us']) / n:.2f} us each, {n} a step)")
                r = run("every kernel empty", [(stub_of[h], *rest) for h, *rest in base], ctx, b)
        finally:
            step.free()
            self.dev.synchronize()
            for pair in kv:
                for p in pair:
                    self.dev.free(p)
        return rows

    def free(self):
        self.dev.synchronize()
        for p in self.ptrs:
            self.dev.free(p)
        self.ptrs = []
