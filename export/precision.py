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
    lm_head: Scheme | None = None    # lm_head's scheme (None: float); the embedding stays float

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "weights", "compute", "kv", "target")}
        d["quantization"] = None if self.scheme is None else {
            **self.scheme.params(), "lm_head": "quantized" if self.lm_head else "float",
            "embed_tokens": "float"}
        if self.lm_head is not None:
            d["quantization"]["lm_head_form"] = self.lm_head.params()
        return d


def precision_for(name: str, *, target: str = "onnxruntime", block_size: int | None = None,
                  symmetric: bool = True, activations: str | None = None,
                  quantize_lm_head: bool = False, lm_head: str | None = None,
                  int8_activations: bool | None = None) -> Precision:
    """The Precision for a name and target; each quantization form checks its own options.
    activations: fp32 | fp16 (quantized forms; default the target's first). lm_head: float |
    int8 | int4 (MatMulNBits targets; default the target's choice), or quantize_lm_head: the
    weights' own form. int8_activations: MatMulNBits multiplies int8-quantized activations
    (default the target's: on for the CPU form)."""
    spec = precision(name)
    form = spec.form(target)
    t = TARGETS[target]
    if not spec.quantized:
        if block_size is not None or quantize_lm_head or lm_head not in (None, "float") or int8_activations:
            raise GlmrtError(f"--block-size, --quantize-lm-head, --lm-head and --int8-activations apply to "
                             f"{'/'.join(n for n, p in PRECISIONS.items() if p.quantized)}, not {name}")
        compute = _float_compute(spec, t, activations)
        return Precision(name, spec.weights, compute, compute if compute != spec.compute else spec.kv, None, target)
    act = {"fp32": "float32", "fp16": "float16", None: t.activations[0]}[activations]
    if act not in t.activations:
        raise GlmrtError(f"target {target} runs {' or '.join(a.replace('float', 'fp') for a in t.activations)} "
                         f"activations")
    options = dict(block_size=block_size, symmetric=symmetric, activations=act, target=target,
                   int8_activations=int8_activations)
    try:
        scheme = SCHEMES[form].for_export(bits=spec.bits, **options)
        head = _lm_head(spec, form, t, quantize_lm_head, lm_head, scheme, options)
    except ValueError as e:
        raise GlmrtError(f"--precision {name} --target {target}: {e}") from None
    return Precision(name, act, act, act, scheme, target, head)


LM_HEAD_BITS = {"int8": 8, "int4": 4}


def _float_compute(spec, target, activations: str | None) -> str:
    """The dtype float weights multiply in: the precision's own, or float32 where the target
    computes fp16 weights in float32 (the weights stay fp16 in the file; ONNX Runtime folds
    the cast when it loads them), or the target's only one (the cuda target computes bf16
    weights in fp16: bf16 -> fp16 is exact for every value in fp16's normal range)."""
    own = spec.compute if spec.compute in target.activations else target.activations[0]
    if activations is None:
        return target.fp16_compute if spec.name == "fp16" else own
    act = {"fp32": "float32", "fp16": "float16"}[activations]
    if spec.name != "fp16" or target.name != "onnxruntime":
        if act == own:
            return act
        raise GlmrtError(f"--activations {activations}: float precisions keep their own compute dtype "
                         "except fp16 on the onnxruntime target (fp16 or fp32)")
    return act


def _lm_head(spec, form: str, target, same: bool, choice: str | None, scheme, options):
    """lm_head's scheme: the weights' own (same), a MatMulNBits of the bits chosen, or float."""
    if same:
        if choice is not None:
            raise ValueError("pass --quantize-lm-head or --lm-head, not both")
        return scheme
    if choice is None and form != "matmulnbits":   # a target's default: MatMulNBits forms only
        return None
    choice = choice or target.lm_head
    if choice == "same":                       # a target's default: the weights' own bits
        return scheme if form == "matmulnbits" else None
    if choice == "float":
        return None
    if choice not in LM_HEAD_BITS:
        raise ValueError(f"--lm-head {choice!r}: float, int8 or int4")
    if form != "matmulnbits":
        raise ValueError(f"--lm-head {choice} takes MatMulNBits targets (onnxruntime, cuda); "
                         "use --quantize-lm-head for the weights' own form")
    return SCHEMES[form].for_export(bits=LM_HEAD_BITS[choice], **options)
