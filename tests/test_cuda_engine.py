"""glmrt's cuda engine without a GPU: every kernel compiles with NVRTC for every architecture it
targets; the host-side formats (int4 addressing, the x staging order, RoPE pairs, argument
structs) against numpy and the exporter; every kernel, and the whole engine, run in the CPU
emulation (tests/cuda_emu) against numpy and the float64 reference; the builder writes a valid
engine for a named GPU; loading refuses what it must, in one line. On a machine with an NVIDIA
GPU and driver, the `cudaengine` tests run the same checks on the device."""
import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import glmrt
from glmrt import reference
from glmrt.backends.cuda_engine import nvrtc, selfcheck
from glmrt.backends.cuda_engine.args import STRUCTS
from glmrt.backends.cuda_engine.sources import Gemv, Shapes, translation_unit
from glmrt.backends.cuda_engine.step import DEFAULT_CONFIG, GEMV, Formats, decode_kernels, engine_kernels, rope_table
from glmrt.config import GlmConfig
from glmrt.engine import check_cuda_engine, find_cuda_engine, read_engine
from glmrt.engines.build import build
from glmrt.errors import ArtifactError, GlmrtError
from glmrt.export.quant import MatMulNBits, pack_nibbles

sys.path.insert(0, str(Path(__file__).parent))
from cuda_emu.emulator import EmulatedDevice, break_kernels  # noqa: E402
from cuda_emu.marks import HAS_NVRTC, needs_cxx, needs_nvrtc  # noqa: E402
from pinned import pinned_site  # noqa: E402


def has_gpu() -> bool:
    try:
        from glmrt.backends.cuda_engine.device import CudaDevice
        CudaDevice()
        return True
    except GlmrtError:
        return False


GPU = 0 if not HAS_NVRTC else has_gpu()
needs_gpu = pytest.mark.skipif(not GPU, reason="no NVIDIA GPU and driver here")

Z1_9B = Shapes(4096, 13696, 32, 2, 128, 64, 151552)
G4_32B = Shapes(6144, 23040, 48, 2, 128, 64, 151552)
SMALL = Shapes(128, 384, 4, 2, 32, 16, 1024)           # the "quant" test checkpoint's shapes
FORMATS = {"int4-b32": Formats("int4", 32, "f16_kn"), "int4-b128-lmhead": Formats("int4", 128, "int4"),
           "fp16": Formats("f16", 32, "f16"), "fp8": Formats("fp8", 32, "f16_kn"),
           "bf16": Formats("bf16", 32, "bf16"), "fp8-lmhead": Formats("fp8", 32, "fp8"),
           "int4-a8-b32": Formats("int4", 32, "f16_kn", "int8"), "int4-a8-b128-lmhead": Formats("int4", 128, "int4", "int8"),
           "int4-b32-lmhead8": Formats("int4", 32, "int8")}


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# every int4 GEMV on the tensor cores (the launch knob step.GEMV["mma"]), 2 warps sharing 16 rows,
# one unit of each of 4 lanes a step: at the test shapes' K (128 to 416) the warps split K for real
MMA = {**DEFAULT_CONFIG, **{r: {**GEMV, "mma": True, "ksplit": 2, "unroll": 1}
                            for r in ("qkv", "o_proj", "gate_up", "down", "lm_head")}}


# ---- NVRTC: every kernel, every architecture ----------------------------------------------------
@pytest.fixture(scope="module")
def compiled_for_every_arch():
    """One translation unit with every format and epilogue at GLM-Z1-9B's shapes (the fp16 and
    int4-lm_head variants renamed beside the default int4 set), compiled for every
    architecture at once (NVRTC runs outside the GIL)."""
    from concurrent.futures import ThreadPoolExecutor
    ks = decode_kernels(Z1_9B, FORMATS["int4-b32"])
    for tag, f in (("f16", FORMATS["fp16"]), ("b128", FORMATS["int4-b128-lmhead"]),
                   ("a8", FORMATS["int4-a8-b128-lmhead"]), ("fp8", FORMATS["fp8"]), ("bf16", FORMATS["bf16"])):
        ks += [Gemv(**{**vars(k), "name": f"{k.name}_{tag}"}) for k in decode_kernels(Z1_9B, f) if isinstance(k, Gemv)]
    # the int8 lm_head (export --lm-head int8) at M = 1 and in an 8-row batched step
    ks += [Gemv(**{**vars(k), "name": f"{k.name}_{tag}"}) for tag, rows in (("i8", 1), ("i8_rows", 8))
           for k in decode_kernels(Z1_9B, FORMATS["int4-b32-lmhead8"], DEFAULT_CONFIG, rows) if k.name.startswith("lm_head")]
    # the tensor-core GEMVs at M = 1 (int4 lm_head too), and an engine for 8 slots' batched kernels
    ks += [Gemv(**{**vars(k), "name": f"{k.name}_mma"}) for k in decode_kernels(Z1_9B, FORMATS["int4-b128-lmhead"], MMA)
           if isinstance(k, Gemv)]
    ks += [k for k in engine_kernels(Z1_9B, FORMATS["int4-b32"], DEFAULT_CONFIG, 8) if k.name not in {x.name for x in ks}]
    ks += [Gemv("lm_head_kn_mma", "f16_kn_mma", Z1_9B.hidden, Z1_9B.vocab, "f16", "argmax", m=8, unroll=4)]
    source = translation_unit(Z1_9B, ks)
    with ThreadPoolExecutor(4) as pool:
        done = dict(zip(nvrtc.ARCHS, pool.map(lambda a: _compile_or_error(source, a), nvrtc.ARCHS)))
    return done, ks


def _compile_or_error(source, arch):
    try:
        return nvrtc.compile_cubin(source, arch)
    except GlmrtError as e:
        return e


@needs_nvrtc
@pytest.mark.parametrize("arch", nvrtc.ARCHS)
def test_every_kernel_compiles_for_every_architecture(compiled_for_every_arch, arch):
    done, ks = compiled_for_every_arch
    compiled = done[arch]
    if isinstance(compiled, Exception):
        raise compiled
    assert compiled.cubin[:4] == b"\x7fELF"
    res = compiled.resources()
    assert set(res) == {k.name for k in ks}
    spills = {n: r["spill_bytes"] for n, r in res.items() if r["spill_bytes"]}
    assert not spills, f"register spills on sm_{arch}: {spills}"


# The cuda extra takes any NVRTC 13 (pyproject: nvidia-cuda-nvrtc>=13): CI's newest is not the only
# one users have (the H200's image had 13.0, which refused a generic lambda 13.5 took). The oldest
# the extra allows, in a package folder of its own (made once, kept in the user's cache).
OLDEST_NVRTC = ("nvidia-cuda-nvrtc==13.0.*", "cuda-bindings==13.0.*", "cuda-pathfinder~=1.1")
OLDEST_RUN = r"""
import ctypes, glob, json, sys
from concurrent.futures import ThreadPoolExecutor
site, path = sys.argv[1:]
# the folder's libnvrtc first: the bindings then use it, not this environment's newer one
for lib in ("libnvrtc-builtins.so.13*", "libnvrtc.so.13*"):
    ctypes.CDLL(glob.glob(site + "/nvidia/cu13/lib/" + lib)[0], mode=ctypes.RTLD_GLOBAL)
from glmrt.backends.cuda_engine import nvrtc
source = open(path).read()

def one(arch):
    try:
        res = nvrtc.compile_cubin(source, arch).resources()
        return {"spills": {n: r["spill_bytes"] for n, r in res.items() if r["spill_bytes"]}, "kernels": len(res)}
    except Exception as e:
        return {"error": str(e)[:3000]}
archs = (80, 89, 90)         # the code paths that differ: sm_80 up, fp8 converts (89), griddepcontrol (90)
with ThreadPoolExecutor(3) as pool:
    out = dict(zip(map(str, archs), pool.map(one, archs)))
print(json.dumps({"version": nvrtc.version(), **out}))
"""


@pytest.fixture(scope="session")
def oldest_nvrtc_site():
    return pinned_site("nvrtc", OLDEST_NVRTC, "nvidia/cu13/lib")


@needs_nvrtc
def test_every_kernel_compiles_with_the_oldest_nvrtc_the_extra_takes(compiled_for_every_arch, oldest_nvrtc_site,
                                                                    tmp_path):
    """The same translation unit as above (every format, epilogue and batched kernel), compiled
    by NVRTC 13.0 for sm_80, 89 and 90: it compiles and holds every kernel. 13.0 spills a few
    bytes where 13.5 does not (8 bytes in the attention on sm_80 and in three 4-row batched
    GEMVs on sm_90): at most 16 bytes a kernel is allowed here."""
    _, ks = compiled_for_every_arch
    path = tmp_path / "engine.cu"
    path.write_text(translation_unit(Z1_9B, ks))
    p = subprocess.run([sys.executable, "-c", OLDEST_RUN, str(oldest_nvrtc_site), str(path)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(oldest_nvrtc_site)}, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out.pop("version") == "13.0"
    assert set(out) == {"80", "89", "90"} and all("error" not in r for r in out.values()), out
    assert all(r["kernels"] == len(ks) and max(r["spills"].values(), default=0) <= 16 for r in out.values()), out


@needs_nvrtc
def test_glm4_32b_shapes_compile_and_fit_shared_memory():
    ks = decode_kernels(G4_32B, FORMATS["int4-b32"])
    compiled = nvrtc.compile_cubin(translation_unit(G4_32B, ks), 90)
    assert compiled.cubin[:4] == b"\x7fELF"
    down = next(k for k in ks if k.name == "down")
    assert down.smem == 23040 // 32 * 80 and down.smem > 48 * 1024      # the attribute path of device.load


@needs_nvrtc
def test_a_compile_error_is_reported_with_nvrtcs_log():
    with pytest.raises(GlmrtError, match=r"NVRTC could not compile the engine for sm_90:\n.*error"):
        nvrtc.compile_cubin('extern "C" __global__ void k() { undefined_thing(); }', 90)


# ---- host-side formats against numpy and the exporter ----------------------------------------
def test_int4_layout_matches_the_exporter_bit_for_bit():
    """selfcheck's MatMulNBits reader (the kernels' addressing, restated in numpy) gives the
    exporter's dequantized weights exactly, K padded to the block included."""
    rng = np.random.default_rng(1)
    for block, k in ((32, 200), (128, 300)):
        w = rng.standard_normal((24, k)).astype(np.float32)
        scheme = MatMulNBits(4, block, True, "float16")
        q = scheme.quantize(w)
        packed = pack_nibbles(q.codes.reshape(24, -1, block))
        np.testing.assert_array_equal(selfcheck.dequant_int4(packed, q.scales, k), scheme.dequantize(q))


def test_the_int4_magic_numbers_give_the_code_minus_8_exactly():
    """kernels/gemv.cu dot_int4: a nibble OR-ed into 0x6400 at bits 0-3 is 1024 + q (minus 1032),
    at bits 4-7 it is 1024 + 16 q (times 0x2C00 = 1/16, plus 0xD480 = -72, one fp16 fma):
    q - 8 for every code, with no rounding."""
    h = lambda bits: np.array([bits], np.uint16).view(np.float16)[0]
    assert float(h(0x2C00)) == 1 / 16 and float(h(0xD480)) == -72.0 and float(h(0x6408)) == 1032.0
    for q in range(16):
        assert float(h(0x6400 | q)) - 1032.0 == q - 8
        hi = float(h(0x6400 | q << 4))                       # exact: 1024 + 16 q
        assert hi == 1024 + 16 * q and np.float16(hi * (1 / 16) - 72.0) == q - 8


def test_the_int4_dot_product_order_matches_the_staged_x():
    """The kernel takes nibbles (word >> 4s) & 0x000F000F, i.e. k = 8j+s and 8j+s+4 of each
    32-value unit, and reads x from shared memory in XLayout<W_INT4>'s pair order: emulated in
    numpy here, the products must be those of the dequantized row with x."""
    rng = np.random.default_rng(2)
    packed, scales = selfcheck.random_int4(rng, 3, 64, 32)
    x = rng.standard_normal(64)
    slot = lambda u, r: u * 40 + 2 * (4 * (r >> 3) + ((r & 7) & 3)) + ((r & 7) >> 2)   # gemv.cu x_word: (v[s], v[s + 4]) pairs
    staged = np.zeros(2 * 40)
    for kk in range(64):
        staged[slot(kk // 32, kk % 32)] = x[kk]
    deq = selfcheck.dequant_int4(packed, scales, 64)
    for n in range(3):
        total = 0.0
        for u in range(2):
            words = packed[n, u].view("<u4")                        # 4 words of 8 nibbles
            for j in range(4):
                for s in range(4):
                    pair = (int(words[j]) >> (4 * s)) & 0x000F000F
                    lo, hi = (pair & 0xF) - 8, (pair >> 16) - 8
                    p = u * 40 + 2 * (4 * j + s)
                    total += (lo * staged[p] + hi * staged[p + 1]) * float(scales[n, u])
        assert total == pytest.approx(deq[n] @ x, rel=1e-12)


@pytest.mark.parametrize("rope_scaling", [None, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}])
def test_rope_pairs_match_the_reference(rope_scaling):
    raw = {"model_type": "glm4", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
           "max_position_embeddings": 4096, "rope_scaling": rope_scaling}
    cfg = GlmConfig.from_hf(raw)
    table = rope_table(cfg, 3000)
    x = np.random.default_rng(3).standard_normal((4, 32))
    for p in (0, 5, 2999):
        want = reference.rope_interleaved(x[:, None, :], np.array([p]), cfg)[:, 0]
        np.testing.assert_allclose(selfcheck.rope(x, table, p, cfg.rotary_dim), want, rtol=2e-6, atol=2e-6)


@needs_cxx
def test_argument_structs_match_the_c_layout():
    """args.py's ctypes mirrors have the C compiler's field offsets and sizes."""
    from cuda_emu.emulator import build as build_emu
    lines = []
    for name, cls in STRUCTS.items():
        fields = [f for f, _ in cls._fields_]
        lines.append(f'extern "C" void layout_{name}(long* o) {{ int i = 0; o[i++] = sizeof({name}); '
                     + " ".join(f"o[i++] = offsetof({name}, {f});" for f in fields) + " }")
    lib = build_emu(translation_unit(SMALL, decode_kernels(SMALL, FORMATS["int4-b32"]))
                    + "#include <cstddef>\n" + "\n".join(lines) + "\n")
    for name, cls in STRUCTS.items():
        out = (ctypes.c_long * (1 + len(cls._fields_)))()
        getattr(lib, f"layout_{name}")(out)
        assert list(out) == [ctypes.sizeof(cls)] + [getattr(cls, f).offset for f, _ in cls._fields_], name


# ---- every kernel in the emulation ----------------------------------------------------------------
@needs_cxx
@pytest.mark.parametrize("formats", FORMATS, ids=str)
def test_every_kernel_passes_its_check_in_the_emulation(formats):
    report = selfcheck.run_checks(EmulatedDevice(sm_count=2), SMALL, FORMATS[formats], max_seq=300, chunk=32, splits=3)
    assert [r["kernel"] for r in report] == list(selfcheck.CHECKS)
    assert all(r["ok"] for r in report), [selfcheck.format_result(r) for r in report if not r["ok"]]


@needs_cxx
@pytest.mark.parametrize("att", [{"heads_per_block": 1, "tile": 32, "threads": 64, "mma": False},
                                 {"heads_per_block": 2, "tile": 64, "threads": 128, "mma": False},
                                 {"heads_per_block": 1, "tile": 64, "threads": 32, "mma": False}], ids=str)
def test_attention_variants_pass_in_the_emulation(att):
    """The CUDA-core attention's variants (query heads per block, tile, threads): each one
    against numpy on one split, several, and grown splits."""
    from glmrt.backends.cuda_engine.step import DEFAULT_CONFIG
    config = {**DEFAULT_CONFIG, "attention": {**DEFAULT_CONFIG["attention"], **att}}
    report = selfcheck.run_checks(EmulatedDevice(sm_count=2), SMALL, FORMATS["int4-b32"], max_seq=300, chunk=32,
                                  splits=3, only=["attention"], config=config)
    assert report[0]["ok"], selfcheck.format_result(report[0])


@needs_cxx
@pytest.mark.parametrize("formats", ["int4-a8-b32", "int4-a8-b128-lmhead", "int4-b32"])
def test_int4_gemvs_with_k_not_a_multiple_of_32_pass_in_the_emulation(formats):
    """Hidden and intermediate sizes that leave a partial 32-value unit (and a partial block):
    the padding of staged x (quantized to zeros with int8 x) adds nothing."""
    odd = Shapes(136, 392, 4, 2, 32, 16, 1024)
    report = selfcheck.run_checks(EmulatedDevice(sm_count=2), odd, FORMATS[formats], max_seq=300, chunk=32,
                                  splits=3, only=["qkv_first", "qkv", "o_proj", "gate_up", "down", "lm_head"])
    assert len(report) == 6 and all(r["ok"] for r in report), [selfcheck.format_result(r) for r in report]


@needs_cxx
@pytest.mark.parametrize("hsum", [1, 4])
def test_int4_gemvs_summing_more_words_in_half2_pass_in_the_emulation(hsum):
    """hsum other than the default 2 (words of products summed in half2 before fp32): every int4
    GEMV against numpy under the same bar."""
    from glmrt.backends.cuda_engine.step import DEFAULT_CONFIG, GEMV
    config = {**DEFAULT_CONFIG, **{r: {**GEMV, "hsum": hsum} for r in ("qkv", "o_proj", "gate_up", "down", "lm_head")}}
    report = selfcheck.run_checks(EmulatedDevice(sm_count=2), SMALL, FORMATS["int4-b128-lmhead"], max_seq=300,
                                  chunk=32, splits=3, config=config, only=["qkv", "o_proj", "gate_up", "down", "lm_head"])
    assert len(report) == 5 and all(r["ok"] for r in report), [selfcheck.format_result(r) for r in report]
    # only int4 with fp16 x sums in half2: the other formats' instances keep hsum 1
    ks = decode_kernels(SMALL, FORMATS["int4-a8-b32"], config) + decode_kernels(SMALL, FORMATS["fp16"], config)
    assert {k.hsum for k in ks if isinstance(k, Gemv)} == {1}


RING_SHAPES = Shapes(128, 1056, 4, 2, 32, 16, 1024)    # down's rows: 33 units, two steps of 32 lanes


@needs_cxx
@pytest.mark.parametrize("formats,stages,unroll,landing,shapes", [
    ("int4-b32", 2, 2, "late", SMALL), ("int4-b32", 3, 1, "early", RING_SHAPES),
    ("int4-a8-b128-lmhead", 3, 1, "early", SMALL), ("fp8-lmhead", 3, 1, "late", SMALL),
    ("bf16", 3, 1, "early", SMALL), ("fp16", 4, 1, "late", RING_SHAPES)], ids=str)
def test_gemvs_with_a_shared_memory_ring_pass_in_the_emulation(formats, stages, unroll, landing, shapes):
    """The launch knob stages: every GEMV on (n, k) rows (int4 with fp16 or int8 x, fp8 with its
    row scales, bf16, fp16) takes its weights through a cp.async ring of that many stages in
    shared memory, and passes against numpy, a block's items running over tiles and over steps
    of a row. The emulation lands a copy at the wait that completes it ("late": a stage read
    before its wait reads NaN bytes) or as it is issued ("early": a copy into a slot still to be
    read overwrites it), refuses one outside the block's dynamic shared memory (a ring larger than
    Gemv.smem) or from a misaligned source; the mutations "ring waits for its stage" and "ring
    slot reused early" below must fail. Also compiles for the GPU."""
    roles = ("qkv", "o_proj", "gate_up", "down", "lm_head")
    config = {**DEFAULT_CONFIG, **{r: {**GEMV, "stages": stages, "unroll": unroll, "blocks_per_sm": 1} for r in roles}}
    report = selfcheck.run_checks(EmulatedDevice(sm_count=2, async_landing=landing), shapes, FORMATS[formats],
                                  max_seq=300, chunk=32, splits=3, config=config, only=["qkv_first", *roles])
    assert len(report) == 6 and all(r["ok"] for r in report), [selfcheck.format_result(r) for r in report]
    ks = [k for k in decode_kernels(shapes, FORMATS[formats], config) if isinstance(k, Gemv)]
    assert {k.name for k in ks if k.stages} >= {"qkv", "o_proj", "gate_up", "down"}
    if HAS_NVRTC and formats == "int4-b32":
        assert nvrtc.compile_cubin(translation_unit(shapes, ks), 80).cubin


def test_freed_frees_and_reports_the_first_failure():
    """device.freed: the memory is freed on the way out; a failure to free is raised, unless
    another failure is already on its way out (the one to report, e.g. a fault that lost the
    context, after which freeing fails too)."""
    from glmrt.backends.cuda_engine.device import freed

    class Held:
        def __init__(self, fails):
            self.fails, self.freed = fails, 0

        def free(self):
            self.freed += 1
            if self.fails:
                raise GlmrtError("cuMemFree: CUDA_ERROR_ILLEGAL_ADDRESS")
    ok = Held(False)
    with freed(ok) as x:
        assert x is ok
    assert ok.freed == 1
    bad = Held(True)
    with pytest.raises(ValueError, match="the first"):
        with freed(bad):
            raise ValueError("the first")
    assert bad.freed == 1
    with pytest.raises(GlmrtError, match="cuMemFree"):
        with freed(Held(True)):
            pass


def test_tuning_keeps_a_faster_candidate_and_leaves_the_batched_kernels_alone():
    """tune(): coordinate descent over the candidates with the step's time; a candidate is kept
    only when faster by more than the margin, as first timed and again beside the best; one that
    does not compile or fit is dropped and reported, any other failure stops the tuning in one
    line; a role's tuned knobs never reach the batched steps' kernels (pinned under "rows")."""
    from glmrt.backends.cuda_engine.step import engine_kernels
    from glmrt.backends.cuda_engine.tune import CANDIDATES, tune, with_knobs
    times = {("qkv", 2): 96.0, ("o_proj", 2): 99.8, ("qkv", 16): selfcheck.Unfit("does not fit")}

    def measure(c):
        us = 100.0
        for (role, v), t in times.items():
            if c[role].get("unroll" if v == 2 else "warps") == v:
                if isinstance(t, Exception):
                    raise t
                us += t - 100.0
        return us
    config, report = tune(measure, candidates=CANDIDATES)
    assert report["chosen"] == {"qkv": {"unroll": 2, "min_blocks": 3}}            # o_proj's 0.2% is noise
    assert report["base_us"] == 100.0 and report["us"] == 96.0
    assert any("error" in t and t["role"] == "qkv" for t in report["tried"])
    qkv = next(t for t in report["tried"] if t["role"] == "qkv" and t["kept"])
    assert (qkv["again_us"], qkv["best_again_us"]) == (96.0, 100.0)
    # a candidate that launches what the best does is not timed
    _, report = tune(measure, candidates={"lm_head": ({"unroll": 2},)}, same=lambda a, b: True)
    assert report["tried"] == [{"role": "lm_head", "knobs": {"unroll": 2}, "skipped": "launches what the best does"}]
    # faster once, not again: not kept
    flaky = iter([100.0, 90.0, 100.0, 100.0])
    _, report = tune(lambda c: next(flaky), candidates={"qkv": ({"unroll": 2},)})
    assert report["chosen"] == {} and report["tried"][0]["us"] == 90.0 and not report["tried"][0]["kept"]
    # a fault on the GPU: one line naming the candidate

    def fault(c):
        if c["down"].get("unroll") == 2:
            raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS\nmore")
        return 100.0
    with pytest.raises(GlmrtError, match=r"^tuning stopped at down \{'unroll': 2, 'min_blocks': 3\}: "
                                         r"RuntimeError: CUDA_ERROR_ILLEGAL_ADDRESS \(build with --no-tune\)$"):
        tune(fault, candidates=CANDIDATES)
    assert config["qkv"]["unroll"] == 2 and DEFAULT_CONFIG["qkv"]["unroll"] == 4    # the default is not touched
    single = {k.name: k for k in engine_kernels(Z1_9B, FORMATS["int4-b32"], config, slots=8)}
    before = {k.name: k for k in engine_kernels(Z1_9B, FORMATS["int4-b32"], DEFAULT_CONFIG, slots=8)}
    assert (single["qkv"].unroll, single["qkv"].min_blocks) == (2, 3)
    assert all(single[n] == before[n] for n in before if "_b" in n)                  # every bucket's kernel as before
    # the attention's knobs are the attention's own
    assert with_knobs(DEFAULT_CONFIG, "attention", {"chunk": 128})["attention"]["chunk"] == 128
    # a candidate table in the wrong shape fails before anything is timed (session 12 lost a GPU call to
    # a dict written where a one-candidate tuple was meant), as does a knob no kernel has
    for bad in ({"o_proj": ({"unroll": 2, "min_blocks": 3})}, {"down": ({"unrol": 2},)}, {"attention": ({"unroll": 2},)},
                {"qkvv": ({"unroll": 2},)}):
        with pytest.raises(ValueError, match=f"^tuning candidates of {next(iter(bad))}: "):
            tune(lambda c: pytest.fail("timed"), candidates=bad)


@needs_cxx
@pytest.mark.parametrize("rpw", [1, 3, 4])
def test_gemvs_finish_tiles_by_warp_or_by_block_in_the_emulation(rpw):
    """Rows per warp decide who runs a tile's epilogue: a warp alone where it holds whole pairs
    (even rpw: QKV's RoPE pairs, SwiGLU's gate and up rows) or the epilogue is a store, else the
    block. Both ways pass against numpy, and compile for the GPU (an epilogue the instance does not
    take must not be instantiated: rpw 1 failed to compile once)."""
    roles = ("qkv", "o_proj", "gate_up", "down")
    config = {**DEFAULT_CONFIG, **{r: {**GEMV, "rpw": rpw, "blocks_per_sm": 1} for r in roles}}
    report = selfcheck.run_checks(EmulatedDevice(sm_count=2), SMALL, FORMATS["int4-b32"], max_seq=300,
                                  chunk=32, splits=3, config=config, only=list(roles))
    assert len(report) == 4 and all(r["ok"] for r in report), [selfcheck.format_result(r) for r in report]
    if HAS_NVRTC:
        ks = [k for k in decode_kernels(SMALL, FORMATS["int4-b32"], config) if k.name in roles]
        assert nvrtc.compile_cubin(translation_unit(SMALL, ks), 90).cubin


@needs_cxx
@pytest.mark.parametrize("formats,shapes", [("int4-b32", SMALL), ("int4-b128-lmhead", SMALL),
                                            ("int4-b32", Shapes(136, 392, 4, 2, 32, 16, 1024))], ids=str)
def test_int4_gemvs_on_the_tensor_cores_pass_in_the_emulation(formats, shapes):
    """The mma GEMV (every weight dequantized once, x's rows as the mma's N) with each prologue
    and epilogue against numpy, K a multiple of 32 or not; mma.sync runs as a warp collective
    in the emulation (tests/cuda_emu), whose fragment layout the H200 confirmed (session 8)."""
    report = selfcheck.run_checks(EmulatedDevice(sm_count=2), shapes, FORMATS[formats], max_seq=300, chunk=32,
                                  splits=3, config=MMA, only=["qkv_first", "qkv", "o_proj", "gate_up", "down", "lm_head"])
    assert len(report) == 6 and all(r["ok"] for r in report), [selfcheck.format_result(r) for r in report]
    assert "int4_mma" in report[0]["name"]


@needs_cxx
def test_smoke_kernel_runs_in_the_emulation():
    assert selfcheck.smoke(EmulatedDevice())["ok"]


# A check that cannot fail is no check: each mutation breaks one thing a kernel must get right.
MUTATIONS = {
    "int4 nibble order": ("gemv.cu", "pack_h2(v[0], v[4]), pack_h2(v[1], v[5])", "pack_h2(v[0], v[1]), pack_h2(v[4], v[5])", "o_proj"),
    "RoPE sign": ("gemv.cu", "r0 = x0 * c - x1 * s", "r0 = x0 * c + x1 * s", "qkv"),
    "first index on ties": ("common.cuh", "v == bv && i < bi", "v == bv && i > bi", "lm_head"),
    "counter re-armed": ("gemv.cu", "if (tid == 0) *a.counter = 0u;", "", "lm_head"),
    "softmax rescale": ("attention.cu", "float v = acc[o] * corr_s[g];", "float v = acc[o];", "attention"),
    "split merge weights": ("attention.cu", "num.x += w[s] * o.x;", "num.x += o.x;", "attention"),
    "attention counter re-armed": ("attention.cu", "if (tid == 0) a.counter[row * gridDim.x + blockIdx.x] = 0u;", "", "attention"),
    "attention query group": ("attention.cu", "head0 = h * G + (blockIdx.x % QG) * HPB", "head0 = h * G", "attention"),
    "attention grown split": ("attention.cu", "return max(a.chunk, (per + TILE - 1) / TILE * TILE);", "return a.chunk;",
                              "attention"),
    # the check's q and this token's K/V land at the kernel's wait (the emulation's in-flight writes)
    "attention: no wait for the QKV kernel": ("attention.cu", "  grid_wait();                               // q and this token's K, V",
                                              "  //", "attention"),
    "SwiGLU gate and up": ("gemv.cu", "g / (1.f + __expf(-g)) * u", "u / (1.f + __expf(-u)) * g", "gate_up"),
    "ring waits for its stage": ("gemv.cu", "cp_async_wait<STAGES - 1>();", "cp_async_wait<STAGES>();", "down"),
    "ring slot reused early": ("gemv.cu", "return ring[i % STAGES];", "return ring[i % (STAGES - 1)];", "gate_up"),
    "residual add": ("gemv.cu", "if (blockIdx.x == 0) {", "if (false) {", "gate_up"),
    "KV cache position": ("gemv.cu", ": *a.pos + a.pos_add + m;", ": *a.pos + m;", "qkv"),
    # the two register stages swap roles each step: a second step on the first's weights
    "weight stages swapped": ("gemv.cu", "while (advance(cur, nxt) && advance(nxt, cur)) {}",
                              "while (advance(cur, nxt) && advance(cur, nxt)) {}", "down"),
    "int4 1/16 in constant memory": ("gemv.cu", "0x00F000F0u, 0x2C002C00u};", "0x00F000F0u, 0x3C003C00u};", "o_proj"),
}
# the int8 lm_head (W_INT8): its zero point (off by one: the smallest error), the byte pairs' order, the
# staged x's swizzle (blocks of 128 at widths 128 and 512, a zero point of 0, a scale without its 16 and a
# wrong scale index were checked by hand in session 13)
INT8_MUTATIONS = {
    "int8 byte pairs": ("__byte_perm(words[j], 0x64646464u, 0x4342)", "__byte_perm(words[j], 0x64646464u, 0x4243)"),
    "int8 zero point off by one": ("const h16x2 q01 = hfma2(__byte_perm(words[j], 0x64646464u, 0x4140), INT4_MAGIC[2], 0xD480D480u);",
                                   "const h16x2 q01 = hfma2(__byte_perm(words[j], 0x64646464u, 0x4140), INT4_MAGIC[2], 0xD47FD47Fu);"),
    "int8 x not swizzled": ("dot_int8(w[uu][r], xu, fp8_swizzle(u))", "dot_int8(w[uu][r], xu, 0)"),
}


def assert_caught(monkeypatch, mutation: str, snippets: tuple, formats: str, only: list) -> None:
    """One deliberate bug in the kernel source: the checks `only` at the formats FORMATS[formats]
    must not all pass."""
    break_kernels(monkeypatch, *snippets, mutation)
    report = selfcheck.run_checks(EmulatedDevice(sm_count=2), SMALL, FORMATS[formats], max_seq=300,
                                  chunk=32, splits=3, only=only)
    assert not all(r["ok"] for r in report), [selfcheck.format_result(r) for r in report]


@needs_cxx
@pytest.mark.parametrize("mutation", INT8_MUTATIONS)
def test_the_check_catches_a_broken_int8_lm_head(monkeypatch, mutation):
    assert_caught(monkeypatch, mutation, INT8_MUTATIONS[mutation], "int4-b32-lmhead8", ["lm_head"])


# fp8 e4m3 rows (dot_fp8): the bit moves that decode two bytes into a half2, the staged x's swizzle,
# the row scale's 2^8
FP8_MUTATIONS = {
    "fp8 byte order": ("const unsigned t = ((w & 0xFFu) << 8) | ((w & 0xFF00u) << 16);",
                       "const unsigned t = ((w & 0xFFu) << 24) | (w & 0xFF00u);"),
    "fp8 sign": ("const unsigned t = ((w >> 8) & 0xFF00u) | (w & 0xFF000000u);",
                 "const unsigned t = ((w >> 8) & 0x7F00u) | (w & 0x7F000000u);"),
    "fp8 x swizzle": ("xa = xu[swz], xb = xu[swz ^ 1];        // values 0..7", "xa = xu[0], xb = xu[1];        // values 0..7"),
    "fp8 row scale": ("256.f * h2f(a.scales[row])", "h2f(a.scales[row])"),
}
BF16_MUTATIONS = {
    "bf16 halves swapped": ("return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));",
                            "return make_float2(__uint_as_float(v & 0xffff0000u), __uint_as_float(v << 16));"),
    "bf16 embedding read as fp16": ("if (PRO == PRO_EMBED_NORM_BF16) load8_bf16(", "if (false) load8_bf16("),
}


@needs_cxx
@pytest.mark.parametrize("mutation", FP8_MUTATIONS)
def test_the_checks_catch_a_broken_fp8_gemv(monkeypatch, mutation):
    assert_caught(monkeypatch, mutation, FP8_MUTATIONS[mutation], "fp8", ["o_proj", "gate_up"])


@needs_cxx
@pytest.mark.parametrize("mutation", BF16_MUTATIONS)
def test_the_checks_catch_a_broken_bf16_gemv(monkeypatch, mutation):
    assert_caught(monkeypatch, mutation, BF16_MUTATIONS[mutation], "bf16", ["qkv_first", "o_proj"])


def test_the_fp8_table_is_e4m3():
    """The checks' e4m3 decoding table against ml_dtypes' (the exporter's)."""
    import ml_dtypes
    ref = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    assert np.array_equal(selfcheck.E4M3, ref, equal_nan=True)


KN_MMA = {**DEFAULT_CONFIG, "lm_head_kn": {**DEFAULT_CONFIG["lm_head_kn"], "mma": True, "warps": 2, "unroll": 2}}


@needs_cxx
@pytest.mark.parametrize("mutation", [None, "B not transposed", "columns of the wrong lanes"])
def test_the_fp16_wt_gemv_on_the_tensor_cores_passes_and_its_bugs_are_caught(monkeypatch, mutation):
    """The lm_head of batched steps (W^T fp16, movmatrix's transpose feeding mma): logits and the
    first-index argmax with a planted tie against numpy; two deliberate bugs must fail."""
    broken = {"B not transposed": ("mma_16816(d[j], ax, movmatrix_t(lo[j]), movmatrix_t(hi[j]))",
                                   "mma_16816(d[j], ax, lo[j], hi[j])"),
              "columns of the wrong lanes": ("part[(warp * ROWS + 8 * c + 2 * j + e) * M + g]",
                                             "part[(warp * ROWS + 8 * j + 2 * c + e) * M + g]")}
    if mutation:
        break_kernels(monkeypatch, *broken[mutation], mutation)
    report = selfcheck.run_checks(EmulatedDevice(sm_count=2), SMALL, FORMATS["int4-b32"], max_seq=300, chunk=32,
                                  splits=3, config=KN_MMA, only=["lm_head"])
    assert "f16_kn_mma" in report[0]["name"] and report[0]["ok"] == (mutation is None), selfcheck.format_result(report[0])


MMA_MUTATIONS = {
    "mma x swizzle": ("gemv.cu", "xu[j ^ sw]", "xu[j]"),
    "mma A fragment order": ("gemv.cu", "a01[4] = {p0[0], p1[0], p0[1], p1[1]}", "a01[4] = {p0[0], p0[1], p1[0], p1[1]}"),
    "mma scale": ("gemv.cu", "p[1] = hmul2(hfma2((w & INT4_MAGIC[1]) | 0x64006400u, INT4_MAGIC[2], 0xD480D480u), s2);",
                  "p[1] = hfma2((w & INT4_MAGIC[1]) | 0x64006400u, INT4_MAGIC[2], 0xD480D480u);"),
    "mma split-K sum": ("gemv.cu", "sum_parts<KSPLIT, ROWS, M>(part, red);", "sum_parts<1, ROWS, M>(part, red);"),
    # lanes whose own unit is past K leave the loop: the others' mma.sync then runs without them
    # (undefined on a GPU; the emulation reports a deadlock or a divergent warp collective)
    "mma skipped by some lanes": ("gemv.cu", "if (u0 >= U) break;", "if (u0 + c >= U) break;"),
}


@needs_cxx
@pytest.mark.parametrize("mutation", MMA_MUTATIONS)
def test_the_checks_catch_a_broken_tensor_core_gemv(monkeypatch, mutation):
    file, old, new = MMA_MUTATIONS[mutation]
    break_kernels(monkeypatch, old, new, f"{mutation} ({file})")
    odd = Shapes(136, 392, 4, 2, 32, 16, 1024)        # down: 13 units a row, the last chunk partial
    report = selfcheck.run_checks(EmulatedDevice(sm_count=2), odd, FORMATS["int4-b32"], max_seq=300,
                                  chunk=32, splits=3, only=["down"], config=MMA)
    assert not report[0]["ok"], selfcheck.format_result(report[0])


@needs_cxx
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_checks_catch_a_broken_kernel(monkeypatch, mutation):
    file, old, new, kernel = MUTATIONS[mutation]
    break_kernels(monkeypatch, old, new, f"{mutation} ({file})")
    from glmrt.backends.cuda_engine.step import DEFAULT_CONFIG
    # the CUDA-core attention (the fallback where head_dim is not a multiple of 32), 2 query groups
    # one GEMV block per SM: each block takes several tiles, so the weight stages swap roles (the
    # ring's mutations: the weights through a shared-memory ring of 3 stages)
    ring = {"stages": 3, "unroll": 1} if mutation.startswith("ring") else {}
    device = EmulatedDevice(sm_count=2, async_landing="early" if mutation == "ring slot reused early" else "late")
    config = {**DEFAULT_CONFIG, "attention": {**DEFAULT_CONFIG["attention"], "heads_per_block": 1, "mma": False,
                                              "threads": 128},
              **{r: {**DEFAULT_CONFIG[r], "blocks_per_sm": 1, **ring} for r in ("qkv", "o_proj", "gate_up", "down", "lm_head")}}
    report = selfcheck.run_checks(device, SMALL, FORMATS["int4-b32"], max_seq=300,
                                  chunk=32, splits=3, only=[kernel], config=config)
    assert not report[0]["ok"], selfcheck.format_result(report[0])


# ---- the builder, without a GPU -------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_model(exported, tmp_path_factory):
    """A copy of the int4 and fp16 (nk) cuda-form exports of the quant checkpoint, each with an
    engine compiled for an H200 named on the command line."""
    made = {}

    def get(precision="int4", activations=None, **options):
        key = (precision, activations, tuple(sorted(options.items())))
        if key not in made:
            model = tmp_path_factory.mktemp("cuda-engine") / "m"
            shutil.copytree(exported("quant", precision, target="cuda", **options), model)
            build(model, backend="cuda", gpu="NVIDIA H200@sm90", activations=activations)
            made[key] = model
        return made[key]
    return get


@needs_nvrtc
def test_build_without_a_gpu_writes_a_complete_engine(engine_model):
    import onnx
    model = engine_model("int4")
    where = model / "engines" / "nvidia-h200-sm90" / "int4"
    em = read_engine(where)
    assert em["kind"] == "cuda-engine" and em["gpu"] == {"name": "NVIDIA H200", "compute_capability": [9, 0]}
    assert em["nvrtc"] == nvrtc.version() and em["min_driver"] == int(em["nvrtc"].split(".")[0]) * 1000
    assert (where / "engine.cubin").read_bytes()[:4] == b"\x7fELF"
    assert selfcheck.__name__ and em["source_sha256"] == __import__("hashlib").sha256(
        (where / "engine.cu").read_bytes()).hexdigest()
    # fp16 x by default; the cuda target's int4 export carries an 8-bit MatMulNBits lm_head
    assert em["formats"] == {"linear": "int4", "block": 32, "lm_head": "int8", "act": "f16"}
    assert {k["fmt"] for k in em["kernels"] if k["type"] == "gemv"} == {"int4", "int8"}
    assert {k["name"] for k in em["kernels"]} == {"qkv_first", "qkv", "attention", "o_proj", "gate_up", "down",
                                                   "lm_head"}
    assert em["selfcheck"] is None and em["tuned"] is False          # no GPU here: compiled, not checked
    assert list(em["seconds"]) == ["compile"] and em["seconds"]["compile"] > 0
    # the weight index points where ONNX's external data does, and covers every matrix
    g = onnx.load(str(model / "model.onnx"), load_external_data=False).graph
    ext = {t.name: {e.key: e.value for e in t.external_data} for t in g.initializer}
    for name, t in em["weights"]["tensors"].items():
        assert (t["offset"], t["bytes"]) == (int(ext[name]["offset"]), int(ext[name]["length"])), name
    assert len(em["weights"]["layers"]) == 2 and em["weights"]["layers"][1]["qkv"]["bias"] == "layers.1/attn/qkv_proj.bias"


@needs_nvrtc
def test_build_cli_names_a_gpu_and_refuses_an_old_one(exported, tmp_path):
    from click.testing import CliRunner

    from glmrt.cli import main
    model = tmp_path / "m"
    shutil.copytree(exported("quant", "int4", target="cuda"), model)
    r = CliRunner().invoke(main, ["build", str(model), "--backend", "cuda", "--gpu", "Jetson AGX Orin@sm87"])
    assert r.exit_code == 0, r.output
    assert (model / "engines" / "jetson-agx-orin-sm87" / "int4" / "engine.cubin").is_file()
    r = CliRunner().invoke(main, ["build", str(model), "--backend", "cuda", "--gpu", "Tesla T4@sm75"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "int4 needs compute capability 8.0" in r.output


@needs_nvrtc
def test_build_cli_takes_int8_activations_for_int4_only(exported, tmp_path):
    """--activations int8 compiles the int4_a8 GEMVs into the engine and its manifest; on an
    fp16 export, or for another backend, it is one line and exit 2, with nothing written."""
    from click.testing import CliRunner

    from glmrt.cli import main
    model = tmp_path / "m"
    shutil.copytree(exported("quant", "int4", target="cuda"), model)
    r = CliRunner().invoke(main, ["build", str(model), "--backend", "cuda", "--gpu", "NVIDIA H200@sm90",
                                  "--activations", "int8"])
    assert r.exit_code == 0, r.output
    em = read_engine(model / "engines" / "nvidia-h200-sm90" / "int4")
    assert em["formats"]["act"] == "int8"
    assert {k["fmt"] for k in em["kernels"] if k["type"] == "gemv"} == {"int4_a8", "int8"}   # lm_head: 8-bit
    fp16 = tmp_path / "f"
    shutil.copytree(exported("quant", "fp16", target="cuda", float_layout="nk"), fp16)
    r = CliRunner().invoke(main, ["build", str(fp16), "--backend", "cuda", "--gpu", "NVIDIA H200@sm90",
                                  "--activations", "int8"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "int4 weights only" in r.output, r.output
    assert not (fp16 / "engines").exists()
    r = CliRunner().invoke(main, ["build", str(model), "--backend", "onnxruntime", "--device", "cpu",
                                  "--activations", "fp16"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "applies to --backend cuda" in r.output, r.output
    r = CliRunner().invoke(main, ["build", str(model), "--backend", "onnxruntime", "--device", "cpu", "--no-tune"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--no-tune applies to --backend cuda" in r.output, r.output


@needs_nvrtc
@pytest.mark.parametrize("what,export,match", [
    ("concat form", ("int4", "onnxruntime", {}), "export with --target cuda"),
    ("fp16 stored as W^T", ("fp16", "cuda", {}), "export with --float-layout nk"),
    ("int8", ("int8", "cuda", {}), "cuda engines are built for fp16, bf16, int4 or fp8, not int8"),
])
def test_build_refuses_what_the_engine_cannot_read(exported, tmp_path, what, export, match):
    precision, target, options = export
    model = tmp_path / "m"
    shutil.copytree(exported("quant", precision, target=target, **options), model)
    with pytest.raises(GlmrtError, match=match):
        build(model, backend="cuda", gpu="NVIDIA H200@sm90")


@pytest.mark.skipif(GPU, reason="a GPU is here")
def test_build_for_the_gpu_here_without_one_says_how_to_name_one(exported, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(exported("quant", "int4", target="cuda"), model)
    with pytest.raises(GlmrtError, match=r"no NVIDIA GPU found .*--gpu NAME@smXY"):
        build(model, backend="cuda")


# ---- loading: what it refuses, in one line ---------------------------------------------------------
ENGINE = {"kind": "cuda-engine", "gpu": {"name": "NVIDIA H200", "compute_capability": [9, 0]},
          "nvrtc": "13.5", "min_driver": 13000}


@pytest.mark.parametrize("cc,driver,match", [
    ((9, 0), 13000, None), ((9, 0), 13020, None),
    ((8, 9), 13000, r"compiled for sm90 \(NVIDIA H200\), this GPU is sm89; rebuild it here: glmrt build .* --backend cuda"),
    ((9, 0), 12080, r"needs a CUDA 13.0 driver or newer \(compiled by NVRTC 13.5\); this driver supports CUDA 12.8"),
])
def test_loading_refuses_another_compute_capability_or_an_older_driver(tmp_path, cc, driver, match):
    where = tmp_path / "m" / "engines" / "nvidia-h200-sm90" / "int4"
    if match is None:
        check_cuda_engine(ENGINE, cc, driver, where)
        return
    with pytest.raises(ArtifactError, match=match) as e:
        check_cuda_engine(ENGINE, cc, driver, where)
    assert "\n" not in str(e.value)


@needs_nvrtc
def test_the_engine_is_found_by_gpu_name_or_compute_capability(engine_model):
    model = engine_model("int4")
    here = model / "engines" / "nvidia-h200-sm90" / "int4"
    assert find_cuda_engine(model, "int4", "NVIDIA H200", (9, 0)) == here
    assert find_cuda_engine(model, "int4", "NVIDIA H100 80GB HBM3", (9, 0)) == here       # same cubin target
    with pytest.raises(ArtifactError, match=r"no cuda engine for NVIDIA L4 \(sm89\) \(there are engines for "
                                            r"nvidia-h200-sm90\); build one: glmrt build .* --backend cuda"):
        find_cuda_engine(model, "int4", "NVIDIA L4", (8, 9))


@pytest.mark.skipif(GPU, reason="a GPU is here")
def test_loading_without_a_driver_is_one_clear_line(exported, tmp_path):
    from click.testing import CliRunner

    from glmrt.cli import main
    model = exported("quant", "int4", target="cuda")
    r = CliRunner().invoke(main, ["bench", str(model), "--backend", "cuda", "--prompt-lengths", "8",
                                  "--contexts", "16"])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: ") and ("NVIDIA driver" in r.output or "CUDA Python bindings" in r.output)


# ---- the whole engine in the emulation -------------------------------------------------------------
def emulated_decoder(model: Path, **options):
    from glmrt import manifest as manifest_io
    from glmrt.backends.cuda_engine.decoder import CudaDecoder
    man = manifest_io.read(model)
    where = find_cuda_engine(model, man["precision"]["name"], "NVIDIA H200", (9, 0))
    return CudaDecoder(model, man, where, read_engine(where), EmulatedDevice(sm_count=2),
                       max_context=options.pop("max_context", 64), **options)


PROMPT = [5, 17, 250, 3, 99, 42, 7]


@needs_nvrtc
@needs_cxx
@pytest.mark.parametrize("precision,options,tol", [("int4", {}, 3e-3), ("int4", {"activations": "int8"}, 2.5e-2),
                                                  ("fp16", {"float_layout": "nk"}, 3e-3), ("fp8", {}, 3e-3),
                                                  ("fp8", {"quantize_lm_head": True}, 3e-3),
                                                  ("int4", {"lm_head": "int8"}, 3e-3),
                                                  ("bf16", {"float_layout": "nk"}, 3e-3)])
def test_the_engine_follows_the_float64_reference_on_its_own_weights(engine_model, precision, options, tol):
    """Prefill token by token in the engine, then decode steps: logits against the float64
    reference run on the very weights the engine reads (int4 dequantized); fp16 activations
    between the kernels are the only rounding; with --activations int8 (int4 with int8 x per 32
    values) the GEMVs' inputs are quantized too: a looser bar (1.8e-2 measured here). fp8: the
    e4m3 rows times their scales, as the reference reads them; bf16: the checkpoint's values;
    an 8-bit lm_head (export --lm-head int8): its bytes minus 128 times their scales."""
    model = engine_model(precision, **options)
    if options.get("lm_head") == "int8":
        assert read_engine(model / "engines" / "nvidia-h200-sm90" / "int4")["formats"]["lm_head"] == "int8"
    dec = emulated_decoder(model, prefill="engine")
    em = read_engine(dec.engine_path)
    w = selfcheck.dequantized_weights(model, em, dec.cfg)
    ref, cache = reference.forward(dec.cfg, w, PROMPT)
    with dec.generation() as c:
        got = dec.step(np.array([PROMPT]), c, keep=3)
        assert got.shape == (1, 3, dec.cfg.vocab_size) and c.length == len(PROMPT)
        assert rel(got[0], ref[-3:]) < tol
        for token in (11, 300):
            ref, cache = reference.forward(dec.cfg, w, [token], cache)
            assert rel(dec.step(np.array([[token]]), c)[0, -1], ref[-1]) < tol


@needs_nvrtc
@needs_cxx
def test_bursts_graphs_and_onnxruntime_prefill_agree_in_the_emulation(engine_model):
    """The same greedy tokens: ONNX Runtime prefill (CPU provider on the emulated device's host
    memory: the gqa form's KV layout shared with the engine) or the engine's own; bursts of 1
    or 4 steps per graph; graphs or plain launches. A stop token inside a burst ends the text
    where it stands, and the cache limit is the same error as the other forms'."""
    model = engine_model("int4")
    runs = {}
    for name, options in {"ort+graphs": {}, "engine+graphs": {"prefill": "engine"},
                          "ort+plain": {"cuda_graph": False}, "ort+burst1": {"burst": 1}}.items():
        dec = emulated_decoder(model, burst=options.pop("burst", 4), **options)
        with dec.generation() as c:
            tokens = [dec.step_greedy(np.array([PROMPT]), c)]
            while len(tokens) < 9:
                tokens += dec.greedy_burst(tokens[-1], c, min(dec.caps.burst, 9 - len(tokens)))
            assert c.length == len(PROMPT) + 8
        runs[name] = tokens
        assert dec.describe()["settings"]["prefill"] == ("engine" if name.startswith("engine") else "onnxruntime")
    assert len({tuple(t) for t in runs.values()}) == 1, runs
    from glmrt.generate import Generation, run
    from glmrt.sampling import SamplingParams
    dec = emulated_decoder(model, burst=4)
    stop = runs["ort+graphs"][5]
    res = Generation([])
    out = list(run(dec, frozenset({stop}), np.array(PROMPT), SamplingParams(), 20, res))
    assert out == runs["ort+graphs"][:runs["ort+graphs"].index(stop)] and res.finish_reason == "stop"
    with dec.generation() as c:
        dec.step(np.array([[5] * 62]), c)
        with pytest.raises(GlmrtError, match="exceed the cache of 64 positions"):
            dec.greedy_burst(3, c, 3)


# ---- on a GPU --------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.cudaengine
@pytest.mark.parametrize("formats", FORMATS, ids=str)
def test_every_kernel_passes_its_check_on_the_gpu(formats):
    from glmrt.backends.cuda_engine.device import CudaDevice
    report = selfcheck.run_checks(CudaDevice(), Z1_9B, FORMATS[formats])
    assert all(r["ok"] for r in report), [selfcheck.format_result(r) for r in report if not r["ok"]]


@needs_nvrtc
@needs_cxx
@pytest.mark.parametrize("precision,options", [("int4", {}), ("fp16", {"float_layout": "nk"}), ("fp8", {}),
                                               ("bf16", {"float_layout": "nk"})], ids=["int4", "fp16", "fp8", "bf16"])
def test_shared_weights_are_the_engines_own_memory(engine_model, precision, options):
    """weights="shared" (the default): ONNX Runtime's prefill session is given the engine's buffers
    (DLPack OrtValues, add_initializer) and computes with them: zero the embedding in the
    engine's memory and every prompt prefills to the same logits; the engine's decode tokens
    are those of its own copy. fp8 and bf16 tensors are the exception (DLPack has no fp8 or bf16
    type ONNX Runtime reads): ONNX Runtime loads those itself, and takes every other tensor."""
    model = engine_model(precision, **options)
    own = emulated_decoder(model, burst=4, weights="engine")
    shared = emulated_decoder(model, burst=4)                 # the default with ONNX Runtime's prefill
    assert own.describe()["settings"]["weights"] == "engine"
    for dec in (own, shared):
        with dec.generation() as c:
            dec.tokens = [dec.step_greedy(np.array([PROMPT]), c)] + dec.greedy_burst(3, c, 4)
    assert shared.tokens == own.tokens and shared.describe()["settings"]["weights"] == "shared"
    index = read_engine(shared.engine_path)["weights"]["tensors"]
    own = {n for n, t in index.items() if t.get("shared") is False}
    assert set(shared.weights.ortvalues) == set(index) - own
    layers = shared.cfg.num_hidden_layers
    assert len(own) == {"fp8": 4 * layers, "bf16": 4 * layers + 2}.get(precision, 0)   # bf16: + embed, lm_head
    if precision == "bf16":                                  # the embedding is ONNX Runtime's own
        return
    embed = shared.weights.ptr[read_engine(shared.engine_path)["weights"]["embed"]]
    shared.device.zero(embed, shared.cfg.vocab_size * shared.cfg.hidden_size * 2)
    with shared.generation() as c:
        a = shared.step(np.array([PROMPT]), c)
    with shared.generation() as c:
        b = shared.step(np.array([[9, 8, 7, 6]]), c)
    np.testing.assert_array_equal(a, b)


@needs_nvrtc
@needs_cxx
def test_build_on_the_gpu_here_checks_every_kernel_first(exported, tmp_path, monkeypatch):
    """--gpu auto with that GPU present: the kernels are checked at the model's shapes before
    the engine is written (the emulated GPU stands in), and the report is in the manifest."""
    import glmrt.engines.cuda_build as cb
    from glmrt.gpu import Gpu
    monkeypatch.setattr(cb, "detect", lambda index=0: Gpu("NVIDIA H200", (9, 0)))
    monkeypatch.setattr(cb, "_gpu_here", lambda target: EmulatedDevice("NVIDIA H200", (9, 0), sm_count=2))
    model = tmp_path / "m"
    shutil.copytree(exported("quant", "int4", target="cuda"), model)
    em = read_engine(build(model, backend="cuda", tune=False))
    assert [r["kernel"] for r in em["selfcheck"]] == list(selfcheck.CHECKS) and all(r["ok"] for r in em["selfcheck"])
    assert em["config"] == DEFAULT_CONFIG and em["tuned"] is False
    em = read_engine(build(model, backend="cuda", max_batch=3, overwrite=True, tune=False))   # buckets 2 and 3 too
    assert [r["kernel"] for r in em["selfcheck"]] == [*selfcheck.CHECKS, "bucket 2", "bucket 3"]
    assert all(r["ok"] for r in em["selfcheck"])


@needs_nvrtc
@needs_cxx
def test_build_on_the_gpu_here_tunes_then_checks_and_records_the_configuration(exported, tmp_path, monkeypatch):
    """With the GPU present the build tunes first (the timings faked here: the emulation has no
    clock worth tuning on), then compiles and checks every kernel, buckets too, under the
    configuration chosen, which the manifest records and the runtime launches with."""
    import glmrt.engines.cuda_build as cb
    from glmrt.backends.cuda_engine import tune as tn
    from glmrt.gpu import Gpu
    monkeypatch.setattr(cb, "detect", lambda index=0: Gpu("NVIDIA H200", (9, 0)))
    monkeypatch.setattr(cb, "_gpu_here", lambda target: EmulatedDevice("NVIDIA H200", (9, 0), sm_count=2))
    faster = {"qkv": {"unroll": 2, "min_blocks": 3}, "attention": {"chunk": 128}}

    def fake(device, shapes, formats, layers, max_context, base=DEFAULT_CONFIG, log=None, weights=None):
        assert weights is not None and len(weights[1]["layers"]) == layers       # the model's own, uploaded
        config, report = tn.tune(lambda c: 100.0 - 5 * sum(c[r] == {**c[r], **k} for r, k in faster.items()), base)
        return config, {**report, "layers": layers}
    monkeypatch.setattr(tn, "tune_on_device", fake)
    model = tmp_path / "m"
    shutil.copytree(exported("quant", "int4", target="cuda"), model)
    em = read_engine(build(model, backend="cuda", max_batch=2))
    assert em["tuned"]["chosen"] == faster and em["tuned"]["layers"] == 2
    assert em["config"]["qkv"]["unroll"] == 2 and em["config"]["attention"]["chunk"] == 128
    qkv = {k["name"]: k for k in em["kernels"]}
    assert (qkv["qkv"]["unroll"], qkv["qkv"]["min_blocks"]) == (2, 3)                 # the single-row step's
    assert (qkv["qkv_b2"]["unroll"], qkv["qkv_b2"]["min_blocks"]) == (4, 2)           # the batched one's as before
    assert all(r["ok"] for r in em["selfcheck"]) and em["selfcheck"][-1]["kernel"] == "bucket 2"
    # the runtime launches with it and says so
    dec = emulated_decoder(model, burst=2, prefill="engine")
    assert dec.step_plan.chunk == 128
    assert dec.describe()["settings"]["tuned"] == "qkv unroll=2,min_blocks=3; attention chunk=128"


@needs_nvrtc
@needs_cxx
def test_build_times_the_step_on_the_models_own_weights_in_bursts(exported, tmp_path, monkeypatch):
    """The tuner's measure in a build: the model's weights uploaded (every layer), the step
    timed in bursts of 8 as the runtime replays them (the emulated GPU's clock: only that it
    runs). The one candidate here changes only a knob this export's W^T lm_head does not take: it
    launches what the defaults do, so it is not timed, and the defaults stay."""
    import glmrt.engines.cuda_build as cb
    from glmrt.backends.cuda_engine import tune as tn
    from glmrt.gpu import Gpu
    monkeypatch.setattr(cb, "detect", lambda index=0: Gpu("NVIDIA H200", (9, 0)))
    monkeypatch.setattr(cb, "_gpu_here", lambda target: EmulatedDevice("NVIDIA H200", (9, 0), sm_count=2))
    monkeypatch.setattr(tn, "CANDIDATES", {"lm_head": ({"unroll": 2, "min_blocks": 3},)})
    monkeypatch.setattr(tn, "CONTEXTS", (16,))
    model = tmp_path / "m"
    shutil.copytree(exported("quant", "int4", target="cuda"), model)
    em = read_engine(build(model, backend="cuda"))
    t = em["tuned"]
    assert t["base_us"] > 0 and t["chosen"] == {} and em["config"] == DEFAULT_CONFIG
    assert t["tried"] == [{"role": "lm_head", "knobs": {"unroll": 2, "min_blocks": 3}, "skipped": "launches what the best does"}]
    assert (t["layers"], t["burst"], t["weights"], t["contexts"]) == (2, 8, "the model's", [16])
    assert all(r["ok"] for r in em["selfcheck"])
    assert list(em["seconds"]) == ["upload", "tune", "compile", "check"]     # where the build's time went


# ---- the driver calls, without a driver ----------------------------------------------------------
class _FakeDriver:
    """cuda.bindings.driver where every call is first made for real (the bindings convert the
    arguments before they look for libcuda, so a wrong type raises TypeError here) and then
    answered with a plausible success: CudaDevice's every code path, run without a GPU."""

    def __init__(self):
        import cuda.bindings.driver as cu
        self.cu, self.next_ptr, self.calls = cu, 1 << 20, []
        ok = cu.CUresult.CUDA_SUCCESS
        attr = cu.CUdevice_attribute
        values = {attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: 9, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: 0,
                  attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: 132,
                  attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: 232448}
        self.answers = {
            "cuDeviceGet": lambda *a: (ok, cu.CUdevice(0)), "cuDeviceGetName": lambda *a: (ok, b"Fake H200\0\0"),
            "cuDeviceGetAttribute": lambda a, d: (ok, values[a]), "cuDriverGetVersion": lambda: (ok, 13000),
            "cuDevicePrimaryCtxRetain": lambda d: (ok, cu.CUcontext(0)), "cuStreamCreate": lambda f: (ok, cu.CUstream(0)),
            "cuMemAlloc": self._alloc, "cuModuleLoadData": lambda i: (ok, cu.CUmodule(0)),
            "cuModuleGetFunction": lambda m, n: (ok, cu.CUfunction(0)), "cuStreamEndCapture": lambda s: (ok, cu.CUgraph(0)),
            "cuGraphInstantiate": lambda g, f: (ok, cu.CUgraphExec(0)), "cuMemGetInfo": lambda: (ok, 1 << 30, 2 << 30),
            "cuEventCreate": lambda f: (ok, cu.CUevent(0)), "cuEventElapsedTime": lambda a, b: (ok, 1.5),
            "cuOccupancyMaxActiveBlocksPerMultiprocessor": lambda f, t, s: (ok, 2)}
        self.ok = ok

    def _alloc(self, n):
        self.next_ptr += (n + 255) // 256 * 256
        return self.ok, self.cu.CUdeviceptr(self.next_ptr)

    def __getattr__(self, name):
        real = getattr(self.cu, name)
        if not name.startswith("cu") or not callable(real) or isinstance(real, type):
            return real

        def call(*args):
            try:
                real(*args)
            except TypeError:
                raise
            except Exception:  # noqa: S110  (no libcuda here: the arguments were accepted)
                pass
            self.calls.append(name)
            return self.answers.get(name, lambda *a: (self.ok,))(*args)
        return call


@pytest.mark.skipif(GPU, reason="a GPU is here: the real device is tested instead")
def test_every_driver_call_takes_its_arguments(monkeypatch):
    from glmrt.backends.cuda_engine import device as device_mod
    from glmrt.backends.cuda_engine.args import GemvArgs
    pytest.importorskip("cuda.bindings.driver")
    fake = _FakeDriver()
    monkeypatch.setattr(device_mod, "_driver", lambda: fake)
    d = device_mod.CudaDevice()
    assert (d.name, d.compute_capability, d.sm_count, d.driver_version) == ("Fake H200", (9, 0), 132, 13000)
    p = d.alloc(1000)
    d.upload(p, np.arange(10, dtype=np.float32))
    d.download(p, np.empty(10, np.float32))
    d.zero(p, 40)
    k = d.load(b"\x7fELF fake cubin", {"big": 60000, "small": 0})
    d.launch(k["big"], (4, 2), 256, 60000, GemvArgs(w=p))
    d.launch(k["big"], (4, 2), 256, 60000, GemvArgs(w=p), pdl=True)     # programmatic dependent launch
    assert d.occupancy(k["big"], 256, 60000) == 2
    graph = d.capture(lambda: d.launch(k["small"], (3,), 128, 0, GemvArgs()))
    d.replay(graph)
    assert d.memory() == (1 << 30, 2 << 30)
    with d.timer() as t:
        d.replay(graph)
    assert t.ms == 1.5
    d.free(p)
    for call in ("cuFuncSetAttribute", "cuLaunchKernel", "cuLaunchKernelEx", "cuStreamBeginCapture", "cuGraphLaunch",
                 "cuMemcpyHtoDAsync"):
        assert call in fake.calls


@needs_nvrtc
@pytest.mark.skipif(GPU, reason="a GPU is here: the real device is tested instead")
def test_glmrt_load_runs_the_engine_through_every_driver_call(engine_model, monkeypatch):
    """glmrt.load(backend="cuda") -> registry -> engine found for the (fake) H200 -> weights
    uploaded, kernels loaded, graphs captured and replayed: the driver sees every call with
    arguments it accepts (the results are meaningless without a GPU)."""
    from glmrt.backends.cuda_engine import device as device_mod
    pytest.importorskip("cuda.bindings.driver")
    fake = _FakeDriver()
    fake.answers["cuDeviceGetName"] = lambda *a: (fake.ok, b"NVIDIA H200\0")
    monkeypatch.setattr(device_mod, "_driver", lambda: fake)
    m = glmrt.load(engine_model("int4"), backend="cuda", max_context=64)
    assert m.decoder.describe()["gpu"] == "NVIDIA H200 (sm90, 132 SMs)"
    with m.decoder.generation() as c:
        m.decoder.step_greedy(np.array([[5, 6, 7]]), c)
        m.decoder.greedy_burst(3, c, 2)
    assert fake.calls.count("cuGraphInstantiate") == 2 and "cuModuleLoadData" in fake.calls


@needs_cxx
@pytest.mark.parametrize("fmt,M", [("int4", 3), ("f16", 3), ("f16_kn", 3), ("int4_mma", 3), ("int4_mma", 8),
                                   ("f16_kn_mma", 3), ("f16_kn_mma", 8)])
def test_one_weight_load_serves_several_rows_of_x(fmt, M):
    """M = 3 rows of x through one GEMV (what verification steps of speculative decoding and
    batched slots will run): each row normalized on its own, the residual stream written per
    row, each row's logits and argmax."""
    from glmrt.backends.cuda_engine.args import GemvArgs
    H, V = SMALL.hidden, SMALL.vocab
    k = Gemv("rows", fmt, H, V, "add_norm", "argmax", block=32, m=M, warps=2, rpw=2, unroll=2,
             ksplit=2 if fmt == "int4_mma" else 1)
    dev = EmulatedDevice(sm_count=2)
    handle = dev.load(translation_unit(SMALL, [k]).encode(), {k.name: k.smem})[k.name]
    rng = np.random.default_rng(5)
    x_in, y_in = rng.standard_normal((M, H)).astype(np.float32), rng.standard_normal((M, H)).astype(np.float32)
    norm_y, norm_x = (1 + 0.1 * rng.standard_normal((2, H))).astype(np.float16)
    if fmt.startswith("int4"):
        packed, scales = selfcheck.random_int4(rng, V, H, 32)
        w = {"w": packed, "scales": scales}
        wd = selfcheck.dequant_int4(packed, scales, H)
    else:
        w16 = (rng.random((V, H), dtype=np.float32) * 0.1 - 0.05).astype(np.float16)
        w = {"w": w16 if fmt == "f16" else np.ascontiguousarray(w16.T)}
        wd = w16.astype(np.float64)
    bufs = []

    def put(a):
        p = dev.alloc(a.nbytes)
        dev.upload(p, a)
        bufs.append(a)
        return p
    grid = min(k.tiles(SMALL), 8)
    a = GemvArgs(**{n: put(v) for n, v in w.items()}, x_in=put(x_in), y_in=put(y_in), norm_y=put(norm_y),
                 norm_x=put(norm_x), x_out=put(np.zeros((M, H), np.float32)), y=put(np.zeros((M, V), np.float32)),
                 part_val=put(np.zeros(M * grid, np.float32)), part_idx=put(np.zeros(M * grid, np.int32)),
                 counter=put(np.zeros(1, np.uint32)), token_out=put(np.zeros(M, np.int32)), eps=selfcheck.EPS)
    dev.launch(handle, (grid,), k.threads, k.smem, a)
    x = x_in.astype(np.float64) + selfcheck.rms_norm(y_in, norm_y, selfcheck.EPS)
    h = selfcheck.rms_norm(x, norm_x, selfcheck.EPS).astype(np.float16).astype(np.float64)    # (M, H)
    ref = h @ wd.T                                                                              # (M, V)
    logits, x_out, tokens = np.empty((M, V), np.float32), np.empty((M, H), np.float32), np.empty(M, np.int32)
    dev.download(a.y, logits)
    dev.download(a.x_out, x_out)
    dev.download(a.token_out, tokens)
    assert rel(logits, ref) < selfcheck.TOL[fmt] and rel(x_out, x) < 1e-6
    assert tokens.tolist() == np.argmax(logits, axis=1).tolist()


# ---- continuous batching on the engine ------------------------------------------------------------
SLOT_MUTATIONS = {
    "attention reads row 0's cache for every slot": ("attention.cu", "const size_t kv0 = (size_t)row * a.slot_stride + ",
                                                     "const size_t kv0 = "),
    "qkv writes every slot at row 0's position": ("gemv.cu", "a.slot_stride ? a.pos[m] + a.pos_add", "a.slot_stride ? a.pos[0] + a.pos_add"),
    "a row norm of the wrong row": ("gemv.cu", "const int m = blockIdx.x, tid = threadIdx.x;", "const int m = 0, tid = threadIdx.x;"),
}


@needs_cxx
@pytest.mark.parametrize("formats", ["int4-b32", "int4-b128-lmhead", "fp16", "fp8", "bf16"])
@pytest.mark.parametrize("mutation", [None, *SLOT_MUTATIONS])
def test_the_bucket_checks_pass_and_catch_slot_bugs(monkeypatch, formats, mutation):
    """What `glmrt build --max-batch` checks on the GPU, in the emulation: each bucket's row norms,
    GEMVs, slot cache writes and per-slot attention against numpy; each slot bug must fail."""
    if mutation:
        file, old, new = SLOT_MUTATIONS[mutation]
        break_kernels(monkeypatch, old, new, f"{mutation} ({file})")
    report = selfcheck.run_bucket_checks(EmulatedDevice(sm_count=2), SMALL, FORMATS[formats], 4)
    assert [r["kernel"] for r in report] == ["bucket 2", "bucket 4"]
    assert all(r["ok"] for r in report) == (mutation is None), [selfcheck.format_result(r) for r in report]


@needs_cxx
def test_the_bucket_checks_pass_with_an_int8_lm_head():
    """The 8-bit lm_head's batched instances (2 and 4 rows of x on the CUDA cores) in each bucket."""
    report = selfcheck.run_bucket_checks(EmulatedDevice(sm_count=2), SMALL, FORMATS["int4-b32-lmhead8"], 4)
    assert [r["kernel"] for r in report] == ["bucket 2", "bucket 4"]
    assert all(r["ok"] for r in report), [selfcheck.format_result(r) for r in report]


@needs_nvrtc
@needs_cxx
@pytest.mark.parametrize("mutation", [None, *SLOT_MUTATIONS])
def test_batched_slots_equal_one_sequence_at_a_time_in_the_emulation(exported, tmp_path, monkeypatch, mutation):
    """An engine built with --max-batch 4: slots prefilled with prompts of different lengths
    (ONNX Runtime's CPU provider writing the slot rows); each bucket's batched step (rows 0..b-1)
    gives each slot the logits the engine's one-sequence step gives it after the same prefill
    (5e-3 of the largest: the batched GEMVs round differently; bucket 1 runs the same kernels:
    equal), and 4 greedy steps the same tokens; 3 slots (not a bucket), a subset of the slots
    with idle rows between them, and slots opened again (new buffers, new graphs) too; each
    deliberately broken slot offset is caught."""
    from glmrt.backends.cuda_engine import sources
    if mutation:
        file, old, new = SLOT_MUTATIONS[mutation]
        break_kernels(monkeypatch, old, new, f"{mutation} ({file})")
        monkeypatch.setattr("glmrt.engines.cuda_build.kernel_text", sources.kernel_text)   # the builder's own name
    model = tmp_path / "m"
    shutil.copytree(exported("quant", "int4", target="cuda"), model)
    build(model, backend="cuda", gpu="NVIDIA H200@sm90", max_batch=4)
    assert read_engine(model / "engines" / "nvidia-h200-sm90" / "int4")["slots"] == 4
    dec = emulated_decoder(model, max_context=96)
    try:
        assert dec.caps.batch == 4 and dec.step_plan.buckets == (1, 2, 4) and dec.cuda_graph
        ok = _slots_agree(dec) if mutation is None else _caught(lambda: _slots_agree(dec))
        assert ok == (mutation is None)
    finally:
        dec.close()


def _caught(check) -> bool:
    """A broken kernel's verdict: its numbers disagree, or its NaN ids are refused."""
    try:
        return check()
    except GlmrtError:
        return False


def _slots_agree(dec) -> bool:
    """Slots opened 1, 2, 3 (a bucket of 4 rows), 4 and 4 again; all of them, or slots 0 and 2
    (idle rows between), stepped together: each slot's logits and 4 greedy steps against the
    engine's one-sequence steps after the same prefill."""
    rng = np.random.default_rng(2)
    ok = True
    for n, pick in ((1, None), (2, None), (3, None), (4, [0, 2]), (4, None)):
        slots = dec.open_slots(n)
        caches = slots if pick is None else [slots[i] for i in pick]
        prompts = [rng.integers(3, 1000, size=3 + 9 * i).tolist() for i in range(len(caches))]
        first = [int(np.argmax(dec.step(np.array([p]), c)[0, -1])) for c, p in zip(caches, prompts)]
        got = dec.step_batch(np.array(first), caches)
        ids, together = np.argmax(got, -1), []
        for _ in range(3):
            together.append(ids.tolist())
            ids = np.array(dec.step_batch_greedy(ids, caches))
        together.append(ids.tolist())
        for i, p in enumerate(prompts):
            with dec.generation() as c:
                dec.step(np.array([p]), c)                   # the same prefill, then the engine's own step
                want = dec.step(np.array([[first[i]]]), c)[0, -1]
                alone = [int(np.argmax(want))]
                for _ in range(3):
                    alone.append(dec.step_greedy(np.array([[alone[-1]]]), c))
            bucket = next(b for b in dec.step_plan.buckets if b > max(c.slot for c in caches))
            err = rel(got[i], want)
            ok &= (err == 0.0 if bucket == 1 else err < 5e-3) and [t[i] for t in together] == alone
        assert [c.length for c in caches] == [len(p) + 4 for p in prompts]
    return ok


@needs_nvrtc
def test_max_batch_is_checked_and_slots_beyond_it_say_how_to_rebuild(engine_model, exported, tmp_path):
    from click.testing import CliRunner

    from glmrt.cli import main
    model = tmp_path / "m"
    shutil.copytree(exported("quant", "int4", target="cuda"), model)
    r = CliRunner().invoke(main, ["build", str(model), "--backend", "cuda", "--gpu", "NVIDIA H200@sm90",
                                  "--max-batch", "9"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "batches 1 to 8" in r.output
    assert not (model / "engines").exists()
    dec = emulated_decoder(engine_model("int4"))               # built for one sequence
    try:
        assert dec.caps.batch == 1
        with pytest.raises(GlmrtError, match="at most 1 sequences.*--max-batch N"):
            dec.open_slots(2)
    finally:
        dec.close()
    sys.path.insert(0, str(Path(__file__).parent))
    from test_backends import emulated_gpu
    with emulated_gpu(), pytest.raises(GlmrtError, match="batches at most 1 sequences.*--max-batch N"):
        glmrt.load(engine_model("int4"), backend="cuda", max_context=64, slots=2)
    # shared memory counted with each kernel's static memory, after the compile
    import glmrt.engines.cuda_build as cb
    small = tmp_path / "small"            # the fp16 W^T lm_head, as FORMATS["int4-b32"] has it
    shutil.copytree(exported("quant", "int4", target="cuda", lm_head="float"), small)
    limit = max(k.smem for k in engine_kernels(SMALL, FORMATS["int4-b32"], DEFAULT_CONFIG, 4))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(cb.SMEM_LIMIT, 90, limit)               # every kernel's dynamic memory fits, not its total
        with pytest.raises(GlmrtError, match=r"needs \d+ bytes of shared memory.*smaller --max-batch"):
            build(small, backend="cuda", gpu="NVIDIA H200@sm90", max_batch=4)
    assert not (small / "engines" / "nvidia-h200-sm90" / "int4").exists()
    big = [k for k in engine_kernels(G4_32B, FORMATS["int4-b32"], DEFAULT_CONFIG, 8) if k.smem > 227 * 1024]
    assert [k.name for k in big] == ["down_b8"]           # GLM-4-32B's 23040-wide x for 8 rows: max-batch 4 there
