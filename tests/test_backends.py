"""The decoder interface (glmrt/backends/base.py): the same conformance checks against every
registered backend, device and attention form that can run on this machine (the others skip,
saying why). A backend added to the registry without a recipe here fails, on purpose. glmrt's
cuda engine runs on the GPU where there is one, else in the CPU emulation of its kernels
(tests/cuda_emu), prefilled by ONNX Runtime's CPU provider on the same host memory."""
import contextlib
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import glmrt
from glmrt import reference
from glmrt.backends import BACKENDS
from glmrt.errors import GlmrtError
from glmrt.export.checkpoint import Checkpoint

PROMPT = list(range(5, 200, 9))
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()

# backend -> [(device, export precision, target and options, logits tolerance against float64)]
RECIPES = {
    "onnxruntime": [("cpu", ("fp32", "onnxruntime"), 1e-4), ("cpu", ("fp16", "cuda"), 1e-2),
                    ("cuda", ("fp16", "onnxruntime"), 1e-2), ("cuda", ("fp16", "cuda"), 1e-2)],
    "tensorrt": [("cuda", ("fp16", "tensorrt"), 1e-2)],
    "cuda": [("cuda", ("fp16", "cuda", {"float_layout": "nk"}), 1e-2)],
    # int8 weights (blocks of 128) and int8 activations against the float reference (measured 2.1e-2 .. 2.9e-2)
    "cpu": [("cpu", ("int8", "cpu"), 5e-2)],
}
CASES = [(b, dev, exp, tol) for b in BACKENDS for dev, exp, tol in RECIPES.get(b, [(None, None, None)])]


def cuda_engine_gpu() -> bool:
    try:
        from glmrt.backends.cuda_engine.device import CudaDevice
        CudaDevice()
        return True
    except glmrt.GlmrtError:
        return False


def runnable(backend, device):
    if backend == "cuda":
        from glmrt.backends.cuda_engine import nvrtc
        try:
            nvrtc.version()
        except glmrt.GlmrtError:
            return "NVRTC is not installed (pip install 'glmrt[cuda]')"
        sys.path.insert(0, str(Path(__file__).parent))
        from cuda_emu.emulator import compiler
        if not cuda_engine_gpu() and compiler() is None:
            return "no GPU for the cuda engine and no C++ compiler for its emulation"
        return None
    if backend == "cpu":
        from glmrt.backends.cpu_engine.compiler import find_compiler
        try:
            find_compiler()
        except glmrt.GlmrtError:
            return "no C compiler for glmrt's cpu engine"
        return None
    if device == "cuda" and not HAS_CUDA:
        return "no CUDA device for ONNX Runtime here"
    if backend == "tensorrt":
        try:
            import tensorrt
            tensorrt.Builder  # noqa: B018  (PyPI's placeholder has no bindings)
        except (ImportError, AttributeError):
            return "TensorRT is not installed"
    return None


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2] and '-'.join(c[2][:2])}"
                + "".join(f"-{v}" for v in (c[2][2] if c[2] and len(c[2]) > 2 else {}).values()))
def loaded(request, exported, tmp_path_factory):
    backend, device, export, tol = request.param
    assert device is not None, f"backend {backend} has no conformance recipe in tests/test_backends.py"
    why = runnable(backend, device)
    if why:
        pytest.skip(why)
    folder = exported("quant", export[0], target=export[1], **(export[2] if len(export) > 2 else {}))
    emulate = backend == "cuda" and not cuda_engine_gpu()
    if BACKENDS[backend].engine_required:
        import shutil

        from glmrt.engines.build import build
        copy = tmp_path_factory.mktemp("engine") / "m"
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("engines"))    # other tests build there too
        build(copy, backend=backend, max_prompt=128, max_context=256,
              **({"gpu": "NVIDIA H200@sm90"} if emulate else {}))
        folder = copy
    with emulated_gpu() if emulate else contextlib.nullcontext():
        return glmrt.load(folder, backend=backend, device=device, max_context=256), tol


@contextlib.contextmanager
def emulated_gpu():
    """glmrt's cuda engine loads onto the CPU emulation of an H200 (tests/cuda_emu)."""
    from cuda_emu.emulator import EmulatedDevice

    from glmrt.backends.cuda_engine import device
    real = device.CudaDevice
    device.CudaDevice = lambda index=0: EmulatedDevice("NVIDIA H200", (9, 0), sm_count=2)
    try:
        yield
    finally:
        device.CudaDevice = real


def test_describe_and_capabilities(loaded):
    m, _ = loaded
    d, caps = m.decoder.describe(), m.decoder.caps
    assert {"backend", "form", "device", "cuda_graph", "settings", "greedy"} <= set(d)
    assert d["backend"] == m.backend and caps.max_context == m.max_context <= 256
    assert caps.burst >= 1 and caps.batch >= 1


def test_steps_follow_the_float64_reference_and_the_cache_grows(loaded, checkpoint):
    m, tol = loaded
    ck = Checkpoint(checkpoint("quant"))
    w = ck.weights_f32()
    ref, ref_cache = reference.forward(ck.cfg, w, PROMPT)
    with m.decoder.generation() as cache:
        assert cache.length == 0
        logits = m.decoder.step(np.array([PROMPT]), cache, keep=3)
        assert logits.shape == (1, 3, m.config.vocab_size) and logits.dtype == np.float32
        assert rel(logits[0], ref[-3:]) < tol and cache.length == len(PROMPT)
        for token in (17, 250, 3):
            ref, ref_cache = reference.forward(ck.cfg, w, [token], ref_cache)
            assert rel(m.decoder.step(np.array([[token]]), cache)[0, -1], ref[-1]) < tol
        assert cache.length == len(PROMPT) + 3


def test_greedy_paths_agree(loaded):
    """step_greedy is the argmax of step's logits; a burst is that many greedy steps."""
    m, _ = loaded
    dec = m.decoder
    with dec.generation() as cache:
        want = [int(np.argmax(dec.step(np.array([PROMPT]), cache)[0, -1]))]
        for _ in range(5):
            want.append(int(np.argmax(dec.step(np.array([[want[-1]]]), cache)[0, -1])))
    with dec.generation() as cache:
        got = [dec.step_greedy(np.array([PROMPT]), cache)]
        got.append(dec.step_greedy(np.array([[got[-1]]]), cache))
        got += dec.greedy_burst(got[-1], cache, min(dec.caps.burst, 4))
        while len(got) < len(want):
            got.append(dec.step_greedy(np.array([[got[-1]]]), cache))
        assert cache.length == len(PROMPT) + len(got) - 1
    assert got[:len(want)] == want


def test_the_cache_limit_is_a_clear_error(loaded):
    m, _ = loaded
    limit = m.decoder.caps.max_context
    with pytest.raises(glmrt.InputError, match="longer than the model's context"):
        m.logits(list(range(5, 6 + limit)))
    with m.decoder.generation() as cache:
        m.decoder.step(np.array([[5] * (limit - 1)]), cache)
        with pytest.raises(GlmrtError, match=f"exceed|{limit}"):
            m.decoder.step(np.array([[5, 6]]), cache)
    assert len(m.generate([5] * (limit - 3), max_new_tokens=50)) <= 3


def test_threads_get_what_they_would_get_alone(loaded):
    """Concurrent decoders run generations side by side, the others take turns: either way
    each thread's tokens are the ones it gets alone."""
    m, _ = loaded
    prompts = [PROMPT[:n] for n in (4, 9, 14, 19)]
    want = [m.generate(p, max_new_tokens=6) for p in prompts]
    assert generate_in_threads(m, prompts, 6) == want


def generate_in_threads(m, prompts: list, new: int) -> list:
    """m.generate(prompt, max_new_tokens=new) for every prompt, each in a thread of its own, at once."""
    got = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, m.generate(prompts[i], max_new_tokens=new)))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return got
