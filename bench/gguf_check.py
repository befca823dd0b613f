"""Is the GGUF conversion right? A small checkpoint made by glmrt, converted by
bench/gguf_export.py, run by llama.cpp (llama-cpp-python), against glmrt's float64 reference
forward and glmrt's fp32 ONNX export of the same checkpoint: logits at every position of a few
prompts, greedy continuations, and the tokenizer on a few texts. Q8_0 / Q4_0 (llama.cpp's
quantizer) and glmrt int8 / int4 are measured against the same reference, for information.

    pip install gguf llama-cpp-python
    python3 bench/gguf_check.py [--workdir DIR]          # also: bench/vs_llama_cpp.py --check

Tolerance (F16 GGUF vs the float64 reference): per position, max |logit difference| / max
|reference logit| <= 1e-2; the top-1 token equal at every position, and greedy tokens equal,
except at near-ties (where the reference's top-2 gap is within twice the measured logit
difference: random weights make some); llama.cpp's token ids equal tokenizer.json's. The
checkpoint's weight gain is 1.0 (make_checkpoint's default 2.0 makes a chaotic network that
amplifies every rounding layer by layer: 7e-3 instead of 1e-3 here). F16 weights are exact copies of these bf16 weights (bf16 -> f16 loses nothing in this range);
what differs is llama.cpp's arithmetic (activations rounded to f16 for its F16 matmuls, an
f16 KV cache). A wrong layout (NeoX instead of interleaved RoPE, halves of gate_up swapped,
the wrong rotary width) moves logits by far more: `negative_controls` measures that.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TOL_REL = 1e-2
# hidden 256, heads 8/2 of 32 (rotary 16), 4 layers, q/k/v bias, vocab above the tokenizer's
CHECK_SIZES = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                   max_position_embeddings=2048, attention_bias=True)
PROMPT_LENGTHS = (7, 64, 200)
GREEDY_PROMPTS = 3
GREEDY_TOKENS = 24
TEXTS = ["[gMASK]<sop><|user|>\nWhat is with in Python?<|assistant|>\n",
         "def f(x):\n    return x ** 2  # square it\n\n\n",
         "The 12345 numbers, 3.14159 and 1e-10; don't we'll they're",
         "naïve café — 你好, мир!  \t tabs and   spaces\r\n",
         "<|system|>\nYou are a helpful assistant.<|user|>\nhi<|observation|>"]


def sibling(name: str):
    """Load bench/<name>.py (bench/ is not a package, and must not go on sys.path: a module
    named like an installed package would shadow it)."""
    spec = importlib.util.spec_from_file_location(f"glmrt_bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compare(got: np.ndarray, ref: np.ndarray) -> dict:
    """got, ref (positions, vocab): relative error per position (max |diff| over the vocab /
    max |ref|), top-1 agreement, and the top-1 disagreements that are not near-ties (the
    reference's top-2 gap larger than twice the largest difference at that position)."""
    diff = np.abs(got - ref).max(-1)
    rel = diff / np.abs(ref).max(-1)
    top2 = np.sort(ref, -1)[:, -2:]
    differ = got.argmax(-1) != ref.argmax(-1)
    decided = (top2[:, 1] - top2[:, 0]) > 2 * diff
    return {"rel_err_max": float(rel.max()), "rel_err_mean": float(rel.mean()),
            "top1": float(1 - differ.mean()), "top1_differ_not_near_tie": int((differ & decided).sum()),
            "positions": int(len(rel))}


def llama_logits(llm, ids) -> np.ndarray:
    """Logits of every position (the Llama was made with logits_all=True)."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[:len(ids)], np.float64)


def llama_greedy(llm, ids, n: int) -> tuple[list[int], list[np.ndarray]]:
    """n greedy tokens and the logits each was chosen from."""
    import llama_cpp
    llm.reset()
    llm.eval(list(map(int, ids)))
    out, steps = [], []
    vocab = llm.n_vocab()
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        steps.append(logits.astype(np.float64))
        out.append(int(np.argmax(logits)))
        llm.eval([out[-1]])
    return out, steps


def reference_greedy(cfg, weights, ids, n: int) -> tuple[list[int], list[np.ndarray]]:
    """float64 greedy tokens and the logits each was chosen from."""
    from glmrt import reference
    logits, cache = reference.forward(cfg, weights, ids)
    out, steps = [], []
    for _ in range(n):
        steps.append(logits[-1])
        out.append(int(np.argmax(logits[-1])))
        logits, cache = reference.forward(cfg, weights, [out[-1]], cache)
    return out, steps


def glmrt_greedy(model, ids, n: int) -> tuple[list[int], list[np.ndarray]]:
    dec = model.decoder
    out, steps = [], []
    with dec.generation() as cache:
        logits = dec.step(np.asarray(ids, np.int64)[None], cache)
        for _ in range(n):
            steps.append(logits[0, -1].astype(np.float64))
            out.append(int(np.argmax(logits[0, -1])))
            logits = dec.step(np.array([[out[-1]]], np.int64), cache)
    return out, steps


def greedy_agreement(got, ref) -> dict:
    """Tokens equal up to where the two first differ; a difference is a near-tie when the
    reference's top-2 gap there is within twice the two engines' largest logit difference
    (both saw the same context up to that step)."""
    toks, steps = got
    rtoks, rsteps = ref
    k = next((i for i, (a, b) in enumerate(zip(toks, rtoks)) if a != b), len(rtoks))
    out = {"tokens": toks, "agree": k, "of": len(rtoks)}
    if k < len(rtoks):
        top2 = np.sort(rsteps[k])[-2:]
        out["gap"] = float(top2[1] - top2[0])
        out["diff"] = float(np.abs(steps[k] - rsteps[k]).max())
        out["near_tie"] = out["gap"] <= 2 * out["diff"]
    return out


def check(workdir: str | Path | None = None, *, seed: int = 7, scale: float = 1.0, threads: int = 2,
          quantized: bool = True, controls: bool = True, converter: str | Path | None = None) -> dict:
    """Run the whole check in `workdir` (a temporary folder when None; removed afterwards);
    `converter`: a llama.cpp source tree whose convert_hf_to_gguf.py to compare with."""
    import llama_cpp
    import glmrt
    from glmrt.export.checkpoint import Checkpoint
    from glmrt.export.export import export_model
    from glmrt.export.synthetic import make_checkpoint
    from glmrt import reference
    from glmrt.tokenizer import Tokenizer
    gx = sibling("gguf_export")

    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="gguf-check-")) if own else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = make_checkpoint(work / "ckpt", CHECK_SIZES, seed=seed, scale=scale, overwrite=True)
        f16 = gx.write_gguf(ckpt, work / "check-f16.gguf")
        cfg = Checkpoint(ckpt).cfg
        weights = Checkpoint(ckpt).weights_f32()
        rng = np.random.default_rng(seed)
        prompts = [rng.integers(3, 1000, n) for n in PROMPT_LENGTHS]
        refs = [reference.forward(cfg, weights, p)[0] for p in prompts]
        n_ctx = 512

        def llama(path, logits_all=True):
            return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   n_threads=threads, n_threads_batch=threads,
                                   logits_all=logits_all, verbose=False)

        def against_reference(get_logits) -> dict:
            got = [get_logits(p) for p in prompts]
            return compare(np.concatenate(got), np.concatenate(refs))

        result = {"sizes": CHECK_SIZES, "seed": seed, "scale": scale, "prompt_lengths": list(PROMPT_LENGTHS),
                  "tolerance": {"rel_err_max": TOL_REL, "top1_and_greedy": "equal except at near-ties"}, "vs_reference": {}}
        llm = llama(f16)
        result["vs_reference"]["llama.cpp F16"] = against_reference(lambda p: llama_logits(llm, p))

        # glmrt fp32 ONNX: the same checkpoint through glmrt's own export
        onnx_dir = export_model(ckpt, work / "glmrt-fp32", precision="fp32", overwrite=True, progress=False)
        m32 = glmrt.load(onnx_dir, device="cpu", threads=threads, verify=False)
        result["vs_reference"]["glmrt fp32"] = against_reference(lambda p: m32.logits(p).astype(np.float64))
        result["llama_f16_vs_glmrt_fp32"] = compare(
            np.concatenate([llama_logits(llm, p) for p in prompts]),
            np.concatenate([m32.logits(p).astype(np.float64) for p in prompts]))

        # greedy continuations: llama.cpp F16, glmrt fp32, float64 reference
        greedy = []
        for p in prompts[:GREEDY_PROMPTS]:
            ref = reference_greedy(cfg, weights, p, GREEDY_TOKENS)
            greedy.append({"prompt_length": int(len(p)), "reference": ref[0],
                           "llama.cpp F16": greedy_agreement(
                               llama_greedy(llama(f16, logits_all=False), p, GREEDY_TOKENS), ref),
                           "glmrt fp32": greedy_agreement(glmrt_greedy(m32, p, GREEDY_TOKENS), ref)})
        result["greedy"] = greedy

        # the tokenizer: llama.cpp's glm4/chatglm-bpe pre-tokenizer + BPE vs tokenizer.json
        tok = Tokenizer(ckpt)
        texts = []
        for text in TEXTS:
            ours = llm.tokenize(text.encode(), add_bos=False, special=True)
            theirs = tok.encode(text)
            texts.append({"text": text, "equal": ours == theirs, "llama.cpp": ours, "tokenizer.json": theirs,
                          "detokenized_equal": llm.detokenize(ours, special=True).decode(errors="replace") == text})
        result["tokenizer"] = texts
        del llm

        if quantized:
            for kind in ("q8_0", "q4_0"):
                q = gx.quantize(f16, work / f"check-{kind}.gguf", kind)
                llq = llama(q)
                result["vs_reference"][f"llama.cpp {kind.upper()}"] = against_reference(lambda p: llama_logits(llq, p))
                del llq
            for prec in ("int8", "int4"):
                d = export_model(ckpt, work / f"glmrt-{prec}", precision=prec, overwrite=True, progress=False)
                mq = glmrt.load(d, device="cpu", threads=threads, verify=False)
                result["vs_reference"][f"glmrt {prec}"] = against_reference(lambda p: mq.logits(p).astype(np.float64))
        if controls:
            result["negative_controls"] = negative_controls(cfg, weights, prompts, refs,
                                                           np.concatenate([llama_logits(llama(f16), p) for p in prompts]))
        if converter:
            result["converter"] = against_converter(ckpt, f16, converter, work)
        result["passed"] = passed(result)
        return result
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


# Runs llama.cpp's own convert_hf_to_gguf.py on a checkpoint. Its tokenizer check hashes the
# tokenization of a fixed text and knows only published tokenizers, so for glmrt's synthetic
# one it stops ("BPE pre-tokenizer was not recognized"); the wrapper answers that one question
# with `pre` and changes nothing else.
CONVERTER = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
import conversion.base as base
known, fallback = base.TextModel.get_vocab_base_pre, sys.argv[2]
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return fallback
base.TextModel.get_vocab_base_pre = pre
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[3:]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def against_converter(ckpt: Path, ours: Path, llama_dir: str | Path, work: Path) -> dict:
    """Convert `ckpt` with llama.cpp's convert_hf_to_gguf.py (from a llama.cpp source tree, e.g.
    llama-cpp-python's sdist's vendor/llama.cpp; it needs torch and transformers) and compare
    with our GGUF: tensor names, types, shapes and bytes, and every metadata key."""
    import subprocess
    import gguf
    theirs = work / "converter-f16.gguf"
    pre = gguf.GGUFReader(str(ours)).fields["tokenizer.ggml.pre"].contents()
    r = subprocess.run([sys.executable, "-c", CONVERTER, str(Path(llama_dir).resolve()), pre, str(ckpt),
                        "--outtype", "f16", "--outfile", str(theirs)], capture_output=True, text=True,
                       cwd=str(llama_dir))
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}")
    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    differ = sorted(n for n in set(ta) & set(tb)
                    if ta[n].tensor_type != tb[n].tensor_type or list(ta[n].shape) != list(tb[n].shape)
                    or not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)))

    def kv(reader):
        return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    ka, kb = kv(a), kv(b)
    keys = {k: {"ours": _short(ka.get(k)), "converter": _short(kb.get(k))}
            for k in sorted(set(ka) | set(kb)) if ka.get(k) != kb.get(k)}
    theirs.unlink()
    return {"tensors": len(ta), "only_ours": sorted(set(ta) - set(tb)), "only_converter": sorted(set(tb) - set(ta)),
            "tensors_differing": differ, "metadata_differing": keys}


def _short(v):
    return v if not isinstance(v, (list, str)) or len(str(v)) < 80 else f"{str(v)[:80]}... ({len(v)} items)"


def negative_controls(cfg, weights, prompts, refs, llama_f16) -> dict:
    """How far llama.cpp's F16 logits are from references with a deliberately wrong layout:
    the check's tolerance must sit far below these (else it could not tell a wrong converter)."""
    from glmrt import reference
    out = {}
    h, rot = cfg.head_dim, cfg.rotary_dim
    # NeoX pairing (i, i + rot/2) = interleaved RoPE on q/k rows permuted within the rotary part
    perm = np.concatenate([np.arange(0, rot, 2), np.arange(1, rot, 2), np.arange(rot, h)])
    neox = dict(weights)
    for key, w in weights.items():
        if any(f"self_attn.{n}_proj" in key for n in "qk"):
            rows = w.reshape(-1, h, *w.shape[1:])[:, perm]
            neox[key] = rows.reshape(w.shape)
    variants = {
        "q/k rows permuted as for a NeoX kernel": (cfg, neox),
        "gate and up halves swapped": (cfg, {k: (np.concatenate(np.split(w, 2)[::-1]) if "gate_up" in k else w)
                                             for k, w in weights.items()}),
        "rotary over the whole head": (dataclasses.replace(cfg, partial_rotary_factor=1.0), weights),
    }
    for name, (c, w) in variants.items():
        wrong = np.concatenate([reference.forward(c, w, p)[0] for p in prompts])
        out[name] = compare(llama_f16, wrong)
    return out


def passed(r: dict) -> bool:
    f16 = r["vs_reference"]["llama.cpp F16"]
    ok = f16["rel_err_max"] <= TOL_REL and f16["top1_differ_not_near_tie"] == 0
    ok &= all(g["llama.cpp F16"]["agree"] == g["llama.cpp F16"]["of"] or g["llama.cpp F16"]["near_tie"]
              for g in r["greedy"])
    ok &= all(t["equal"] for t in r["tokenizer"])
    if "converter" in r:
        c = r["converter"]
        ok &= not (c["tensors_differing"] or c["only_ours"] or c["only_converter"])
    return bool(ok)


def format_check(r: dict) -> str:
    lines = [f"GGUF conversion check: hidden {r['sizes']['hidden_size']}, {r['sizes']['num_hidden_layers']} layers, "
             f"heads {r['sizes']['num_attention_heads']}/{r['sizes']['num_key_value_heads']} x {r['sizes']['head_dim']}, "
             f"vocab {r['sizes']['vocab_size']}, seed {r['seed']}, weight gain {r['scale']}; prompts of "
             f"{', '.join(map(str, r['prompt_lengths']))} tokens, logits at every position vs the float64 reference",
             "| weights | max rel err | mean rel err | top-1 agreement | top-1 differences not at a near-tie |",
             "|---|---|---|---|---|"]
    for name, c in r["vs_reference"].items():
        ties = (f"{c['top1_differ_not_near_tie']} of {c['positions']}" if c["rel_err_max"] <= TOL_REL
                else "n/a (errors this large make every gap a near-tie)")
        lines.append(f"| {name} | {c['rel_err_max']:.2e} | {c['rel_err_mean']:.2e} | {100 * c['top1']:.1f}% | {ties} |")
    c = r["llama_f16_vs_glmrt_fp32"]
    lines.append(f"llama.cpp F16 vs glmrt fp32: max rel err {c['rel_err_max']:.2e}, top-1 {100 * c['top1']:.1f}%")
    for g in r["greedy"]:
        parts = []
        for name in ("llama.cpp F16", "glmrt fp32"):
            a = g[name]
            parts.append(f"{name} {a['agree']}/{a['of']}" + ("" if a["agree"] == a["of"] else
                         f" (then a {'near-tie' if a['near_tie'] else 'REAL DIFFERENCE'}: reference top-2 gap "
                         f"{a['gap']:.2e}, logit difference {a['diff']:.2e})"))
        lines.append(f"greedy after a {g['prompt_length']}-token prompt, tokens equal to the reference: " + "; ".join(parts))
    n_eq = sum(t["equal"] for t in r["tokenizer"])
    lines.append(f"tokenizer: llama.cpp's ids equal tokenizer.json's on {n_eq} of {len(r['tokenizer'])} texts")
    for t in r["tokenizer"]:
        if not t["equal"]:
            lines.append(f"  differs on {t['text']!r}: {t['llama.cpp']} vs {t['tokenizer.json']}")
    for name, c in r.get("negative_controls", {}).items():
        lines.append(f"control, reference with {name}: max rel err {c['rel_err_max']:.2f}, top-1 {100 * c['top1']:.0f}%")
    if "converter" in r:
        c = r["converter"]
        lines.append(f"llama.cpp's convert_hf_to_gguf.py on the same checkpoint: {c['tensors']} tensors, "
                     f"{len(c['tensors_differing'])} differing in type, shape or bytes, "
                     f"{len(c['only_ours']) + len(c['only_converter'])} present on one side only; metadata "
                     "keys that differ: " + (", ".join(f"{k} (ours {v['ours']!r}, converter {v['converter']!r})"
                                                       for k, v in c["metadata_differing"].items()) or "none"))
    lines.append(f"tolerance (llama.cpp F16): max rel err <= {TOL_REL:g}, top-1 and greedy tokens equal except at "
                 f"near-ties, tokenizer equal: {'PASSED' if r['passed'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None, help="keep the files here (default: a temporary folder)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--converter", default=None, metavar="LLAMA_CPP_DIR",
                    help="also compare with llama.cpp's convert_hf_to_gguf.py from this source tree")
    args = ap.parse_args(argv)
    r = check(args.workdir, threads=args.threads, converter=args.converter)
    print(format_check(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
