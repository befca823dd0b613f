"""The decode attention on the tensor cores (kernels/attention.cu attention_mma, the launch knob
DEFAULT_CONFIG["attention"]["mma"]) without a GPU: against numpy in the CPU emulation
(tests/cuda_emu: mma.sync and movmatrix as warp collectives) for groups of 2, 4, 16 and 24 query
heads per KV head, one split and several with the last one merging, contexts that are not a
multiple of the tile, batched rows (grid z, slot_stride); deliberate bugs that the check must
catch; and every instance at GLM-Z1-9B's and GLM-4-32B's shapes compiled by NVRTC for every
architecture without register spills."""
import sys
from pathlib import Path

import pytest

from glmrt.backends.cuda_engine import nvrtc, selfcheck
from glmrt.backends.cuda_engine.sources import Attention, AttentionMerge, Shapes, translation_unit
from glmrt.backends.cuda_engine.step import DEFAULT_CONFIG, Formats, decode_kernels
from glmrt.errors import GlmrtError

sys.path.insert(0, str(Path(__file__).parent))
from cuda_emu.emulator import EmulatedDevice, break_kernels  # noqa: E402
from cuda_emu.marks import HAS_NVRTC, needs_cxx, needs_nvrtc  # noqa: E402

INT4 = Formats("int4", 32, "f16_kn")


def mma(**att) -> dict:
    """A config with the tensor-core attention on (threads: its block, the knob mma_threads) or,
    with mma=False, the CUDA-core one (threads: its own knob)."""
    on = att.pop("mma", True)
    if on and "threads" in att:
        att["mma_threads"] = att.pop("threads")
    return {**DEFAULT_CONFIG, "attention": {**DEFAULT_CONFIG["attention"], "mma": on, **att}}


def shapes(group: int, head_dim: int) -> Shapes:
    """Two KV heads of `group` query heads each (the GEMVs' sizes do not matter here)."""
    return Shapes(128, 384, 2 * group, 2, head_dim, head_dim // 2, 1024)


# id: (group, head_dim, attention knobs[, run_checks' chunk and splits]); the warps' shares
# (kernels/attention.cu): MT m-tiles of 16 query heads, position groups PGS, dims groups DG; the
# merge folds 16 / EPT splits a step (EPT: 8-dim outputs a thread)
CASES = {
    "G2 hd32, 4 warps, tile 32 (2 position x 2 dims groups, one idle)": (2, 32, {"threads": 128, "tile": 32}),
    "G4 hd64, 8 warps, tile 64 (4 position x 2 dims groups)": (4, 64, {"threads": 256, "tile": 64}),
    "G16 hd64, 4 warps, tile 32 (2 position x 2 dims groups)": (16, 64, {"threads": 128, "tile": 32}),
    "G16 hd128, 2 warps, tile 16": (16, 128, {"threads": 64, "tile": 16}),
    "G24 hd32, 4 warps, tile 32 (2 m-tiles x 2 position groups)": (24, 32, {"threads": 128, "tile": 32}),
    "G24 hd64, 1 warp (both m-tiles), tile 32, merge 2 splits a step": (24, 64, {"threads": 32, "tile": 32}),
    "G16 hd64, tile 16, 19 splits, merge 16 splits a step": (16, 64, {"threads": 128, "tile": 16}, 16, 24),
}


@needs_cxx
@pytest.mark.parametrize("case", CASES)
def test_attention_on_the_tensor_cores_passes_in_the_emulation(case):
    """Against numpy at lengths 1 .. 300 over 3 splits of 32+ positions (19 of 16+): one split,
    several (the last merging), lengths off the tile, and past chunk x splits (each split's share
    grown)."""
    group, hd, att, *split = CASES[case]
    chunk, splits = split or (32, 3)
    report = selfcheck.run_checks(EmulatedDevice(sm_count=2), shapes(group, hd), INT4, max_seq=300, chunk=chunk,
                                  splits=splits, only=["attention"], config=mma(**att))
    r = report[0]
    assert r["ok"], selfcheck.format_result(r)
    assert r["name"].startswith("attention on the tensor cores") and f"{group} query heads a block" in r["name"]
    lengths = set(r["errors_by_length"])
    assert {1, 37, 300} <= lengths and len(lengths) >= 6          # one split, off the tile, grown splits


@needs_cxx
@pytest.mark.parametrize("group,head_dim", [(4, 64), (24, 32)])
def test_attention_on_the_tensor_cores_serves_batched_rows(group, head_dim):
    """The bucket check's attention: grid z = row, each row its own cache (slot_stride) and length."""
    report = selfcheck.run_bucket_checks(EmulatedDevice(sm_count=2), shapes(group, head_dim), INT4, 3,
                                         config=mma(threads=128, tile=32, chunk=32, splits=3))
    assert len(report) == 2 and all(r["ok"] for r in report), [selfcheck.format_result(r) for r in report]
    for r in report:
        att = {k: v for k, v in r["errors"].items() if k.startswith("attention row")}
        assert len(att) >= 2 and max(att.values()) <= selfcheck.TOL["attention_mma"], att


def test_the_mma_knob_builds_the_tensor_core_instance():
    s = shapes(16, 128)
    att = next(k for k in decode_kernels(s, INT4, mma(threads=256, tile=64)) if k.name == "attention")
    assert att.mma and att.hpb == 16 and att.blocks_x(s.kv_heads) == 2
    assert "attention_mma<128, 16, 256, 64, false, 8>(a);" in att.instance()
    default = next(k for k in decode_kernels(s, INT4) if k.name == "attention")      # the default since session 9
    assert default.mma and "attention_mma<128, 16, 256, 32, false, 8>(a);" in default.instance()
    plain = next(k for k in decode_kernels(s, INT4, mma(mma=False, threads=128)) if k.name == "attention")
    assert not plain.mma and "attention<128, 16, 4, 128, 32>(a);" in plain.instance()
    # head_dim not a multiple of 32: the CUDA-core kernel
    odd = next(k for k in decode_kernels(shapes(4, 8), INT4, mma()) if k.name == "attention")
    assert not odd.mma


# A check that cannot fail is no check: each mutation breaks one thing attention_mma must get right
# (snippet, replacement[, (group, head_dim, knobs): G16 hd64, 4 warps, tile 32 by default: 2 position
# groups x 2 dims groups over the tile's 2 slices]).
MUTATIONS = {
    "softmax rescale of O": ("o[mi][ci][i][e] *= corr[e >> 1];", ";"),
    "split merge weights": ("const float w = __expf(mv[u][k] - mx) * lv[u][k];", "const float w = __expf(mv[u][k] - mx);"),
    # the merge's steps (G24 hd64, one warp: 2 splits a step)
    "split merge rescale": ("for (int i = 0; i < 8; ++i) acc[k][i] *= c;", ";", (24, 64, {"threads": 32, "tile": 32})),
    "quad max: wrong lanes": ("__shfl_xor_sync(0xffffffffu, tmax[r], 2)", "__shfl_xor_sync(0xffffffffu, tmax[r], 4)"),
    "row sum over the quad": ("l_run[mi][r] += __shfl_xor_sync(0xffffffffu, l_run[mi][r], 2);", ""),
    "KV head": ("(size_t)h * a.max_seq * HD;   // this row's KV head h", "(size_t)(h ^ 1) * a.max_seq * HD;"),
    "position groups' weights": ("const float wgt = __expf(m_run[mi][r] - mx_s[rr]);", "const float wgt = 1.f;"),
    "positions past the split": ("if (p >= t1) sc[mi][j][n][e] = ninf;", ""),
    "V not transposed": ("movmatrix_t(att_word(v0, i)), b1 = movmatrix_t(att_word(v1, i))",
                         "att_word(v0, i), b1 = att_word(v1, i)"),
    "Q dims order": ("qa[mi][2 * c][2 + e] = pack_h2(lo.z * scale, lo.w * scale);",
                     "qa[mi][2 * c][2 + e] = pack_h2(lo.w * scale, lo.z * scale);"),
    "counter re-armed": ("if (tid == 0) *fin = 0u;", ""),
    "grown split": ("return max(a.chunk, (per + TILE - 1) / TILE * TILE);", "return a.chunk;"),
    # the check's q and this token's K/V land only at the kernel's wait (the emulation's in-flight
    # writes): a kernel that reads them without waiting for the QKV kernel reads NaN
    "no wait for the QKV kernel": ("  grid_wait();                                           // q and this token's K, V", "  //"),
}


@needs_cxx
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_check_catches_a_broken_tensor_core_attention(monkeypatch, mutation):
    old, new, *case = MUTATIONS[mutation]
    group, hd, att = case[0] if case else (16, 64, {"threads": 128, "tile": 32})
    break_kernels(monkeypatch, old, new, mutation)
    report = selfcheck.run_checks(EmulatedDevice(sm_count=2), shapes(group, hd), INT4, max_seq=300, chunk=32, splits=3,
                                  only=["attention"], config=mma(**att))
    assert not report[0]["ok"], selfcheck.format_result(report[0])


# V rows past the sequence read into the tile (where each kernel loads zeros), each kernel's
READ_PAST = {"mma": ("vr[b][i] = ok ? vbase[(size_t)p * RW + w % RW]", "vr[b][i] = w < TW ? vbase[(size_t)p * RW + w % RW]",
                     {"threads": 128, "tile": 32}),
             "cuda-core": ("vr[i] = ok ? vbase[(size_t)t * RW + w % RW]", "vr[i] = w < TW ? vbase[(size_t)t * RW + w % RW]",
                           {"mma": False, "threads": 64, "heads_per_block": 1, "tile": 32})}


@needs_cxx
@pytest.mark.parametrize("kernel", READ_PAST)
def test_the_check_sees_rows_read_past_the_sequence(monkeypatch, kernel):
    """The check's cache holds NaN past each length (memory never written, or another
    sequence's), so a kernel that reads V rows there and weights them by zero fails at every
    length off the tile, not only where the buffer ends (300 positions here)."""
    old, new, att = READ_PAST[kernel]
    break_kernels(monkeypatch, old, new, "V past the sequence read")
    r = selfcheck.run_checks(EmulatedDevice(sm_count=2), shapes(16, 64), INT4, max_seq=300, chunk=32, splits=3,
                             only=["attention"], config=mma(**att))[0]
    errs = r["errors_by_length"]
    assert not r["ok"] and errs[1] == float("inf") and errs[37] == float("inf"), errs


# ---- NVRTC: the instances the sweep times, at the two models' shapes, every architecture --------
Z1_9B = Shapes(4096, 13696, 32, 2, 128, 64, 151552)        # G = 16
G4_32B = Shapes(6144, 23040, 48, 2, 128, 64, 151552)       # G = 24
INSTANCES = [Attention(f"att_g{g}_{t}t_tile{tile}", 128, g, t, 0, tile, mma=True)
             for g in (16, 24) for t in (128, 256) for tile in (32, 64)]
# the spread merge's pair (the attention leaving its partials, attention_merge)
INSTANCES += [Attention("att_g16_spread", 128, 16, 256, 0, 32, mma=True, spread=True),
              AttentionMerge("att_merge_g16", 128, 16, 128, 32), AttentionMerge("att_merge_g24", 128, 24, 128, 32)]
# the splits merged in two levels (merge_group)
INSTANCES += [Attention(f"att_g{g}_tree8", 128, g, 256, 0, 32, mma=True, merge_group=8) for g in (16, 24)]


@pytest.fixture(scope="module")
def compiled():
    from concurrent.futures import ThreadPoolExecutor
    source = translation_unit(Z1_9B, INSTANCES)          # Cfg does not enter the attention

    def one(arch):
        try:
            return nvrtc.compile_cubin(source, arch)
        except GlmrtError as e:
            return e
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(nvrtc.ARCHS, pool.map(one, nvrtc.ARCHS)))


@needs_nvrtc
@pytest.mark.parametrize("arch", nvrtc.ARCHS)
def test_attention_on_the_tensor_cores_compiles_without_spills(compiled, arch):
    c = compiled[arch]
    if isinstance(c, Exception):
        raise c
    res = c.resources()
    assert set(res) == {k.name for k in INSTANCES}
    spills = {n: r["spill_bytes"] for n, r in res.items() if r["spill_bytes"]}
    assert not spills, f"register spills on sm_{arch}: {spills}"
    assert all(r["smem_static"] <= 48 * 1024 for r in res.values())


# ---- the splits merged apart (merge "spread": attention_merge, a block per query head) -------------
@needs_cxx
@pytest.mark.parametrize("group,head_dim,splits", [(4, 32, 3), (16, 64, 19), (24, 32, 5)])
def test_the_spread_merge_passes_in_the_emulation(group, head_dim, splits):
    """attention_mma leaving every split's partials and attention_merge folding them, a block per
    query head, against numpy at one split (no merge), several, and grown splits."""
    report = selfcheck.run_checks(EmulatedDevice(sm_count=2), shapes(group, head_dim), INT4, max_seq=300, chunk=32,
                                  splits=splits, only=["attention"], config=mma(merge="spread", threads=128))
    assert report[0]["ok"] and "a block per query head merging" in report[0]["name"], selfcheck.format_result(report[0])


@needs_cxx
def test_the_spread_merge_serves_batched_rows_in_the_emulation():
    report = selfcheck.run_bucket_checks(EmulatedDevice(sm_count=2), shapes(16, 32), INT4, 3,
                                         config=mma(merge="spread", threads=128, splits=3))
    assert len(report) == 2 and all(r["ok"] for r in report), [selfcheck.format_result(r) for r in report]


SPREAD_MUTATIONS = {
    "merge: splits' weights dropped": ("lsum = lsum * c + w;", "lsum = lsum * c + 1.f;"),
    "merge: groups not rescaled": ("const float wgt = mrun == ninf ? 0.f : __expf(mrun - big);",
                                   "const float wgt = mrun == ninf ? 0.f : 1.f;"),
    "merge: another row's heads": ("rh = row * gridDim.x;   // rh", "rh = 0;   // rh"),
    "merge: one split group only": ("for (int sp = sg; sp < used; sp += SG)", "for (int sp = sg; sp < min(used, SG); sp += SG)"),
}


@needs_cxx
@pytest.mark.parametrize("mutation", SPREAD_MUTATIONS)
def test_the_checks_catch_a_broken_spread_merge(monkeypatch, mutation):
    break_kernels(monkeypatch, *SPREAD_MUTATIONS[mutation], mutation)
    config = mma(merge="spread", threads=128, splits=19)
    if mutation == "merge: another row's heads":
        report = selfcheck.run_bucket_checks(EmulatedDevice(sm_count=2), shapes(16, 32), INT4, 3,
                                             config=mma(merge="spread", threads=128, splits=3))
    else:
        # head_dim 128: 8 split groups of 16 threads, fewer than the 10 splits in use at 300 positions
        report = selfcheck.run_checks(EmulatedDevice(sm_count=2), shapes(16, 128), INT4, max_seq=300, chunk=32,
                                      splits=19, only=["attention"], config=config)
    assert not all(r["ok"] for r in report), [selfcheck.format_result(r) for r in report]


# ---- the splits merged in two levels (merge_group n: the last of each n splits, then the last of those)
@needs_cxx
@pytest.mark.parametrize("group,head_dim,threads,merge_group,splits", [(16, 64, 128, 2, 5), (24, 32, 128, 3, 7)])
def test_the_two_level_merge_passes_in_the_emulation(group, head_dim, threads, merge_group, splits):
    """Against numpy at one split (no merge), splits within one first-level group (one level),
    several groups, a last group short of merge_group splits, and grown splits."""
    report = selfcheck.run_checks(EmulatedDevice(sm_count=2), shapes(group, head_dim), INT4, max_seq=300, chunk=32,
                                  splits=splits, only=["attention"],
                                  config=mma(threads=threads, tile=32, merge_group=merge_group))
    r = report[0]
    assert r["ok"] and f"merged in two levels, {merge_group} splits" in r["name"], selfcheck.format_result(r)
    assert not any(r["counters_after"]) and len(r["counters_after"]) == 2 * (1 + 128)


@needs_cxx
def test_the_two_level_merge_serves_batched_rows_in_the_emulation():
    report = selfcheck.run_bucket_checks(EmulatedDevice(sm_count=2), shapes(16, 32), INT4, 3,
                                         config=mma(threads=128, tile=32, splits=5, merge_group=2))
    assert len(report) == 2 and all(r["ok"] for r in report), [selfcheck.format_result(r) for r in report]


TREE_MUTATIONS = {
    "a group's (m, l) not left": ("if (d8 == 0) { pml[2 * at] = mrun[k]; pml[2 * at + 1] = lsum[k]; }", ""),
    "a group's first split": ("split / MG * MG : 0", "split : 0"),
    "the second level folds one group": ("att_fold<HD, G, THREADS, true>(o2, ml2, rh + head0, g2, 0, ngrp,",
                                         "att_fold<HD, G, THREADS, true>(o2, ml2, rh + head0, g2, 0, 1,"),
    "group counter not re-armed": ("      *gc = 0u;                                          // re-armed", "//"),
    "another row's partials": ("h16* o2 = part16 + (size_t)gridDim.z * gridDim.x * G * a.splits * HD;",
                               "h16* o2 = part16 + (size_t)gridDim.x * G * a.splits * HD;"),
}


@needs_cxx
@pytest.mark.parametrize("mutation", TREE_MUTATIONS)
def test_the_checks_catch_a_broken_two_level_merge(monkeypatch, mutation):
    break_kernels(monkeypatch, *TREE_MUTATIONS[mutation], mutation)
    if mutation == "another row's partials":
        report = selfcheck.run_bucket_checks(EmulatedDevice(sm_count=2), shapes(16, 32), INT4, 3,
                                             config=mma(threads=128, tile=32, splits=5, merge_group=2))
    else:
        report = selfcheck.run_checks(EmulatedDevice(sm_count=2), shapes(16, 64), INT4, max_seq=300, chunk=32,
                                      splits=5, only=["attention"], config=mma(threads=128, tile=32, merge_group=2))
    assert not all(r["ok"] for r in report), [selfcheck.format_result(r) for r in report]


@pytest.mark.parametrize("group,head_dim,threads,tile,fits", [
    (16, 128, 256, 32, True), (24, 128, 256, 32, True), (48, 128, 256, 32, False),   # 3 m-tiles, 8 warps
    (40, 128, 128, 32, False), (16, 96, 256, 32, True), (16, 80, 256, 32, False), (96, 128, 256, 32, False)])
def test_shapes_the_tensor_core_attention_cannot_take_fall_back(group, head_dim, threads, tile, fits):
    """mma_attention_fits mirrors attention_mma's static_asserts: where it says no, the engine
    compiles the CUDA-core kernel instead of failing to compile (checked by NVRTC where it says yes)."""
    from glmrt.backends.cuda_engine.sources import mma_attention_fits
    assert mma_attention_fits(head_dim, group, threads, tile) == fits
    s = Shapes(1024, 1024, 2 * group, 2, head_dim, min(64, head_dim), 1024)
    att = next(k for k in decode_kernels(s, INT4, mma(threads=threads, tile=tile, merge="spread")) if k.name == "attention")
    assert att.mma == fits
    if fits and HAS_NVRTC:
        ks = [k for k in decode_kernels(s, INT4, mma(threads=threads, tile=tile, merge="spread"))
              if k.name.startswith("attention")]
        assert len(ks) == 2
        nvrtc.compile_cubin(translation_unit(s, ks), 90)
