"""One export's precision: the registry's entry (glmrt/precision.py) for a name and target,
resolved into the dtypes the graph uses and the quantization scheme object that writes its
weights (export/quant.py's SCHEMES, by the form the registry names)."""
from __future__ import annotations

import dataclasses

from glmrt.errors import GlmrtError
from glmrt.precision import PRECISIONS, TARGETS, precision

from .quant import SCHEMES, Scheme


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str
    weights: str      # dtype of float matmul / embedding weights in the graph
    compute: str      # dtype matmuls run in (and of norm weights, biases, quantization scales)
    kv: str           # dtype of the KV cache
    scheme: Scheme | None = None     # the quantization scheme (export/quant.py), None for float
    target: str = "onnxruntime"      # export target (glmrt.precision.TARGETS)
    quantize_lm_head: bool = False   # the embedding always stays float

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "weights", "compute", "kv", "target")}
        d["quantization"] = None if self.scheme is None else {
            **self.scheme.params(), "lm_head": "quantized" if self.quantize_lm_head else "float",
            "embed_tokens": "float"}
        return d


def precision_for(name: str, *, target: str = "onnxruntime", block_size: int | None = None,
                  symmetric: bool = True, activations: str | None = None,
                  quantize_lm_head: bool = False) -> Precision:
    """The Precision for a name and target; each quantization form checks its own options.
    activations: fp32 | fp16 (quantized forms; default the target's first)."""
    spec = precision(name)
    form = spec.form(target)
    if not spec.quantized:
        if block_size is not None or quantize_lm_head:
            raise GlmrtError(f"--block-size and --quantize-lm-head apply to "
                             f"{'/'.join(n for n, p in PRECISIONS.items() if p.quantized)}, not {name}")
        return Precision(name, spec.weights, spec.compute, spec.kv, None, target)
    t = TARGETS[target]
    act = {"fp32": "float32", "fp16": "float16", None: t.activations[0]}[activations]
    if act not in t.activations:
        raise GlmrtError(f"target {target} runs {' or '.join(a.replace('float', 'fp') for a in t.activations)} "
                         f"activations")
    try:
        scheme = SCHEMES[form].for_export(bits=spec.bits, block_size=block_size, symmetric=symmetric,
                                          activations=act, target=target)
    except ValueError as e:
        raise GlmrtError(f"--precision {name} --target {target}: {e}") from None
    return Precision(name, act, act, act, scheme, target, quantize_lm_head)
