"""Each exported precision under ONNX Runtime vs the float64 numpy reference (glmrt.reference),
for a prefill and a run of decode steps through the runtime's own KV cache handling."""
import numpy as np
import pytest

from glmrt import reference
from glmrt.export.checkpoint import Checkpoint

PROMPT = [3, 141, 59, 265, 358, 979, 323, 846, 264, 338]
# precision -> relative tolerance (max abs error / max abs logit); measured values in comments
TOL = {"fp32": 1e-5,   # ~1e-6
       "bf16": 1e-5,   # the checkpoint is bf16: weights are exact, compute is fp32
       "fp16": 1e-2}   # ~2e-3


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("precision", list(TOL))
@pytest.mark.parametrize("name", ["tiny", "mqa-yarn"])
def test_logits_and_cache_against_float64_reference(name, precision, checkpoint, model):
    ck = Checkpoint(checkpoint(name))
    weights = ck.weights_f32()
    m = model(name, precision)
    ref, ref_cache = reference.forward(ck.cfg, weights, PROMPT)
    with m.decoder.generation() as cache:
        logits = m.decoder.step(np.array([PROMPT]), cache, keep=len(PROMPT))
        assert rel(logits[0], ref) < TOL[precision]
        # the cache holds K after RoPE, V as projected: (batch, kv_heads, seq, head_dim)
        assert rel(cache.kv[0][0], ref_cache[0][0]) < TOL[precision]
        assert rel(cache.kv[1][0], ref_cache[0][1]) < TOL[precision]
        for token in [5, 77, 901, 12, 640, 33]:
            ref, ref_cache = reference.forward(ck.cfg, weights, [token], ref_cache)
            logits = m.decoder.step(np.array([[token]]), cache)
            assert rel(logits[0, -1], ref[-1]) < TOL[precision]


def test_reference_rope_is_interleaved_not_rotate_half(checkpoint):
    """Pairs (2i, 2i+1) rotate together; dims past rotary_dim pass through unchanged."""
    cfg = Checkpoint(checkpoint("tiny")).cfg
    x = np.zeros((1, 1, cfg.head_dim))
    x[0, 0, 0] = 1.0                                   # first element of pair 0
    x[0, 0, -1] = 2.0                                  # a pass-through dim
    out = reference.rope_interleaved(x, np.array([3]), cfg)
    inv_freq, _ = cfg.rope_inv_freq()
    assert out[0, 0, 0] == pytest.approx(np.cos(3 * inv_freq[0]))
    assert out[0, 0, 1] == pytest.approx(np.sin(3 * inv_freq[0]))
    assert out[0, 0, -1] == 2.0
    assert np.count_nonzero(out) == 3
