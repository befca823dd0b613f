"""The runtime API on the tiny checkpoint: generation, stops, limits, sampling, streaming,
threads, and that it runs with torch unimportable."""
import subprocess
import sys
import threading

import numpy as np
import pytest

import glmrt
from glmrt.errors import InputError
from glmrt.model import Generation
from glmrt.sampling import Sampler, SamplingParams

PROMPT = [3, 141, 59, 265, 358, 979, 323, 846]


def test_logits_shape_and_dtype(model):
    m = model()
    out = m.logits(PROMPT)
    assert out.shape == (len(PROMPT), m.config.vocab_size) and out.dtype == np.float32


def test_same_call_same_seed_same_output(model):
    m = model()
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a, b = m.generate(PROMPT, **kw), m.generate(PROMPT, **kw)
    assert a == b
    assert a != m.generate(PROMPT, **{**kw, "seed": 8})


def test_stops_on_every_end_token_and_does_not_return_it(exported):
    m = glmrt.load(exported())
    free = m.generate(PROMPT, max_new_tokens=10)
    eos = m.eos_ids
    for stop_at in (0, 4):
        m.eos_ids = eos | {free[stop_at]}
        res = Generation([])
        got = list(m.stream(PROMPT, max_new_tokens=10, result=res))
        assert got == free[:stop_at] == res.tokens
        assert res.finish_reason == "stop" and res.stop_token == free[stop_at]


def test_length_limits(model):
    m = model()
    res = Generation([])
    assert len(list(m.stream(PROMPT, max_new_tokens=5, result=res))) == 5
    assert res.finish_reason == "length"
    near = [5] * (m.max_context - 3)
    assert len(m.generate(near, max_new_tokens=50)) <= 3     # capped by the context
    with pytest.raises(InputError, match="longer than the model's context"):
        m.generate([5] * (m.max_context + 1))


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -1.0}, "temperature=-1.0"),
    ({"top_p": float("nan")}, "top_p=nan"),
    ({"top_k": -3}, "top_k=-3"),
    ({"repetition_penalty": 0.0}, "repetition_penalty=0.0"),
    ({"max_new_tokens": -1}, "max_new_tokens=-1"),
    ({"seed": "x"}, "seed='x'"),
])
def test_bad_sampling_parameters(model, kwargs, match):
    with pytest.raises(InputError, match=match):
        model().generate(PROMPT, **kwargs)


@pytest.mark.parametrize("ids,match", [([], "non-empty"), ([[1, 2]], "1-D"), ([1, 10 ** 6], "outside the vocabulary")])
def test_bad_token_ids(model, ids, match):
    with pytest.raises(InputError, match=match):
        model().logits(ids)


def test_sampler_rules():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(100).astype(np.float32)
    best = int(logits.argmax())
    assert Sampler(SamplingParams())(logits, np.array([])) == best
    assert Sampler(SamplingParams(temperature=5.0, top_k=1, seed=1))(logits, np.array([])) == best
    assert Sampler(SamplingParams(temperature=5.0, top_p=1e-6, seed=1))(logits, np.array([])) == best
    # top_k=3: only the three best ever come out
    s = Sampler(SamplingParams(temperature=10.0, top_k=3, seed=2))
    assert {s(logits, np.array([])) for _ in range(200)} == set(np.argsort(logits)[-3:].tolist())
    # a strong repetition penalty moves greedy off a token already seen
    assert Sampler(SamplingParams(repetition_penalty=100.0))(logits, np.array([best])) != best


def test_stream_decoder_emits_whole_characters(model):
    tok = model().tokenizer
    text = "naïve café — 世界 🎉 done"
    ids = tok.encode(text)
    dec = tok.stream()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) < len(ids)          # some multi-byte chars were held back


def test_chat_renders_template_and_streams(model):
    m = model()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    prompt = m.render_prompt(msgs)
    assert prompt.startswith("[gMASK]<sop><|system|>\nBe brief.<|user|>\nHello")
    assert prompt.endswith("<|assistant|>")
    ids = m.tokenizer.encode(prompt)
    assert ids[:2] == [m.tokenizer.id_of("[gMASK]"), m.tokenizer.id_of("<sop>")]
    reply = m.chat(msgs, max_new_tokens=12)
    assert reply["role"] == "assistant" and reply["finish_reason"] == "length"
    text = m.tokenizer.decode(m.generate(ids, max_new_tokens=12), skip_special=False)
    assert reply == {**glmrt.parse_reply(text, truncated=True).as_message(), "finish_reason": "length"}
    deltas = list(m.chat_stream(msgs, max_new_tokens=12))
    assert deltas[-1].kind == "done" and deltas[-1].message == reply
    assert "".join(d.text for d in deltas if d.kind == "content") == reply["content"]


def test_concurrent_calls_each_get_their_own_output(model):
    m = model()
    prompts = [PROMPT[:n] for n in range(2, 8)]
    want = [m.generate(p, max_new_tokens=12) for p in prompts]
    got = [None] * len(prompts)

    def run(i):
        got[i] = m.generate(prompts[i], max_new_tokens=12)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_import_glmrt_is_light():
    code = "import sys, glmrt; print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'transformers', 'glmrt.export') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_generation_runs_with_torch_unimportable(exported, model):
    want = model().generate(PROMPT, max_new_tokens=10)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['transformers'] = None\n"  # import raises
        "import glmrt\n"
        f"m = glmrt.load({str(exported())!r})\n"
        f"print(m.generate({PROMPT}, max_new_tokens=10))\n"
        "print(m.chat([{'role': 'user', 'content': 'hi'}], max_new_tokens=4)['role'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [str(want), "assistant"]
