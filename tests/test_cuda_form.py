"""The CUDA form (GroupQueryAttention, fused norms, device KV cache through IOBinding): its
numerics on ONNX Runtime's CPU provider here, and on the GPU where onnxruntime-gpu is present
(those tests skip cleanly elsewhere)."""
import os
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import glmrt
from glmrt import reference
from glmrt.errors import GlmrtError
from glmrt.export.checkpoint import Checkpoint
from glmrt.export.export import export_model

PROMPT = list(range(5, 300, 7))
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with a CUDA device")


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def cuda_form(exported):
    def get(precision="fp16", float_layout="kn"):
        return exported("quant", precision, target="cuda", float_layout=float_layout)
    return get


@pytest.mark.parametrize("precision,layout", [("fp16", "kn"), ("fp16", "nk"), ("bf16", "nk")])
def test_float_cuda_forms_match_the_reference_on_cpu(checkpoint, cuda_form, precision, layout):
    """fp16 and bf16 weights (the checkpoint's bf16 values stored as they are, cast to fp16 in the
    graph: exact in fp16's range), fp16 activations, against the float64 reference."""
    ck = Checkpoint(checkpoint("quant"))
    w = ck.weights_f32()
    m = glmrt.load(cuda_form(precision, layout), max_context=256)
    assert m.manifest["io"]["form"] == "gqa" and m.manifest["precision"]["compute"] == "float16"
    ref, cache = reference.forward(ck.cfg, w, PROMPT)
    assert rel(m.logits(PROMPT), ref) < 1e-2          # fp16 weights and activations: ~7e-4
    with m.decoder.generation() as n:
        logits = m.decoder.step(np.array([PROMPT]), n)
        for token in [17, 250, 3, 999]:                   # decode steps through the device cache
            ref, cache = reference.forward(ck.cfg, w, [token], cache)
            logits = m.decoder.step(np.array([[token]]), n)
            assert rel(logits[0, -1], ref[-1]) < 1e-2
        assert n.length == len(PROMPT) + 4


def test_greedy_tokens_agree_with_the_fp32_cpu_form(cuda_form, model):
    m = glmrt.load(cuda_form("fp16"), max_context=256)
    assert m.generate(PROMPT, max_new_tokens=24) == model("quant").generate(PROMPT, max_new_tokens=24)


def test_device_cache_generations_take_turns(cuda_form):
    m = glmrt.load(cuda_form("int4"), max_context=256)
    prompts = [PROMPT[:n] for n in (5, 9, 13, 17)]
    want = [m.generate(p, max_new_tokens=8) for p in prompts]
    got = [None] * 4
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, m.generate(prompts[i], max_new_tokens=8)))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_cache_bound_is_a_clear_error(cuda_form):
    m = glmrt.load(cuda_form("fp16"), max_context=64)
    with pytest.raises(glmrt.InputError, match="longer than the model's context"):
        m.logits(list(range(5, 100)))


def test_float_layout_is_checked(checkpoint, tmp_path):
    with pytest.raises(GlmrtError, match="float layout 'nk': 'kn', or 'nk' with target cuda"):
        export_model(checkpoint("quant"), tmp_path / "o", precision="fp16", float_layout="nk", progress=False)
    with pytest.raises(GlmrtError, match="float layout 'mk'"):
        export_model(checkpoint("quant"), tmp_path / "o", precision="fp16", target="cuda",
                     float_layout="mk", progress=False)
    assert not (tmp_path / "o").exists()


def test_cuda_target_refuses_what_it_cannot_run(checkpoint, tmp_path):
    with pytest.raises(GlmrtError, match="target cuda .* takes fp16, bf16, int4, int8 or fp8, not fp32"):
        export_model(checkpoint("quant"), tmp_path / "o", precision="fp32", target="cuda", progress=False)
    with pytest.raises(GlmrtError, match="rotary_dim/2 a multiple of 8"):
        export_model(checkpoint("tiny"), tmp_path / "o", precision="fp16", target="cuda", progress=False)
    assert not (tmp_path / "o").exists()


def test_cuda_device_without_gpu_says_how_to_get_one(cuda_form):
    if HAS_CUDA:
        pytest.skip("a GPU is present")
    with pytest.raises(GlmrtError, match=r"onnxruntime-gpu .*pip install 'glmrt\[gpu\]'"):
        glmrt.load(cuda_form("fp16"), device="cuda")


@gpu
@pytest.mark.parametrize("name,layout", [("quant", "kn"), ("quant", "nk"), ("mqa-yarn", "kn")])
def test_gpu_logits_match_cpu_fp32_within_fp16_tolerance(name, layout, exported, model):
    if name == "mqa-yarn":
        pytest.skip("rotary_dim 8: GroupQueryAttention needs a multiple of 16")
    m = glmrt.load(exported(name, "fp16", target="cuda", float_layout=layout), device="cuda",
                   max_context=512)
    ref = model(name).logits(PROMPT)
    got = m.logits(PROMPT)
    assert rel(got, ref) < 1e-2
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    # greedy: every token the GPU picks is the fp32 CPU path's best or within fp16 noise of it
    # (exact equality breaks on this random model's near-ties: seen on the H200 at token 16)
    gpu_tokens = m.generate(PROMPT, max_new_tokens=24)
    full = model(name).logits(PROMPT + gpu_tokens)[len(PROMPT) - 1:-1]          # (24, V) fp32
    gap = full.max(-1) - full[np.arange(len(gpu_tokens)), gpu_tokens]
    assert (gap <= 1e-2 * np.abs(full).max()).all(), gap
    assert gpu_tokens[:12] == model(name).generate(PROMPT, max_new_tokens=12)


@gpu
def test_gpu_int4_and_cuda_graph_decode(exported, model):
    m = glmrt.load(exported("quant", "int4", target="cuda"), device="cuda", max_context=512)
    cpu = glmrt.load(exported("quant", "int4", target="cuda"), device="cpu", max_context=512)
    assert m.decoder.cuda_graph
    assert m.generate(PROMPT, max_new_tokens=24) == cpu.generate(PROMPT, max_new_tokens=24)
    assert m.generate(PROMPT[:9], max_new_tokens=24) == cpu.generate(PROMPT[:9], max_new_tokens=24)


def test_greedy_steps_take_the_argmax_in_the_graph(cuda_form):
    """step_greedy returns the graph's next_token (ArgMax of the logits, first max on ties) and
    generate uses it; an export without next_token falls back to the host argmax."""
    m = glmrt.load(cuda_form("int4"), max_context=256)
    dec = m.decoder
    assert dec.device_greedy and dec.caps.device_argmax
    with dec.generation() as n:
        logits = dec.step(np.array([PROMPT]), n)
    with dec.generation() as n:
        token = dec.step_greedy(np.array([PROMPT]), n)
        assert token == int(np.argmax(logits[0, -1])) and n.length == len(PROMPT)
        for _ in range(6):                               # decode steps: compare with the logits path
            with_logits = dec.step(np.array([[token]]), n)        # same position, overwritten below
            n.length -= 1
            nxt = dec.step_greedy(np.array([[token]]), n)
            assert nxt == int(np.argmax(with_logits[0, -1]))
            token = nxt
    via_device = m.generate(PROMPT, max_new_tokens=12)
    dec.device_greedy = False
    assert m.generate(PROMPT, max_new_tokens=12) == via_device


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_greedy_bursts_give_the_step_by_step_tokens(cuda_form, device):
    """Bursts chain each step's argmax into the next step's input on the device, and come
    back once per burst: the same tokens as one step at a time, for lengths that end
    mid-burst, with a stop token inside a burst, and with the cache bound checked."""
    path = cuda_form("int4")
    one = glmrt.load(path, max_context=256, burst=1)
    assert one.decoder.caps.burst == 1
    m = glmrt.load(path, device=device, max_context=256, burst=3)
    assert m.decoder.caps.burst == 3
    for prompt, new in ((PROMPT, 13), (PROMPT[:9], 7), (PROMPT[:4], 1)):
        want = one.generate(prompt, max_new_tokens=new)
        assert m.generate(prompt, max_new_tokens=new) == want
    want = one.generate(PROMPT, max_new_tokens=20)
    stop = want[7]                                       # a stop token in the middle of a burst
    first = want.index(stop)
    for mm in (one, m):
        mm.eos_ids = frozenset({stop})
    res = glmrt.model.Generation([])
    assert m.generate(PROMPT, max_new_tokens=20, result=res) == want[:first]
    assert res.finish_reason == "stop" and res.stop_token == stop
    assert m.generate(PROMPT, max_new_tokens=20) == one.generate(PROMPT, max_new_tokens=20)
    with m.decoder.generation() as n:                   # the bound: no step past max_context
        n.length = 254
        with pytest.raises(GlmrtError, match="exceed the cache of 256"):
            m.decoder.greedy_burst(5, n, 3)
        n.length = 0
        with pytest.raises(GlmrtError, match="1 to 3"):
            m.decoder.greedy_burst(5, n, 4)
    with pytest.raises(GlmrtError, match="burst=0"):
        glmrt.load(path, max_context=256, burst=0)


def test_ort_switches_are_defaults_scoped_to_session_creation(monkeypatch):
    """glmrt's ORT switch defaults hold only while a session is made, and never override
    what the user's environment sets."""
    from glmrt.backends.ort_session import CUDA_ORT_DEFAULTS, ort_settings
    monkeypatch.delenv("ORT_ENABLE_XQA", raising=False)
    with ort_settings(CUDA_ORT_DEFAULTS) as s:
        assert os.environ["ORT_ENABLE_XQA"] == "0" and s == {"ORT_ENABLE_XQA": "0"}
    assert "ORT_ENABLE_XQA" not in os.environ
    monkeypatch.setenv("ORT_ENABLE_XQA", "1")
    with ort_settings(CUDA_ORT_DEFAULTS) as s:
        assert s == {"ORT_ENABLE_XQA": "1"}
    assert os.environ["ORT_ENABLE_XQA"] == "1"


@gpu
def test_gpu_session_records_the_ort_switches_it_ran_with(cuda_form, monkeypatch):
    monkeypatch.delenv("ORT_ENABLE_XQA", raising=False)
    m = glmrt.load(cuda_form("int4"), device="cuda", max_context=64)
    assert m.decoder.describe()["settings"] == {"ORT_ENABLE_XQA": "0"}
    assert "ORT_ENABLE_XQA" not in glmrt.load(cuda_form("int4"), max_context=64).decoder.describe()["settings"]


def test_an_8bit_matmulnbits_export_asks_for_onnxruntime_1_22_on_cuda():
    """The cuda target's 8-bit lm_head (and int8 weights) run on ONNX Runtime's CUDA provider from
    1.22: an older one is named in one line before a session is made; the CPU provider and
    4-bit-only exports are not held to it."""
    from glmrt.backends.ort_session import check_ort_version
    int4 = {"form": "matmulnbits", "bits": 4}
    head8 = {"precision": {"quantization": {**int4, "lm_head_form": {"form": "matmulnbits", "bits": 8}}}}
    with pytest.raises(GlmrtError, match=r"^m: its 8-bit MatMulNBits needs onnxruntime-gpu 1\.22 or newer on "
                                         r"CUDA \(this is 1\.21\.1\); upgrade it, or export with --lm-head float$"):
        check_ort_version(Path("m"), head8, "cuda", "1.21.1")
    for ok in ("1.22.0", "1.31.1", "2.0.0.dev1"):
        check_ort_version(Path("m"), head8, "cuda", ok)
    check_ort_version(Path("m"), head8, "cpu", "1.20.0")
    check_ort_version(Path("m"), {"precision": {"quantization": int4}}, "cuda", "1.20.0")
    check_ort_version(Path("m"), {"precision": {"name": "fp16"}}, "cuda", "1.20.0")
    with pytest.raises(GlmrtError):
        check_ort_version(Path("m"), {"precision": {"quantization": {"form": "matmulnbits", "bits": 8}}}, "cuda", "1.21")
