"""End-to-end tests of ``moe-mpi serve`` under real ``mpirun``, with the ``openai`` client.

One 2-rank server serves most tests (started once for the module; the last
test stops it with SIGTERM and times it). A 3-rank server (mode auto), a
server whose rank 1 is killed, and start-up failures get their own jobs. The model is a
tiny random qwen3_moe (the one tests/test_generate.py uses, seed 1) with a
256-token context, so that an over-long prompt is cheap to make.

Greedy texts are compared with ``moe-mpi generate`` (chat and raw prompt)
and, for 32 concurrent requests, with each prompt's text served alone. A
batched forward pass rounds differently from a single one and could flip a
near-tie between two tokens (as in mlx-lm itself); this model has none for
these prompts, which the equality tests would show.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from moe_mpi import synthetic  # noqa: E402
from openai_stream import collect, open_stream  # noqa: E402  (tests/openai_stream.py)
from serve_jobs import ENV, ranks_gone, start_server  # noqa: E402  (tests/serve_jobs.py)
from moe_mpi.bench.serve import http_get  # noqa: E402
from moe_mpi.launch import run_mpirun  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
#: The test model's context. Large, so that the disconnect test's request
#: (max_tokens CONTEXT - 40, no end-of-sequence token) cannot finish before
#: the server notices its client left: the tiny model decodes about 1000
#: tokens/s.
CONTEXT = 1 << 16
MAX_TOKENS = 12
TIMEOUT = 120
STOP_WITHIN = 10.0  # seconds for every rank to be gone after a signal to mpirun
PROMPTS = [f"question {i}: what is {i} plus {i + 1}" for i in range(32)]


def normalize(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def post_raw(url: str, path: str, body: bytes, content_type="application/json", headers=None):
    """``(status, parsed JSON body)`` of a POST with exactly these bytes."""
    host, port = url.split("://")[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    hdrs = {"Content-Type": content_type} if content_type else {}
    conn.request("POST", path, body, {**hdrs, **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data)


def get_json(url: str, path: str, headers: dict) -> dict:
    host, port = url.split("://")[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    assert response.status == 200
    return json.loads(response.read())


def rank_pids(url: str) -> list:
    status, body = http_get(url, "/status")
    assert status == 200, body
    return [r["pid"] for r in body["ranks"]]


def generate_text(ckpt, prompt: str, *extra) -> str:
    """What ``moe-mpi generate`` prints for ``prompt`` (2 ranks, greedy)."""
    argv = [sys.executable, "-m", "moe_mpi", "generate", "--model", str(ckpt), "--prompt", prompt,
            "--max-tokens", str(MAX_TOKENS), *extra]
    proc = run_mpirun(2, argv, timeout=TIMEOUT, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")
    return proc.stdout[:-1]


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    config = synthetic.tiny_config("qwen3_moe", max_position_embeddings=CONTEXT)
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("serve") / "qwen3_moe", config, seed=1)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """The 2-rank server most tests share (test_sigterm_... stops it)."""
    job = start_server(2, ckpt, tmp_path_factory.mktemp("logs"))
    yield job
    job.stop(signal.SIGTERM, timeout=30)  # SIGKILL to mpirun alone would leave rank 0 behind


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def model_id(ckpt) -> str:
    return str(ckpt)


def chat(client, model_id, prompt, **kwargs):
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    kwargs.setdefault("temperature", 0.0)
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": prompt}], **kwargs)


def stream_chat(client, model_id, prompt, **kwargs):
    """``(text, usage, finish_reason)`` of a streaming chat completion."""
    stream = chat(client, model_id, prompt, stream=True, stream_options={"include_usage": True}, **kwargs)
    return collect(stream)


def chat_prompt_tokens(tokenizer, prompt: str) -> int:
    messages = [{"role": "user", "content": prompt}]
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def check_usage(usage, finish, prompt_tokens: int) -> None:
    assert usage.prompt_tokens == prompt_tokens
    if finish == "length":
        assert usage.completion_tokens == MAX_TOKENS
    else:  # an end-of-sequence token, counted as mlx-lm's server counts it
        assert finish == "stop" and 1 <= usage.completion_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# --------------------------------------------------------------------------
# The 2-rank server
# --------------------------------------------------------------------------


def test_health_and_models(server, client, model_id):
    assert http_get(server.url, "/health") == (200, {"status": "ok"})
    models = client.models.list().data
    assert [m.id for m in models] == [model_id]


def test_chat_greedy_matches_generate(client, model_id, ckpt, tokenizer):
    prompt = "hello world"
    response = chat(client, model_id, prompt)
    choice = response.choices[0]
    assert normalize(choice.message.content) == normalize(generate_text(ckpt, prompt))
    check_usage(response.usage, choice.finish_reason, chat_prompt_tokens(tokenizer, prompt))


def test_chat_streaming_matches_non_streaming(client, model_id, tokenizer):
    prompt = "the quick brown fox"
    whole = chat(client, model_id, prompt)
    text, usage, finish = stream_chat(client, model_id, prompt)
    assert text == whole.choices[0].message.content and text
    assert finish == whole.choices[0].finish_reason
    check_usage(usage, finish, chat_prompt_tokens(tokenizer, prompt))


def test_completions_match_generate_raw(client, model_id, ckpt, tokenizer):
    prompt = "a mixture of experts"
    expected = normalize(generate_text(ckpt, prompt, "--ignore-chat-template"))
    whole = client.completions.create(model=model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert normalize(whole.choices[0].text) == expected
    check_usage(whole.usage, whole.choices[0].finish_reason, len(tokenizer.encode(prompt)))
    stream = client.completions.create(model=model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert normalize("".join(c.choices[0].text for c in chunks if c.choices)) == expected
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_32_concurrent_streams_match_single_requests(server, client, model_id, tokenizer):
    alone = {}
    for prompt in PROMPTS:
        r = chat(client, model_id, prompt)
        alone[prompt] = (r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason)
    before = http_get(server.url, "/status")[1]
    results, errors = {}, []

    def one(prompt):
        try:
            results[prompt] = stream_chat(client, model_id, prompt)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    after = http_get(server.url, "/status")[1]
    assert not errors, errors
    assert len(results) == len(PROMPTS)
    for prompt, (text, usage, finish) in results.items():
        assert (text, usage.completion_tokens, finish) == alone[prompt], prompt
        check_usage(usage, finish, chat_prompt_tokens(tokenizer, prompt))
    # Every rank stepped the same requests and tokens.
    tokens = sum(u.completion_tokens for _, u, _ in results.values())
    for b, a in zip(before["ranks"], after["ranks"]):
        assert a["requests"] - b["requests"] == len(PROMPTS)
        assert a["generated_tokens"] - b["generated_tokens"] == tokens
    # Control: one broadcast per step, plus at most one per wake-up from idle
    # and the status query's own; a message per layer would be 2 per step.
    steps = after["control"]["steps"] - before["control"]["steps"]
    broadcasts = after["control"]["broadcasts"] - before["control"]["broadcasts"]
    assert steps <= broadcasts <= steps + len(PROMPTS) + 1
    assert broadcasts < 1.5 * steps, (broadcasts, steps)
    batched = after["ranks"][0]["decode_steps"] - before["ranks"][0]["decode_steps"]
    assert batched < tokens / 4, "the requests were not decoded together"


def test_seed_gives_the_same_draws_alone_and_batched(client, model_id):
    def sample(seed):
        return chat(client, model_id, "tell me a story", temperature=1.0, seed=seed, max_tokens=24).choices[0].message.content

    alone = sample(7)
    together = [None] * 4
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, sample(7))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert together == [alone] * 4
    assert sample(8) != alone


def test_logit_bias_and_stop_words_reach_every_rank(client, model_id, tokenizer):
    tid = tokenizer.encode("x", add_special_tokens=False)[-1]
    piece = tokenizer.decode([tid])
    forced = chat(client, model_id, "anything", logit_bias={str(tid): 100.0})
    assert forced.choices[0].message.content == piece * MAX_TOKENS
    stopped = chat(client, model_id, "anything", logit_bias={str(tid): 100.0}, stop=[piece * 3])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == 3
    assert piece * 3 not in (stopped.choices[0].message.content or "")


BAD = {
    # name: (body bytes or dict, content type, status, param or code to find)
    "malformed json": (b'{"messages": [', "application/json", 400, "invalid_json"),
    "not an object": (b"[1, 2]", "application/json", 400, None),
    "wrong content type": ({"messages": [{"role": "user", "content": "hi"}]}, "text/plain", 415, "unsupported_media_type"),
    "no content type": ({"messages": [{"role": "user", "content": "hi"}]}, None, 415, "unsupported_media_type"),
    "unknown model": ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, "application/json", 404, "model_not_found"),
    "negative max_tokens": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, "application/json", 400, "max_tokens"),
    "prompt longer than the context": ({"messages": [{"role": "user", "content": "word " * (CONTEXT + 16)}]}, "application/json", 400, "context_length_exceeded"),
    "prompt and max_tokens over the context": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": CONTEXT}, "application/json", 400, "context_length_exceeded"),
    "no messages": ({"max_tokens": 4}, "application/json", 400, "messages"),
    "image content": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}, "application/json", 400, "messages"),
    "logit_bias out of range": ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999": 1.0}}, "application/json", 400, "logit_bias"),
    "top_k above the vocabulary": ({"messages": [{"role": "user", "content": "hi"}], "top_k": 10**6}, "application/json", 400, "top_k"),
    "huge seed": ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}, "application/json", 400, "seed"),
    "infinite temperature": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', "application/json", 400, "temperature"),
    "template returning a dict": ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"return_dict": True}}, "application/json", 400, "chat_template_kwargs"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(case, server, client, model_id):
    body, ctype, status, needle = BAD[case]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, reply = post_raw(server.url, "/v1/chat/completions", raw, ctype)
    assert got == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if needle is not None:
        assert needle in (error["param"], error["code"]), error
    assert chat(client, model_id, "still there?", max_tokens=2).choices[0].message is not None


def test_openai_client_raises_on_bad_requests(server, client, model_id):
    with pytest.raises(openai.NotFoundError) as info:
        chat(client, "no-such-model", "hi")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, model_id, "hi", max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"
    assert post_raw(server.url, "/v1/nothing", b"{}")[0] == 404


def test_disconnect_mid_stream_frees_the_slot(server, client, model_id, tokenizer):
    before = http_get(server.url, "/status")[1]["requests"]
    # No end-of-sequence token, so that only the disconnect can end it early
    # (the tiny model otherwise stops by itself, sometimes before a loaded
    # machine has noticed the client left).
    sock = open_stream(server.url, model_id, CONTEXT - 40, tokenizer.eos_token_ids)
    received = b""
    while received.count(b"data: ") < 2:
        received += sock.recv(4096)
    sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = http_get(server.url, "/status")[1]["requests"]
        if now["active"] == 0 and now["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.1)
    assert now["cancelled"] == before["cancelled"] + 1, now
    assert now["active"] == 0
    # It left long before its max_tokens.
    assert now["generated_tokens"] - before["generated_tokens"] < CONTEXT - 40 - 20
    assert chat(client, model_id, "after the disconnect").choices[0].message.content is not None


def test_status_has_every_ranks_figures(server):
    status, body = http_get(server.url, "/status")
    assert status == 200
    assert body["model"]["ranks"] == 2 and body["model"]["moe_layers"] == 2
    rows = body["ranks"]
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert r["requests"] == rows[0]["requests"] > 0
        assert r["generated_tokens"] == rows[0]["generated_tokens"] > 0
        assert r["expert_seconds"] > 0 and r["all_reduce_seconds"] > 0 and r["peak_memory_bytes"] > 0
        # One all-reduce per MoE layer per forward pass over the batch, but for the last
        # layer's in prompt chunks, where nobody reads its output (moe_mpi.unread).
        assert r["all_reduces"] + r["all_reduces_skipped"] == r["forward_passes"] * 2
        assert 0 < r["all_reduces_skipped"] < r["forward_passes"] and r["all_reduces_per_token"] > 0
        # No collective besides the all-reduces and the status allgathers.
        assert set(r["other_collectives"]) <= {"allgather"}


def test_example_client_streams_an_answer(server):
    argv = [sys.executable, "examples/openai_client.py", "--url", server.url + "/v1", "--max-tokens", "8", "hello"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert re.search(r"\[.+: \d+ prompt tokens, [1-8] generated\]", proc.stderr), proc.stderr


def test_sigterm_to_mpirun_stops_every_rank(server):
    pids = rank_pids(server.url)
    seconds = server.stop(signal.SIGTERM, timeout=STOP_WITHIN)
    assert seconds < STOP_WITHIN
    assert ranks_gone(pids, 1.0)


# --------------------------------------------------------------------------
# Other jobs
# --------------------------------------------------------------------------


def skewed_stats(path: Path) -> Path:
    """Router statistics in which experts 0 and 1 take most slots (for --mode auto)."""
    import numpy as np

    from moe_mpi.routing import RoutingStats

    stats = RoutingStats([8, 8])  # the tiny qwen3_moe: 2 MoE layers of 8 experts
    hot = np.array([[0, 1]] * 30 + [[2, 3], [4, 5], [6, 7]])  # [T, k=2]
    for layer in range(2):
        stats(layer, hot)
    stats.save(path)
    return path


def test_three_ranks_auto_mode_heads_split_api_key_and_sigint(ckpt, tmp_path):
    # The sharding options are generate's: a per-layer auto layout from statistics, the
    # attention split by heads (batched KV caches of each rank's heads; answers as generate's)
    # and the LM head by vocabulary rows (one all-gather of the logits per forward pass).
    stats = skewed_stats(tmp_path / "stats.json")
    served = tmp_path / "served.json"
    job = start_server(
        3, ckpt, tmp_path, "--api-key", "sesame", "--mode", "auto", "--stats", stats, "--replicas", "1",
        "--record-routing", served, "--log-level", "WARNING", "--attention", "split", "--lm-head", "split",
    )
    try:
        # The ready line shows at any log level, and not as a warning.
        assert re.search(r" INFO moe-mpi serve: .* at http://", job.output()), job.output()
        model = get_json(job.url, "/status", {"Authorization": "Bearer sesame"})["model"]
        assert model["mode"] == "auto" and len(model["experts_per_rank"]) == 3, model
        assert model["attention"] == "split" and model["lm_head"] == "split", model
        status, reply = post_raw(job.url, "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode())
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=job.url + "/v1", api_key="sesame", max_retries=0, timeout=TIMEOUT)
        prompt = "hello world"
        assert normalize(chat(client, str(ckpt), prompt).choices[0].message.content) == normalize(generate_text(ckpt, prompt))
        texts = {}
        threads = [threading.Thread(target=lambda p=p: texts.__setitem__(p, stream_chat(client, str(ckpt), p)[0])) for p in PROMPTS[:8]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert all(texts.get(p) == chat(client, str(ckpt), p).choices[0].message.content for p in PROMPTS[:8])
        # Saved when the batch empties: the statistics of what was served.
        from moe_mpi.routing import RoutingStats

        deadline = time.monotonic() + 10
        while not served.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        recorded = RoutingStats.load(served)
        assert recorded.tokens[0] > 8 and all(c.sum() == t * 2 for c, t in zip(recorded.counts, recorded.tokens))
        assert set(recorded.identity) == {"routers"}  # the served model's, for a later --stats
        assert http_get(job.url, "/status")[0] == 401  # needs the key too
        rows = get_json(job.url, "/status", {"Authorization": "Bearer sesame"})["ranks"]
        for r in rows:  # one gather per forward pass (none left out: --record-routing runs every layer)
            assert r["logit_gathers"] == r["forward_passes"] > 0 and r["logit_gathers_skipped"] == 0, r
            assert set(r["other_collectives"]) <= {"allgather", "all_gather"}, r["other_collectives"]
        pids = [r["pid"] for r in rows]
        assert len(pids) == 3
        assert job.stop(signal.SIGINT, timeout=STOP_WITHIN) < STOP_WITHIN
        assert ranks_gone(pids, 1.0)
    finally:
        job.stop(signal.SIGKILL, timeout=5)


def test_a_rank_that_dies_takes_the_job_down(ckpt, tmp_path):
    job = start_server(2, ckpt, tmp_path)
    try:
        pids = rank_pids(job.url)
        os.kill(pids[1], signal.SIGKILL)
        job.proc.wait(timeout=STOP_WITHIN)
        assert job.proc.returncode != 0
        assert ranks_gone(pids, 2.0)
        out = job.output()
        assert "rank 1" in out and ("signal 9" in out or "Killed" in out), out
        assert http_get(job.url, "/health") == (None, None)  # nothing accepts requests
    finally:
        job.stop(signal.SIGKILL, timeout=5)


def test_startup_errors_end_every_rank_with_one_message(ckpt, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = [sys.executable, "-m", "moe_mpi", "serve", "--model", str(ckpt), "--port", str(port)]
        start = time.monotonic()
        proc = run_mpirun(2, argv, timeout=TIMEOUT, env=ENV)
    assert proc.returncode == 1 and time.monotonic() - start < 30
    assert proc.stderr.count("moe-mpi: error: cannot serve on 127.0.0.1") == 1, proc.stderr
    argv = [sys.executable, "-m", "moe_mpi", "serve", "--model", str(tmp_path / "missing"), "--port", "0"]
    proc = run_mpirun(2, argv, timeout=TIMEOUT, env=ENV)
    assert proc.returncode == 1
    assert proc.stderr.count("moe-mpi: error:") == 1 and "does not exist" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    # Once served (and would have failed at the first save, ending the server), before anything listens now.
    argv = [sys.executable, "-m", "moe_mpi", "serve", "--model", str(ckpt), "--port", "0", "--record-routing", str(tmp_path)]
    proc = run_mpirun(2, argv, timeout=TIMEOUT, env=ENV)
    assert proc.returncode == 1
    assert proc.stderr.count("moe-mpi: error:") == 1 and f"--record-routing {tmp_path} is a directory" in proc.stderr, proc.stderr


def test_bench_serve_drives_both_servers(ckpt, tmp_path):
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "moe_mpi", "bench", "serve", "--model", str(ckpt), "--clients", "1,3",
            "--servers", "moe-mpi,mlx-lm", "--max-tokens", "4", "--requests", "1", "--min-requests", "3",
            "--json", str(out), "--logs", str(tmp_path / "logs")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=4 * TIMEOUT, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["server"], r["clients"], r["requests"], r["failed"]) for r in rows] == [
        ("moe-mpi", 1, 3, 0), ("moe-mpi", 3, 3, 0), ("mlx-lm", 1, 3, 0), ("mlx-lm", 3, 3, 0)]
    assert all(0 < r["tokens"] <= 3 * 4 and r["aggregate_tps"] > 0 and r["ttft_p50_ms"] > 0 for r in rows)
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| clients |"))
    first_row = next(line for line in lines[head + 2:] if line.startswith("| 1 |"))
    assert lines[head].count("|") == lines[head + 1].count("|") == first_row.count("|")
    for r in rows:  # the mean of the level's TTFTs, each kept in the JSON
        assert r["ttft_mean_ms"] == pytest.approx(sum(r["ttft_ms"]) / len(r["ttft_ms"]), abs=1.0)
    assert rows[1]["status"]["control_broadcasts_per_step"] <= 2  # from moe-mpi serve's /status
    assert "3 clients: moe-mpi / mlx-lm: aggregate" in proc.stdout
    # The bench checks the output it times: both servers' greedy texts, prompt by prompt.
    checks = json.loads(out.read_text())["output_check"]
    assert [(c["clients"], c["server"], c["reference"], c["compared"]) for c in checks] == [
        (1, "mlx-lm", "moe-mpi", 3), (3, "mlx-lm", "moe-mpi", 3)]
    assert all(c["equal"] == c["compared"] for c in checks), checks
    assert "output check, 3 clients: mlx-lm texts equal moe-mpi's in 3/3 requests" in proc.stdout


# --------------------------------------------------------------------------
# In-process units (no MPI)
# --------------------------------------------------------------------------


class _Bus:
    """A broadcast medium for ControlChannels of several pretend ranks in one process."""

    def __init__(self):
        self.sent = None

    def rank(self, rank):
        bus = self

        class Request:
            def Test(self):  # noqa: N802 - mpi4py's name
                return True

            def Wait(self):  # noqa: N802
                pass

        class Mpi:
            def Ibcast(self, buf, root):  # noqa: N802
                if rank == root:
                    bus.sent = bytes(buf)
                else:
                    # A broadcast needs the same size on every rank: the
                    # announce-ahead exists to make that so.
                    assert len(buf) == len(bus.sent), (len(buf), len(bus.sent))
                    buf[:] = bus.sent
                return Request()

        class Comm:
            comm = Mpi()

        Comm.rank = rank
        return Comm()


def test_control_channel_delivers_news_at_the_next_step_and_overflow_one_later():
    from moe_mpi.serve.control import GATHER_STATUS, STOP, ControlChannel

    bus = _Bus()
    root, other = (ControlChannel(bus.rank(r), inline_bytes=256) for r in (0, 1))
    small = {"join": [{"rid": 0, "prompt": [1, 2, 3]}]}
    big = {"join": [{"rid": 1, "prompt": [5] * 100}, {"rid": 2, "prompt": [7] * 300}, {"rid": 3, "prompt": [9]}]}
    news = [(0, small), (GATHER_STATUS, None), (0, big), (0, {"cancel": [0]}), (0, None), (STOP, None)]
    delivered = []
    for flags, events in news:
        sent = root.exchange(flags, events)
        got = other.exchange(idle=True)
        # Every rank decodes the same message (and the sizes agreed: _Bus checks).
        assert (got.step, got.flags, got.events) == (sent.step, sent.flags, sent.events)
        delivered.append(got)
    joins = [[j["rid"] for j in m.events.get("join", [])] for m in delivered]
    # Small news at once; of the big batch what fits at once, the rest (in
    # order) with the next message, ahead of that message's own news.
    assert joins == [[0], [], [1], [2, 3], [], []]
    assert delivered[3].events["cancel"] == [0]
    assert delivered[1].gather_status and delivered[-1].stop
    assert [m.step for m in delivered] == list(range(len(news)))
    assert root.stats.broadcasts == other.stats.broadcasts == len(news)


class _SoloComm:
    """A one-rank Communicator stand-in for the engine's control channel."""

    rank = 0

    class comm:  # noqa: N801 - the attribute name Communicator has
        @staticmethod
        def Ibcast(buf, root):  # noqa: N802 - mpi4py's name
            class Done:
                def Wait(self):  # noqa: N802
                    pass

            return Done()


class _ScriptDesk:
    """Rank 0's desk for an in-process engine: a burst of joins, then stop."""

    def __init__(self, joins):
        self.joins, self.sent = joins, False
        self.engine = None
        self.joined, self.first, self.tokens, self.done = {}, {}, {}, set()
        self.token_steps = {}

    def compose(self, block):
        from moe_mpi.serve.control import STOP

        if not self.sent:
            self.sent = True
            return 0, {"join": self.joins}
        return (STOP if len(self.done) == len(self.joins) else 0), None

    def on_join(self, rid, uid, cached):
        self.joined[rid] = self.engine.counts["steps"]

    def on_progress(self, rid, progress):
        pass

    def on_token(self, rid, r):
        self.first.setdefault(rid, self.engine.counts["steps"])
        self.tokens.setdefault(rid, []).append(r.token)
        self.token_steps.setdefault(rid, []).append(self.engine.counts["steps"])
        if r.finish_reason is not None:
            self.done.add(rid)

    def on_cancelled(self, rid):
        pass

    def on_status(self, figures):
        pass


def _run_engine(ckpt, prompts, prompt_concurrency, logits=None, max_tokens=6):
    from mlx_lm.utils import load

    from moe_mpi.serve.engine import BatchOptions, Engine

    model, tok = load(str(ckpt))
    joins = [
        {"rid": i, "prompt": tok.encode(p), "max_tokens": max_tokens, "stop": [], "sampling": {},
         "logits": (logits or {}).get(i, {})}
        for i, p in enumerate(prompts)
    ]
    desk = _ScriptDesk(joins)
    options = BatchOptions(prompt_concurrency=prompt_concurrency, prompt_cache_size=0)
    engine = Engine(model, tok, _SoloComm(), options, desk, model_key=("m", None, None))
    desk.engine = engine
    engine.run()
    return desk


def test_a_burst_joins_in_groups_and_the_first_group_streams_before_the_next_prefills(ckpt):
    # Real mlx-lm model and BatchGenerator in one process; only MPI is absent.
    prompts = [f"burst {i}: the quick brown fox number {i}" for i in range(7)]
    desk = _run_engine(ckpt, prompts, prompt_concurrency=3)
    groups = [[0, 1, 2], [3, 4, 5], [6]]
    for earlier, later in zip(groups, groups[1:]):
        # Every first token of a group came out before the next group joined.
        assert max(desk.first[r] for r in earlier) <= min(desk.joined[r] for r in later), (desk.first, desk.joined)
        assert len({desk.joined[r] for r in later}) == 1
    assert all(len(desk.tokens[r]) == 6 for r in range(len(prompts)))
    # Batched greedy tokens equal each prompt's tokens served alone.
    for i, prompt in enumerate(prompts[:3] + prompts[6:]):
        alone = _run_engine(ckpt, [prompt], prompt_concurrency=3)
        assert alone.tokens[0] == desk.tokens[prompts.index(prompt)]


def _textless_token(tokenizer):
    """A token that shows no text alone: a UTF-8 continuation byte of the byte-level BPE."""
    for token in range(tokenizer.vocab_size):
        if token in tokenizer.eos_token_ids:
            continue
        detok = tokenizer.detokenizer
        detok.add_token(token)
        if detok.last_segment == "":
            return token
    raise AssertionError("the test tokenizer has no token without text")


def test_joins_wait_for_first_text_not_first_token(ckpt, tokenizer):
    # Request 0 is forced (logit bias) to write a byte that is never valid
    # UTF-8 alone: its client sees no text. Request 1 must not start its
    # prefill while request 0's client still waits for text, but only for
    # FIRST_TEXT_TOKENS tokens, not until request 0 ends.
    from moe_mpi.serve.engine import FIRST_TEXT_TOKENS

    byte = _textless_token(tokenizer)
    bias = {0: {"logit_bias": {str(byte): 1e4}}}
    desk = _run_engine(ckpt, ["no text here", "plain text here"], prompt_concurrency=1, logits=bias, max_tokens=8)
    assert desk.tokens[0] == [byte] * 8
    before_join = [step for step in desk.token_steps[0] if step <= desk.joined[1]]
    assert len(before_join) == FIRST_TEXT_TOKENS, (desk.token_steps, desk.joined)
    # With a request that shows text at once, the next one joins after its first token.
    desk = _run_engine(ckpt, ["plain text here", "more plain text"], prompt_concurrency=1, max_tokens=8)
    shown = tokenizer.detokenizer
    shown.add_token(desk.tokens[0][0])
    assert shown.last_segment, "the test needs a prompt whose first greedy token is text"
    assert [s for s in desk.token_steps[0] if s <= desk.joined[1]] == desk.token_steps[0][:1]
