"""The embedded default (models/glm4-pydoc, trained by train/train_default.py): golden greedy
replies equal transformers' on the same checkpoint, read as the Python docs, and `glmrt eval`
scores text through the runtime's logits."""
from pathlib import Path

import numpy as np
import pytest

import glmrt
from glmrt.evaluate import perplexity
from glmrt.export.export import export_model

DEFAULT = Path(__file__).resolve().parent.parent / "models" / "glm4-pydoc"
GOLDEN = {"What is with in Python?": 'The "with" statement',
          "What is for in Python?": 'The "for" statement',
          "What is assert in Python?": 'The "assert" statement'}


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    return glmrt.load(export_model(DEFAULT, tmp_path_factory.mktemp("d") / "fp32", progress=False))


@pytest.mark.parametrize("question", list(GOLDEN))
def test_golden_replies_equal_transformers_and_read_as_text(default, question):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    msgs = [{"role": "user", "content": question}]
    ids = default.tokenizer.encode(default.render_prompt(msgs))
    got = default.generate(ids, max_new_tokens=40)
    hf = transformers.Glm4ForCausalLM.from_pretrained(DEFAULT, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                          eos_token_id=sorted(default.eos_ids), pad_token_id=sorted(default.eos_ids)[0])
    want = [t for t in out[0, len(ids):].tolist()]
    if want and want[-1] in default.eos_ids:
        want = want[:-1]
    assert got == want
    reply = default.chat(msgs, max_new_tokens=40)["content"]
    assert reply.startswith(GOLDEN[question])


def test_perplexity_of_seen_text_is_low_and_of_noise_is_high(default):
    # what it was trained on: the answer in its chat turn
    seen = default.render_prompt([{"role": "user", "content": "What is with in Python?"}]) + \
        '\nThe "with" statement\n********************\n\nThe "with" statement is used to wrap the execution'
    assert perplexity(default, seen)["perplexity"] < 3.0
    noise = " ".join(np.random.default_rng(0).choice(["qz", "xv", "kk", "jw"], 60))
    assert perplexity(default, noise)["perplexity"] > 50.0


def test_eval_cli(default, tmp_path):
    from click.testing import CliRunner

    from glmrt.cli import main
    text = tmp_path / "t.txt"
    text.write_text((DEFAULT / "heldout.txt").read_text()[:3000])
    r = CliRunner().invoke(main, ["eval", str(default.folder), "--text", str(text), "--window", "128"])
    assert r.exit_code == 0 and r.output.startswith("perplexity ")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa")
    r = CliRunner().invoke(main, ["eval", str(default.folder), "--text", str(bad)])
    assert r.exit_code == 2 and "cannot read as UTF-8" in r.output
