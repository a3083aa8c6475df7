"""quickdraft serve: the OpenAI-compatible server over the bundled pair, on 127.0.0.1.

Servers run in a background thread of the test process (uvicorn, port 0); clients are the
official ``openai`` package (max_retries=0) and ``httpx`` for raw bodies. Every wait is
bounded.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")
fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("prometheus_client")

from quickdraft.ort_backend.cli import BUNDLED_GAMMA, default_model_dir  # noqa: E402
from quickdraft.ort_backend.generator import DecodeConfig, load_pair  # noqa: E402
from quickdraft.sampling import SamplingConfig  # noqa: E402
from quickdraft.serve.app import create_app  # noqa: E402
from quickdraft.serve.settings import BUNDLED_MODEL_NAME, ServeSettings  # noqa: E402

MODEL = BUNDLED_MODEL_NAME
PROMPTS = ["def fib(n):", "import os\n", "class Stack:\n    def", "for i in range(10):"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# -- helpers (test_serve_load.py and test_serve_ray.py import them) -----------------------


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, app, start_timeout: float = 60.0):
        # a module's client keeps its connection across tests that run other servers for
        # seconds: with uvicorn's 5 s keep-alive the server could close it as the client
        # reused it (a disconnect without a response, the client not retrying)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=10,
                                timeout_keep_alive=300)
        self.app = app
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.start_timeout = start_timeout

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not shut down"

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def engine(self):
        return self.app.state.engine

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0,
                             timeout=kw.pop("timeout", 60.0), **kw)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()


def reference(pair, prompt, *, max_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None,
              gamma=BUNDLED_GAMMA, drafter="model"):
    """What a fresh Generator gives for the request, run alone (in this thread)."""
    config = DecodeConfig(max_new_tokens=max_tokens,
                          sampling=SamplingConfig(temperature=temperature, top_k=top_k,
                                                  top_p=top_p), seed=seed)
    with pair.generator(config, gamma=gamma, drafter=drafter) as g:
        return g.generate(prompt)


def wait_for(predicate, timeout: float = 15.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    return load_pair(default_model_dir(), device="cpu", max_gamma=8)


@pytest.fixture(scope="module")
def server(pair):
    app = create_app(ServeSettings(max_concurrency=4, max_queue=64), pair=pair)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """The bundled pair copied with a chat_template in target/tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("chat") / "pair"
    shutil.copytree(default_model_dir(), folder)
    config_path = folder / "target" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    app = create_app(ServeSettings(model_dir=str(folder), model_name="chat-pair",
                                   device="cpu", gamma=BUNDLED_GAMMA))
    with ServerThread(app) as s:
        s.folder = folder
        yield s


# -- the basics ----------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    h = server.health()
    assert h["status"] == "ok" and h["model"] == MODEL and h["pid"] > 0
    r = httpx.get(server.url + "/v1/models", timeout=10)
    assert r.headers["x-quickdraft-pid"] == str(h["pid"])


def test_greedy_completion_equals_generator(pair, client):
    ref = reference(pair, PROMPTS[0], max_tokens=24)
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24,
                                    temperature=0)
    choice = out.choices[0]
    assert choice.text == ref.text and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ref.prompt_ids)
    assert out.usage.completion_tokens == len(ref.tokens) == 24
    assert out.usage.total_tokens == out.usage.prompt_tokens + 24
    spec = out.model_extra["speculative"]
    assert spec["gamma"] == 4 and 0 <= spec["acceptance_rate"] <= 1
    assert spec["tokens_per_target_call"] >= 1 and spec["alpha"] is not None


def test_sampled_output_equals_quickdraft_generate(client, capsys):
    """The server against the CLI itself: the same settings, the same JSON text."""
    from quickdraft.cli import main

    argv = ["generate", "--prompt", PROMPTS[1], "--max-new-tokens", "20", "--temperature",
            "0.8", "--top-p", "0.9", "--top-k", "40", "--seed", "7", "--json"]
    assert main(argv) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20,
                                    temperature=0.8, top_p=0.9, seed=7,
                                    extra_body={"top_k": 40})
    assert out.choices[0].text == cli["text"]
    assert out.usage.completion_tokens == len(cli["tokens"])


@pytest.mark.parametrize("drafter,gamma", [("model", 3), ("ngram", 2), ("auto", 2),
                                           ("hierarchical", 2)])
def test_seeded_sampling_equals_generator_for_each_drafter(pair, client, drafter, gamma):
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.95, seed=11)
    ref = reference(pair, PROMPTS[2], gamma=gamma, drafter=drafter, **kw)
    for _ in range(2):  # the second run may reuse a pooled Generator: the same output
        out = client.completions.create(model=MODEL, prompt=PROMPTS[2],
                                        extra_body={"gamma": gamma, "drafter": drafter}, **kw)
        assert out.choices[0].text == ref.text


@pytest.mark.parametrize("drafter,gamma", [("model", "auto"), ("bandit", 2)])
def test_timed_drafters_are_greedy_exact(pair, client, drafter, gamma):
    """gamma auto and the bandit choose from measured times, so their sampled draws vary
    from run to run (in `quickdraft generate` too); greedy output is the target's alone."""
    ref = reference(pair, PROMPTS[2], max_tokens=16, gamma=gamma, drafter=drafter)
    out = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16,
                                    temperature=0, extra_body={"gamma": gamma,
                                                               "drafter": drafter})
    assert out.choices[0].text == ref.text
    assert out.model_extra["speculative"]["gamma"] >= 1


def test_pooled_generators_are_reused(server, client):
    before = server.health()["generators_reused"]
    for seed in (1, 2, 3):
        client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=4, seed=seed,
                                  temperature=0.5)
    h = server.health()
    assert h["generators_reused"] >= before + 2
    assert h["pooled"] <= h["max_concurrency"]


def test_token_id_prompt(pair, client):
    ids = list(pair.tokenizer.encode(PROMPTS[0]).ids)
    ref = reference(pair, ids, max_tokens=8)
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert out.choices[0].text == ref.text


def test_streaming_equals_non_streaming(client):
    kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0.7, seed=5)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert len(chunks) > 2
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 30
    assert chunks[-1].model_extra["speculative"]["gamma"] == 4


def test_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    json.loads(lines[-2][6:])  # every other event is JSON


def test_stop_strings_cut_the_text(pair, client):
    ref = reference(pair, PROMPTS[0], max_tokens=40).text
    assert len(ref) >= 40
    mid = len(ref) // 2
    stop = ref[mid : mid + 9]  # mid-text, spans tokens
    want = ref[: ref.index(stop)]
    kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0)
    out = client.completions.create(stop=[stop, "never-appears"], **kw)
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == want  # nothing past the stop
    assert chunks[-1].choices[0].finish_reason == "stop"
    # a stop string that never appears changes nothing
    out = client.completions.create(stop="\x00zz", **kw)
    assert out.choices[0].text == ref and out.choices[0].finish_reason == "length"


def test_stop_string_prefix_is_held_back_while_streaming(pair, client):
    """A tail that could begin a stop string is not sent until it cannot."""
    ref = reference(pair, PROMPTS[0], max_tokens=40).text
    i = len(ref) // 2
    stop = ref[i : i + 4] + "\x01"  # its first four characters appear, the fifth never
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40,
                                            temperature=0, stream=True, stop=stop))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == ref
    sent = ""
    for t in texts[:-1]:  # before the end, no sent text ends inside a possible stop
        sent += t
        assert not any(stop.startswith(sent[-k:]) for k in range(1, len(stop)))


# -- chat ----------------------------------------------------------------------------------


def test_chat_uses_the_template(chat_server, pair):
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "def add(a, b):"}]
    engine = chat_server.engine
    rendered = engine.template.render(messages, add_generation_prompt=True)
    assert rendered == ("<|endoftext|><|system|>\nYou write Python.\n<|user|>\n"
                        "def add(a, b):\n<|assistant|>\n")
    try:  # the same string as transformers' apply_chat_template, where it is installed
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(chat_server.folder / "target"))
        assert tok.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=True) == rendered
    except ImportError:
        pass
    ids = list(pair.tokenizer.encode(rendered, add_special_tokens=False).ids)
    ref = reference(pair, ids, max_tokens=20, temperature=0.9, seed=3)
    client = chat_server.client()
    out = client.chat.completions.create(model="chat-pair", messages=messages,
                                         max_tokens=20, temperature=0.9, seed=3)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="chat-pair", messages=messages,
                                                 max_tokens=20, temperature=0.9, seed=3,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_without_a_template_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                               "content": "hi"}])
    err = e.value.body
    assert e.value.status_code == 400 and "chat_template" in err["message"]
    assert err["param"] == "messages"


# -- errors --------------------------------------------------------------------------------

LONG = "x = 1\n" * 400  # far more tokens than the context of 512

BAD_BODIES = [
    # (body: dict -> JSON, or bytes sent as is; endpoint; status; param or None)
    (b"not json", "completions", 400, None),
    (b"\xff\xfe\x00garbage", "completions", 400, None),
    (b'{"model": "quickdraft-default", "prompt": "\xc3\x28"}', "completions", 400, None),
    (b"", "completions", 400, None),
    (b"[1, 2, 3]", "completions", 400, None),
    (b'"just a string"', "completions", 400, None),
    (b"[" * 100_000 + b"]" * 100_000, "completions", 400, None),
    (b'{"model": "x", "prompt": "' + b"a" * (1 << 20) + b'"}', "completions", 413, None),
    (b'{"model": "quickdraft-default", "prompt": "a", "temperature": NaN}', "completions",
     400, "temperature"),
    (b'{"model": "quickdraft-default", "prompt": "a", "top_p": Infinity}', "completions",
     400, "top_p"),
    (b'{"model": "quickdraft-default", "prompt": "\\ud800"}', "completions", 400, "prompt"),
    ({"prompt": "a"}, "completions", 400, "model"),
    ({"model": MODEL}, "completions", 400, "prompt"),
    ({"model": 5, "prompt": "a"}, "completions", 400, "model"),
    ({"model": "gpt-4", "prompt": "a"}, "completions", 404, "model"),
    ({"model": MODEL, "prompt": ""}, "completions", 400, "prompt"),
    ({"model": MODEL, "prompt": []}, "completions", 400, "prompt"),
    ({"model": MODEL, "prompt": [10**9]}, "completions", 400, "prompt"),
    ({"model": MODEL, "prompt": [-1]}, "completions", 400, "prompt"),
    ({"model": MODEL, "prompt": [[1, 2]]}, "completions", 400, "prompt.[0]"),
    ({"model": MODEL, "prompt": ["a", "b"]}, "completions", 400, "prompt"),
    ({"model": MODEL, "prompt": {"a": 1}}, "completions", 400, "prompt"),
    ({"model": MODEL, "prompt": LONG}, "completions", 400, "prompt"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 10**12}, "completions", 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 0}, "completions", 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "max_tokens": -5}, "completions", 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 1.5}, "completions", 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "max_tokens": "10"}, "completions", 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "max_tokens": True}, "completions", 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "temperature": "hot"}, "completions", 400,
     "temperature"),
    ({"model": MODEL, "prompt": "a", "temperature": -1}, "completions", 400, "temperature"),
    ({"model": MODEL, "prompt": "a", "temperature": 1e308}, "completions", 400,
     "temperature"),
    ({"model": MODEL, "prompt": "a", "top_p": 0}, "completions", 400, "top_p"),
    ({"model": MODEL, "prompt": "a", "top_p": 1.5}, "completions", 400, "top_p"),
    ({"model": MODEL, "prompt": "a", "top_k": -1}, "completions", 400, "top_k"),
    ({"model": MODEL, "prompt": "a", "top_k": 10**9}, "completions", 400, "top_k"),
    ({"model": MODEL, "prompt": "a", "seed": -1}, "completions", 400, "seed"),
    ({"model": MODEL, "prompt": "a", "seed": 2**70}, "completions", 400, "seed"),
    ({"model": MODEL, "prompt": "a", "seed": "7"}, "completions", 400, "seed"),
    ({"model": MODEL, "prompt": "a", "n": 2}, "completions", 400, "n"),
    ({"model": MODEL, "prompt": "a", "n": 0}, "completions", 400, "n"),
    ({"model": MODEL, "prompt": "a", "stream": "yes"}, "completions", 400, "stream"),
    ({"model": MODEL, "prompt": "a", "stop": 5}, "completions", 400, "stop"),
    ({"model": MODEL, "prompt": "a", "stop": [""]}, "completions", 400, "stop"),
    ({"model": MODEL, "prompt": "a", "stop": ["a"] * 50}, "completions", 400, "stop"),
    ({"model": MODEL, "prompt": "a", "gamma": 0}, "completions", 400, "gamma"),
    ({"model": MODEL, "prompt": "a", "gamma": 100}, "completions", 400, "gamma"),
    ({"model": MODEL, "prompt": "a", "gamma": "fast"}, "completions", 400, "gamma"),
    ({"model": MODEL, "prompt": "a", "drafter": "oracle"}, "completions", 400, "drafter"),
    ({"model": MODEL, "prompt": "a", "logprobs": 5}, "completions", 400, "logprobs"),
    ({"model": MODEL, "prompt": "a", "echo": True}, "completions", 400, "echo"),
    ({"model": MODEL, "prompt": "a", "best_of": 3}, "completions", 400, "best_of"),
    ({"model": MODEL, "prompt": "a", "presence_penalty": 0.5}, "completions", 400,
     "presence_penalty"),
    ({"model": MODEL, "messages": []}, "chat/completions", 400, "messages"),
    ({"model": MODEL, "messages": "hi"}, "chat/completions", 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "chat/completions",
     400, "messages.[0].role"),
    ({"model": MODEL, "messages": [{"content": "x"}]}, "chat/completions", 400,
     "messages.[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "chat/completions",
     400, "messages.[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3},
     "chat/completions", 400, "n"),
    ({"model": MODEL}, "chat/completions", 400, "messages"),
]


@pytest.mark.parametrize("body,endpoint,status,param", BAD_BODIES,
                         ids=[f"bad{i}" for i in range(len(BAD_BODIES))])
def test_bad_requests_get_openai_errors(server, body, endpoint, status, param):
    url = f"{server.url}/v1/{endpoint}"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"},
                       timeout=30)
    else:
        r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param, err


CHAT_BAD_BODIES = [
    # (raw JSON body, param the 400 names, words of its message)
    (b'{"model": "chat-pair", "messages": [{"role": "user", "content": "hi", '
     b'"name": "\\ud800"}], "max_tokens": 2}', "messages.[0].name", "not valid UTF-8"),
    (json.dumps({"model": "chat-pair", "messages": [{"role": "user", "content": "hi"}],
                 "max_completion_tokens": 600}).encode(), "max_completion_tokens",
     "use max_completion_tokens <="),
    (json.dumps({"model": "chat-pair", "messages": [{"role": "user", "content": LONG}]}
                ).encode(), "messages", "shorten the messages"),
    (json.dumps({"model": "chat-pair", "messages": [{"role": "user", "content": "hi"}],
                 "max_tokens": 5, "max_completion_tokens": 6}).encode(), None,
     "give one of them"),
    (json.dumps({"model": "chat-pair", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
                ).encode(), "messages.[0].content.[0].type", "'text'"),
    (json.dumps({"model": "chat-pair", "messages": [
        {"role": "user", "content": [{"type": "text"}]}]}).encode(),
     "messages.[0].content.[0].text", "missing"),
    (json.dumps({"model": "chat-pair", "messages": [{"role": "user", "content": "hi"}],
                 "tools": [{"type": "function", "function": {"name": "f"}}]}).encode(),
     "tools", "not supported"),
    (json.dumps({"model": "chat-pair", "messages": [{"role": "user", "content": "hi"}],
                 "tool_choice": "auto"}).encode(), "tool_choice", "not supported"),
    (json.dumps({"model": "chat-pair", "messages": [{"role": "user", "content": "hi"}],
                 "response_format": {"type": "json_object"}}).encode(), "response_format",
     "text response format"),
]


@pytest.mark.parametrize("body,param,words", CHAT_BAD_BODIES,
                         ids=[f"chat{i}" for i in range(len(CHAT_BAD_BODIES))])
def test_bad_chat_requests_name_their_own_fields(chat_server, body, param, words):
    """A chat request's errors name its fields (messages, max_completion_tokens), never
    a 500; a keep-alive connection goes on serving after each."""
    with httpx.Client(base_url=chat_server.url, timeout=30) as http:
        r = http.post("/v1/chat/completions", content=body,
                      headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and words in err["message"], err
        assert err["param"] == param, err
        ok = http.post("/v1/chat/completions", json={
            "model": "chat-pair", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2, "response_format": {"type": "text"}, "tool_choice": "none"})
        assert ok.status_code == 200, ok.text


def test_a_top_p_below_float32_is_the_top_token_not_an_error(server, pair):
    """top_p 1e-300 rounds to 0 in the float32 verification graph: it is kept at the
    smallest normal there, which keeps the top token as any top_p that small does."""
    body = {"model": MODEL, "prompt": "def g(x):", "top_p": 1e-300, "max_tokens": 8,
            "seed": 1}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    greedy = reference(pair, "def g(x):", max_tokens=8, temperature=0.0)
    assert r.json()["choices"][0]["text"] == greedy.text


def test_tiny_temperature_is_a_client_error_not_a_crash(server):
    """Overflowing logits (temperature 1e-300) fail in the step: a 400, and the server
    goes on."""
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "a", "temperature": 1e-300,
                         "max_tokens": 4})
    assert r.status_code in (200, 400), r.text
    assert server.health()["status"] == "ok"


def test_unknown_routes_and_methods(server):
    r = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="a")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="a", max_tokens=100_000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="a", n=2)
    assert e.value.body["param"] == "n"


def test_no_5xx_after_the_fuzz(server, client):
    """After everything above the server still answers, and counted no 5xx."""
    from prometheus_client.parser import text_string_to_metric_families

    out = client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "quickdraft_requests":
            statuses = {s.labels["status"] for s in family.samples
                        if s.name.endswith("_total")}
            assert not {s for s in statuses if s.startswith("5")}, statuses


# -- scheduling: cancellation, queue, timeout, shutdown ------------------------------------


def test_cancelled_stream_frees_its_generator(server, client):
    closed = server.health()["generators_closed"]
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=450,
                                       temperature=0, stream=True)
    it = iter(stream)
    next(it), next(it)
    assert server.health()["active"] == 1
    stream.close()  # the client goes away mid-stream
    wait_for(lambda: server.health()["active"] == 0)
    h = wait_for(lambda: (h := server.health())["generators_closed"] > closed and h)
    assert h["queued"] == 0
    out = client.completions.create(model=MODEL, prompt="y", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'quickdraft_finished_total{reason="cancelled"}' in text


def test_client_gone_before_a_non_streamed_answer_frees_its_stream(server):
    before = server.health()["generators_closed"]
    body = {"model": MODEL, "prompt": "def h():", "max_tokens": 450, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.4)
    wait_for(lambda: server.health()["active"] == 0)
    wait_for(lambda: server.health()["generators_closed"] > before)


def test_full_queue_answers_429_with_retry_after(pair):
    app = create_app(ServeSettings(max_concurrency=1, max_queue=1), pair=pair)
    body = {"model": MODEL, "prompt": "def f():", "max_tokens": 120, "temperature": 0}
    results = []
    with ServerThread(app) as s:
        def post():
            r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
            results.append((r.status_code, r.headers.get("retry-after"), r.json()))

        threads = [threading.Thread(target=post) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    codes = sorted(code for code, _, _ in results)
    assert len(results) == 6 and set(codes) <= {200, 429} and 429 in codes, codes
    assert codes.count(200) >= 2
    for code, after, payload in results:
        if code == 429:
            assert after is not None and int(after) >= 1
            assert payload["error"]["type"] == "rate_limit_error"


def test_timeout_is_504_and_an_error_event_in_streams(pair):
    app = create_app(ServeSettings(timeout=0.3), pair=pair)
    body = {"model": MODEL, "prompt": "def f():", "max_tokens": 450, "temperature": 0}
    with ServerThread(app) as s:
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True},
                          timeout=30) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["type"] == "timeout"
        wait_for(lambda: s.health()["active"] == 0)


def test_graceful_shutdown_finishes_in_flight_requests(pair):
    app = create_app(ServeSettings(shutdown_timeout=20), pair=pair)
    got = {}
    s = ServerThread(app).__enter__()
    client = s.client()

    def ask():
        got["out"] = client.completions.create(model=MODEL, prompt="def g():", max_tokens=200,
                                               temperature=0)

    t = threading.Thread(target=ask)
    t.start()
    wait_for(lambda: s.health()["active"] == 1)
    scheduler = s.engine.scheduler
    s.stop(timeout=60)
    t.join(30)
    assert got["out"].usage.completion_tokens == 200  # finished, not cut
    assert not scheduler.alive  # the scheduler thread was joined


def test_metrics_parse_and_count(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("quickdraft_requests", "quickdraft_tokens_generated",
                 "quickdraft_acceptance_rate", "quickdraft_alpha",
                 "quickdraft_tokens_per_second", "quickdraft_queue_depth",
                 "quickdraft_time_to_first_token_seconds",
                 "quickdraft_inter_token_latency_seconds"):
        assert name in families, name
    ok = sum(s.value for s in families["quickdraft_requests"].samples
             if s.name == "quickdraft_requests_total"
             and s.labels == {"endpoint": "/v1/completions", "status": "200"})
    assert ok >= 5
    assert any(s.value > 0 for s in families["quickdraft_tokens_generated"].samples)
    rate = families["quickdraft_acceptance_rate"].samples[0].value
    assert 0 < rate <= 1
    ttft = [s for s in families["quickdraft_time_to_first_token_seconds"].samples
            if s.name.endswith("_count")]
    assert ttft and ttft[0].value >= 5


# -- the command line ----------------------------------------------------------------------


def test_cli_registers_serve():
    from quickdraft.cli import build_parser
    from quickdraft.serve.cli import _settings

    args = build_parser().parse_args(["serve", "--port", "0", "--gamma", "3",
                                      "--max-concurrency", "2", "--timeout", "5",
                                      "--attention", "cudnn"])
    settings = _settings(args)
    assert settings.gamma == 3 and settings.max_concurrency == 2 and settings.timeout == 5
    assert settings.attention == "cudnn"
    assert settings.served_name() == MODEL and settings.resolved_device() == "cpu"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-concurrency", "0"])


@pytest.mark.parametrize("flag,value,why", [("--port", "70000", "must be <= 65535"),
                                            ("--port", "-1", "must be >= 0"),
                                            ("--shutdown-timeout", "inf", "finite number >= 0"),
                                            ("--shutdown-timeout", "-2", "finite number >= 0"),
                                            ("--timeout", "0", "finite number > 0")])
def test_cli_refuses_out_of_range_numbers_naming_the_flag(flag, value, why, capsys):
    """Out of range, argparse names the flag (a port past 65535 used to reach the socket
    layer as an OverflowError traceback)."""
    from quickdraft.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", flag, value])
    err = capsys.readouterr().err
    assert flag in err and why in err
    assert build_parser().parse_args(["serve", "--shutdown-timeout", "0"]).shutdown_timeout == 0


def test_quickdraft_serve_command_starts_answers_and_stops_on_sigint(tmp_path):
    """The real command: `quickdraft serve` in a child process, one request, then Ctrl-C
    (SIGINT): uvicorn's lifespan shuts the scheduler down and the command exits 0."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "quickdraft.cli", "serve", "--port", str(port),
             "--max-concurrency", "2", "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None  # died: stop waiting, fail below

        wait_for(up, timeout=60, every=0.2)
        assert proc.poll() is None, log.read_text()
        r = httpx.post(url + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": "def f(x):", "max_tokens": 5,
                             "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
