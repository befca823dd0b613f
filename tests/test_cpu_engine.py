"""glmrt's own CPU engine (backend "cpu"): engine.c compiled here for each instruction set this
CPU runs, its GEMV against numpy and ONNX Runtime's MatMulNBits on the same int8 x, its decode
steps against ONNX Runtime's CPU form of the same export and the float64 reference, and the
one-line refusals."""
import ctypes
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import glmrt
from glmrt.backends.cpu_engine import compiler
from glmrt.backends.cpu_engine.engine import LinearC, gemv, load_library
from glmrt.engines.build import build
from glmrt.engines.cpu_build import dequantize, quantize_x
from glmrt.errors import GlmrtError
from glmrt.export.quant import MatMulNBits, pack_nibbles

def _compiler():
    try:
        return compiler.find_compiler()
    except GlmrtError:
        return None


pytestmark = pytest.mark.skipif(_compiler() is None, reason="no C compiler (cc, gcc, clang or $CC)")
ISAS = [isa for isa in compiler.ISAS if compiler.runs_here(isa)]
PROMPT = list(range(5, 300, 7))


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    made = {}

    def get(isa):
        if isa not in made:
            out = tmp_path_factory.mktemp("cpu-engine") / f"{isa}.so"
            compiler.compile_library(compiler.source_text(), isa, out)
            made[isa] = load_library(out)
        return made[isa]
    return get


def packed(bits, block, n, k, seed):
    """A random (n, k) matrix as MatMulNBits stores it: (bytes (n, kb, block*bits/8), scales (n, kb))."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    q = MatMulNBits(bits, block, True, "float32").quantize(w)
    codes = q.codes.reshape(n, -1, block)
    return (pack_nibbles(codes) if bits == 4 else codes).copy(), q.scales.astype(np.float32)


def ort_matmulnbits(x, w, scales, bits, block, k, n):
    """ONNX Runtime's MatMulNBits with int8 activations (accuracy_level 4) on the same bytes."""
    import onnxruntime as ort
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor("w", TensorProto.UINT8, w.shape, w.tobytes(), raw=True),
                               helper.make_tensor("s", TensorProto.FLOAT, scales.shape, scales.tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)                 # what ONNX Runtime 1.2x reads (onnx's default may be newer)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x[None]})[0][0]


# (bits, block, k): whole chunks, and rows ending in a partial chunk (a 4-bit chunk is 128
# values, an 8-bit one 64), as GLM's intermediate sizes do (6848 = 53.5 chunks of 128)
SHAPES = [(4, 16, 160), (4, 32, 256), (4, 32, 224), (4, 64, 320), (4, 128, 192), (4, 256, 512), (8, 32, 96), (8, 128, 384),
          (8, 64, 200)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,block,k", SHAPES)
def test_the_gemv_computes_what_numpy_and_onnxruntime_do(library, isa, bits, block, k):
    """Against float64 numpy on the same int8 x and dequantized weights: the integer sums are
    exact, only the fp32 sums' order differs (bound 1e-5). Against ONNX Runtime's MatMulNBits
    with accuracy_level 4 on the same bytes: the same quantization of x (bound 1e-5). With the
    scales as stored (fp32) and as the runtime hands them over (fp16 copies of fp16 values)."""
    n = 40
    w, scales = packed(bits, block, n, k, seed=k + bits)
    bias = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    x = np.random.default_rng(2).standard_normal(k).astype(np.float32) * 3
    half = scales.astype(np.float16)
    assert np.array_equal(half.astype(np.float32), scales)     # glmrt's MatMulNBits scales: fp16 values
    want = dequantize(w, scales, bits, k) @ quantize_x(x, block) + bias
    for s, sbits in ((scales, 32), (half, 16)):
        lin = LinearC(w.ctypes.data, s.ctypes.data, bias.ctypes.data, n, k, scales.shape[1], block, bits, sbits)
        got = gemv(library(isa), lin, x)
        assert rel(got, want) < 1e-5
        assert rel(got - bias, ort_matmulnbits(x, w, scales, bits, block, k, n)) < 1e-5
        lin.bias = None                                        # no bias: NULL
        assert rel(gemv(library(isa), lin, x), want - bias) < 1e-5


def test_the_isas_are_what_the_library_says(library):
    for isa in ISAS:
        assert library(isa).glmrt_cpu_isa().decode() == isa
    assert "generic" in ISAS                                    # every CPU runs the portable C


@pytest.fixture(scope="module")
def engine_model(exported):
    """The quant checkpoint's --target cpu exports with a cpu engine for every ISA this CPU runs."""
    made = {}

    def get(precision):
        if precision not in made:
            folder = exported("quant", precision, target="cpu")
            for isa in ISAS:
                if not (folder / "engines" / f"cpu-{isa}").exists():
                    build(folder, backend="cpu", isa=isa)
            made[precision] = folder
        return made[precision]
    return get


def decode_logits(m, tokens=(17, 250, 3, 9, 1000)):
    with m.decoder.generation() as g:
        m.decoder.step(np.array([PROMPT]), g)
        return np.array([m.decoder.step(np.array([[t]]), g)[0, -1] for t in tokens])


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_the_engine_decodes_what_the_onnxruntime_cpu_form_does(engine_model, precision):
    """Prefill on ONNX Runtime's CPU form, decode steps in the engine, on one cache: the logits
    of ONNX Runtime's own decode steps (same weights, same int8 x per block) within 1e-5
    (measured 2.7e-7 for int4), and the same greedy tokens."""
    folder = engine_model(precision)
    eng, ort = glmrt.load(folder, backend="cpu"), glmrt.load(folder)
    d = eng.decoder.describe()
    assert d["backend"] == "cpu" and d["settings"]["isa"] == compiler.host_isa()
    assert rel(decode_logits(eng), decode_logits(ort)) < 1e-5
    assert eng.generate(PROMPT, max_new_tokens=24) == ort.generate(PROMPT, max_new_tokens=24)
    eng.decoder.close()


def test_the_engine_against_the_float64_reference(engine_model, checkpoint):
    """Teacher-forced decode steps against the reference on the dequantized weights (lm_head
    too): int8 activations' bound from tests/test_quant.py (rel. error 3e-2; top-1 95% there over
    99 positions, 90% here over 59), and where the top-1 differs, the reference's own top-2
    gap within twice the logits' difference (a near tie)."""
    from glmrt import reference
    from glmrt.export.checkpoint import Checkpoint
    from test_quant import INT8_ACTIVATIONS
    ck = Checkpoint(checkpoint("quant"))
    scheme = MatMulNBits(4, 32, True, "float32")
    deq = {k: (scheme.dequantize(scheme.quantize(v)) if v.ndim == 2 and k != "model.embed_tokens.weight" else v)
           for k, v in ck.weights_f32().items()}
    ids = list(range(5, 700, 7))
    ref, _ = reference.forward(ck.cfg, deq, ids)                          # (seq, V) float64
    m = glmrt.load(engine_model("int4"), backend="cpu")
    with m.decoder.generation() as g:
        m.decoder.step(np.array([ids[:40]]), g)
        got = np.array([m.decoder.step(np.array([[t]]), g)[0, -1] for t in ids[40:]])
    bound, agree = INT8_ACTIVATIONS["int4"]
    ref = ref[40:]
    assert rel(got, ref) < bound
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= agree - 0.05        # 59 positions, not 99
    for i in np.flatnonzero(got.argmax(-1) != ref.argmax(-1)):               # only near ties differ
        gap = ref[i].max() - ref[i, got[i].argmax()]
        assert gap <= 2 * np.abs(got[i] - ref[i]).max(), (i, gap)


def test_isas_and_thread_counts_agree(engine_model):
    """Threads split rows and heads, never a sum: 1, 2 and 3 threads give the same bits. Each
    instruction set this CPU runs (AVX-512, AVX-VNNI, AVX2, portable C) sums in its own order:
    within 1e-5 of the best one."""
    folder = engine_model("int4")
    runs = {t: decode_logits(glmrt.load(folder, backend="cpu", threads=t)) for t in (1, 2, 3)}
    assert np.array_equal(runs[1], runs[2]) and np.array_equal(runs[1], runs[3])
    aside = []                  # the better ISAs' folders moved aside: the loader takes the next one
    try:
        for better, isa in zip(ISAS, ISAS[1:]):
            where = folder / "engines" / f"cpu-{better}"
            where.rename(where.with_name(f"aside-{better}"))
            aside.append(where)
            m = glmrt.load(folder, backend="cpu")
            assert m.decoder.describe()["settings"]["isa"] == isa
            assert rel(decode_logits(m), runs[1]) < 1e-5, isa
    finally:
        for where in aside:
            where.with_name(f"aside-{where.name[4:]}").rename(where)


def test_the_cache_limit_and_bad_ids_are_one_line(engine_model):
    m = glmrt.load(engine_model("int4"), backend="cpu", max_context=50)
    with m.decoder.generation() as g:
        m.decoder.step(np.array([list(range(5, 54))]), g)                  # 49 tokens
        m.decoder.step_greedy(np.array([[3]]), g)
        with pytest.raises(GlmrtError, match="exceed the cache of 50"):
            m.decoder.step_greedy(np.array([[3]]), g)
    with m.decoder.generation() as g:
        m.decoder.step(np.array([PROMPT[:4]]), g)
        with pytest.raises(GlmrtError, match="token id 99999 is outside the vocabulary"):
            m.decoder.step_greedy(np.array([[99999]]), g)
    m.decoder.close()
    with m.decoder.generation() as g, pytest.raises(GlmrtError, match="the cpu engine was closed"):
        m.decoder.step_greedy(np.array([[3]]), g)


@pytest.mark.parametrize("what,kwargs,match", [
    ("concat", {"precision": "int4"}, "concat form of --target onnxruntime.*export with --target cpu"),
    ("cuda", {"precision": "int4", "target": "cuda"}, "gqa form of --target cuda.*export with --target cpu"),
    ("fp32", {"precision": "fp32", "target": "cpu"}, "fp32 export; the cpu engine runs int4 and int8"),
])
def test_exports_the_engine_cannot_read_are_refused_in_one_line(exported, what, kwargs, match):
    folder = exported("quant", **kwargs)
    with pytest.raises(GlmrtError, match=match) as e:
        build(folder, backend="cpu")
    assert "\n" not in str(e.value)
    assert not (folder / "engines" / f"cpu-{compiler.host_isa()}").exists()


def test_loading_refuses_what_this_cpu_cannot_run_in_one_line(engine_model, exported, tmp_path):
    from glmrt.errors import ArtifactError
    folder = exported("quant", "int4", target="cpu", block_size=128)       # an export without engines
    with pytest.raises(ArtifactError, match="no cpu engine for this CPU; build one: glmrt build .* --backend cpu"):
        glmrt.load(folder, backend="cpu")
    copy = tmp_path / "m"
    shutil.copytree(engine_model("int4"), copy)
    for isa in ISAS:
        man = copy / "engines" / f"cpu-{isa}" / "int4" / "manifest.json"
        em = json.loads(man.read_text())
        em["cpu_flags"] = [*em["cpu_flags"], "avx10_9"]                   # a flag no CPU has yet
        man.write_text(json.dumps(em))
    with pytest.raises(ArtifactError, match="lacks avx10_9; rebuild it here: glmrt build .* --backend cpu --overwrite") as e:
        glmrt.load(copy, backend="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(GlmrtError, match="--isa applies to --backend cpu"):
        build(copy, backend="onnxruntime", isa="generic")


def test_the_cli_builds_and_chats_on_the_cpu_engine(exported, tmp_path):
    from click.testing import CliRunner

    from glmrt.cli import main
    copy = tmp_path / "m"
    shutil.copytree(exported("quant", "int8", target="cpu"), copy, ignore=shutil.ignore_patterns("engines"))
    r = CliRunner().invoke(main, ["build", str(copy), "--backend", "cpu", "--isa", "generic"])
    assert r.exit_code == 0, r.output
    em = json.loads((copy / "engines" / "cpu-generic" / "int8" / "manifest.json").read_text())
    assert em["kind"] == "cpu-engine"
    assert em["formats"] == {"linear": "int8", "block": 128, "lm_head": "int8", "scales": "float16"}
    assert all(c["ok"] for c in em["selfcheck"]) and len(em["selfcheck"]) == 5
    r = CliRunner().invoke(main, ["bench", str(copy), "--backend", "cpu", "--prompt-lengths", "16",
                                  "--contexts", "32", "--decode-steps", "8", "--repeats", "1"])
    assert r.exit_code == 0, r.output
    assert "cpu" in r.output


def test_one_slot_serves_requests_in_turn(engine_model):
    """slots=1 (what `glmrt serve --backend cpu --slots 1` loads): the scheduler runs the engine,
    each thread's greedy tokens are the ones it gets alone, and more slots are one clear line."""
    from test_backends import generate_in_threads
    folder = engine_model("int4")
    alone = glmrt.load(folder, backend="cpu")
    prompts = [PROMPT[:n] for n in (5, 12, 30)]
    want = [alone.generate(p, max_new_tokens=8) for p in prompts]
    with glmrt.load(folder, backend="cpu", slots=1) as m:
        assert generate_in_threads(m, prompts, 8) == want
        assert m.generate(prompts[2] + want[2], max_new_tokens=4) == alone.generate(prompts[2] + want[2], max_new_tokens=4)
    with pytest.raises(GlmrtError, match="slots=2: the cpu engine decodes one sequence at a time"):
        glmrt.load(folder, backend="cpu", slots=2)


@pytest.mark.parametrize("precision,block", [("int4", 32), ("int8", 32)])
def test_rows_that_end_in_a_partial_chunk_decode_as_onnxruntime_does(tmp_path_factory, precision, block):
    """hidden 160 and intermediate 224 (1.25 and 1.75 chunks of 128 int4 values; 2.5 and 3.5
    of 64 int8 ones), 5 query heads over 1 KV head: the whole step, every ISA this CPU runs,
    against ONNX Runtime's form of the same export (1e-5)."""
    from glmrt.export.export import export_model
    from glmrt.export.synthetic import TINY, make_checkpoint
    root = tmp_path_factory.mktemp("odd")
    ck = make_checkpoint(root / "ck", {**TINY, "hidden_size": 160, "intermediate_size": 224, "num_attention_heads": 5,
                                       "num_key_value_heads": 1, "head_dim": 32}, seed=8, scale=1.0)
    folder = export_model(ck, root / "m", precision=precision, target="cpu", block_size=block, progress=False)
    want = decode_logits(glmrt.load(folder))
    for isa in ISAS:
        build(folder, backend="cpu", isa=isa)
        m = glmrt.load(folder, backend="cpu")
        assert m.decoder.describe()["settings"]["isa"] == isa
        assert rel(decode_logits(m), want) < 1e-5, isa
        shutil.rmtree(folder / "engines")
