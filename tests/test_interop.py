"""Model folders other runtimes run (export --for): onnxruntime-genai on the CPU form and on the
CUDA form (GroupQueryAttention, which ONNX Runtime's CPU provider runs too), and optimum's
ORTModelForCausalLM on the CPU form, each against glmrt's own runtime on the same folder:
the same greedy tokens for several prompts, and the same logits at every step.

optimum runs here in a package folder of its own, laid over this environment's torch, numpy
and onnxruntime: its ORTModelForCausalLM (optimum-onnx 0.1) needs transformers < 4.58 and does
not import beside transformers 5, which the reference tests use (README, "Other runtimes").
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import glmrt
from glmrt.cli import main
from glmrt.errors import GlmrtError
from glmrt.export.export import export_model
from glmrt.export.synthetic import TINY, make_checkpoint
from pinned import pinned_site

og = pytest.importorskip("onnxruntime_genai")        # the test extra installs it

PROMPTS = [list(range(5, 300, 7)), [17, 250, 3, 999, 42], [600, 7, 7, 7, 31, 400, 12, 81, 5]]
NEW = 24
BOTH = ("onnxruntime-genai", "optimum")


@pytest.fixture(scope="module")
def folders(exported):
    """The CPU form for both consumers (fp32) and the CUDA form for onnxruntime-genai (fp16)."""
    return {"concat": exported("quant", "fp32", consumers=BOTH),
            "gqa": exported("quant", "fp16", target="cuda", consumers=("onnxruntime-genai",))}


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def genai_model(folder: Path):
    cfg = og.Config(str(folder))
    cfg.clear_providers()                                 # the CUDA form's config names cuda
    return og.Model(cfg)


def genai_greedy(model, prompt: list, eos, new: int = NEW, max_length: int = 256):
    """onnxruntime-genai's greedy tokens (stop token not returned) and each step's logits."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    tokens, rows = [], []
    while not gen.is_done() and len(tokens) < new:
        rows.append(np.asarray(gen.get_logits(), np.float32).reshape(-1))   # what the next token is chosen from
        gen.generate_next_token()
        t = int(gen.get_next_tokens()[0])
        if t in eos:
            break
        tokens.append(t)
    return tokens, rows


# ---- the folder: every graph described, weights written once, glmrt's graph unchanged ----------
def test_manifest_describes_every_graph_and_the_weights_are_shared(folders):
    for form, folder in folders.items():
        man = json.loads((folder / "manifest.json").read_text())
        assert set(man["consumers"]) == (set(BOTH) if form == "concat" else {"onnxruntime-genai"})
        assert [p.name for p in folder.glob("*.data")] == ["model.onnx.data"]
        data = (folder / "model.onnx.data").stat().st_size
        for name, rec in man["consumers"].items():
            io = rec["io"]
            assert io["consumer"] == name and io["form"] == form and rec["graph"] in man["files"]
            graph = onnx.load(str(folder / rec["graph"]), load_external_data=False)
            external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
            assert external and {e.value for t in external for e in t.external_data
                                 if e.key == "location"} == {"model.onnx.data"}
            assert (folder / rec["graph"]).stat().st_size < data / 10        # nodes only
            s = ort.InferenceSession(str(folder / rec["graph"]), providers=["CPUExecutionProvider"])
            for got, want in ((s.get_inputs(), io["inputs"]), (s.get_outputs(), io["outputs"])):
                assert [t.name for t in got] == [t["name"] for t in want]
                assert [t.type for t in got] == [f"tensor({t['dtype'].replace('float32', 'float')})"
                                                  for t in want]
            assert "logits_index" not in {t.name for t in s.get_inputs()}
        assert "onnxruntime-genai" not in man["consumers"] or (folder / "genai_config.json").is_file()


def test_glmrt_own_graph_and_runtime_are_unchanged_by_consumers(folders, exported):
    plain = exported("quant", "fp32")
    digest = [hashlib.sha256((f / "model.onnx").read_bytes()).hexdigest() for f in (plain, folders["concat"])]
    assert digest[0] == digest[1]
    assert json.loads((plain / "manifest.json").read_text())["consumers"] == {}
    m = glmrt.load(folders["concat"])
    assert m.generate(PROMPTS[0], max_new_tokens=8) == glmrt.load(plain).generate(PROMPTS[0], max_new_tokens=8)


def test_genai_config_speaks_the_folder(folders):
    for form, folder in folders.items():
        man = json.loads((folder / "manifest.json").read_text())
        g = json.loads((folder / "genai_config.json").read_text())
        cfg, dec = man["config"], g["model"]["decoder"]
        assert g["model"]["type"] == "decoder" and dec["filename"] == "model.genai.onnx"
        assert g["model"]["eos_token_id"] == man["generation"]["eos_token_id"]        # the three stop ids
        assert len(g["model"]["eos_token_id"]) == 3
        assert (dec["num_key_value_heads"], dec["head_size"], dec["num_hidden_layers"]) == \
            (cfg["num_key_value_heads"], cfg["head_dim"], cfg["num_hidden_layers"])
        assert g["model"]["context_length"] == cfg["max_position_embeddings"]
        assert g["search"]["past_present_share_buffer"] is (form == "gqa")
        assert ("position_ids" in dec["inputs"]) is (form == "concat")
        io = man["consumers"]["onnxruntime-genai"]["io"]
        graph_in = {t["name"] for t in io["inputs"]}
        graph_out = {t["name"] for t in io["outputs"]}
        for i in range(cfg["num_hidden_layers"]):      # genai's %d patterns name the graph's tensors
            assert {dec["inputs"]["past_key_names"] % i, dec["inputs"]["past_value_names"] % i} <= graph_in
            assert {dec["outputs"]["present_key_names"] % i, dec["outputs"]["present_value_names"] % i} <= graph_out
        assert {v for k, v in dec["inputs"].items() if "%" not in v} <= graph_in
        assert dec["session_options"]["provider_options"] == ([{"cuda": {}}] if form == "gqa" else [])
        assert g["search"]["top_k"] == man["generation"]["sampling"]["top_k"]


# ---- onnxruntime-genai --------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps")
def test_genai_and_glmrt_share_one_onnxruntime_whatever_comes_first(folders):
    """onnxruntime-genai loads the onnxruntime library installed beside it, not a copy: with it
    imported first, glmrt and genai run in one process over one libonnxruntime."""
    code = ("import sys, onnxruntime_genai as og, glmrt\n"
            "f = sys.argv[1]\n"
            "print(glmrt.load(f).generate([5, 6, 7], max_new_tokens=3))\n"
            "og.Model(f)\n"
            "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libonnxruntime.so' in l}))")
    p = subprocess.run([sys.executable, "-c", code, str(folders["concat"])], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    libs = json.loads(p.stdout.splitlines()[-1].replace("'", '"'))
    assert len(libs) == 1 and Path(libs[0]).parent == Path(ort.__file__).parent / "capi"


@pytest.mark.parametrize("form", ["concat", "gqa"])
def test_genai_greedy_tokens_and_logits_equal_glmrt(folders, form):
    folder = folders[form]
    m = glmrt.load(folder, max_context=256)
    model = genai_model(folder)
    for prompt in PROMPTS:
        tokens, rows = genai_greedy(model, prompt, m.eos_ids)
        assert tokens == m.generate(prompt, max_new_tokens=NEW), prompt
        assert len(tokens) >= 8
        with m.decoder.generation() as cache:          # glmrt's logits, fed the same tokens
            # (copied: on the CPU provider the gqa decoder's rows alias its step buffer)
            want = [m.decoder.step(np.array([prompt]), cache)[0, -1].copy()]
            for t in tokens[:len(rows) - 1]:
                want.append(m.decoder.step(np.array([[t]]), cache)[0, -1].copy())
        for step, (got, ref) in enumerate(zip(rows, want)):
            assert rel(got, ref) < 1e-5, f"{form} step {step}"    # same graph, same numerics


def test_genai_gqa_graph_under_a_mask_as_long_as_the_cache(folders):
    """Under CUDA graphs onnxruntime-genai feeds an attention mask as long as the whole cache,
    zeros past the text: total_sequence_length is then the cache's length and seqlens_k
    carries the position, as in glmrt's own CUDA graphs. Run so on the CPU provider."""
    folder, cap = folders["gqa"], 64
    m = glmrt.load(folder, max_context=cap)
    man = json.loads((folder / "manifest.json").read_text())
    s = ort.InferenceSession(str(folder / "model.genai.onnx"), providers=["CPUExecutionProvider"])
    cfg = man["config"]
    kv = [np.zeros((1, cfg["num_key_value_heads"], cap, cfg["head_dim"]), np.float16)
          for _ in range(2 * cfg["num_hidden_layers"])]
    names = [i.name for i in s.get_inputs() if i.name.startswith("past_")]
    prompt, length = PROMPTS[1], 0
    with m.decoder.generation() as cache:
        ids = prompt
        for _ in range(6):
            length += len(ids)
            mask = np.zeros((1, cap), np.int64)
            mask[0, :length] = 1
            out = s.run(None, {"input_ids": np.array([ids], np.int64), "attention_mask": mask,
                               **dict(zip(names, kv))})
            kv = out[1:]
            want = m.decoder.step(np.array([ids]), cache)[0, -1].copy()
            assert out[0].shape == (1, 1, cfg["vocab_size"])
            assert rel(out[0][0, -1], want) < 1e-5
            ids = [int(want.argmax())]


def test_genai_tokenizer_reads_the_folder_as_glmrt_does(exported):
    """The tokenizer files survive: GLM's special tokens, the stop ids, the same ids for a
    rendered prompt of either template (greedy comparisons above are on ids regardless)."""
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What does with do? naïve café 日本"}]
    for name in ("tiny", "z1"):
        folder = exported(name, "fp32", consumers=("onnxruntime-genai",))
        m = glmrt.load(folder)
        tok = og.Tokenizer(og.Model(str(folder)))
        ids = m.prompt_ids(msgs)
        assert [int(i) for i in tok.encode(m.render_prompt(msgs))] == ids
        assert sorted(int(i) for i in tok.eos_token_ids) == sorted(m.eos_ids)
        assert tok.decode(ids[3:]) == m.tokenizer.decode(ids[3:])       # after [gMASK]<sop><|system|>


def test_genai_chat_template_rendering_differs_where_the_readme_says(exported):
    """onnxruntime-genai renders chat templates without transformers' trim_blocks and
    lstrip_blocks: GLM-4's one-line template comes out the same, GLM-Z1's multi-line one gains
    newlines, so the README has users render prompts with glmrt or transformers. Should genai
    render it as transformers does, this fails and the README can say so."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does with do?"}]
    rendered = {}
    for name in ("tiny", "z1"):
        folder = exported(name, "fp32", consumers=("onnxruntime-genai",))
        tok = og.Tokenizer(og.Model(str(folder)))
        rendered[name] = (tok.apply_chat_template(messages=json.dumps(msgs), add_generation_prompt=True),
                          glmrt.load(folder).render_prompt(msgs))
    assert rendered["tiny"][0] == rendered["tiny"][1]
    assert rendered["z1"][0] != rendered["z1"][1]
    assert rendered["z1"][0].replace("\n<|", "<|").replace("<sop>\n", "<sop>") == rendered["z1"][1]


# ---- optimum ------------------------------------------------------------------------------------
# optimum's side, pinned: the ORTModelForCausalLM of optimum-onnx 0.1 and the transformers it
# imports with (each pin's own needs are in this environment already, or listed).
OPTIMUM_PINS = ("optimum-onnx==0.1.0", "optimum==2.1.0", "transformers==4.57.6", "tokenizers==0.22.2",
                "huggingface-hub==0.36.2", "requests==2.34.2", "urllib3==2.8.0",
                "certifi==2026.10.19.post1", "charset-normalizer==3.5.3")
# The README's route: the optimum graph, the KV head count that ORTModelForCausalLM takes from
# num_attention_heads for a model type it does not list, and the head size it takes as
# hidden_size / num_attention_heads (right for every GLM-4-0414 shape, not for every config).
# The first folder runs once as loaded, to see it fail as the README says.
OPTIMUM_RUN = r"""
import json, sys, torch
from optimum.onnxruntime import ORTModelForCausalLM
job = json.loads(sys.argv[1])
results = []
for i, folder in enumerate(job["folders"]):
    model = ORTModelForCausalLM.from_pretrained(folder, file_name="model.optimum.onnx")
    out = {}

    def greedy(p):
        ids = torch.tensor([p])
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=%d, do_sample=False)
        return g[0, len(p):].tolist()

    if i == 0:
        try:
            greedy(job["prompts"][0])
        except Exception as e:
            out["as_loaded"] = " ".join(str(e).split())
    model.num_key_value_heads = model.config.num_key_value_heads
    model.embed_size_per_head = model.config.head_dim
    out["tokens"] = [greedy(p) for p in job["prompts"]]
    ids = torch.tensor([job["prompts"][0]])
    out["logits"] = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].tolist()
    results.append(out)
print(json.dumps(results))
""" % NEW


@pytest.fixture(scope="session")
def optimum_site():
    """A package folder holding OPTIMUM_PINS (made once, kept in the user's cache)."""
    return pinned_site("optimum", OPTIMUM_PINS, "optimum/onnxruntime")


def test_the_readme_examples_run_as_written(optimum_site, tmp_path):
    """README, "Other runtimes": its export line, then its onnxruntime-genai and optimum Python
    blocks as written, in a folder where the default model's checkpoint is at models/ (optimum's
    from its own packages, as the README has users give it an environment of its own). Both are
    greedy on the same folder: their replies begin alike."""
    import re
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    part = readme[readme.index("## Other runtimes"):readme.index("## Layout")]
    (tmp_path / "models").symlink_to(Path(__file__).resolve().parent.parent / "models")
    lines = [ln.split("  #")[0].strip() for ln in re.search(r"```sh\n(.*?)```", part, re.S).group(1).splitlines()]
    for line in [ln for ln in lines if ln and not ln.startswith("#")]:
        args = line.split()
        assert args[0] == "glmrt"
        p = subprocess.run([sys.executable, "-m", "glmrt.cli", *args[1:]], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
    genai, optimum = re.findall(r"```python\n(.*?)```", part, re.S)
    replies = []
    for code, env in ((genai, os.environ), (optimum, {**os.environ, "PYTHONPATH": str(optimum_site),
                                                      "TRANSFORMERS_VERBOSITY": "error"})):
        p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        replies.append(p.stdout.strip())
    assert len(replies[0]) > 40 and replies[0][:40] == replies[1][:40], replies


@pytest.fixture(scope="module")
def optimum_folders(folders, tmp_path_factory):
    """The CPU form above, and one whose head_dim (16) is not hidden_size / heads (64 / 8)."""
    ck = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "wide-heads",
                         {**TINY, "num_attention_heads": 8, "head_dim": 16}, seed=7)
    wide = export_model(ck, tmp_path_factory.mktemp("onnx") / "wide-heads", consumers=("optimum",),
                        progress=False)
    return {"quant": folders["concat"], "wide-heads": wide}


@pytest.fixture(scope="module")
def optimum_run(optimum_folders, optimum_site):
    """optimum's ORTModelForCausalLM on each folder, in one process of its own."""
    env = {**os.environ, "PYTHONPATH": str(optimum_site), "TRANSFORMERS_VERBOSITY": "error"}
    job = {"folders": [str(f) for f in optimum_folders.values()], "prompts": PROMPTS}
    p = subprocess.run([sys.executable, "-c", OPTIMUM_RUN, json.dumps(job)],
                       capture_output=True, text=True, env=env, cwd=optimum_site)
    assert p.returncode == 0, p.stderr[-3000:]
    return dict(zip(optimum_folders, json.loads(p.stdout.strip().splitlines()[-1])))


@pytest.mark.parametrize("name", ["quant", "wide-heads"])
def test_optimum_greedy_tokens_and_logits_equal_glmrt(optimum_folders, optimum_run, name):
    m = glmrt.load(optimum_folders[name])
    for prompt, tokens in zip(PROMPTS, optimum_run[name]["tokens"]):
        want = m.generate(prompt, max_new_tokens=NEW)
        assert len(want) >= 8
        assert tokens[:len(want)] == want, prompt         # optimum returns the stop token too
    assert rel(optimum_run[name]["logits"], m.logits(PROMPTS[0])) < 1e-5   # every position scored


def test_optimum_as_loaded_fails_as_the_readme_says(optimum_run):
    """Why the route sets num_key_value_heads: as loaded, optimum sizes the first step's empty
    cache with num_attention_heads (4 here, 32 on GLM-Z1-9B) and ONNX Runtime refuses it. Should
    optimum learn glm4, this fails and the README's route can lose that line."""
    err = optimum_run["quant"].get("as_loaded", "")
    assert "past_key_values" in err and "Got: 4 Expected: 2" in err


# ---- the CLI and its refusals --------------------------------------------------------------------
def test_export_for_on_the_cli_and_refusals(checkpoint, tmp_path):
    from click.testing import CliRunner
    r = CliRunner().invoke(main, ["export", str(checkpoint("tiny")), "-o", str(tmp_path / "o"),
                                  "--for", "onnxruntime-genai", "--for", "optimum"])
    assert r.exit_code == 0 and "also for onnxruntime-genai, optimum" in r.output
    assert set(json.loads((tmp_path / "o" / "manifest.json").read_text())["consumers"]) == set(BOTH)
    r = CliRunner().invoke(main, ["info", str(tmp_path / "o")])
    assert "also for   onnxruntime-genai: model.genai.onnx + genai_config.json" in r.output
    with pytest.raises(GlmrtError, match="--for optimum runs the onnxruntime or tensorrt target's graph, not cuda's"):
        export_model(checkpoint("quant"), tmp_path / "c", precision="fp16", target="cuda",
                     consumers=("optimum",), progress=False)
    with pytest.raises(GlmrtError, match="--for 'llama.cpp'"):
        export_model(checkpoint("tiny"), tmp_path / "d", consumers=("llama.cpp",), progress=False)
