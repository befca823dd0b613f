"""`glmrt build` and the TensorRT backend, as far as they run without TensorRT: profiles from
the IO contract, engine folder naming, manifest compatibility checks, FP8 support by compute
capability, clear messages, and the ONNX Runtime build. Tests that need TensorRT are marked
and skip here."""
import json
import shutil

import numpy as np
import pytest

import glmrt
from glmrt.contract import contract_from_dict
from glmrt.engine import check_compatible, engine_dir, gpu_slug
from glmrt.engines.build import build
from glmrt.engines.profiles import Limits, profiles
from glmrt.errors import ArtifactError, GlmrtError
from glmrt.gpu import Gpu, check_precision, parse_gpu

try:
    import tensorrt  # noqa: F401
    HAS_TRT = hasattr(tensorrt, "Builder")
except ImportError:
    HAS_TRT = False
needs_trt = pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed")


def contract(exported, **opts):
    d = exported("quant", "int4", target="tensorrt", **opts)
    return contract_from_dict(json.loads((d / "manifest.json").read_text())["io"])


def test_profiles_cover_prefill_and_decode(exported):
    c = contract(exported)
    pre, dec = profiles(c, Limits(max_batch=2, max_prompt=512, max_context=2048))
    assert (pre["name"], dec["name"]) == ("prefill", "decode")
    assert pre["shapes"]["input_ids"] == ((1, 1), (1, 256), (2, 512))
    assert pre["shapes"]["past_key_values.0.key"] == ((1, 2, 0, 32), (1, 2, 0, 32), (2, 2, 0, 32))
    assert pre["shapes"]["attention_mask"] == ((1, 1), (1, 256), (2, 512))
    assert dec["shapes"]["input_ids"] == ((1, 1), (1, 1), (2, 1))
    assert dec["shapes"]["past_key_values.1.value"] == ((1, 2, 1, 32), (1, 2, 1024, 32), (2, 2, 2047, 32))
    assert dec["shapes"]["attention_mask"] == ((1, 2), (1, 1025), (2, 2048))
    assert dec["shapes"]["logits_index"] == ((1,), (1,), (1,))
    assert set(pre["shapes"]) == {t.name for t in c["inputs"]}


@pytest.mark.parametrize("limits,match", [
    (Limits(max_context=10 ** 6), "exceeds the model's max_position_embeddings"),
    (Limits(max_prompt=512, max_context=256), "--max-prompt 512 exceeds --max-context 256"),
    (Limits(max_batch=0), "--max-batch must be at least 1"),
])
def test_bad_limits(limits, match):
    with pytest.raises(GlmrtError, match=match):
        limits.check(4096)


def test_engine_folders_are_keyed_by_gpu_and_precision(tmp_path):
    assert gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert engine_dir(tmp_path, "tensorrt", "fp8", gpu_name="NVIDIA GeForce RTX 4090",
                      compute_capability=(8, 9)) == tmp_path / "engines/nvidia-geforce-rtx-4090-sm89/fp8"
    assert engine_dir(tmp_path, "onnxruntime", "int4", device="cuda") == tmp_path / "engines/onnxruntime-cuda/int4"


@pytest.mark.parametrize("precision,cc,ok", [
    ("fp8", (8, 9), True), ("fp8", (9, 0), True), ("fp8", (8, 7), False), ("fp8", (8, 0), False),
    ("int4", (8, 0), True), ("int4", (7, 5), False), ("fp16", (7, 2), True)])
def test_fp8_and_int4_by_compute_capability(precision, cc, ok):
    gpu = Gpu("Some GPU", cc)
    if ok:
        check_precision(precision, gpu)
    else:
        with pytest.raises(GlmrtError, match=f"{precision} needs compute capability"):
            check_precision(precision, gpu)


def test_the_gpu_asked_about_is_cudas_device_not_nvmls(monkeypatch):
    # a Ray replica (or a container) sees its own GPU as CUDA device 0; NVML and nvidia-smi
    # number the machine's GPUs, so the engine folder must be chosen by the listed one
    from glmrt.gpu import visible
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible(1) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert (visible(0), visible(1)) == (3, 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2a, 2")
    assert (visible(0), visible(1)) == ("GPU-8f2a", 2)
    for listed in ("", "5"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
        with pytest.raises(GlmrtError, match="leaves no CUDA device 1"):
            visible(1)


def test_parse_gpu():
    assert parse_gpu("NVIDIA H200@sm90") == Gpu("NVIDIA H200", (9, 0))
    assert parse_gpu("Jetson AGX Orin@8.7") == Gpu("Jetson AGX Orin", (8, 7))
    with pytest.raises(GlmrtError, match="NAME@smXY"):
        parse_gpu("H200")


ENGINE = {"kind": "tensorrt-engine", "tensorrt": "10.14.1", "gpu": {"name": "NVIDIA H200", "compute_capability": [9, 0]}}


@pytest.mark.parametrize("here,version,match", [
    (("NVIDIA H200", (9, 0)), "10.14.1", None),
    (("NVIDIA H200", (9, 0)), "11.1.0", "built with TensorRT 10.14.1, this is TensorRT 11.1.0"),
    (("NVIDIA L40S", (8, 9)), "10.14.1", r"built for NVIDIA H200 \(sm90\), this GPU is NVIDIA L40S \(sm89\)"),
    (("NVIDIA H100 80GB HBM3", (9, 0)), "10.14.1", "built for NVIDIA H200, this GPU is NVIDIA H100"),
])
def test_engine_compatibility_is_checked_before_loading(tmp_path, here, version, match):
    where = tmp_path / "m" / "engines" / "nvidia-h200-sm90" / "fp8"
    args = dict(gpu_name=here[0], compute_capability=here[1], tensorrt_version=version, where=where)
    if match is None:
        check_compatible(ENGINE, **args)
    else:
        with pytest.raises(ArtifactError, match=match) as e:
            check_compatible(ENGINE, **args)
        assert "glmrt build" in str(e.value) and "--backend tensorrt" in str(e.value)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed")
def test_build_without_tensorrt_says_how_to_install(exported):
    with pytest.raises(GlmrtError, match=r"TensorRT is not installed: pip install 'glmrt\[tensorrt\]'"):
        build(exported("quant", "int4", target="tensorrt"), gpu="NVIDIA H200@sm90")


def test_build_refuses_contrib_op_graphs_and_mismatched_precision(exported):
    with pytest.raises(GlmrtError, match="export with --target tensorrt"):
        build(exported("quant", "int4"), gpu="NVIDIA H200@sm90")
    with pytest.raises(GlmrtError, match="holds a int4 model; export it with --precision fp8"):
        build(exported("quant", "int4", target="tensorrt"), precision="fp8", gpu="NVIDIA H200@sm90")
    with pytest.raises(GlmrtError, match="fp8 needs compute capability 8.9"):
        build(exported("quant", "fp8", target="tensorrt"), gpu="NVIDIA A100@sm80")


def test_loading_a_missing_engine_says_how_to_build(exported, monkeypatch):
    import glmrt.gpu
    monkeypatch.setattr(glmrt.gpu, "detect", lambda index=0: Gpu("NVIDIA H200", (9, 0)))
    with pytest.raises(ArtifactError, match=r"no TensorRT engine for NVIDIA H200 \(sm90\); build one: glmrt build"):
        glmrt.load(exported("quant", "int4", target="tensorrt"), backend="tensorrt")


def test_onnxruntime_build_writes_an_optimized_graph_that_runs(exported, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(exported("quant", "int4"), model)
    out = build(model, backend="onnxruntime", device="cpu")
    assert out == model / "engines" / "onnxruntime-cpu" / "int4"
    man = json.loads((out / "manifest.json").read_text())
    assert man["kind"] == "onnxruntime-optimized" and "model.opt.onnx" in man["files"]
    import onnxruntime as ort
    s = ort.InferenceSession(str(out / "model.opt.onnx"), providers=["CPUExecutionProvider"])
    assert {i.name for i in s.get_inputs()} >= {"input_ids", "logits_index"}
    with pytest.raises(GlmrtError, match="already built"):
        build(model, backend="onnxruntime", device="cpu")
    # the model folder still verifies, and loading it on the cpu now uses the optimized graph
    m = glmrt.load(model)
    assert m.decoder.describe()["graph"] == str(out / "model.opt.onnx")
    assert m.generate([5, 6, 7], max_new_tokens=6) == glmrt.load(exported("quant", "int4")).generate(
        [5, 6, 7], max_new_tokens=6)


@pytest.mark.parametrize("name,beside", [("model.onnx", False), ("model.onnx.data", True)])
def test_a_build_from_a_corrupted_file_fails_and_writes_nothing(exported, tmp_path, monkeypatch, name, beside):
    """A file changed in place (same size) fails the build with the checksum's line and leaves
    no engine folder (nor a staged one): the graph hashed before the builder parses it, the
    weights in a thread beside the build (here the threshold is lowered so this small export's
    weights file counts as large)."""
    from glmrt.engines import build as build_mod
    model = tmp_path / "m"
    shutil.copytree(exported("quant", "int4"), model)
    data = model / name
    monkeypatch.setattr(build_mod, "BESIDE", data.stat().st_size if beside else 1 << 40)
    small, weights = build_mod.split_files(json.loads((model / "manifest.json").read_text()))
    assert (name in weights) == beside and (name in small) != beside
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=f"{name}: checksum does not match"):
        build(model, backend="onnxruntime", device="cpu")
    left = list((model / "engines").rglob("*")) if (model / "engines").exists() else []
    assert not [f for f in left if f.is_file() or "partial" in f.name], left


@needs_trt
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_tensorrt_engine_logits_match_onnxruntime(exported, tmp_path, precision):
    model = tmp_path / "m"
    shutil.copytree(exported("quant", precision, target="tensorrt"), model)
    build(model, backend="tensorrt", max_prompt=128, max_context=256)
    trt_model = glmrt.load(model, backend="tensorrt")
    ort_model = glmrt.load(model)
    prompt = list(range(5, 100, 3))
    a, b = trt_model.logits(prompt), ort_model.logits(prompt)
    assert np.abs(a - b).max() / np.abs(b).max() < 2e-2
    assert trt_model.generate(prompt, max_new_tokens=16) == ort_model.generate(prompt, max_new_tokens=16)
