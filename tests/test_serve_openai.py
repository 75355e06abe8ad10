"""``moe-mpi serve`` against what clients of OpenAI's API and of ``mlx_lm.server`` send.

One 2-rank server under real ``mpirun`` (the tiny random qwen3_moe of
tests/test_serve.py, with ``--allowed-origins``), driven by the ``openai``
client, and by raw HTTP for what that client does not send (HEAD, wrong
methods, CORS preflights). The checks are grouped so that one server
launch serves them all.
"""

import http.client
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from moe_mpi import synthetic  # noqa: E402
from moe_mpi.bench.serve import ServerJob  # noqa: E402
from moe_mpi.launch import mpirun_command  # noqa: E402

TIMEOUT = 120
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ORIGIN = "http://app.example"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    config = synthetic.tiny_config("qwen3_moe", max_position_embeddings=1 << 12)
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("serve-openai") / "qwen3_moe", config, seed=1)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    argv = mpirun_command(2, [sys.executable, "-m", "moe_mpi", "serve", "--model", str(ckpt), "--port", "0",
                              "--allowed-origins", ORIGIN])
    job = ServerJob(argv, tmp_path_factory.mktemp("logs") / f"serve-{time.monotonic_ns()}.log", env=ENV).start()
    try:
        job.wait_ready(timeout=TIMEOUT)
        yield job
    finally:
        # SIGTERM: every rank ends (SIGKILL to mpirun alone would leave rank
        # 0 behind); the job's whole session is killed if it has not in 30 s.
        job.stop(signal.SIGTERM, timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def model_id(ckpt) -> str:
    return str(ckpt)


def request(url: str, method: str, path: str, body=None, headers=None):
    """``(status, headers, body bytes)`` of one raw HTTP request."""
    host, port = url.split("://")[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body, headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def openai_error(data: bytes) -> dict:
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def chat(client, model_id, prompt="hello world", **kwargs):
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    kwargs.setdefault("temperature", 0.0)
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": prompt}], **kwargs)


def complete(client, model_id, prompt="hello world", **kwargs):
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    kwargs.setdefault("temperature", 0.0)
    return client.completions.create(model=model_id, prompt=prompt, **kwargs)


def forced(tokenizer, text=" fox"):
    """A logit_bias that makes every token ``text``'s last token; that token's text."""
    tid = tokenizer.encode(text, add_special_tokens=False)[-1]
    return {str(tid): 100.0}, tokenizer.decode([tid])


def counts(usage) -> tuple:
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def check_chunks(chunks, object_type, model_id):
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and all(c.created and c.model == model_id and c.object == object_type for c in chunks), \
        [(c.object, c.model) for c in chunks]


# --------------------------------------------------------------------------
# Requests as ordinary client code writes them
# --------------------------------------------------------------------------


def test_messages_and_stops_as_clients_send_them(server, client, model_id, tokenizer):
    def text(messages, **kwargs):
        kwargs.setdefault("max_tokens", MAX_TOKENS)
        r = client.chat.completions.create(model=model_id, messages=messages, temperature=0, **kwargs)
        return r.choices[0].message.content

    user = {"role": "user", "content": "hello world"}
    parts = {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}
    assert text([parts]) == text([user])
    system = {"role": "system", "content": "be brief"}
    turns = [system, user, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]
    assert text(turns) is not None and text([system, user]) is not None
    with pytest.raises(openai.BadRequestError) as info:
        text([])
    assert info.value.body["param"] == "messages"
    # model left out: the served one.
    status, _, data = request(server.url, "POST", "/v1/chat/completions", {"messages": [user], "max_tokens": 2})
    assert status == 200 and json.loads(data)["model"] == model_id
    # stop as a string and as a list, streamed or not.
    bias, piece = forced(tokenizer)
    for stop in (piece * 2, [piece * 2, "never"]):
        r = chat(client, model_id, logit_bias=bias, stop=stop)
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 2
        assert (r.choices[0].message.content or "") == ""
        chunks = list(chat(client, model_id, logit_bias=bias, stop=stop, stream=True))
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_fields_sent_as_null_count_as_left_out(server, client, model_id):
    # The openai client sends a parameter given as None as null; mlx-lm's
    # reading took null for a value (400 "temperature must be of type"), and
    # a null max_completion_tokens hid max_tokens (the default 512 instead).
    r = chat(client, model_id, temperature=None, top_p=None, seed=None, stop=None, presence_penalty=None,
             logit_bias=None, logprobs=None, top_logprobs=None, n=None, max_completion_tokens=None, max_tokens=3)
    assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason in ("stop", "length")
    status, _, data = request(server.url, "POST", "/v1/completions",
                              {"prompt": "hi", "max_tokens": 2, "stream": None, "echo": None, "logprobs": None, "model": None})
    assert status == 200 and json.loads(data)["model"] == model_id


def test_models_retrieve_by_the_id_that_list_gives(client, model_id, ckpt):
    # The openai client escapes the id in the path (/ as %2F).
    [listed] = client.models.list().data
    assert client.models.retrieve(listed.id).id == model_id
    assert client.models.retrieve(ckpt.name).id == model_id  # a name requests may use
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


def test_methods_and_paths(server):
    url = server.url
    # HEAD: GET's headers, no body.
    for path in ("/health", "/v1/models"):
        status, headers, data = request(url, "HEAD", path)
        assert status == 200 and int(headers["content-length"]) > 0 and data == b"", (path, status)
    # A method the path does not take: 405 with Allow, in OpenAI's error shape.
    for method, path, allow in [("GET", "/v1/chat/completions", "POST"), ("GET", "/v1/completions", "POST"),
                                ("POST", "/v1/models", "GET"), ("PUT", "/v1/chat/completions", "POST"),
                                ("DELETE", "/v1/models", "GET"), ("PATCH", "/health", "GET")]:
        status, headers, data = request(url, method, path, {} if method != "GET" else None)
        assert status == 405 and allow in headers["allow"], (method, path, status)
        assert openai_error(data)["code"] == "method_not_allowed"
    # No such path, whatever the method.
    for method in ("GET", "POST", "DELETE"):
        status, _, data = request(url, method, "/v1/embeddings", {} if method == "POST" else None)
        assert status == 404 and openai_error(data)["code"] == "not_found"
    # A trailing slash or a query string names the same endpoint.
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert request(url, "POST", "/v1/chat/completions/", body)[0] == 200
    assert request(url, "POST", "/v1/chat/completions?x=1", body)[0] == 200
    # A base URL without /v1: every endpoint, not only /chat/completions.
    bare = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=TIMEOUT)
    [model] = bare.models.list().data
    assert bare.models.retrieve(model.id).id == model.id
    assert bare.completions.create(model=model.id, prompt="hi", max_tokens=2).usage.completion_tokens <= 2
    assert bare.chat.completions.create(model=model.id, messages=body["messages"], max_tokens=2).choices
    # A refused request whose big body the server did not need still gets
    # its answer: the body is read, not left for a connection reset.
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (4 << 20)}]}).encode()
    for _ in range(3):
        status, _, data = request(url, "POST", "/v1/nothing", big, {"Content-Type": "application/json"})
        assert status == 404 and openai_error(data)


def test_cors_preflight_allows_the_authorization_header(server):
    # The openai client in a browser always sends Authorization, which a
    # "*" in Access-Control-Allow-Headers does not cover.
    url = server.url
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"}
    status, headers, _ = request(url, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 204 and headers["access-control-allow-origin"] == ORIGIN
    allowed = [h.strip().lower() for h in headers["access-control-allow-headers"].split(",")]
    assert "authorization" in allowed and "*" in allowed
    status, headers, _ = request(url, "OPTIONS", "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert status == 204 and "access-control-allow-origin" not in headers
    status, headers, _ = request(url, "POST", "/v1/chat/completions", body, {"Origin": ORIGIN})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN


# --------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------


def test_stream_chunks_and_usage_agree_with_the_whole_response(client, model_id):
    for prompt, kwargs in [("hello world", {}), ("the quick brown fox", {"max_tokens": 40})]:
        whole = chat(client, model_id, prompt, **kwargs)
        chunks = list(chat(client, model_id, prompt, stream=True, stream_options={"include_usage": True}, **kwargs))
        # Every chunk, the usage chunk too (mlx-lm says "chat.completion" there), is a chunk.
        check_chunks(chunks, "chat.completion.chunk", model_id)
        assert chunks[-1].choices == [] and counts(chunks[-1].usage) == counts(whole.usage)
        assert all(c.usage is None for c in chunks[:-1])
        text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
        finish = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
        assert (text, finish) == (whole.choices[0].message.content or "", [whole.choices[0].finish_reason])
        u = whole.usage
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
        assert (whole.choices[0].finish_reason == "length") == (u.completion_tokens == kwargs.get("max_tokens", MAX_TOKENS))
        # Without include_usage, no usage chunk.
        assert all(c.usage is None and c.choices for c in chat(client, model_id, prompt, stream=True, **kwargs))
    whole = complete(client, model_id)
    chunks = list(complete(client, model_id, stream=True, stream_options={"include_usage": True}))
    check_chunks(chunks, "text_completion", model_id)
    assert counts(chunks[-1].usage) == counts(whole.usage)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    # max_completion_tokens, the newer name.
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3)
    assert r.usage.completion_tokens <= 3


def test_chat_logprobs_in_openai_shape_whole_and_streamed(client, model_id, tokenizer):
    bias, piece = forced(tokenizer)
    r = chat(client, model_id, logprobs=True, top_logprobs=3, logit_bias=bias, max_tokens=4)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    for e in content:
        # The token drawn, as text, with its bytes; the top tokens most likely first.
        assert e.token == piece and e.bytes == list(piece.encode()) and e.logprob <= 0
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == piece
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
    assert "".join(e.token for e in content) == r.choices[0].message.content
    # logprobs alone: no top tokens; a greedy token is the likeliest.
    plain = chat(client, model_id, logprobs=True)
    assert all(e.token is not None and e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert chat(client, model_id).choices[0].logprobs is None
    # Streamed: each chunk carries the log probabilities of its tokens.
    chunks = list(chat(client, model_id, logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    whole = chat(client, model_id, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert [(e.token, e.top_logprobs[0].token) for e in streamed] == [(e.token, e.top_logprobs[0].token) for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-3)


def test_completion_logprobs_take_an_integer(client, model_id, tokenizer):
    # OpenAI's completions take logprobs=N (mlx-lm refused any integer: "must be of type bool").
    bias, piece = forced(tokenizer)
    r = complete(client, model_id, logprobs=2, logit_bias=bias, max_tokens=3)
    lp = r.choices[0].logprobs
    assert lp.tokens == [piece] * 3 and len(lp.token_logprobs) == 3
    assert lp.text_offset == [0, len(piece), 2 * len(piece)]
    assert all(len(top) <= 2 and max(top, key=top.get) == piece for top in lp.top_logprobs)
    assert complete(client, model_id, logprobs=0).choices[0].logprobs.top_logprobs is None
    assert len(complete(client, model_id, logprobs=True).choices[0].logprobs.tokens) > 0  # mlx-lm's way
    chunks = list(complete(client, model_id, logprobs=1, stream=True, logit_bias=bias, max_tokens=3))
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == [piece] * 3
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, model_id, logprobs=50)
    assert info.value.body["param"] == "logprobs"


def test_completion_prompts_as_openai_takes_them(client, model_id, tokenizer):
    prompt = "a mixture of experts"
    text = complete(client, model_id, prompt).choices[0].text
    ids = tokenizer.encode(prompt)
    # Token ids, and a list of one prompt (mlx-lm: 404, its generation thread dead).
    for given in (ids, [prompt], [ids]):
        r = complete(client, model_id, given)
        assert r.choices[0].text == text and r.usage.prompt_tokens == len(ids), given
    for several in (["one", "two"], [ids, ids]):
        with pytest.raises(openai.BadRequestError) as info:
            complete(client, model_id, several)
        assert info.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, model_id, [tokenizer.vocab_size + 10])
    assert info.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):
        complete(client, model_id, "")
    # echo: the prompt, then the completion (mlx-lm ignored it).
    assert complete(client, model_id, prompt, echo=True).choices[0].text == prompt + text
    chunks = list(complete(client, model_id, prompt, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == prompt + text
    assert complete(client, model_id, ids, echo=True).choices[0].text == tokenizer.decode(ids) + text
    with pytest.raises(openai.BadRequestError) as info:  # the prompt's log probabilities are not computed
        complete(client, model_id, prompt, echo=True, logprobs=1)
    assert info.value.body["param"] == "echo"


REFUSED = {
    # what OpenAI's API offers that this server cannot do: (create, kwargs, param)
    "n=2": ("chat", {"n": 2}, "n"),
    "n=3 completions": ("text", {"n": 3}, "n"),
    "json mode": ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    "json schema": ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    "tools without tool calling": ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    "best_of": ("text", {"best_of": 2}, "best_of"),
    "suffix": ("text", {"suffix": "end"}, "suffix"),
    "top_logprobs beyond 11": ("chat", {"logprobs": True, "top_logprobs": 20}, "top_logprobs"),
}


def test_what_cannot_be_done_is_refused_not_ignored(client, model_id):
    for case, (kind, kwargs, param) in REFUSED.items():
        with pytest.raises(openai.BadRequestError) as info:
            (chat if kind == "chat" else complete)(client, model_id, **kwargs)
        assert info.value.body["param"] == param, case
    # ... and what can, is served.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for kwargs in ({"response_format": {"type": "text"}}, {"n": 1}, {"tools": tools, "tool_choice": "none"},
                   {"user": "someone", "seed": 3, "top_p": 0.5, "presence_penalty": 0.5, "frequency_penalty": 0.5}):
        assert chat(client, model_id, **kwargs).choices[0].finish_reason in ("stop", "length"), kwargs
    assert complete(client, model_id, best_of=1, echo=False, suffix="").choices[0].text is not None
