"""Function calling in `r1lab serve`, end to end: a real server process driven by the official `openai` client.

The model is the tiny preset fine-tuned here, in a fixture, to really emit DeepSeek tool-call blocks: it learns
four replies by heart (a call after reasoning, the answer after the tool's output, a call without reasoning for
the forced `tool_choice`, a malformed call). The fixture checks with the engine, greedily, that it learnt them,
so the server tests below test the server, not the luck of the fine-tune.
"""

import json

import pytest
import torch

from r1lab import Engine, SamplingParams, load_pretrained, load_tokenizer, save_pretrained
from r1lab.data import render_sft
from r1lab.tokenizer import tools_prompt

from serving import collect_stream, init_tiny, openai, openai_client, post, running_server

KEY = "sk-tools"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS = [WEATHER]


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


ASK_PARIS = [{"role": "user", "content": "Weather in Paris?"}]
THINK = "<think>\nI need the weather tool.\n</think>\n\n"
PARIS_CALL = call("get_weather", '{"city": "Paris"}')
# What a client sends back: the call without the reasoning (DeepSeek's API asks not to send reasoning_content back)
PARIS_ROUND = ASK_PARIS + [{"role": "assistant", "content": None, "tool_calls": [PARIS_CALL]},
                           {"role": "tool", "content": '{"temp": 18}'}]
ANSWER = "It is 18 degrees in Paris."
ASK_ROME = [{"role": "user", "content": "Rome?"}]
ROME_CALL = call("get_weather", '{"city": "Rome"}')
ASK_BAD = [{"role": "user", "content": "Break it."}]
BAD_CALL = call("launch", '{"x": oops}')  # a function not in the tools, arguments not JSON

# The four replies the model learns (each a conversation whose last turn is the target).
LESSONS = [
    ASK_PARIS + [{"role": "assistant", "content": THINK, "tool_calls": [PARIS_CALL]}],
    PARIS_ROUND + [{"role": "assistant", "content": ANSWER}],
    ASK_ROME + [{"role": "assistant", "content": None, "tool_calls": [ROME_CALL]}],
    ASK_BAD + [{"role": "assistant", "content": "Sure.", "tool_calls": [BAD_CALL]}],
]


def with_tools(messages):
    # what apply_chat_template(..., tools=TOOLS) renders (tested against the official template in test_tools.py)
    return messages[:-1] + [{"role": "system", "content": tools_prompt(TOOLS)}] + messages[-1:]


def fine_tune(model, tok, steps=150, lr=3e-3):
    """Teach the model LESSONS: AdamW on the loss of each lesson's last turn (render_sft's mask), the head applied
    to the predicted positions only (the 129k-row head over the long tools prompt would cost most of the time)."""
    seqs = [render_sft(with_tools(m), tok) for m in LESSONS]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.0
        for ids, mask in seqs:
            x = torch.tensor([ids[:-1]])
            h = model(x, return_hidden=True)[0]
            where = torch.tensor(mask[1:])
            logits = model.lm_head(h[where])
            loss = loss + torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:])[where])
        loss.backward()
        opt.step()
    model.eval()
    return loss.item() / len(seqs)


def greedy(model, tok, messages, forced=""):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, tools=TOOLS) + tok.encode(forced)
    eng = Engine(model, tok, max_batch=1, max_seq_len=1024)
    return eng.generate([ids], SamplingParams(temperature=0.0, max_tokens=64))[0].text


def rendered_reply(tok, lesson):
    """The text the model should generate for a lesson: its last turn as the template renders it, EOS dropped."""
    prompt = tok.apply_chat_template(lesson[:-1], add_generation_prompt=True, tools=TOOLS)
    return tok.apply_chat_template(lesson, tools=TOOLS)[len(prompt):].removesuffix(tok.eos_token)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = init_tiny(tmp_path_factory.mktemp("serve-tools") / "tool-r1")
    torch.manual_seed(0)
    model, tok = load_pretrained(out), load_tokenizer(out)
    loss = fine_tune(model, tok)
    for lesson in LESSONS:  # the premise of every test below: it learnt each reply exactly
        got = greedy(model, tok, lesson[:-1])
        assert got == rendered_reply(tok, lesson), (loss, got)
    save_pretrained(model, out, tok)
    return out


@pytest.fixture(scope="module")
def server(ckpt):
    with running_server(ckpt, max_batch=4, api_key=KEY) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, KEY)


def create(client, messages, **kw):
    return client.chat.completions.create(model="tool-r1", messages=messages, temperature=0.0, max_tokens=64, **kw)


def streamed(client, messages, **kw):
    """A streamed create, collected: the reasoning, content, tool calls and finish reason of its one choice."""
    reasoning, content, calls, finish, _ = collect_stream(create(client, messages, stream=True, **kw))
    return reasoning[0], content[0], calls[0], finish[0]


def test_tool_call_round_trip(client):
    r = create(client, ASK_PARIS, tools=TOOLS)
    tok = load_tokenizer()
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(ASK_PARIS, add_generation_prompt=True, tokenize=True,
                                                                tools=TOOLS))
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    msg = choice.message
    assert msg.reasoning_content == "I need the weather tool." and msg.content is None
    (tc,) = msg.tool_calls
    assert tc.type == "function" and tc.id.startswith("call_") and tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == {"city": "Paris"}
    # the client sends the call back with the tool's output; the model answers
    back = ASK_PARIS + [{"role": "assistant", "content": msg.content, "tool_calls": [tc.model_dump()]},
                        {"role": "tool", "tool_call_id": tc.id, "content": '{"temp": 18}'}]
    r2 = create(client, back, tools=TOOLS)
    assert r2.choices[0].message.content == ANSWER and r2.choices[0].finish_reason == "stop"
    assert not r2.choices[0].message.tool_calls


def test_tool_call_round_trip_streamed(client):
    reasoning, content, calls, finish = streamed(client, ASK_PARIS, tools=TOOLS)
    assert (reasoning, content, finish) == ("I need the weather tool.", "", "tool_calls")
    (tc,) = calls
    assert tc["type"] == "function" and tc["id"].startswith("call_") and tc["name"] == "get_weather"
    assert tc["arguments"] == '{"city": "Paris"}'
    back = ASK_PARIS + [{"role": "assistant", "content": None, "tool_calls": [
                            {"id": tc["id"], "type": "function",
                             "function": {"name": tc["name"], "arguments": tc["arguments"]}}]},
                        {"role": "tool", "tool_call_id": tc["id"], "content": '{"temp": 18}'}]
    _, content, calls, finish = streamed(client, back, tools=TOOLS)
    assert (content, calls, finish) == (ANSWER, [], "stop")


def test_stream_helper_of_the_client_accumulates_calls(client):
    # the openai package's own stream accumulator (client.chat.completions.stream) must see the same call
    with client.chat.completions.stream(model="tool-r1", messages=ASK_PARIS, tools=TOOLS, temperature=0.0,
                                        max_tokens=64) as stream:
        final = stream.get_final_completion()
    (tc,) = final.choices[0].message.tool_calls
    assert (tc.function.name, tc.function.arguments) == ("get_weather", '{"city": "Paris"}')
    assert final.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_none_returns_text(client, stream):
    # no tools in the prompt and nothing parsed: whatever the model writes is content
    kw = dict(tools=TOOLS, tool_choice="none")
    if stream:
        _, content, calls, finish = streamed(client, ASK_PARIS, **kw)
    else:
        r = create(client, ASK_PARIS, **kw)
        m = r.choices[0]
        content, calls, finish = m.message.content, m.message.tool_calls, m.finish_reason
        tok = load_tokenizer()
        assert r.usage.prompt_tokens == len(tok.apply_chat_template(ASK_PARIS, add_generation_prompt=True,
                                                                    tokenize=True))
    assert not calls and finish in ("stop", "length") and isinstance(content, str)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_forces_a_call(client, choice, stream):
    # ASK_ROME was learnt as a call without reasoning: the forced start of the block is exactly its context
    kw = dict(tools=TOOLS, tool_choice=choice)
    if stream:
        reasoning, content, calls, finish = streamed(client, ASK_ROME, **kw)
        got = [(c["name"], c["arguments"]) for c in calls]
    else:
        c = create(client, ASK_ROME, **kw).choices[0]
        reasoning, content, finish = c.message.reasoning_content, c.message.content, c.finish_reason
        got = [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
    assert got == [("get_weather", '{"city": "Rome"}')] and finish == "tool_calls"
    assert not reasoning and not content


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_call_is_returned_as_content(client, stream):
    # the model calls a function that is not among the tools, with arguments that are not JSON
    expected = rendered_reply(load_tokenizer(), LESSONS[3])  # "Sure.<｜tool▁calls▁begin｜>...launch..."
    if stream:
        _, content, calls, finish = streamed(client, ASK_BAD, tools=TOOLS)
    else:
        c = create(client, ASK_BAD, tools=TOOLS).choices[0]
        content, calls, finish = c.message.content, c.message.tool_calls, c.finish_reason
    assert content == expected and "<｜tool▁calls▁begin｜>" in content and not calls and finish == "stop"


@pytest.mark.parametrize("body, param, words", [
    ({"tools": "get_weather"}, "tools", "non-empty list"),
    ({"tools": []}, "tools", "non-empty list"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "given twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools",
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": "x"}}}]}, "tools",
     "required"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [PARIS_CALL]}]}, "messages", "only assistant"),
    ({"messages": [{"role": "tool", "content": None}]}, "messages", "content"),
])
def test_bad_tools_requests_get_400(server, body, param, words):
    r = post(server, "/v1/chat/completions", {"model": "tool-r1", "messages": ASK_PARIS, **body}, KEY, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and words in err["message"], err


def test_bad_tools_via_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        create(client, ASK_PARIS, tools=[{"type": "function", "function": {"name": ""}}])
    assert e.value.status_code == 400 and "tools[0].function.name" in e.value.message
