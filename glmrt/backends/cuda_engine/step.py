"""One decode step of the whole model: the kernels it needs (what the builder compiles) and
the launches, in order, with their arguments (what the decoder queues or captures as a graph).

Per layer, five kernels:

  qkv        x = x + norm(mlp) * w_post_mlp (the previous layer's sandwich add; layer 0: the
             embedding row), h = norm(x) * w_in; qkv = h W^T + b; RoPE; k, v -> cache at pos
  attention  one block per (KV head, group of its query heads, split of the context); the
             last split of each to finish merges them: attn (NH * HD) fp32
  o_proj     o = attn W^T
  gate_up    x = x + norm(o) * w_post_attn; h = norm(x) * w_pre_mlp; act = silu(h Wg^T) * h Wu^T
  down       mlp = act W^T
and after the last layer
  lm_head    x = x + norm(mlp) * w_post_mlp; h = norm(x) * w_final; logits; argmax -> next id

Batched slots (continuous batching, engines built with --max-batch N): KV caches for N
sequences, slot i a row of one buffer per layer and K/V; a batched step over rows 0..b-1 (b a
bucket: 1, 2, 4, 8, or N) runs GEMVs compiled for M = b rows (int4 on the tensor cores, whose
cost barely grows with the rows), each row its own position and cache (GemvArgs/AttnArgs
slot_stride; the attention's grid z is the row), one CUDA graph per bucket. Its norms run
once per row in a kernel of their own (row_norm, row_embed: a block per row, writing the fp16
input of the GEMV after it), not in every block of the GEMVs' prologues.
Its control buffer: [pos_0 .. pos_{N-1}, id_0 .. id_{N-1}, out_0 .. out_{N-1}].

The residual stream x is fp32 and alternates between two buffers (each fused norm reads one
and block 0 writes the other), so no kernel reads what it writes. Everything a step reads from
the host sits in one int32 control buffer: [pos, id_0, id_1, ..., id_burst]; step i of a burst
reads its token from slot i, its position as pos + i, and writes its argmax into slot i + 1,
so a burst of n steps is n copies of this list with i = 0..n-1, captured as one CUDA graph.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ...reference import rope_table
from .args import AttnArgs, GemvArgs
from .sources import (ATT_MAX_SPLITS, NK_FORMATS, Attention, AttentionMerge, Gemv, RowNorm, Shapes, merge_threads,
                      mma_attention_fits)

# Launch parameters per role. warps, rpw (rows per warp), unroll (16-byte units in flight per
# lane and row) and min_blocks (__launch_bounds__) fix the kernel instance; blocks_per_sm sets
# the persistent grid: 0 = as many as fit at once (the driver's occupancy for the kernel),
# N = N per SM. The builder records what it used; tuning replaces these.
# min_blocks 2: ptxas otherwise spends ~187 registers on the int4 GEMVs (one block of 8 warps per
# SM); with 2 it fits them in ~115 without spilling (3 spills), 16 warps and 64 KB in flight per SM.
# hsum (int4, fp16 x): 32-bit words whose products are summed in half2 before fp32. 4 (a unit's 32
# products, 16 per half) made GLM-Z1-9B int4's step 2.48 ms against 2.58 (H200, session 7) but
# moved 4 GLM-Z1-9B layers' logits 7.2e-3 from the float reference (1: 4.4e-3; ONNX Runtime's
# form: 5.0e-3; all session 7). 2 (8 products a half) is the default since session 13: H200, steps
# as bursts of 8, GLM-Z1-9B 2437 -> 2335 us (-4.2%; -4.3% in another call), GLM-4-32B -3.0%;
# `glmrt bench` 411.7 -> 431.1 tok/s and 154.1 -> 158.9; 4 GLM-Z1-9B layers' logits 5.02e-3 from
# the float32 reference against 4.98e-3 with 1 and ONNX Runtime's form's 4.97e-3 (session 13);
# the layer GEMVs' int4 checks pass at both models' shapes (bench/RESULTS.md)
# mma (int4 with fp16 x): the tensor-core GEMV (kernels/gemv.cu gemv_mma; 16 rows a warp, ksplit
# warps sharing them) instead of the CUDA-core one; it costs the same for 1 to 8 rows of x
# stages (the NK formats: int4, fp8, fp16, bf16 (V, H)): 0 the weights wait in two register stages,
# S >= 2 in a ring of S stages in shared memory filled by cp.async (kernels/gemv.cu gemv_nk). H200,
# session 11: no ring faster beyond the spread (GLM-Z1-9B int4 step: best 2516 us against 2529 at
# 128, slower at 8192; the others 2557-2854; fp8 +45%)
# Measured and not kept (H200, session 12, 40- and 61-layer steps as bursts of 8, bench/RESULTS.md):
# a block's tiles requested into L2 ahead (cp.async.bulk.prefetch: GLM-Z1-9B +0.3..+4%, GLM-4-32B
# +4..+7%), its second step loaded before it waits (+0.9..+2.5% for all roles; at best -0.7%, one
# role), 4 rows a warp with unroll 2 (+6..+18%)
# glmrt build tunes these per GPU and model (tune.py: the model's own weights timed in the step)
GEMV = {"warps": 8, "rpw": 2, "unroll": 4, "min_blocks": 2, "blocks_per_sm": 0, "hsum": 2, "mma": False, "ksplit": 1,
        "stages": 0}
DEFAULT_CONFIG = {
    "qkv": GEMV, "o_proj": GEMV, "gate_up": GEMV, "down": GEMV, "lm_head": GEMV,
    "lm_head_kn": {**GEMV, "rpw": 1, "unroll": 8},
    # the 8-bit MatMulNBits lm_head (export --lm-head int8): unroll 2, where 4 spills (NVRTC 13.5,
    # sm_90: 8 bytes at one row of x, 340 at eight; 80 to 118 registers with 2, none spilled);
    # min_blocks 3 (80 registers: 3 blocks an SM): the tuner kept it for GLM-Z1-9B on the H200
    # (session 14: 2282.6 against 2304.3 us a step, -0.9%)
    "lm_head_i8": {**GEMV, "unroll": 2, "min_blocks": 3},
    # heads_per_block query heads of a KV head's group per block, tile positions a step;
    # splits: the grid's y (at most sources.ATT_MAX_SPLITS); chunk: the fewest positions a
    # split takes (short contexts use len / chunk splits, long ones all of them); mma: the
    # tensor-core kernel (kernels/attention.cu attention_mma, a block per KV head and split,
    # heads_per_block ignored; head_dim a multiple of 32, else the CUDA-core kernel). H200,
    # GLM-Z1-9B's 40-layer step at context 128 / 8192: 2521 / 2796 us with it (256 threads),
    # 2575 / 3220 with the CUDA-core kernel (128 threads, 4 query heads a block). merge (mma):
    # "last", the last split to finish folds the group's splits; "spread", a kernel of its own
    # with a block per query head does (attention_merge: one more launch a layer). H200, same
    # step, "last" / "spread": 2528 / 2539 us at 128, 2805 / 2766 at 8192 (128 splits: 2957):
    # a wash; "spread" stays an option (checked in the emulation, not yet against numpy on a GPU)
    # mma_threads: the tensor-core kernel's block; threads: the CUDA-core kernel's; merge_group
    # ("last", mma): 0, the last split folds all of them; n >= 2, two levels: the last of each n
    # splits folds them while others still read, the last of those folds the partials (at 8K the
    # one-level merge has one block read 64 splits' outputs, 256 KB for GLM-Z1-9B's group). H200,
    # tuned int4 steps as bursts of 8 against 0 (session 14): 8, GLM-Z1-9B +0.4% at 128, -0.5% at
    # 8192, GLM-4-32B 0.0%, -2.3%; 4: +3.8 / -0.6% and +2.6 / -1.7% (at 129 positions its two
    # levels cost a step's worth); 16: +0.9 / +0.3%. Not better there either: 128 splits of 128
    # threads (+1.9 / +2.1%; GLM-4-32B +6.6% at 8192), tile 64 (+3.3 / +1.4%), 128 threads (+1.4 / +2.7%)
    # splits 66 (64 before session 15): the tensor-core kernel runs one block an SM, and 2 KV heads x
    # 66 splits fill the 132 SMs of an H200 (or an H100 SXM). Just past 8192 positions the splits take
    # whole tiles of 32: 64 splits 160 positions each, 52 of them used (104 blocks, 5 tiles in turn),
    # 66 splits 128 (130 blocks, 4 tiles). Yet the steps, which time lengths 8192 .. 8199, measured
    # the same (H200, session 15: GLM-Z1-9B -0.4% / +0.1% at 128 / 8192, GLM-4-32B -0.3% / +0.2%):
    # the fifth tile is not what the 8K attention waits on. Kept because the session's engine
    # builds, kernel checks and `glmrt bench` figures ran with it. Measured and not kept
    # (session 15, int4 steps against these defaults): the K/V tiles through a cp.async ring in
    # dynamic shared memory (2 or 3 stages, tiles of 32, 64 or 128: +1.5 .. +9.9% for GLM-Z1-9B,
    # +0.1 .. +4.5% for GLM-4-32B); loading the first tiles before the kernel's wait: faster, and wrong
    # (kernels/attention.cu, at its grid_wait)
    "attention": {"threads": 128, "heads_per_block": 4, "tile": 32, "chunk": 32, "splits": 66, "mma": True,
                  "mma_threads": 256, "merge": "last", "merge_group": 8},
    # the GEMVs of a batched step (M = 2..8 rows, buckets of continuous batching), per role over
    # its M = 1 knobs: int4 on the tensor cores (H200, GLM-Z1-9B's qkv, o_proj and gate_up alone,
    # 4 warps sharing 16 rows: 43.4 us at 8 rows, 43.8 at one; the CUDA-core GEMV 99.3 and 36.2), the 8 warps of a block sharing 16
    # rows (H200, the 9B step with 2 / 4 / 8 rows: 2.88 / 3.64 / 4.03 ms; 4 warps a group: 3.29 /
    # 4.18 / 4.01 ms)
    "rows": {"qkv": {"mma": True, "ksplit": 8}, "o_proj": {"mma": True, "ksplit": 8},
             "gate_up": {"mma": True, "ksplit": 8}, "down": {"mma": True, "ksplit": 8},
             "lm_head": {"mma": True, "ksplit": 8},
             # the fp16 W^T lm_head stays on the CUDA cores: on the tensor cores ("mma": true,
             # movmatrix) it is correct on the H200 but no faster in the step (8 rows: 4.00 against
             # 3.98 ms; 2 rows: 3.08 against 2.94)
             # the 8-bit lm_head's batched instances keep min_blocks 2 (the single row's 3 caps them
             # at 80 registers; 8 rows take 118)
             "lm_head_kn": {}, "lm_head_i8": {"min_blocks": 2}},
    # and per bucket (rows as a string) over "rows" (H200, the 9B step on zero weights, 4 / 8 rows:
    # 3.10 / 3.97 ms; without these 3.64 / 4.03; at 2 rows they cost 2.92 against 2.87): down's wide
    # x staged for 4 rows leaves room for 16 warps a block, for 8 rows (219 KB) fewer loads in flight
    "rows_by_bucket": {"4": {"down": {"warps": 16, "ksplit": 8, "min_blocks": 1}},
                       "8": {"down": {"unroll": 2, "min_blocks": 3}}},
    # programmatic dependent launch (sm_90+): each kernel launched while the previous one ends,
    # its first weights loaded before it waits for it (kernels/common.cuh grid_wait)
    "pdl": True,          # sm_90+: measured 2.61 vs 2.85 ms per 9B int4 step on the H200 (session 6)
}
ATTENTION = DEFAULT_CONFIG["attention"]


# lm_head formats with launch knobs of their own (the rest take their role's)
FORMAT_ROLES = {"f16_kn": "lm_head_kn", "f16_kn_mma": "lm_head_kn", "int8": "lm_head_i8"}


def role(spec) -> str:
    """The launch-parameter entry a kernel instance takes."""
    name = spec.name.rsplit("_b", 1)[0] if spec.m > 1 else spec.name      # a batched step's instance
    return FORMAT_ROLES.get(spec.fmt) or {"qkv_first": "qkv"}.get(name, name)


def knobs(config: dict, key: str, rows: int = 1) -> dict:
    """The launch knobs of a GEMV role ("lm_head_kn" for the W^T lm_head, "lm_head_i8" for the
    8-bit one) at `rows` rows of x:
    step.GEMV, the role's own, then for batched steps "rows" and "rows_by_bucket"."""
    c = {**GEMV, **config.get(key, {})}
    if rows > 1:
        c.update(config.get("rows", {}).get(key, {}))
        c.update(config.get("rows_by_bucket", {}).get(str(rows), {}).get(key, {}))
    return c


def gemv_grid(spec, shapes, config: dict, device, handle) -> int:
    """Blocks of a persistent GEMV: blocks_per_sm per SM (0: as many as are resident at once),
    never more than its tiles."""
    per_sm = knobs(config, role(spec), spec.m).get("blocks_per_sm", 0) or device.occupancy(handle, spec.threads, spec.smem)
    return max(1, min(spec.tiles(shapes), per_sm * device.sm_count))


# what int4 weights multiply, as the CLI and describe() name it -> Formats.act
ACTIVATIONS = {"fp16": "f16", "int8": "int8"}


@dataclasses.dataclass(frozen=True)
class Formats:
    linear: str        # the layers' matrices: "int4", "f16", "fp8" (e4m3, a scale per row) or "bf16"
    block: int         # int4 block size along K
    lm_head: str       # "int4", "int8" (MatMulNBits 8 bits), "f16" (V, H), "f16_kn" (H, V), "bf16" (V, H) or "fp8" (V, H)
    act: str = "f16"   # what int4 weights multiply: "f16" x, or "int8" x per 32 values (W4A8)

    @property
    def embed(self) -> str:
        """The prologue reading the embedding table: a bf16 export keeps it in bf16."""
        return "embed_norm_bf16" if self.linear == "bf16" else "embed_norm"

    def kernel(self, fmt: str) -> str:
        """The kernel format of weights stored as `fmt` (int4 with int8 x: "int4_a8")."""
        return "int4_a8" if fmt == "int4" and self.act == "int8" else fmt


MAX_SLOTS = 8          # rows of x one batched step takes (the mma's N)


def slot_buckets(slots: int) -> tuple[int, ...]:
    """The batch sizes an engine for `slots` sequences compiles: 1, 2, 4, 8 below it and itself."""
    return tuple(sorted({b for b in (1, 2, 4, 8) if b < slots} | {slots}))


def bucket_name(name: str, rows: int) -> str:
    return name if rows == 1 else f"{name}_b{rows}"


def decode_kernels(shapes: Shapes, formats: Formats, config: dict = DEFAULT_CONFIG, rows: int = 1) -> list:
    """The kernel instances of one decode step: M = 1, or the GEMVs of a batched step over
    `rows` slots (named name_b<rows>; the attention instance serves every row count)."""
    s, f = shapes, formats

    def gemv(name, role, fmt, k, n, pro, epi):
        c = knobs(config, FORMAT_ROLES.get(fmt, role), rows)
        kfmt = f.kernel(fmt)             # hsum shapes only int4 with fp16 x: 1 elsewhere, as compiled
        if kfmt == "int4" and c.get("mma"):
            kfmt = "int4_mma"
        if kfmt == "f16_kn" and c.get("mma") and k % 16 == 0:
            kfmt = "f16_kn_mma"
        return Gemv(bucket_name(name, rows), kfmt, k, n, pro, epi, block=f.block, m=rows, warps=c["warps"],
                    rpw=c["rpw"], unroll=c["unroll"],
                    min_blocks=c["min_blocks"], hsum=c["hsum"] if kfmt == "int4" else 1,
                    ksplit=c.get("ksplit", 1) if kfmt == "int4_mma" else 1,
                    stages=c.get("stages", 0) if kfmt in NK_FORMATS else 0)

    att = {**ATTENTION, **config["attention"]}
    hpb = att["heads_per_block"] if s.group % att["heads_per_block"] == 0 else 0    # 0: the whole group
    if rows > 1:                         # the norms ran before (row_norm): every GEMV reads fp16 x
        return [gemv("qkv", "qkv", f.linear, s.hidden, s.qkv, "f16", "qkv"),
                gemv("o_proj", "o_proj", f.linear, s.heads * s.head_dim, s.hidden, "f32", "store"),
                gemv("gate_up", "gate_up", f.linear, s.hidden, 2 * s.inter, "f16", "swiglu"),
                gemv("down", "down", f.linear, s.inter, s.hidden, "f16", "store"),
                gemv("lm_head", "lm_head", f.lm_head, s.hidden, s.vocab, "f16", "argmax")]
    mma = bool(att.get("mma", False)) and mma_attention_fits(s.head_dim, s.group, att["mma_threads"], att["tile"])
    mg = merge_group(att)                # checked whatever the kernel: a bad value is never ignored
    spread = mma and att.get("merge", "last") == "spread"
    if att.get("merge", "last") not in ("last", "spread"):
        raise ValueError(f"attention merge {att['merge']!r}: 'last' or 'spread'")
    threads = att["mma_threads"] if mma else att["threads"]
    return [
        gemv("qkv_first", "qkv", f.linear, s.hidden, s.qkv, f.embed, "qkv"),
        gemv("qkv", "qkv", f.linear, s.hidden, s.qkv, "add_norm", "qkv"),
        Attention("attention", s.head_dim, s.group, threads, hpb, att["tile"], mma=mma, spread=spread,
                  merge_group=mg if mma and not spread else 0),
        *([AttentionMerge("attention_merge", s.head_dim, s.group, merge_threads(s.head_dim), att["tile"])]
          if spread else []),
        gemv("o_proj", "o_proj", f.linear, s.heads * s.head_dim, s.hidden, "f32", "store"),
        gemv("gate_up", "gate_up", f.linear, s.hidden, 2 * s.inter, "add_norm", "swiglu"),
        gemv("down", "down", f.linear, s.inter, s.hidden, "f16", "store"),
        gemv("lm_head", "lm_head", f.lm_head, s.hidden, s.vocab, "add_norm", "argmax"),
    ]


def row_norms(formats: Formats) -> list:
    return [RowNorm("row_norm", "add_norm"), RowNorm("row_embed", formats.embed)]


def engine_kernels(shapes: Shapes, formats: Formats, config: dict = DEFAULT_CONFIG, slots: int = 1) -> list:
    """Every kernel instance an engine for `slots` sequences compiles: the decode step (M = 1),
    and for slots > 1 each bucket's GEMVs and the row norms."""
    kernels = decode_kernels(shapes, formats, config)
    if slots > 1:
        for rows in slot_buckets(slots)[1:]:
            kernels += decode_kernels(shapes, formats, config, rows=rows)
        kernels += row_norms(formats)
    return kernels


def merge_group(att: dict) -> int:
    """The attention's first-level merge group (0: one level), checked."""
    n = att.get("merge_group", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n == 1 or n > ATT_MAX_SPLITS:
        raise ValueError(f"attention merge_group {n!r}: 0 (one level) or 2 .. {ATT_MAX_SPLITS} splits")
    return n


def attention_split(config: dict, max_context: int, tile: int) -> tuple[int, int]:
    """(chunk, splits) of the attention: the fewest positions per split (the configured chunk
    rounded up to the kernel's tile) and the grid's y (the configured splits, no more than
    the cache needs at that chunk nor than one merge takes)."""
    att = {**ATTENTION, **config.get("attention", {})}
    chunk = -(-max(att["chunk"], tile) // tile) * tile
    splits = max(1, min(att["splits"], -(-max_context // chunk), ATT_MAX_SPLITS))
    return chunk, splits


def attention_launches(specs: dict, handles: dict, kv_heads: int, splits: int, rows: int, args,
                       pdl: bool = False) -> list:
    """(handle, grid, threads, smem, args, pdl) of the attention and, when its splits are merged
    apart (merge "spread"), attention_merge; specs and handles by kernel name."""
    spec = specs["attention"]
    out = [(handles["attention"], (spec.blocks_x(kv_heads), splits, rows), spec.threads, spec.smem, args, pdl)]
    if "attention_merge" in specs:
        m = specs["attention_merge"]
        out.append((handles["attention_merge"], (m.blocks_x(kv_heads), 1, rows), m.threads, m.smem, args, pdl))
    return out


KINDS = {"gemv": Gemv, "attention": Attention, "norm": RowNorm, "attention_merge": AttentionMerge}


def kernel_from_dict(d: dict):
    d = dict(d)
    return KINDS[d.pop("type")](**d)


def kernel_to_dict(k) -> dict:
    return {"type": next(name for name, cls in KINDS.items() if isinstance(k, cls)), **dataclasses.asdict(k)}


class DecodeStep:
    """The step's device buffers and its launches for each slot of a burst.

    kernels: name -> (spec, handle); weights: name -> address (DeviceWeights); wmap: the
    engine manifest's weight roles; kv: per layer (K cache, V cache) addresses."""

    def __init__(self, device, kernels: dict, weights, wmap: dict, kv: list, cfg, max_context: int,
                 burst: int, config: dict = DEFAULT_CONFIG, slots: int = 1):
        self.device, self.kernels, self.w, self.wmap, self.kv = device, kernels, weights, wmap, kv
        self.cfg, self.max_context, self.burst, self.config = cfg, max_context, burst, config
        self.slots = S = max(1, slots)           # rows every per-token buffer holds
        s = self.shapes = Shapes.from_config(cfg)
        att = kernels["attention"][0]
        self.chunk, self.splits = attention_split(config, max_context, att.tile)
        self.pdl = bool(config.get("pdl")) and tuple(device.compute_capability) >= (9, 0)
        self.buckets = slot_buckets(S) if S > 1 else (1,)
        self.lm_grid = max(self.grid(bucket_name("lm_head", b)) for b in self.buckets)
        f32, f16, i32 = 4, 2, 4
        sizes = {                                        # name: bytes (S rows each where per token)
            "x0": S * s.hidden * f32, "x1": S * s.hidden * f32,  # the residual stream, ping-pong
            "q": S * s.heads * s.head_dim * f32,
            "part_o": S * s.heads * self.splits * s.head_dim * f32,
            "part_ml": S * s.heads * self.splits * 2 * f32,
            "attn": S * s.heads * s.head_dim * f32,
            "o": S * s.hidden * f32,
            "act": S * s.inter * f16,
            "mlp": S * s.hidden * f32,
            "h": S * s.hidden * f16,                     # batched: a row norm's output, a GEMV's x
            "logits": S * s.vocab * f32,
            "part_val": S * self.lm_grid * f32, "part_idx": S * self.lm_grid * i32,
            "counter": 4,
            "att_counter": 4 * S * att.counters(s.kv_heads),
            "ctl": (burst + 2) * i32,                    # [pos, id_0 .. id_burst]
            "bctl": 3 * S * i32,                         # batched: [pos_0.., id_0.., out_0..]
            "rope": max_context * (s.rot // 2) * 2 * f32,
        }
        self.buf = {}
        for name, n in sizes.items():
            self.buf[name] = device.alloc(n)
            device.zero(self.buf[name], n)
        self._rope = rope_table(cfg, max_context)
        device.upload(self.buf["rope"], self._rope)
        device.synchronize()

    def grid(self, name: str) -> int:
        spec, handle = self.kernels[name]
        return gemv_grid(spec, self.shapes, self.config, self.device, handle)

    def _gemv(self, name: str, **fields):
        spec, handle = self.kernels[name]
        a = GemvArgs(eps=self.cfg.rms_norm_eps, max_seq=self.max_context, **fields)
        return handle, (self.grid(name),), spec.threads, spec.smem, a, self.pdl

    def _linear(self, m: dict) -> dict:
        return {"w": self.w[m["w"]], "scales": self.w[m.get("scales")], "bias": self.w[m.get("bias")]}

    def launches(self, i: int) -> list:
        """Burst slot i: every launch of one decode step, in order."""
        ctl = self.buf["ctl"]
        return self._fused(self.kv, ctl, ctl + 4 * (1 + i), ctl + 4 * (2 + i), pos_add=i)

    def batch_launches(self, rows: int, kv: list, slot_stride: int) -> list:
        """Every launch of one batched decode step over slots 0..rows-1 (rows: a bucket), slot
        i's caches at kv[layer] + i * slot_stride (h16 elements). One row runs the fused M = 1
        kernels, slot 0 at its own position."""
        b, S = self.buf, self.slots
        pos, token, token_out = b["bctl"], b["bctl"] + 4 * S, b["bctl"] + 8 * S
        if rows == 1:
            return self._fused(kv, pos, token, token_out, pos_add=0, slot_stride=slot_stride)
        return self._bucket_launches(rows, kv, slot_stride, pos, token, token_out)

    def _attention(self, kc: int, vc: int, pos: int, pos_add: int, slot_stride: int, rows: int):
        b = self.buf
        att = AttnArgs(q=b["q"], k_cache=kc, v_cache=vc, pos=pos, part_o=b["part_o"], part_ml=b["part_ml"],
                       out=b["attn"], counter=b["att_counter"], pos_add=pos_add, max_seq=self.max_context,
                       chunk=self.chunk, splits=self.splits, slot_stride=slot_stride)
        names = [n for n in ("attention", "attention_merge") if n in self.kernels]
        return attention_launches({n: self.kernels[n][0] for n in names}, {n: self.kernels[n][1] for n in names},
                                  self.shapes.kv_heads, self.splits, rows, att, self.pdl)

    def _fused(self, kv: list, pos: int, token: int, token_out: int, pos_add: int, slot_stride: int = 0) -> list:
        """The M = 1 step: each norm fused into the GEMV after it (the kernels' prologues)."""
        b, w = self.buf, self.w
        x = (b["x0"], b["x1"])
        out = []
        for layer, lw in enumerate(self.wmap["layers"]):
            kc, vc = kv[layer]
            qkv = dict(self._linear(lw["qkv"]), norm_x=w[lw["input_norm"]], x_out=x[1], q=b["q"],
                       k_cache=kc, v_cache=vc, rope=b["rope"], pos=pos, pos_add=pos_add, slot_stride=slot_stride)
            if layer == 0:
                out.append(self._gemv("qkv_first", embed=w[self.wmap["embed"]], tokens=token, **qkv))
            else:
                prev = self.wmap["layers"][layer - 1]
                out.append(self._gemv("qkv", x_in=x[0], y_in=b["mlp"], norm_y=w[prev["post_mlp_norm"]], **qkv))
            out += self._attention(kc, vc, pos, pos_add, slot_stride, 1)
            out.append(self._gemv("o_proj", y_in=b["attn"], y=b["o"], **self._linear(lw["o"])))
            out.append(self._gemv("gate_up", x_in=x[1], y_in=b["o"], norm_y=w[lw["post_attn_norm"]],
                                  norm_x=w[lw["pre_mlp_norm"]], x_out=x[0], act=b["act"], **self._linear(lw["gate_up"])))
            out.append(self._gemv("down", h_in=b["act"], y=b["mlp"], **self._linear(lw["down"])))
        last = self.wmap["layers"][-1]
        out.append(self._gemv("lm_head", x_in=x[0], y_in=b["mlp"], norm_y=w[last["post_mlp_norm"]],
                              norm_x=w[self.wmap["norm"]], x_out=x[1], y=b["logits"], part_val=b["part_val"],
                              part_idx=b["part_idx"], counter=b["counter"], token_out=token_out,
                              **self._linear(self.wmap["lm_head"])))
        return out

    def _norm(self, name: str, rows: int, **fields):
        spec, handle = self.kernels[name]
        a = GemvArgs(eps=self.cfg.rms_norm_eps, max_seq=self.max_context, act=self.buf["h"], **fields)
        return handle, (rows,), spec.threads, 0, a, self.pdl

    def _bucket_launches(self, rows: int, kv: list, slot_stride: int, pos: int, token: int, token_out: int) -> list:
        """A batched step of rows > 1: each norm once per row (row_norm, row_embed), then the
        bucket's GEMVs on its fp16 output."""
        b, w, h = self.buf, self.w, self.buf["h"]
        x = (b["x0"], b["x1"])
        name = lambda n: bucket_name(n, rows)                                     # noqa: E731
        out = []
        for layer, lw in enumerate(self.wmap["layers"]):
            kc, vc = kv[layer]
            if layer == 0:
                out.append(self._norm("row_embed", rows, embed=w[self.wmap["embed"]], tokens=token,
                                      norm_x=w[lw["input_norm"]], x_out=x[1]))
            else:
                prev = self.wmap["layers"][layer - 1]
                out.append(self._norm("row_norm", rows, x_in=x[0], y_in=b["mlp"], norm_y=w[prev["post_mlp_norm"]],
                                      norm_x=w[lw["input_norm"]], x_out=x[1]))
            out.append(self._gemv(name("qkv"), h_in=h, q=b["q"], k_cache=kc, v_cache=vc, rope=b["rope"], pos=pos,
                                  slot_stride=slot_stride, **self._linear(lw["qkv"])))
            out += self._attention(kc, vc, pos, 0, slot_stride, rows)
            out.append(self._gemv(name("o_proj"), y_in=b["attn"], y=b["o"], **self._linear(lw["o"])))
            out.append(self._norm("row_norm", rows, x_in=x[1], y_in=b["o"], norm_y=w[lw["post_attn_norm"]],
                                  norm_x=w[lw["pre_mlp_norm"]], x_out=x[0]))
            out.append(self._gemv(name("gate_up"), h_in=h, act=b["act"], **self._linear(lw["gate_up"])))
            out.append(self._gemv(name("down"), h_in=b["act"], y=b["mlp"], **self._linear(lw["down"])))
        last = self.wmap["layers"][-1]
        out.append(self._norm("row_norm", rows, x_in=x[0], y_in=b["mlp"], norm_y=w[last["post_mlp_norm"]],
                              norm_x=w[self.wmap["norm"]], x_out=x[1]))
        out.append(self._gemv(name("lm_head"), h_in=h, y=b["logits"], part_val=b["part_val"], part_idx=b["part_idx"],
                              counter=b["counter"], token_out=token_out, **self._linear(self.wmap["lm_head"])))
        return out

    def free(self) -> None:
        for p in self.buf.values():
            self.device.free(p)
        self.buf.clear()
