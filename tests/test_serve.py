"""`r1lab serve` end to end: a real server process on a tiny random checkpoint, driven by the official `openai`
client, raw HTTP and headless Chromium. The expected outputs come from an Engine in this process: sampling is
a pure function of (seed, position), so the server's batching must not change a single token."""

import asyncio
import os
import shutil
import time

import pytest

from r1lab import Engine, SamplingParams, load_pretrained, load_tokenizer
from r1lab.serve.stream import split_text

from serving import (collect_stream, httpx, init_tiny, openai, openai_client, post, running_server, serve_load,
                     wait_until)

KEY = "sk-test-key"
MAX_BATCH = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("serve") / "tiny-r1")


@pytest.fixture(scope="module")
def server(ckpt):
    with running_server(ckpt, max_batch=MAX_BATCH, api_key=KEY) as url:
        yield url


@pytest.fixture(scope="module")
def ref(ckpt):
    """The model and tokenizer in this process, for expected outputs."""
    return load_pretrained(ckpt), load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, KEY)


def expected(ref, prompts, **kw):
    """Completions of each (prompt ids, seed) from the reference engine."""
    # as many slots as sequences: a decode step costs the same for every slot, used or not
    eng = Engine(ref[0], ref[1], max_batch=len(prompts) * kw.get("n", 1), max_seq_len=1024)
    seqs = [s for i, (p, seed) in enumerate(prompts) for s in eng.add_request(p, SamplingParams(seed=seed, **kw), i)]
    while eng.has_work():
        eng.step()
    return [eng.completion(s) for s in seqs]


def chat_ids(tok, messages, prefix=""):
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True) + prefix)


def health(server):
    return httpx.get(server + "/health").json()


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-r1"]
    h = health(server)
    assert h["status"] == "ok" and h["max_batch"] == MAX_BATCH and h["max_seq_len"] == 1024


def test_prefix_cache_hits_in_usage_and_health(server, client, ref):
    """Two chats with one long system prompt: the second finds the first's full pages of their shared prefix in
    the engine's prefix cache, reports them as usage.prompt_tokens_details.cached_tokens (OpenAI's field) and
    still answers as a fresh engine does; /health reports the paged pool."""
    system = {"role": "system", "content": "You are a careful assistant for a lighthouse keeper. " * 16}
    msgs = [[system, {"role": "user", "content": q}] for q in ("Which lamp?", "How tall is the tower?")]
    ids = [chat_ids(ref[1], m) for m in msgs]
    common = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    assert common >= 128
    rs = [client.chat.completions.create(model="tiny-r1", messages=m, max_tokens=6, temperature=0.8, seed=4)
          for m in msgs]
    assert rs[0].usage.prompt_tokens_details.cached_tokens == 0
    assert rs[1].usage.prompt_tokens_details.cached_tokens == common // 64 * 64
    (exp,) = expected(ref, [(ids[1], 4)], max_tokens=6, temperature=0.8)
    assert split_text(exp.text) == (rs[1].choices[0].message.reasoning_content, rs[1].choices[0].message.content)
    cache = health(server)["cache"]
    assert cache["pages_total"] == cache["pages_used"] + cache["pages_cached"] + cache["pages_free"]
    assert cache["pages_cached"] >= common // 64 and cache["cached_tokens"] >= common // 64 * 64


def test_chat_non_streaming_equals_engine(client, ref):
    r = client.chat.completions.create(model="tiny-r1", messages=MSGS, max_tokens=12, temperature=0.8, seed=3)
    (exp,) = expected(ref, [(chat_ids(ref[1], MSGS), 3)], max_tokens=12, temperature=0.8)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content) == split_text(exp.text)
    assert r.choices[0].finish_reason == exp.finish_reason
    assert r.usage.prompt_tokens == len(ref[1].apply_chat_template(MSGS, add_generation_prompt=True, tokenize=True))
    assert r.usage.completion_tokens == len(exp.token_ids) <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_reasoning_separate(client, ref):
    # The assistant turn is opened with "<think>\n" (DeepSeek prefix completion), so the output is reasoning.
    msgs = MSGS + [{"role": "assistant", "content": "<think>\n", "prefix": True}]
    kw = dict(model="tiny-r1", messages=msgs, max_tokens=10, temperature=1.0, seed=11)
    reasoning, content, _, finish, usage = collect_stream(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    ids = chat_ids(ref[1], MSGS, "<think>\n")
    (exp,) = expected(ref, [(ids, 11)], max_tokens=10, temperature=1.0)
    exp_r, exp_c = split_text(exp.text, prefix="<think>\n")
    assert exp_r  # the random model writes something that is not whitespace
    assert (reasoning[0], content[0]) == (exp_r, exp_c)
    assert finish[0] == exp.finish_reason
    assert usage.prompt_tokens == len(ids) and usage.completion_tokens == len(exp.token_ids)
    whole = client.chat.completions.create(**kw)  # non-streamed: the same split
    assert (whole.choices[0].message.reasoning_content, whole.choices[0].message.content) == (exp_r, exp_c)


def test_n_samples(client, ref):
    r = client.chat.completions.create(model="tiny-r1", messages=MSGS, max_tokens=6, n=3, seed=5, temperature=1.0)
    exp = expected(ref, [(chat_ids(ref[1], MSGS), 5)], max_tokens=6, n=3, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [split_text(e.text)[1] for e in exp]
    assert len({c.message.content for c in r.choices}) == 3  # distinct samples
    assert r.usage.completion_tokens == sum(len(e.token_ids) for e in exp)
    _, content, _, finish, _ = collect_stream(client.chat.completions.create(
        model="tiny-r1", messages=MSGS, max_tokens=6, n=3, seed=5, temperature=1.0, stream=True), n=3)
    assert content == [c.message.content for c in r.choices] and finish == [c.finish_reason for c in r.choices]


def test_completions_and_stop_sequences(client, ref):
    tok = ref[1]
    prompt = "The capital of France is"
    base = client.completions.create(model="tiny-r1", prompt=prompt, max_tokens=16, seed=2, temperature=1.0)
    (exp,) = expected(ref, [(tok.encode(prompt), 2)], max_tokens=16, temperature=1.0)
    assert base.choices[0].text == exp.text and base.usage.prompt_tokens == len(tok.encode(prompt))
    text = exp.text
    stop = text[len(text) // 2: len(text) // 2 + 2]  # a string the sample is known to produce
    assert stop.strip() and text.find(stop) > 0
    r = client.completions.create(model="tiny-r1", prompt=prompt, max_tokens=16, seed=2, temperature=1.0, stop=[stop])
    assert r.choices[0].text == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-r1", prompt=prompt, max_tokens=16, seed=2, temperature=1.0, stop=stop, stream=True) if c.choices)
    assert streamed == r.choices[0].text  # the stop string's start was held back, never sent
    chat = client.chat.completions.create(model="tiny-r1", messages=MSGS, max_tokens=16, seed=2, stop=["a", "e", " "])
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert not any(s in chat.choices[0].message.content for s in ("a", "e", " "))


OK = {"model": "tiny-r1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD = [  # (body or raw text, key, status, param)
    ('{"model": "tiny-r1", "messages": [', KEY, 400, None),  # malformed JSON
    ("[1, 2]", KEY, 400, None),  # not an object
    ({k: v for k, v in OK.items() if k != "messages"}, KEY, 422, "messages"),  # missing field
    ({k: v for k, v in OK.items() if k != "model"}, KEY, 422, "model"),
    ({**OK, "messages": "hi"}, KEY, 422, "messages"),  # wrong types
    ({**OK, "max_tokens": "5"}, KEY, 422, "max_tokens"),
    ({**OK, "temperature": "hot"}, KEY, 422, "temperature"),
    ({**OK, "messages": [{"role": "wizard", "content": "hi"}]}, KEY, 422, "messages.0.role"),
    ({**OK, "max_tokens": -3}, KEY, 422, "max_tokens"),  # out of range
    ({**OK, "temperature": 5}, KEY, 422, "temperature"),
    ({**OK, "n": 0}, KEY, 422, "n"),
    ({**OK, "stop": [""]}, KEY, 422, "stop"),
    ({**OK, "model": "gpt-4"}, KEY, 404, "model"),  # unknown model
    ({**OK, "messages": [{"role": "user", "content": "word " * 2000}]}, KEY, 413, "messages"),  # beyond the context
    ({**OK, "max_tokens": 10**12}, KEY, 400, "max_tokens"),  # absurd max_tokens
    ({**OK, "n": 1000}, KEY, 400, "n"),
    (OK, "wrong-key", 401, None),  # wrong or missing API key
    (OK, None, 401, None),
]


@pytest.mark.parametrize("body, key, status, param", BAD)
def test_bad_input_gets_status_and_openai_error(server, body, key, status, param):
    r = post(server, "/v1/chat/completions", None if isinstance(body, str) else body, key,
             raw=body if isinstance(body, str) else None)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_bad_input_through_openai_client(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSGS, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="bad", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny-r1", prompt="hi", max_tokens=100_000)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny-r1", prompt=[10**9, "x"], max_tokens=2)
    assert post(server, "/v1/completions", {"model": "tiny-r1", "prompt": [10**9], "max_tokens": 2},
                KEY).status_code == 400
    assert httpx.get(server + "/v1/nothing-here").json()["error"]["code"] == "not_found"
    assert health(server)["status"] == "ok"  # still serving


def test_load_64_streaming_clients(server, ref):
    res = asyncio.run(serve_load.run_load(server + "/v1", "tiny-r1", clients=64, max_tokens=8, api_key=KEY))
    print(f"\nload: 64 clients x 8 tokens in {res['wall_s']:.2f} s: {res['requests_per_s']:.1f} requests/s, "
          f"{res['tokens_per_s']:.0f} tokens/s, time to first token p50 {res['ttft_p50_s']:.2f} s")
    assert res["errors"] == [] and res["ok"] == 64
    tok = ref[1]
    prompts = [(chat_ids(tok, [{"role": "user", "content": f"Client {i}: what is {i} + {i}?"}]), i) for i in range(64)]
    exp = expected(ref, prompts, max_tokens=8, temperature=0.8)
    for r, e in zip(sorted(res["results"], key=lambda r: r["client"]), exp):
        assert (r["reasoning"] or None, r["content"]) == split_text(e.text), r["client"]
        assert r["finish_reason"] == e.finish_reason and r["completion_tokens"] == len(e.token_ids)
        assert r["prompt_tokens"] == len(prompts[r["client"]][0])


def test_disconnect_frees_the_slot(server):
    before = health(server)["aborted"]
    body = {"model": "tiny-r1", "prompt": "Once upon a time", "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert health(server)["running"] == 1  # 1000 tokens take far longer than this test waits
    # the connection is closed: the engine must abort the sequence and stop generating for it
    assert wait_until(lambda: health(server)["running"] == 0 and health(server)["waiting"] == 0, timeout=5)
    assert health(server)["aborted"] == before + 1
    tokens = health(server)["tokens"]
    time.sleep(0.3)
    assert health(server)["tokens"] == tokens


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_page_in_headless_chromium(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (its browsers not needed)")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, args=args,
                                                   headless=True)
        requests = []
        ctx.on("request", lambda req: requests.append(req.url))
        page = ctx.new_page()
        page.goto(server + "/")
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.fill("#max-tokens", "900")
        page.fill("#input", "What is 2 + 2?")
        page.click("#send")
        think = page.locator(".assistant .think")
        page.wait_for_function("document.querySelector('.assistant .think')?.textContent.length > 0", timeout=20000)
        first = len(think.text_content())
        page.wait_for_function(f"document.querySelector('.assistant .think').textContent.length > {first}",
                               timeout=20000)  # text keeps arriving: it is streamed
        assert page.locator("details.reasoning").is_visible()
        assert page.locator(".user").text_content() == "What is 2 + 2?"
        page.screenshot(path=str(tmp_path / "serve-page.png"))
        page.click("#stop")
        page.wait_for_selector(".assistant[data-done='stopped']", timeout=10000)
        assert page.locator("#send").is_enabled()
        ctx.close()
    assert (tmp_path / "serve-page.png").stat().st_size > 0
    if os.environ.get("R1LAB_SCREENSHOT"):  # e.g. docs/serve-page.png, to keep
        shutil.copyfile(tmp_path / "serve-page.png", os.environ["R1LAB_SCREENSHOT"])
    assert all(u.startswith(server) for u in requests), requests  # no external network resources
    assert wait_until(lambda: health(server)["running"] == 0, timeout=5)  # stop freed the slot
