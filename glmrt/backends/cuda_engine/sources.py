"""The engine's CUDA C: the kernel files shipped in kernels/, one model's shapes as compile-time
constants, and the kernel instances one decode step launches, assembled into ONE translation
unit. NVRTC compiles it per GPU architecture (nvrtc.py); the tests compile the same text as C++
for their CPU emulation (tests/cuda_emu/).

Every instance is an `extern "C"` kernel taking one argument struct (GemvArgs or AttnArgs,
mirrored by args.py) and calling a template with its shapes and launch parameters fixed, so
the compiler sees every loop bound: the engine is compiled for one model on one GPU.
"""
from __future__ import annotations

import dataclasses
import hashlib
from importlib import resources

KERNEL_FILES = ("common.cuh", "gemv.cu", "attention.cu")

# int4_a8: int4's bytes, x quantized to int8 per 32 values (the dp4a GEMV, kernels/gemv.cu);
# int4_mma: int4's bytes and fp16 x on the tensor cores (gemv_mma)
# fp8: e4m3 weights (n, k) with one fp16 scale per row (the export's fp8-rows form); bf16: (n, k)
FORMATS = {"int4": "W_INT4", "f16": "W_F16", "f16_kn": "W_F16_KN", "int4_a8": "W_INT4_A8", "int4_mma": "W_INT4_MMA",
           "f16_kn_mma": "W_F16_KN_MMA", "fp8": "W_FP8", "bf16": "W_BF16", "int8": "W_INT8"}
KN_MMA_TILE = 32               # columns per tile of the W^T GEMV on the tensor cores
INT4_FORMATS = ("int4", "int4_a8", "int4_mma")
NBITS_FORMATS = INT4_FORMATS + ("int8",)     # MatMulNBits: rows in blocks along K, a scale each
NK_FORMATS = ("int4", "int4_a8", "f16", "fp8", "bf16", "int8")   # gemv_nk's: (n, k) rows, 16-byte units per lane
MMA_ROWS = 16                  # output rows of one warp's mma (m16n8k16)
PROLOGUES = {"f16": "PRO_F16", "f32": "PRO_F32", "add_norm": "PRO_ADD_NORM", "embed_norm": "PRO_EMBED_NORM",
             "embed_norm_bf16": "PRO_EMBED_NORM_BF16"}
EPILOGUES = {"store": "EPI_STORE", "qkv": "EPI_QKV", "swiglu": "EPI_SWIGLU", "argmax": "EPI_ARGMAX"}
KN_TILE = 256                  # columns per tile of the W^T GEMV (32 lanes x 8 values)


def entry(name: str, args: str, call: str, threads: int, min_blocks: int | None = None) -> str:
    """One kernel instance: an extern "C" entry point of `threads` threads a block (at least
    `min_blocks` resident per SM, when given) taking its argument struct by value and calling a
    template with everything fixed."""
    bounds = f"{threads}, {min_blocks}" if min_blocks is not None else f"{threads}"
    return f'extern "C" __global__ void __launch_bounds__({bounds}) {name}(const {args} a) {{ {call} }}\n'


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the kernels are compiled for (from the model's GlmConfig)."""
    hidden: int          # H
    inter: int           # I
    heads: int           # NH
    kv_heads: int        # NKV
    head_dim: int        # HD
    rot: int             # rotary dims of each head (partial RoPE)
    vocab: int           # V

    @classmethod
    def from_config(cls, cfg) -> "Shapes":
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                   cfg.num_key_value_heads, cfg.head_dim, cfg.rotary_dim, cfg.vocab_size)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def qkv(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def source(self) -> str:
        return ("struct Cfg {\n"
                f"  static constexpr int H = {self.hidden}, I = {self.inter}, NH = {self.heads}, "
                f"NKV = {self.kv_heads}, HD = {self.head_dim}, ROT = {self.rot}, V = {self.vocab};\n"
                "};\n")


@dataclasses.dataclass(frozen=True)
class Gemv:
    """One GEMV kernel: y (m, n) = x (m, k) W^T in weight format `fmt` (int4 block `block`,
    f16 as (n, k), f16_kn as (k, n), fp8 as (n, k) with a scale per row), prologue `pro`, epilogue `epi`, and its launch shape:
    `warps` warps, `rpw` rows per warp, `unroll` 16-byte units in flight per lane and row
    (f16_kn: rows of W^T in flight per warp). int4_mma: each warp owns 16 rows, `ksplit`
    warps share them (splitting K), and rpw is unused."""
    name: str
    fmt: str
    k: int
    n: int
    pro: str
    epi: str
    block: int = 32
    m: int = 1
    warps: int = 8
    rpw: int = 2
    unroll: int = 4
    min_blocks: int = 1      # __launch_bounds__' minimum resident blocks per SM (caps registers)
    hsum: int = 1            # int4 with fp16 x: 32-bit words whose products are summed in half2 before fp32
    ksplit: int = 1          # int4_mma: warps sharing a group of 16 rows
    stages: int = 0          # NK formats: 0 two register stages, S >= 2 a cp.async ring of S in shared memory

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def rows(self) -> int:
        """Output rows per tile."""
        if self.fmt == "int4_mma":
            return MMA_ROWS * (self.warps // self.ksplit)
        if self.fmt == "f16_kn_mma":
            return KN_MMA_TILE
        return KN_TILE if self.fmt == "f16_kn" else self.warps * self.rpw

    def tiles(self, shapes: Shapes) -> int:
        if self.epi == "swiglu":
            return -(-shapes.inter // (self.rows // 2))
        return -(-self.n // self.rows)

    @property
    def kp(self) -> int:
        """K as stored: int4 rows are padded to whole blocks."""
        return -(-self.k // self.block) * self.block if self.fmt in NBITS_FORMATS else self.k

    @property
    def smem(self) -> int:
        """Dynamic shared memory per block: x staged as fp16 (and the f16_kn partial sums), then
        with `stages` the warps' rings (kernels/gemv.cu RingSlot: a lane's 16-byte unit per unit
        and row, and the 4-byte word of its scale where the format has scales)."""
        per = 20 if self.fmt in ("int4", "int4_a8", "fp8", "int8") else 16
        ring = self.warps * self.stages * self.unroll * self.rpw * 32 * per
        if self.fmt == "int4":
            return self.m * (self.kp // 32) * 80 + ring
        if self.fmt == "int4_mma":
            return self.m * (self.kp // 32) * 64
        if self.fmt == "int4_a8":
            return self.m * (self.kp // 32) * 48 + ring
        if self.fmt in ("f16", "fp8", "bf16", "int8"):
            return self.m * self.k * 2 + ring
        if self.fmt == "f16_kn_mma":
            return self.m * self.k * 2
        return self.m * self.k * 2 + self.warps * KN_TILE * self.m * 4

    def instance(self) -> str:
        if self.fmt == "f16_kn_mma":
            call = (f"gemv_kn_mma<Cfg, {self.k}, {self.n}, {self.m}, {self.warps}, {self.unroll}, "
                    f"{PROLOGUES[self.pro]}, {EPILOGUES[self.epi]}>(a);")
        elif self.fmt == "int4_mma":
            call = (f"gemv_mma<Cfg, {self.block}, {self.k}, {self.n}, {self.m}, {self.warps}, {self.ksplit}, "
                    f"{self.unroll}, {PROLOGUES[self.pro]}, {EPILOGUES[self.epi]}>(a);")
        elif self.fmt == "f16_kn":
            call = (f"gemv_kn<Cfg, {self.k}, {self.n}, {self.m}, {self.warps}, {self.unroll}, "
                    f"{PROLOGUES[self.pro]}, {EPILOGUES[self.epi]}>(a);")
        else:
            call = (f"gemv_nk<Cfg, {FORMATS[self.fmt]}, {self.block}, {self.k}, {self.n}, {self.m}, "
                    f"{self.warps}, {self.rpw}, {self.unroll}, {PROLOGUES[self.pro]}, {EPILOGUES[self.epi]}, "
                    f"{self.hsum}, {self.stages}>(a);")
        return entry(self.name, self.args, call, self.threads, self.min_blocks)

    args = "GemvArgs"


@dataclasses.dataclass(frozen=True)
class Attention:
    """The decode attention kernel: `threads` per block, `heads_per_block` of a KV head's
    `group` query heads per block, the context read `tile` positions at a time and split
    over the grid's y (kernels/attention.cu). `mma`: the tensor-core kernel (attention_mma),
    a block taking the whole group (heads_per_block ignored); `spread`: its splits merged by
    attention_merge (AttentionMerge), a block per query head, not by the last split;
    `merge_group` (mma, not spread): 0, the last split merges them all; else in two levels, the
    last of each merge_group splits, then the last of those."""
    name: str
    head_dim: int
    group: int
    threads: int = 128
    heads_per_block: int = 0     # 0: the whole group (a divisor of it otherwise)
    tile: int = 32
    mma: bool = False
    spread: bool = False
    merge_group: int = 0

    @property
    def hpb(self) -> int:
        if self.mma:
            return self.group
        hpb = self.heads_per_block or self.group
        if self.group % hpb:
            raise ValueError(f"attention: {hpb} query heads per block do not divide the group of {self.group}")
        return hpb

    def blocks_x(self, kv_heads: int) -> int:
        """The grid's x: one block per (KV head, query group)."""
        return kv_heads * (self.group // self.hpb)

    def counters(self, kv_heads: int) -> int:
        """The merge's counters a row (AttnArgs.counter, zero between launches): one per block of
        the grid's x, and with two levels ATT_MAX_SPLITS more each (one per first-level group)."""
        return self.blocks_x(kv_heads) * (1 + (ATT_MAX_SPLITS if self.merge_group else 0))

    @property
    def smem(self) -> int:
        return 0

    def instance(self) -> str:
        if self.mma:
            call = (f"attention_mma<{self.head_dim}, {self.group}, {self.threads}, {self.tile}, "
                    f"{'true' if self.spread else 'false'}, {self.merge_group}>(a);")
        else:
            call = f"attention<{self.head_dim}, {self.group}, {self.hpb}, {self.threads}, {self.tile}>(a);"
        # the tensor-core kernel runs one block an SM by design: min_blocks 1 lets it take the
        # registers it needs (without it NVRTC 13.5 held GLM-Z1-9B's instance to 128 on sm_80
        # and spilled 52 bytes once the merge became att_fold)
        return entry(self.name, self.args, call, self.threads, 1 if self.mma else None)

    args = "AttnArgs"


ATT_MAX_SPLITS = 128           # kernels/attention.cu: the splits one merge takes


def mma_attention_fits(head_dim: int, group: int, threads: int, tile: int) -> bool:
    """Whether attention_mma compiles for these shapes: its static_asserts, mirrored (head_dim
    a multiple of 32, warps and 16-head m-tiles dividing one another, the tile's K/V rows or the
    warps' sum of O under 46 KB of static shared memory). Where not, the CUDA-core kernel runs."""
    if head_dim % 32 or tile % 16 or threads % 32 or tile <= 0 or threads <= 0:
        return False
    warps, mt = threads // 32, -(-group // 16)
    if warps % mt and mt % warps:
        return False
    wpm, nsl = (warps // mt if warps > mt else 1), tile // 16
    pgs = min(wpm, nsl)
    if nsl % pgs or wpm % pgs:
        return False
    rw = head_dim // 8
    rwp = rw if rw % 8 else rw + 4
    return max(2 * tile * rwp, mt * 16 * (head_dim + 4) // 4) * 16 <= 46 * 1024


def merge_threads(head_dim: int) -> int:
    """attention_merge's block: split groups of head_dim / 8 threads, about 128 in all."""
    return head_dim // 8 * max(1, 128 // (head_dim // 8))


@dataclasses.dataclass(frozen=True)
class AttentionMerge:
    """The splits' merge of a spread attention (kernels/attention.cu attention_merge): a block
    of `threads` per query head; `tile` is the attention's (the same chunk rule)."""
    name: str
    head_dim: int
    group: int
    threads: int = 128
    tile: int = 32

    def blocks_x(self, kv_heads: int) -> int:
        return kv_heads * self.group

    @property
    def smem(self) -> int:
        return 0

    def instance(self) -> str:
        return entry(self.name, self.args, f"attention_merge<{self.head_dim}, {self.group}, {self.threads}, "
                                            f"{self.tile}>(a);", self.threads)

    args = "AttnArgs"


@dataclasses.dataclass(frozen=True)
class RowNorm:
    """The norms of a batched step, one block per row (kernels/gemv.cu norm_rows): `pro`
    add_norm (the sandwich norm's residual add) or embed_norm (layer 0's embedding row)."""
    name: str
    pro: str
    threads: int = 256

    @property
    def smem(self) -> int:
        return 0

    def instance(self) -> str:
        return entry(self.name, self.args, f"norm_rows<Cfg, {PROLOGUES[self.pro]}, {self.threads}>(a);", self.threads)

    args = "GemvArgs"


@dataclasses.dataclass(frozen=True)
class Stub:
    """An empty kernel taking another kernel's argument struct, launched in its place with its
    grid, threads and shared memory: timing a decode step without that kernel's work."""
    name: str
    args: str
    threads: int
    smem: int = 0

    def instance(self) -> str:
        return f'extern "C" __global__ void {self.name}(const {self.args} a) {{ }}\n'


def kernel_text() -> str:
    """The shipped kernel files, in order (the code every engine is compiled from)."""
    folder = resources.files(__package__) / "kernels"
    return "".join(f"// ---- {name}\n" + (folder / name).read_text(encoding="utf-8") for name in KERNEL_FILES)


def translation_unit(shapes: Shapes, kernels: list) -> str:
    """The whole source NVRTC compiles: kernel files, the model's constants, the instances,
    and (for the CPU emulation only) the table of kernels by name."""
    names = [k.name for k in kernels]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate kernel names in {names}")
    emu = "".join(f"EMU_KERNEL({k.name}, {k.args})\n" for k in kernels)
    return (kernel_text() + "// ---- this model\n" + shapes.source()
            + "".join(k.instance() for k in kernels)
            + "#ifdef GLMRT_EMULATE\nstd::vector<EmuKernel>& emu_kernels() {\n"
            + "  static std::vector<EmuKernel> k = {\n" + emu + "  };\n  return k;\n}\n#endif\n")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


SMOKE = r"""
struct SmokeArgs { float* x; int n; };
extern "C" __global__ void smoke(const SmokeArgs a) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < a.n) a.x[i] = 2.f * a.x[i] + 1.f;
}
#ifdef GLMRT_EMULATE
std::vector<EmuKernel>& emu_kernels() {
  static std::vector<EmuKernel> k = { EMU_KERNEL(smoke, SmokeArgs) };
  return k;
}
#endif
"""
