"""The llama.cpp side of issue 14's CPU benchmark: bench/gguf_export.py writes a GGUF that
llama.cpp runs as the same model glmrt runs (layout, metadata, tokenizer), llama.cpp's own
quantizer makes Q4_0 / Q8_0 from it, and bench/vs_llama_cpp.py runs end to end.

Skipped unless llama-cpp-python and gguf are installed; they are not in glmrt's extras
(llama-cpp-python compiles llama.cpp from source at install time, minutes on 2 cores):

    pip install gguf llama-cpp-python
    # or a wheel built earlier for this CPU: pip install /path/to/llama_cpp_python-*.whl gguf
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[1]


def bench_module(name):
    spec = importlib.util.spec_from_file_location(f"test_bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gx():
    return bench_module("gguf_export")


@pytest.fixture(scope="module")
def check_mod():
    return bench_module("gguf_check")


@pytest.fixture(scope="module")
def small(tmp_path_factory, gx, check_mod):
    """The check's checkpoint and its F16 GGUF."""
    from glmrt.export.synthetic import make_checkpoint
    d = tmp_path_factory.mktemp("gguf")
    ckpt = make_checkpoint(d / "ckpt", check_mod.CHECK_SIZES, seed=3, scale=1.0)
    return ckpt, gx.write_gguf(ckpt, d / "m-f16.gguf")


def fields(path):
    r = gguf.GGUFReader(str(path))
    return {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}, \
        {t.name: t for t in r.tensors}


def test_gguf_layout_and_metadata_are_what_llama_cpp_glm4_reads(small):
    from glmrt.config import GlmConfig
    from glmrt.export.checkpoint import Checkpoint, bf16_to_f32
    ckpt, path = small
    cfg = GlmConfig.from_file(ckpt / "config.json")
    kv, tensors = fields(path)
    assert kv["general.architecture"] == "glm4" and kv["general.file_type"] == 1          # MOSTLY_F16
    assert kv["glm4.block_count"] == cfg.num_hidden_layers
    assert kv["glm4.embedding_length"] == cfg.hidden_size
    assert kv["glm4.feed_forward_length"] == cfg.intermediate_size                     # I, not 2I
    assert kv["glm4.attention.head_count"] == cfg.num_attention_heads
    assert kv["glm4.attention.head_count_kv"] == cfg.num_key_value_heads
    assert kv["glm4.attention.key_length"] == kv["glm4.attention.value_length"] == cfg.head_dim
    assert kv["glm4.rope.dimension_count"] == cfg.head_dim // 2                         # partial rotary
    assert kv["glm4.context_length"] == cfg.max_position_embeddings
    assert kv["glm4.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "chatglm-bpe"
    assert len(kv["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert kv["tokenizer.ggml.eos_token_id"] == cfg.pad_token_id
    # one GGUF tensor per checkpoint tensor; F16 matrices, F32 vectors; data equal to the bf16 weights
    ck = Checkpoint(ckpt)
    assert len(tensors) == len(ck.where)
    for key in ["model.layers.1.mlp.gate_up_proj.weight", "model.layers.0.self_attn.k_proj.bias",
                "model.layers.2.post_self_attn_layernorm.weight", "lm_head.weight"]:
        t = tensors[gx_name(key)]
        want = bf16_to_f32(ck.raw(key))
        assert list(t.shape[::-1]) == list(want.shape)                                 # ggml ne is reversed
        assert t.tensor_type.name == ("F16" if want.ndim == 2 else "F32")
        # bf16 -> f16 is exact except below f16's normal range (|x| < 6.1e-5: subnormals)
        exact = want.astype(np.float16) if want.ndim == 2 else want
        np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), exact)


def gx_name(key):
    return bench_module("gguf_export").gguf_name(key)


def test_an_unknown_pre_tokenizer_is_refused(tmp_path, gx, small):
    import shutil
    ckpt, _ = small
    other = tmp_path / "ckpt"
    shutil.copytree(ckpt, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="not GLM-4's"):
        gx.write_gguf(other, tmp_path / "x.gguf")


def test_llama_cpp_f16_matches_glmrt_reference_fp32_export_and_tokenizer(tmp_path, check_mod):
    r = check_mod.check(tmp_path, seed=5, quantized=False)
    print(check_mod.format_check(r))
    f16 = r["vs_reference"]["llama.cpp F16"]
    assert f16["rel_err_max"] <= 1e-2 and f16["top1_differ_not_near_tie"] == 0
    assert r["llama_f16_vs_glmrt_fp32"]["rel_err_max"] <= 1e-2
    for g in r["greedy"]:
        a = g["llama.cpp F16"]
        assert a["agree"] == a["of"] or a["near_tie"], g
    assert all(t["equal"] for t in r["tokenizer"]), r["tokenizer"]
    # the tolerance sits far below what a wrong layout does
    for name, c in r["negative_controls"].items():
        assert c["rel_err_max"] > 20 * check_mod.TOL_REL, name
    assert r["passed"]


def test_llama_cpp_quantizer_makes_q4_0_and_q8_0(tmp_path, gx, small):
    _, f16 = small
    for kind, body in (("q4_0", "Q4_0"), ("q8_0", "Q8_0")):
        q = gx.quantize(f16, tmp_path / f"m-{kind}.gguf", kind)
        _, tensors = fields(q)
        assert tensors["blk.0.ffn_up.weight"].tensor_type.name == body
        assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
        # llama.cpp keeps its output matrix at more bits than Q4_0 (Q6_K by default)
        assert tensors["output.weight"].tensor_type.name == ("Q6_K" if kind == "q4_0" else "Q8_0")
        llm = llama_cpp.Llama(str(q), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
        llm.eval([5, 6, 7])
        assert np.isfinite(np.array(llm.scores[:3])).all()
        llm.close()


def test_the_benchmark_runs_end_to_end_on_a_small_model(tmp_path):
    vs = bench_module("vs_llama_cpp")
    out = tmp_path / "r.json"
    vs.main(["--small", "--no-check", "--workdir", str(tmp_path / "w"), "--threads", "1",
             "--prompt-lengths", "16,32", "--decode-steps", "4", "--repeats", "1", "--flash-attn", "off",
             "--glmrt", "int4=--precision int4", "--llama", "q4_0", "--json", str(out)])
    r = json.loads(out.read_text())
    engines = {(x["engine"], x["label"]) for x in r["rows"]}
    assert engines == {("llama.cpp", "Q4_0 (flash attn off)"), ("glmrt", "int4")}
    glm = next(x for x in r["rows"] if x["engine"] == "glmrt")
    llm = next(x for x in r["rows"] if x["engine"] == "llama.cpp")
    for x in (glm, llm):
        assert set(x["prefill"]) == {"16", "32"} and x["decode"]["tok_s"] > 0 and x["pct_of_ceiling"] > 0
        # against the higher of the copy rates measured at the start and the end
        ceiling = max(r["copy_rate_gbps"]["1"], r["copy_rate_gbps_end"]["1"]) * 1e9
        assert x["pct_of_ceiling"] == pytest.approx(100 * x["bytes_per_token"] / ceiling / (x["decode"]["ms"] / 1e3))
        assert x["ceiling_low"] == (x["pct_of_ceiling"] > 100)
    assert glm["ratio"]["decode"] == pytest.approx(glm["decode"]["tok_s"] / llm["decode"]["tok_s"])
    assert glm["goal"]["decode"]["want"] == 1.2
    assert r["gguf"]["q4_0"]["roles"]["output.weight"] == "Q6_K"
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == []        # everything it made is gone
