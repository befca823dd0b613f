"""Accuracy of every precision on the embedded default model (models/glm4-pydoc), on ONNX
Runtime CPU: logits relative error and top-1 agreement vs the fp32 export over the same
positions, and perplexity on held-out text (never trained on) and on seen text (answers in
their chat turns: what the model learned). transformers fp32 gives the reference perplexity.

    python3 bench/quality.py > bench/quality.md
"""
import sys
import tempfile
from pathlib import Path

import numpy as np

import glmrt
from glmrt.evaluate import perplexity
from glmrt.export.export import export_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "models" / "glm4-pydoc"
sys.path.insert(0, str(ROOT / "train"))
from train_default import chunks, question, split_topics  # noqa: E402

VARIANTS = [  # label, export options
    ("fp32", dict(precision="fp32")),
    ("bf16", dict(precision="bf16")),
    ("fp16 (fp16 compute)", dict(precision="fp16", activations="fp16")),
    ("fp16 weights, fp32 compute", dict(precision="fp16", activations="fp32")),
    ("int8 b32, float activations, lm_head float", dict(precision="int8", block_size=32, int8_activations=False,
                                                        lm_head="float")),
    ("int8 b32, int8 activations, lm_head float", dict(precision="int8", block_size=32, lm_head="float")),
    ("int8 b32, int8 activations, lm_head int8 (--block-size 32)", dict(precision="int8", block_size=32)),
    ("int8 b128, int8 activations, lm_head int8 (CPU default: block 128, the weights' bits)", dict(precision="int8")),
    ("int8 Q/DQ per-channel (TensorRT)", dict(precision="int8", target="tensorrt", activations="fp32")),
    ("int4 b32, float activations, lm_head float", dict(precision="int4", int8_activations=False, lm_head="float")),
    ("int4 b32, int8 activations, lm_head float", dict(precision="int4", lm_head="float")),
    ("int4 b32, int8 activations, lm_head int8", dict(precision="int4", lm_head="int8")),
    ("int4 b32, int8 activations, lm_head int4 (CPU default: the weights' bits)", dict(precision="int4")),
    ("int4 b32 asym, int8 activations, lm_head int8", dict(precision="int4", symmetric=False, lm_head="int8")),
    ("int4 b32 + AWQ, int8 activations, lm_head int8", dict(precision="int4", awq=True, lm_head="int8")),
    ("int4 b128, int8 activations, lm_head int8", dict(precision="int4", block_size=128, lm_head="int8")),
    ("int4 b128, int8 activations, lm_head int4 (the CPU's faster option: --block-size 128)",
     dict(precision="int4", block_size=128)),
    ("int4 b128 + AWQ, int8 activations, lm_head int4", dict(precision="int4", block_size=128, awq=True)),
    ("int4 Q/DQ b64 (TensorRT)", dict(precision="int4", target="tensorrt", block_size=64, activations="fp32")),
    ("fp8 e4m3 Q/DQ (TensorRT)", dict(precision="fp8", target="tensorrt", activations="fp32")),
]


def seen_text() -> str:
    parts = []
    for key, (train, _) in list(split_topics().items())[::4]:
        parts.append(f"[gMASK]<sop><|user|>\n{question(key, 0)}<|assistant|>\n{chunks(train)[0]}<|user|>")
    return "".join(parts)


def hf_perplexity(text: str, tok, window: int) -> float:
    import torch
    from transformers import Glm4ForCausalLM
    hf = Glm4ForCausalLM.from_pretrained(DEFAULT, dtype=torch.float32).eval()
    ids = tok.encode(text)
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, window):
            chunk = ids[s:s + window]
            if len(chunk) < 2:
                break
            logp = torch.log_softmax(hf(torch.tensor([chunk])).logits[0, :-1].double(), -1)
            nll -= float(logp[torch.arange(len(chunk) - 1), torch.tensor(chunk[1:])].sum())
            n += len(chunk) - 1
    return float(np.exp(nll / n))


def main():
    heldout = (DEFAULT / "heldout.txt").read_text(encoding="utf-8")
    seen = seen_text()
    window = 256
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = None
        for label, opts in VARIANTS:
            m = glmrt.load(export_model(DEFAULT, Path(tmp) / label.replace(" ", "_").replace("/", "_"),
                                        progress=False, **opts))
            ids = m.tokenizer.encode(seen)[:1024]
            logits = np.concatenate([m.logits(ids[s:s + window]) for s in range(0, len(ids), window)])
            if ref is None:
                ref = logits
            rel = float(np.abs(logits - ref).max() / np.abs(ref).max())
            top1 = float((logits.argmax(-1) == ref.argmax(-1)).mean())
            q = m.manifest["precision"]["quantization"]
            rows.append((label, rel, top1, perplexity(m, heldout, window)["perplexity"],
                         perplexity(m, seen, window)["perplexity"],
                         q["mean_rel_rmse"] if q else None, len(ids)))
            tok = m.tokenizer
    print(f"| precision | logits rel. error vs fp32 | top-1 agreement ({rows[0][6]} positions) "
          f"| held-out ppl | seen ppl | mean weight rel. RMSE |")
    print("|---|---|---|---|---|---|")
    print(f"| transformers fp32 (torch) | – | – | {hf_perplexity(heldout, tok, window):.1f} "
          f"| {hf_perplexity(seen, tok, window):.3f} | – |")
    for label, rel, top1, ph, ps, err, _ in rows:
        print(f"| {label} | {rel:.2e} | {100 * top1:.1f}% | {ph:.1f} | {ps:.3f} | "
              f"{'–' if err is None else f'{err:.4f}'} |")


if __name__ == "__main__":
    main()
