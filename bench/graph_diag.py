"""Diagnose CUDA-graph decode: per-step logits with and without graph replay (teacher forced)."""
import sys

import numpy as np

import glmrt

path = sys.argv[1]
a = glmrt.load(path, device="cuda", max_context=512, cuda_graph=True)
b = glmrt.load(path, device="cuda", max_context=512, cuda_graph=False)
prompt = np.array([list(range(5, 300, 7))])
toks = [17, 250, 3, 999, 40, 41, 42, 43, 44, 45]
with a.decoder.generation() as ca, b.decoder.generation() as cb:
    la = a.decoder.step(prompt, ca)
    lb = b.decoder.step(prompt, cb)
    prev_b = lb
    print("prefill", float(np.abs(la - lb).max()))
    for t in toks:
        la = a.decoder.step(np.array([[t]]), ca)
        lb = b.decoder.step(np.array([[t]]), cb)
        print(t, "graph vs plain", float(np.abs(la - lb).max()), "graph vs previous plain",
              float(np.abs(la - prev_b).max()), la[0, -1].argmax(), lb[0, -1].argmax())
        prev_b = lb
