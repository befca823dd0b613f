"""The cpu target: the gqa form (GroupQueryAttention, fused norms, the KV cache updated in place)
in fp32 for ONNX Runtime's CPU provider. Its numerics are the concat form's (the onnxruntime
target), node for node fewer: same weights, same int8 activations, same logits."""
import json

import numpy as np
import onnx
import pytest

import glmrt
from glmrt import reference
from glmrt.export.checkpoint import Checkpoint

PROMPT = list(range(5, 300, 7))


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_the_cpu_form_computes_what_the_concat_form_does(exported, precision):
    """Prefill logits, decode steps through the in-place cache and greedy tokens against the
    onnxruntime target's export of the same checkpoint (the same quantized weights and lm_head),
    with float activations: equal within float rounding (measured 5.5e-7 for int4). With int8
    activations (both forms' default) the same, except where the forms' norms, which round
    differently in the last bit, put an activation at a rounding tie on the other int8 code: int4
    on this prompt, from position 30 on (7.8e-3; 4.6e-7 before it), since the scales became fp16
    values in session 16; int8 4.5e-7. Greedy tokens equal either way."""
    for int8, bound in ((False, 1e-4), (True, {"int4": 3e-2, "int8": 1e-4}[precision])):
        cpu = glmrt.load(exported("quant", precision, target="cpu", int8_activations=int8))
        concat = glmrt.load(exported("quant", precision, int8_activations=int8))
        assert cpu.manifest["io"]["form"] == "gqa" and concat.manifest["io"]["form"] == "concat"
        assert rel(cpu.logits(PROMPT), concat.logits(PROMPT)) < bound
        outs = []
        for m in (cpu, concat):
            with m.decoder.generation() as g:
                m.decoder.step(np.array([PROMPT]), g)
                outs.append([m.decoder.step(np.array([[t]]), g)[0, -1] for t in (17, 250, 3)])
        assert rel(np.array(outs[0]), np.array(outs[1])) < bound
        assert cpu.generate(PROMPT, max_new_tokens=12) == concat.generate(PROMPT, max_new_tokens=12)
        if int8 and precision == "int4":                  # the tie: only from position 30 on
            assert rel(cpu.logits(PROMPT[:30]), concat.logits(PROMPT[:30])) < 1e-4


@pytest.mark.parametrize("precision,block,level", [("int4", 32, 4), ("int8", 128, 4)])
def test_the_graph_carries_what_the_manifest_records(exported, precision, block, level):
    """int8 activations (MatMulNBits accuracy_level 4) and the CPU's blocks by default, lm_head in
    the weights' own bits, all in the graph as the manifest says."""
    folder = exported("quant", precision, target="cpu")
    q = json.loads((folder / "manifest.json").read_text())["precision"]["quantization"]
    assert q["int8_activations"] and q["accuracy_level"] == level and q["block_size"] == block
    assert q["lm_head"] == "quantized"
    nodes = [n for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nodes]
    assert len(nodes) == 4 * 2 + 1 and all(a["accuracy_level"] == level and a["block_size"] == block for a in attrs)


def test_fp32_cpu_form_matches_the_float64_reference(checkpoint, exported):
    ck = Checkpoint(checkpoint("quant"))
    m = glmrt.load(exported("quant", "fp32", target="cpu"))
    ref, _ = reference.forward(ck.cfg, ck.weights_f32(), PROMPT)
    assert rel(m.logits(PROMPT), ref) < 1e-4


def test_the_cpu_form_on_a_gpu_is_one_clear_line(exported):
    from glmrt.errors import GlmrtError
    with pytest.raises(GlmrtError, match=r"exported for the CPU \(--target cpu.*export with --target cuda"):
        glmrt.load(exported("quant", "int4", target="cpu"), device="cuda")
