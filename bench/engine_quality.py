"""The cuda engine's accuracy on the embedded default model (models/glm4-pydoc), int4 with fp16
activations (the default) and with int8 activations (`glmrt build --activations int8`): every
position of held-out text decoded by the engine's own kernels, in the CPU emulation of
tests/cuda_emu (no GPU needed; the same kernel source NVRTC compiles) or on the GPU here with
--gpu. Against the fp32 export on ONNX Runtime CPU (bench/quality.py's baseline): logits error
relative to the largest logit, top-1 agreement, perplexity. Beside them, ONNX Runtime's own int4
CUDA form of the same folder, run on its CPU provider (the same int4 weights), and the engine
with other lm_heads than the cuda target's 8-bit one (export --lm-head float / int4).

    python3 bench/engine_quality.py [--gpu] [--tokens 512] [--window 256]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import glmrt
from glmrt import manifest as manifest_io
from glmrt.engine import find_cuda_engine, read_engine
from glmrt.engines.build import build
from glmrt.evaluate import window_nll
from glmrt.export.export import export_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "models" / "glm4-pydoc"


def engine_logits(folder: Path, device, windows: list[list[int]]) -> np.ndarray:
    """(positions, V) float32: each window decoded token by token by the engine's kernels."""
    from glmrt.backends.cuda_engine.decoder import CudaDecoder
    man = manifest_io.read(folder)
    where = find_cuda_engine(folder, man["precision"]["name"], device.name, device.compute_capability)
    dec = CudaDecoder(folder, man, where, read_engine(where), device, prefill="engine",
                      max_context=max(len(w) for w in windows) + 8)
    out = []
    for w in windows:
        with dec.generation() as c:
            out.append(dec.step(np.array([w]), c, keep=len(w))[0])
    dec.close()
    return np.concatenate(out)


def scores(logits: np.ndarray, ref: np.ndarray, windows: list[list[int]]) -> dict:
    """Against the reference logits of the same positions; perplexity of each window's next tokens."""
    err = np.abs(logits - ref).max(-1) / np.abs(ref).max(-1)
    nll, n, at = 0.0, 0, 0
    for w in windows:
        nll += window_nll(logits[at:at + len(w)], w)
        n += len(w) - 1
        at += len(w)
    return {"max_rel_err": float(err.max()), "median_rel_err": float(np.median(err)),
            "top1": float((logits.argmax(-1) == ref.argmax(-1)).mean()), "perplexity": float(np.exp(nll / n))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU here instead of the CPU emulation")
    ap.add_argument("--tokens", type=int, default=512, help="held-out tokens scored")
    ap.add_argument("--window", type=int, default=256, help="tokens per window (each starts without context)")
    ap.add_argument("--forms", default="fp16,int8,lmh16,lmh4",
                    help="engine rows: fp16 (the default build), int8 (--activations int8), lmh16 / lmh4 (an fp16 / "
                         "int4 lm_head instead of the cuda target's 8-bit one)")
    args = ap.parse_args()
    if args.gpu:
        from glmrt.backends.cuda_engine.device import CudaDevice
        device, gpu = CudaDevice(), "auto"
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from cuda_emu.emulator import EmulatedDevice
        device, gpu = EmulatedDevice(sm_count=4), "NVIDIA H200@sm90"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_model(DEFAULT, tmp / "fp32", precision="fp32")
        fp32 = glmrt.load(tmp / "fp32")
        ids = fp32.tokenizer.encode((DEFAULT / "heldout.txt").read_text(encoding="utf-8"))[:args.tokens]
        windows = [ids[s:s + args.window] for s in range(0, len(ids), args.window) if len(ids[s:s + args.window]) > 1]
        ref = np.concatenate([fp32.logits(w) for w in windows]).astype(np.float64)
        rows.append(("fp32 export, ONNX Runtime CPU (the reference)", scores(ref, ref, windows)))
        export_model(DEFAULT, tmp / "int4", precision="int4", target="cuda")
        ort = glmrt.load(tmp / "int4", device="cpu")
        rows.append(("int4 cuda form (8-bit lm_head), ONNX Runtime (its CPU provider), fp16 activations",
                     scores(np.concatenate([ort.logits(w) for w in windows]), ref, windows)))
        forms = args.forms.split(",")
        for lm in ("float", "int4"):
            export_model(DEFAULT, tmp / f"int4-lmh{lm}", precision="int4", target="cuda", lm_head=lm)
        ort16 = glmrt.load(tmp / "int4-lmhfloat", device="cpu")
        rows.append(("int4 cuda form, fp16 lm_head (--lm-head float), ONNX Runtime (its CPU provider)",
                     scores(np.concatenate([ort16.logits(w) for w in windows]), ref, windows)))
        for key, label, act, lm in (
                ("fp16", "int4, cuda engine, fp16 activations, 8-bit lm_head (the defaults)", None, None),
                ("int8", "int4, cuda engine, int8 activations (--activations int8)", "int8", None),
                ("lmh16", "int4, cuda engine, fp16 lm_head (export --lm-head float)", None, "float"),
                ("lmh4", "int4, cuda engine, int4 lm_head (export --lm-head int4)", None, "int4")):
            if key not in forms:
                continue
            folder = tmp / f"engine-{act or 'fp16'}-{lm or 'lmh16'}"
            shutil.copytree(tmp / (f"int4-lmh{lm}" if lm else "int4"), folder)
            build(folder, backend="cuda", gpu=gpu, activations=act)
            t = time.perf_counter()
            rows.append((label, scores(engine_logits(folder, device, windows), ref, windows)))
            print(f"  ({label}: {time.perf_counter() - t:.0f} s)", file=sys.stderr)
    where = "GPU: " + device.name if args.gpu else "CPU emulation of the kernels (tests/cuda_emu)"
    print(f"Default model (models/glm4-pydoc), {sum(len(w) for w in windows)} held-out tokens in windows of "
          f"{args.window}; engine on the {where}; errors and top-1 against the fp32 export.\n")
    print("| form | logits rel. error, max / median | top-1 agreement | held-out ppl |")
    print("|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['max_rel_err']:.2e} / {r['median_rel_err']:.2e} | {100 * r['top1']:.1f}% | "
              f"{r['perplexity']:.2f} |")


if __name__ == "__main__":
    main()
