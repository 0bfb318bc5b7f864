"""The server's OpenAI API features through the official `openai` client: tool calling (a tiny model
trained to call a tool), logprobs, n choices with seeds, response_format by constrained decoding,
and the sampling defaults."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from export_fixtures import running_server, tiny_model
from mistral_tune.chat import load_tokenizer
from mistral_tune.models.load import load_model, save_model
from mistral_tune.models.tuned import load_tuned
from mistral_tune.serve.defaults import SamplingDefaults, sampling_defaults
from mistral_tune.serve.tools import MalformedToolCall, ToolFormat

openai = pytest.importorskip("openai")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALL = {"id": "abc123XYZ", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALLED = [*ASK, {"role": "assistant", "tool_calls": [CALL]}]
ANSWERED = [*CALLED, {"role": "tool", "tool_call_id": "abc123XYZ", "content": "sunny"}]
BREAK = [{"role": "user", "content": "Break it"}]


def _overfit(model_dir: Path, tok) -> None:
    """Train the model (a few hundred tiny steps, ~1 s) to answer ASK with CALL, ANSWERED with
    "It is sunny." and BREAK with a call cut off (what training renders, through encode_chat)."""
    torch.manual_seed(0)
    model, _ = load_model(str(model_dir))
    seqs = [tok.encode_chat(CALLED, tools=TOOLS), tok.encode_chat([*ANSWERED, {"role": "assistant",
                                                                              "content": "It is sunny."}], tools=TOOLS)]
    prompt = tok.encode_prompt(BREAK, TOOLS)
    broken = [tok._instruct.TOOL_CALLS, *tok.encode_text('[{"name": "get_weather", "arguments": ', bos=False,
                                                          eos=False), tok.eos_id]
    seqs.append((prompt + broken, [False] * len(prompt) + [True] * len(broken)))
    data = []
    for ids, mask in seqs:
        x = torch.tensor([ids])
        data.append((x[:, :-1], torch.tensor(mask[1:]), x[0, 1:][torch.tensor(mask[1:])]))
    # Only the decoder layer and the target tokens' output rows train: a full vocabulary's softmax
    # and its optimizer state would cost most of the time.
    vocab = torch.unique(torch.cat([t for *_, t in data]))
    model.requires_grad_(False)
    body = [*model.model.layers.parameters(), *model.model.norm.parameters()]
    for p in body:
        p.requires_grad_(True)
    head = torch.nn.Parameter(model.lm_head.weight[vocab].clone())
    opt = torch.optim.Adam([*body, head], lr=1e-2)
    data = [(x, m, torch.searchsorted(vocab, t)) for x, m, t in data]
    for _ in range(400):
        loss = sum(torch.nn.functional.cross_entropy(model.hidden_states(x)[0][m] @ head.T, t) for x, m, t in data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    with torch.no_grad():
        model.lm_head.weight[vocab] = head
    save_model(model.eval(), model_dir)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory: pytest.TempPathFactory, one_thread):
    d = tiny_model(tmp_path_factory.mktemp("tools") / "tool-v3", "v3")
    _overfit(d, load_tokenizer(None, d))
    return load_tuned(d)


@pytest.fixture(scope="module")
def client(tool_model):
    for host, port in running_server(tool_model, max_batch=4, queue_depth=8, max_tokens_limit=200):
        yield openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="x", max_retries=0, timeout=60)


def test_the_prompt_with_tools_is_what_training_renders(tool_model) -> None:
    tok = tool_model.tokenizer
    prompt = tok.encode_prompt(ASK, TOOLS)
    assert tok.encode_chat(CALLED, tools=TOOLS)[0][:len(prompt)] == prompt
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    reference = MistralTokenizer.from_file(tok.source_file).encode_chat_completion(
        ChatCompletionRequest(messages=ASK, tools=TOOLS)).tokens
    assert prompt == reference


def test_a_tool_call_comes_back_parsed_and_streamed(client, tool_model) -> None:
    resp = client.chat.completions.create(model=tool_model.name, messages=ASK, tools=TOOLS, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id == "abc123XYZ"
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(model=tool_model.name, messages=ASK, tools=TOOLS, temperature=0,
                                                stream=True):
        delta = chunk.choices[0].delta
        for c in delta.tool_calls or []:
            entry = calls.setdefault(c.index, {"name": "", "arguments": ""})
            entry["name"] += c.function.name or ""
            entry["arguments"] += c.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
        assert not delta.content
    assert finish == "tool_calls" and calls == {0: {"name": "get_weather", "arguments": call.function.arguments}}


def test_tool_results_in_the_history_and_tool_choice_none(client, tool_model) -> None:
    resp = client.chat.completions.create(model=tool_model.name, messages=ANSWERED, tools=TOOLS, temperature=0)
    assert resp.choices[0].message.content == "It is sunny." and resp.choices[0].finish_reason == "stop"
    resp = client.chat.completions.create(model=tool_model.name, messages=ASK, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=8)
    assert resp.choices[0].message.tool_calls is None


def test_a_malformed_call_is_returned_as_text(client, tool_model) -> None:
    for stream in (False, True):
        got = client.chat.completions.create(model=tool_model.name, messages=BREAK, tools=TOOLS, temperature=0,
                                             stream=stream)
        if stream:
            chunks = list(got)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = got.choices[0].message.content, got.choices[0].finish_reason
        assert finish == "malformed_tool_call" and text.startswith('[TOOL_CALLS]') and '"get_weather"' in text


def test_forced_tool_choice_makes_any_model_call_the_tool(client, tool_model) -> None:
    """tool_choice required or named: the answer is a call that parses, even where the model would
    answer in text (sampled, so it wanders)."""
    city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}
    count = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
             "required": ["n"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": city}},
             {"type": "function", "function": {"name": "count", "parameters": count}}]
    for choice in ("required", {"type": "function", "function": {"name": "count"}}):
        # Bounded arguments and one call: an answer fits in max_tokens, each token being at least a byte.
        resp = client.chat.completions.create(model=tool_model.name, messages=ANSWERED, tools=tools, n=3, seed=1,
                                              tool_choice=choice, temperature=1.0, max_tokens=200,
                                              parallel_tool_calls=False)
        for c in resp.choices:
            assert c.finish_reason == "tool_calls", c.message
            for call in c.message.tool_calls:
                spec = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call.function.name]
                jsonschema.validate(json.loads(call.function.arguments), spec)
                assert isinstance(choice, str) or call.function.name == "count"


def test_logprobs_are_the_models_and_streamed_alike(client, tool_model) -> None:
    tok, model = tool_model.tokenizer, tool_model.model
    kwargs = dict(model=tool_model.name, messages=ANSWERED, tools=TOOLS, temperature=0, logprobs=True, top_logprobs=3)
    content = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    ids = tok.encode_prompt(ANSWERED, TOOLS)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids + tok.encode_text("It is sunny.", bos=False, eos=False)]))[0],
                                 -1)
    assert "".join(e.token for e in content).strip() == "It is sunny."
    for k, e in enumerate(content):
        row = want[len(ids) - 1 + k]
        assert e.logprob == pytest.approx(row.max().item(), abs=1e-4)  # greedy: the most likely token
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert e.top_logprobs[0].token == e.token and bytes(e.bytes).decode() == e.token
    streamed = [e for c in client.chat.completions.create(**kwargs, stream=True) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    # The second request reuses the first's cached prompt: the same values up to float rounding.
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)


def test_n_choices_follow_their_seeds(client, tool_model) -> None:
    kwargs = dict(model=tool_model.name, messages=[{"role": "user", "content": "Tell me"}], temperature=1.0,
                  max_tokens=12)
    many = client.chat.completions.create(**kwargs, n=3, seed=5)
    assert [c.index for c in many.choices] == [0, 1, 2]
    texts = [c.message.content for c in many.choices]
    assert texts == [client.chat.completions.create(**kwargs, seed=5 + i).choices[0].message.content
                     for i in range(3)]
    assert len(set(texts)) > 1
    streamed = {i: "" for i in range(3)}
    for chunk in client.chat.completions.create(**kwargs, n=3, seed=5, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert list(streamed.values()) == texts


def test_json_schema_answers_validate(client, tool_model) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "days": {"type": "array", "items": {"type": "boolean"},
                                                        "maxItems": 3}},
              "required": ["city", "days"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema, "strict": True}}
    resp = client.chat.completions.create(model=tool_model.name, messages=ASK, response_format=fmt, n=4, seed=3,
                                          temperature=1.0, max_tokens=64)
    for c in resp.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), schema)
    resp = client.chat.completions.create(model=tool_model.name, messages=ASK, response_format=fmt, max_tokens=2)
    assert resp.choices[0].finish_reason == "length"  # cut: what came so far, as OpenAI does


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
    ],
)
def test_refusals_name_the_field(client, tool_model, kwargs, param) -> None:
    kwargs = {"model": tool_model.name, "messages": ASK, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kwargs)
    assert info.value.body["param"] == param, info.value.body


def test_sampling_defaults_rule(tmp_path: Path, tool_model) -> None:
    assert sampling_defaults(tmp_path) == SamplingDefaults()  # no file: the stated defaults
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 0.5}))
    assert sampling_defaults(None, tmp_path) == SamplingDefaults(0.7, 0.5, 0, str(tmp_path / "generation_config.json"))
    assert sampling_defaults(tool_model.model_dir).temperature == 0.0  # ours write do_sample false: greedy


TOKENIZERS = {v: load_tokenizer(v) for v in ("v3", "v7", "tekken")}


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40) | st.sampled_from(['[{"name": "get_weather", "arguments": {}}]', "[]", "{}",
                                                    '[{"name": "other", "arguments": {}}]']))
def test_any_tool_call_text_parses_or_is_malformed(text) -> None:
    for tok in TOKENIZERS.values():
        fmt = ToolFormat(tok)
        try:
            calls = fmt.parse([fmt.calls_id, *tok.encode_text(text, bos=False, eos=False)], {"get_weather"})
        except MalformedToolCall:
            continue
        assert [c["function"]["name"] for c in calls] == ["get_weather"]


def test_calls_rendered_by_mistral_common_parse_back() -> None:
    calls = [CALL, {"id": "xyz987ABC", "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": "Zürich \"Nord\""})}}]
    for tok in TOKENIZERS.values():
        ids, mask = tok.encode_chat([*ASK, {"role": "assistant", "tool_calls": calls}], tools=TOOLS)
        answer = [i for i, m in zip(ids, mask, strict=True) if m][:-1]  # the assistant turn less its </s>
        got = ToolFormat(tok).parse(answer, {"get_weather"})
        assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == \
            [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
