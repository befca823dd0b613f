"""GLM chat done right: templates byte-identical to transformers, the reply parser's corpus,
the tool loop and Z1 reasoning end to end through the real runtime (outputs steered by
forcing tokens), and search-grounded answers with resolved citations."""
import json

import pytest

import glmrt
from glmrt import parse_reply
from steer import Script

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city; 天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time now",
                                         "parameters": {"type": "object", "properties": {}}}}

CASES = {
    "plain": ([{"role": "user", "content": "Hi"}], None),
    "system": ([{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi"}], None),
    "tools": ([{"role": "system", "content": "SYS"}, {"role": "user", "content": "Weather?"}], [WEATHER, TIME]),
    "tool-history": ([
        {"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
        {"role": "observation", "content": '{"t": 20}'},
        {"role": "assistant", "content": "It is 20C."}, {"role": "user", "content": "Thanks"}], [WEATHER]),
    "multi-turn": ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
                    {"role": "user", "content": "e"}], None),
    "z1-history": ([{"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "<think>add</think>\n4"},
                    {"role": "user", "content": "and 3+3?"}], None),
    "unicode": ([{"role": "user", "content": "你好，世界 🎉 naïve — ünïcödé"}], [WEATHER]),
    "empty": ([{"role": "system", "content": ""}, {"role": "user", "content": ""}], None),
}


@pytest.fixture(scope="module")
def hf_tokenizers(checkpoint):
    transformers = pytest.importorskip("transformers")
    return {n: transformers.AutoTokenizer.from_pretrained(str(checkpoint(n))) for n in ("tiny", "z1")}


@pytest.mark.parametrize("variant", ["tiny", "z1"])     # GLM-4 template (file) / Z1 (tokenizer_config)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("gen", [True, False])
def test_prompt_is_byte_identical_to_transformers(variant, case, gen, model, hf_tokenizers):
    messages, tools = CASES[case]
    want = hf_tokenizers[variant].apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=gen)
    assert model(variant).render_prompt(messages, tools, add_generation_prompt=gen) == want


def test_builtin_templates_are_the_fallback(exported, tmp_path):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(exported("tiny"), folder)
    man = json.loads((folder / "manifest.json").read_text())
    man["chat_template"] = None
    (folder / "manifest.json").write_text(json.dumps(man))
    prompt = glmrt.load(folder).render_prompt([{"role": "user", "content": "Hi"}])
    assert prompt == "[gMASK]<sop><|user|>\nHi<|assistant|>"


def test_sandbox_refuses_python_internals(model):
    m = model()
    m_template = m.chat_template
    try:
        m.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
        with pytest.raises(glmrt.InputError, match="sandbox"):
            m.render_prompt([{"role": "user", "content": "x"}])
    finally:
        m.chat_template = m_template


# ---- the parser corpus -------------------------------------------------------------------
def call(name, args, error=None):
    return (name, args, error)


def calls_of(r):
    return [(c.name, json.loads(c.arguments), c.error) for c in r.tool_calls]


@pytest.mark.parametrize("text,tools,kw,content,reasoning,calls", [
    ("\nHello there.", None, {}, "Hello there.", None, []),
    ('get_weather\n{"city": "Paris"}', [WEATHER], {}, "", None, [call("get_weather", {"city": "Paris"})]),
    ('get_weather\n{"city": "Paris"}<|assistant|>get_time\n{}', [WEATHER, TIME], {}, "", None,
     [call("get_weather", {"city": "Paris"}), call("get_time", {})]),
    ("get_weather\n{'city': 'Paris', 'units': None, 'days': (1, 2)}", [WEATHER], {}, "", None,
     [call("get_weather", {"city": "Paris", "units": None, "days": [1, 2]})]),
    ('get_weather\n{"city": {"name": "Paris", "geo": [48.8, 2.3]}, "opts": {"a": [1, {"b": 2}]}}', [WEATHER], {},
     "", None, [call("get_weather", {"city": {"name": "Paris", "geo": [48.8, 2.3]}, "opts": {"a": [1, {"b": 2}]}})]),
    ('\nLet me check.<|assistant|>get_weather\n{"city": "Oslo"}', [WEATHER], {}, "Let me check.", None,
     [call("get_weather", {"city": "Oslo"})]),
    ('get_weather\n{"city": Paris}', [WEATHER], {}, "", None,
     [call("get_weather", {}, 'arguments are not valid JSON or a Python literal: \'{"city": Paris}\'')]),
    ('get_weather\n["Paris"]', [WEATHER], {}, "", None,
     [call("get_weather", {}, "arguments must be an object, got list: '[\"Paris\"]'")]),
    ('send_mail\n{"to": "x"}', [WEATHER], {}, "", None,
     [call("send_mail", {"to": "x"}, "unknown function 'send_mail'; known: get_weather")]),
    ('get_weather\n{"city": "Par', [WEATHER], {"truncated": True}, "", None,
     [call("get_weather", {}, "the call was cut off by the length limit")]),
    ("get_wea", [WEATHER], {"truncated": True}, "", None,
     [call("get_wea", {}, "the call was cut off by the length limit")]),
    ("Yes\nthat is right.", [WEATHER], {}, "Yes\nthat is right.", None, []),
    ("Paris is nice.", None, {}, "Paris is nice.", None, []),
    ("Step one. Step two.</think>\nThe answer is 4.", None, {"thinking": True}, "The answer is 4.",
     "Step one. Step two.", []),
    ("Still thinking when the limit came", None, {"thinking": True, "truncated": True}, "",
     "Still thinking when the limit came", []),
    ("<think>Explicit open.</think>Done.", None, {}, "Done.", "Explicit open.", []),
    ('Need weather.</think>get_weather\n{"city": "Rome"}', [WEATHER], {"thinking": True}, "",
     "Need weather.", [call("get_weather", {"city": "Rome"})]),
])
def test_parser_corpus(text, tools, kw, content, reasoning, calls):
    r = parse_reply(text, tools, **kw)
    assert (r.content, r.reasoning, calls_of(r)) == (content, reasoning, calls)
    for c in r.tool_calls:
        assert c.id.startswith("call_") and c.as_openai()["type"] == "function"


def test_calls_and_results_go_back_into_history_as_the_template_expects(model, hf_tokenizers):
    m = model()
    reply = parse_reply('get_weather\n{"city": "Paris"}', [WEATHER]).as_message()
    history = [{"role": "user", "content": "Hi"}, reply,
               {"role": "tool", "tool_call_id": reply["tool_calls"][0]["id"], "content": '{"t": 20}'}]
    glm_form = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
                {"role": "observation", "content": '{"t": 20}'}]
    want = hf_tokenizers["tiny"].apply_chat_template(glm_form, tools=[WEATHER], tokenize=False,
                                                     add_generation_prompt=True)
    assert m.render_prompt(history, [WEATHER]) == want
    assert want.endswith('<|assistant|>get_weather \n{"city": "Paris"}<|observation|>\n{"t": 20}<|assistant|>')


# ---- end to end through the runtime --------------------------------------------------------
def weather_script(prompt):
    if "<|observation|>" not in prompt:
        return 'get_weather\n{"city": "Paris"}<|assistant|>get_time\n{}<|observation|>'
    return "\nIt is 20C at noon.<|user|>"


def test_tool_loop_end_to_end(model):
    m = model()
    ran = []

    def get_weather(city: str):
        """Current weather for a city."""
        ran.append(city)
        return {"city": city, "t": 20}

    def get_time():
        raise RuntimeError("clock unavailable")
    script = Script(m.tokenizer, weather_script)
    run = m.run_tools([{"role": "user", "content": "Weather in Paris?"}],
                      {"get_weather": get_weather, "get_time": get_time},
                      logits_processor=script, max_new_tokens=64)
    assert run.rounds == 1 and ran == ["Paris"]
    assert run.message["content"] == "It is 20C at noon." and run.message["finish_reason"] == "stop"
    roles = [x["role"] for x in run.messages]
    assert roles == ["user", "assistant", "tool", "tool", "assistant"]
    assert json.loads(run.messages[2]["content"]) == {"city": "Paris", "t": 20}
    assert json.loads(run.messages[3]["content"]) == {"error": "RuntimeError: clock unavailable"}
    # the second prompt carried both calls and both results in GLM's own form
    assert script.prompts[1].endswith(
        '<|assistant|>get_weather \n{"city": "Paris"}<|assistant|>get_time \n{}'
        '<|observation|>\n{"city": "Paris", "t": 20}'
        '<|observation|>\n{"error": "RuntimeError: clock unavailable"}<|assistant|>')
    assert "## get_weather" in script.prompts[0] and '"city"' in script.prompts[0]


def test_tool_loop_bounded_and_bad_calls_are_results(model):
    m = model()
    script = Script(m.tokenizer, lambda p: 'nope\n{"x": 1}<|observation|>')
    run = m.run_tools([{"role": "user", "content": "?"}], {"get_time": lambda: "noon"},
                      logits_processor=script, max_rounds=2, max_new_tokens=32)
    assert run.rounds == 2 and len(script.prompts) == 3
    assert run.message["tool_calls"][0]["error"].startswith("unknown function 'nope'")
    assert json.loads(run.messages[2]["content"])["error"].startswith("unknown function 'nope'")


def test_call_cut_off_by_length_is_inspectable(model):
    m = model()
    script = Script(m.tokenizer, lambda p: 'get_weather\n{"city": "Paris", "days": 3}<|observation|>')
    reply = m.chat([{"role": "user", "content": "?"}], [WEATHER], logits_processor=script, max_new_tokens=5)
    assert reply["finish_reason"] == "length"
    assert reply["tool_calls"][0]["error"] == "the call was cut off by the length limit"


def test_z1_reasoning_is_separated_in_results_and_streams(model, hf_tokenizers):
    m = model("z1")
    script = Script(m.tokenizer, lambda p: "First, 2 and 2.\nSo 4.</think>\nThe answer is 4.<|user|>")
    msgs = [{"role": "user", "content": "2+2?"}]
    assert m.render_prompt(msgs).endswith("<|assistant|>\n<think>")
    deltas = list(m.chat_stream(msgs, logits_processor=script, max_new_tokens=64))
    reply = deltas[-1].message
    assert reply["reasoning_content"] == "First, 2 and 2.\nSo 4." and reply["content"] == "The answer is 4."
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == reply["reasoning_content"]
    assert "".join(d.text for d in deltas if d.kind == "content") == reply["content"]
    kinds = [d.kind for d in deltas]
    assert kinds.index("content") > max(i for i, k in enumerate(kinds) if k == "reasoning")
    assert not any("<" in d.text for d in deltas if d.kind != "done")   # no tag, no special token
    # history keeps only the answer, as the template does
    nxt = m.render_prompt(msgs + [reply, {"role": "user", "content": "and 3+3?"}])
    assert "First, 2 and 2" not in nxt and "<|assistant|>\nThe answer is 4.<|user|>" in nxt
    assert nxt == hf_tokenizers["z1"].apply_chat_template(
        msgs + [{"role": "assistant", "content": reply["content"]}, {"role": "user", "content": "and 3+3?"}],
        tokenize=False, add_generation_prompt=True)


def test_search_answer_resolves_citations(model):
    m = model()
    docs = [{"id": 0, "title": "Paris", "url": "https://a.example/paris", "content": "Capital of France."},
            {"id": 1, "title": "Seine", "url": "https://a.example/seine", "content": "A river."}]
    script = Script(m.tokenizer, lambda p: "\nParis is the capital【0†source】 on the Seine【1†source】【7†source】.<|user|>")
    reply = m.search_answer("Where is Paris?", docs, logits_processor=script, max_new_tokens=64)
    prompt = script.prompts[0]
    assert "<|observation|>\n【0†Paris†https://a.example/paris】\nCapital of France." in prompt
    assert prompt.startswith("[gMASK]<sop><|system|>\n请依据")
    got = [(c["id"], c["document"] and c["document"]["title"]) for c in reply["citations"]]
    assert got == [("0", "Paris"), ("1", "Seine"), ("7", None)]
    c = reply["citations"][0]
    assert reply["content"][c["start"]:c["end"]] == "【0†source】"
