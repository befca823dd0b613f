"""HF transformers eager baseline on the GPU: Glm4ForCausalLM with random bf16 weights of the
GLM-Z1-9B and GLM-4-32B shapes, batch 1: decode tok/s (median step over a greedy run with the
KV cache) and 2048-token prefill time. torch is used here only, never by glmrt."""
import argparse
import json
import time

import numpy as np
import torch
from transformers import Glm4Config, Glm4ForCausalLM

from glmrt.export.synthetic import SHAPES, hf_config


def measure(shape: str, layers: int | None, steps: int = 48, prefill: int = 2048) -> dict:
    sizes = dict(SHAPES[shape])
    if layers:
        sizes["num_hidden_layers"] = layers
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Glm4ForCausalLM(Glm4Config(**hf_config(sizes, [151329], 151329))).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(3, 1000, (1, prefill), device="cuda")
    with torch.no_grad():
        for _ in range(2):
            model(ids[:, :128])
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out = model(ids[:, :128], use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        step_times = []
        for i in range(steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            if i >= 4:
                step_times.append(time.perf_counter() - t)
    del model
    torch.cuda.empty_cache()
    return {"shape": shape, "layers": sizes["num_hidden_layers"], "prefill_tokens": prefill,
            "prefill_ms": 1e3 * float(np.median(times)), "decode_ms": 1e3 * float(np.median(step_times)),
            "decode_tok_s": 1.0 / float(np.median(step_times)), "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--shapes", default="glm-z1-9b,glm-4-32b")
    args = ap.parse_args()
    results = []
    for shape in args.shapes.split(","):
        r = measure(shape, None)
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.json:
        open(args.json, "w").write(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
