"""`glmrt export`: checkpoint folder -> model folder (ONNX graph + external weights + tokenizer
+ chat template + manifest.json). Written into a hidden temporary folder beside the target and
renamed into place only when complete, so an interrupted export never leaves a folder that
looks finished.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import signal
from pathlib import Path

import numpy as np
import onnx

import glmrt
from glmrt import manifest
from glmrt.contract import CONSUMERS, contract_to_dict
from glmrt.errors import CheckpointError, GlmrtError
from glmrt.precision import PRECISIONS, TARGETS
from glmrt.precision import precision as spec

from .checkpoint import Checkpoint
from .calibrate import activation_amax, activation_stats, default_prompts
from .decoder import ConcatEmitter
from .gqa import GqaEmitter
from .interop import GENAI_CONFIG, consumer_graph, genai_config, special_token_id
from .precision import precision_for
from .quant import combine
from .onnx_builder import GraphBuilder, WeightFile

GRAPH, WEIGHTS = "model.onnx", "model.onnx.data"
EMITTERS = {"concat": ConcatEmitter, "gqa": GqaEmitter}     # by the target's attention form
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json", "config.json")


def export_model(checkpoint: str | Path, out: str | Path, *, precision: str = "fp32",
                 target: str = "onnxruntime", block_size: int | None = None,
                 symmetric: bool = True, activations: str | None = None,
                 quantize_lm_head: bool = False, lm_head: str | None = None,
                 int8_activations: bool | None = None, calibration_prompts: int = 32, awq: bool = False,
                 float_layout: str = "kn", consumers: tuple = (), overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Export `checkpoint` to the model folder `out`; returns `out`.

    precision: fp32 | fp16 | bf16 | int4 | int8 | fp8; target: onnxruntime (MatMulNBits for
    int4/int8) | tensorrt (standard Q/DQ ops only). block_size / symmetric apply to int4/int8,
    activations (fp32 | fp16) to the quantized forms; lm_head (float | int8 | int4) and
    int8_activations (MatMulNBits' int8 compute) default to the target's choice
    (export/precision.py); quantize_lm_head gives lm_head the weights' form. FP8 calibrates activation scales on
    `calibration_prompts` prompts, and awq=True (int4/int8) searches activation-aware weight
    scales on them (export/awq.py). float_layout (target cuda): float weights stored as W^T for
    MatMul ("kn") or as the checkpoint stores them, read by FusedMatMul transB=1 ("nk").
    consumers: other runtimes to write the folder for too (glmrt.contract.CONSUMERS:
    onnxruntime-genai, optimum), each its graph over the same weights file (export/interop.py)."""
    prec = precision_for(precision, target=target, block_size=block_size, symmetric=symmetric,
                         activations=activations, quantize_lm_head=quantize_lm_head, lm_head=lm_head,
                         int8_activations=int8_activations)
    if float_layout not in ("kn", "nk") or (float_layout == "nk" and target != "cuda"):
        raise GlmrtError(f"float layout {float_layout!r}: 'kn', or 'nk' with target cuda")
    consumers = tuple(dict.fromkeys(consumers))
    for name in consumers:
        if name not in CONSUMERS:
            raise GlmrtError(f"--for {name!r}: expected one of {', '.join(CONSUMERS)}")
        if TARGETS[target].form not in CONSUMERS[name].forms:
            runs = [t for t, tt in TARGETS.items() if tt.form in CONSUMERS[name].forms]
            raise GlmrtError(f"--for {name} runs the {' or '.join(runs)} target's graph, not {target}'s")
    if awq and not spec(precision).awq:
        raise GlmrtError(f"--awq applies to {' and '.join(n for n, p in PRECISIONS.items() if p.awq)} "
                         f"weights, not {precision}")
    out = Path(out)
    synthetic = str(checkpoint).startswith("synthetic:")
    manifest.check_output(out, overwrite=overwrite, what="glmrt export",
                          owned=manifest.owned_by_manifest(("onnx-model",), subfolders=("engines",)),
                          protect=() if synthetic else (checkpoint,))
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        ckpt = open_checkpoint(checkpoint, out.parent / f".{out.name}.synthetic")
        ckpt.check()
        if not (ckpt.folder / "tokenizer.json").is_file():
            raise CheckpointError(f"{ckpt.folder / 'tokenizer.json'}: not found (glmrt needs the "
                                  "checkpoint's tokenizer files)")
        generation = _generation(ckpt)
        act_amax = awq_stats = None
        if (prec.scheme is not None and prec.scheme.calibrated) or awq:
            prompts = default_prompts(ckpt.folder / "tokenizer.json", count=calibration_prompts)
            if awq:
                awq_stats = activation_stats(ckpt, prompts, sample_rows=256)
            else:
                act_amax = activation_amax(ckpt, prompts)
        with manifest.staged(out) as tmp:
            weights = WeightFile(tmp, WEIGHTS)
            g = GraphBuilder(weights)
            emitter = EMITTERS[TARGETS[target].form](g, ckpt, prec, act_amax, awq_stats)
            emitter.float_layout = float_layout
            contract = emitter.emit(progress=progress)
            ckpt.assert_all_taken()
            weights.close()
            model = g.model(contract["inputs"], contract["outputs"], contrib=TARGETS[target].contrib_ops,
                            doc=f"GLM-4-0414 decoder exported by glmrt {glmrt.__version__} ({precision})")
            (tmp / GRAPH).write_bytes(model.SerializeToString())
            written = {n: _write_consumer(tmp, model, ckpt, prec.kv, emitter.form, n, generation)
                       for n in consumers}
            del model
            if emitter.form == "concat":    # the gqa form uses ORT-only ops the checker does not know
                for graph in [GRAPH] + [w["graph"] for w in written.values()]:
                    onnx.checker.check_model(str(tmp / graph))
            for name in TOKENIZER_FILES:
                if (ckpt.folder / name).is_file():
                    shutil.copy2(ckpt.folder / name, tmp / name)
            template = _template_source(ckpt.folder)
            files = {n: manifest.file_entry(tmp / n, weights.sha256 if n == WEIGHTS else None)
                     for n in sorted(os.listdir(tmp))}
            manifest.write(tmp, {
                "format": manifest.MANIFEST_FORMAT, "kind": "onnx-model",
                "config": ckpt.cfg.to_dict(), "io": contract_to_dict(contract),
                "precision": _precision_record(prec, emitter, act_amax, calibration_prompts),
                "graph": GRAPH, "tokenizer": "tokenizer.json", "consumers": written,
                "chat_template": template, "generation": generation, "files": files,
                "streamed_bytes_per_token": _streamed_bytes(g),
                "versions": {"glmrt": glmrt.__version__, "onnx": onnx.__version__,
                             "numpy": np.__version__, "python": platform.python_version()},
                "source": {"checkpoint": str(checkpoint) if synthetic
                           else str(ckpt.folder.resolve()),
                           "config_sha256": manifest.sha256(ckpt.folder / "config.json")},
            })
    finally:
        shutil.rmtree(out.parent / f".{out.name}.synthetic", ignore_errors=True)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return out


def _write_consumer(tmp: Path, model, ckpt, kv_dtype: str, form: str, name: str, generation: dict) -> dict:
    """Write consumer `name`'s graph (and genai_config.json for onnxruntime-genai); returns
    the manifest's record of it: its graph, IO contract and the config file it reads."""
    c = CONSUMERS[name]
    graph, contract = consumer_graph(model, ckpt.cfg, kv_dtype, form, c)
    (tmp / c.graph).write_bytes(graph.SerializeToString())
    if c.config == GENAI_CONFIG:  # optimum reads the checkpoint's own config.json (copied below)
        # the gqa form runs on CUDA in fp16 (target cuda) or on the CPU in fp32 (target cpu)
        device = "cuda" if form == "gqa" and kv_dtype == "float16" else "cpu"
        cfg = genai_config(ckpt.cfg, contract, c.graph, generation, device=device,
                           gmask_id=special_token_id(ckpt.folder / "tokenizer.json", "[gMASK]"))
        (tmp / GENAI_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return {"graph": c.graph, "io": contract_to_dict(contract), "config": c.config}


def _streamed_bytes(g: GraphBuilder) -> int:
    """Weight bytes a decode step reads: every external initializer but the embedding table
    (one row is gathered) and the rotary caches (one row each)."""
    total = 0
    for t in g.initializers:
        if t.data_location == onnx.TensorProto.EXTERNAL and not (
                t.name == "model.embed_tokens.weight" or t.name.startswith("rotary.")):
            total += int(next(e.value for e in t.external_data if e.key == "length"))
    return total


def open_checkpoint(source, scratch: Path):
    """A checkpoint folder, or `synthetic:<shape>[:<layers>]` (random weights made on the fly;
    its config and tokenizer files go to `scratch`)."""
    text = str(source)
    if text.startswith("synthetic:"):
        from .synthetic import SyntheticCheckpoint
        _, shape, *rest = text.split(":")
        try:
            layers = int(rest[0]) if rest else None
        except ValueError:
            raise GlmrtError(f"{text}: the layer count must be an integer") from None
        shutil.rmtree(scratch, ignore_errors=True)
        return SyntheticCheckpoint(scratch, shape, layers=layers)
    return Checkpoint(source)


def _precision_record(prec, emitter, act_amax, n_prompts) -> dict:
    """The manifest's precision: the scheme, each weight's measured error, FP8 scales."""
    d = prec.to_dict()
    if d["quantization"] is not None:
        errors = {k: combine(v) for k, v in emitter.qerrors.items()}
        d["quantization"]["errors"] = errors
        d["quantization"]["mean_rel_rmse"] = float(np.mean([e["rel_rmse"] for e in errors.values()]))
        if act_amax is not None:
            d["quantization"]["calibration"] = {"prompts": n_prompts, "source": "pydoc_data topics",
                                                "input_amax": act_amax}
        d["quantization"]["method"] = "awq" if emitter.awq_report else "round-to-nearest"
        if emitter.awq_report:
            r = emitter.awq_report
            d["quantization"]["awq"] = {
                "prompts": n_prompts, "source": "pydoc_data topics", "linears": r,
                "mean_output_error_rtn": float(np.mean([v["rtn"] for v in r.values()])),
                "mean_output_error_awq": float(np.mean([v["awq"] for v in r.values()]))}
    return d


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _template_source(folder: Path) -> str | None:
    """Where the chat template lives: chat_template.jinja, else tokenizer_config.json's key."""
    if (folder / "chat_template.jinja").is_file():
        return "chat_template.jinja"
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        try:
            if isinstance(json.loads(tc.read_text(encoding="utf-8")).get("chat_template"), str):
                return "tokenizer_config.json"
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{tc}: not valid JSON") from None
    return None


def _generation(ckpt: Checkpoint) -> dict:
    """Stop ids (config.json and generation_config.json together) and sampling defaults."""
    eos = list(ckpt.cfg.eos_token_id)
    gen = {}
    p = ckpt.folder / "generation_config.json"
    if p.is_file():
        try:
            gen = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{p}: not valid JSON") from None
        extra = gen.get("eos_token_id", [])
        for i in extra if isinstance(extra, list) else [extra]:
            if isinstance(i, int) and i not in eos:
                eos.append(i)
    sampling = {k: gen[k] for k in ("temperature", "top_p", "top_k", "do_sample") if k in gen}
    return {"eos_token_id": eos, "sampling": sampling}
