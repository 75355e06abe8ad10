"""A model whose logits are not finite gives an error, not garbage (``moe_mpi/finite.py``), under real ``mpirun``.

Two broken copies of the tiny qwen3_moe checkpoint of tests/test_generate.py:

* ``nan``: one NaN in layer 0's ``q_proj``: every logit is NaN from the first token;
* ``late``: a NaN row in the embedding table, for the token the intact model
  draws as its ``K``-th (greedy, raw prompt). The first ``K`` tokens are the
  intact model's, drawn from finite logits; feeding token ``K`` back makes
  the next logits NaN. So it breaks mid-generation, and a request that stops
  at ``K`` tokens never sees it.

``moe-mpi generate`` must end with one error line from rank 0 and exit 1,
having printed only the good text; ``moe-mpi serve`` must answer the request
that hits it with an OpenAI error (500, or an error event in a stream) and go
on serving the others.
"""

import http.client
import importlib.util
import json
import os
import shutil
import signal
import sys
import time

import mlx.core as mx
import pytest

from ckpt_edits import edit_tensors
from moe_mpi import synthetic
from moe_mpi.bench.serve import ServerJob, http_get
from moe_mpi.launch import mpirun_command, run_mpirun

TIMEOUT = 120
FAIL_WITHIN = 20.0  # seconds for a failing generate job
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PROMPT = "the quick brown fox"
NEEDLE = "the model's logits are not finite (NaN or infinity)"


def nan_at(a: mx.array, rows) -> mx.array:
    """``a`` with NaN in the given rows (all of them where ``rows`` is None: just ``a[0, 0]``)."""
    if rows is None:
        mask = (mx.arange(a.shape[0])[:, None] == 0) & (mx.arange(a.shape[1])[None, :] == 0)
    else:
        mask = (mx.arange(a.shape[0]) == rows)[:, None]
    return mx.where(mask, mx.array(float("nan"), a.dtype), a)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """``{"clean", "nan", "late"}`` checkpoints, the prompt's ids, the intact greedy tokens and ``K``."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.utils import load as mlx_lm_load

    root = tmp_path_factory.mktemp("nonfinite")
    clean = synthetic.write_checkpoint(root / "clean", "qwen3_moe", seed=1)
    model, tokenizer = mlx_lm_load(str(clean))
    ids = tokenizer.encode(PROMPT)  # as --ignore-chat-template encodes it
    tokens = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=10)]
    # The first drawn token, from the third on, that neither the prompt nor an earlier draw holds.
    k = next(i + 1 for i in range(2, len(tokens)) if tokens[i] not in ids and tokens[i] not in tokens[:i])
    nan = edit_tensors(shutil.copytree(clean, root / "nan"), lambda w: w.update(
        {"model.layers.0.self_attn.q_proj.weight": nan_at(w["model.layers.0.self_attn.q_proj.weight"], None)}))
    late = edit_tensors(shutil.copytree(clean, root / "late"), lambda w: w.update(
        {"model.embed_tokens.weight": nan_at(w["model.embed_tokens.weight"], tokens[k - 1])}))
    return {"clean": clean, "nan": nan, "late": late, "ids": ids, "tokens": tokens, "k": k}


def generate(ckpt, *args):
    argv = [sys.executable, "-m", "moe_mpi", "generate", "--model", str(ckpt), *map(str, args)]
    start = time.monotonic()
    proc = run_mpirun(2, argv, timeout=TIMEOUT, env=ENV)
    return proc, time.monotonic() - start


def assert_one_error(proc, seconds, needle):
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert proc.stderr.count("error:") == 1 and proc.stderr.count(needle) == 1, output
    assert "Traceback" not in output and "Warning" not in output, output
    assert seconds < FAIL_WITHIN, f"took {seconds:.1f} s\n{output}"


# --------------------------------------------------------------------------
# moe-mpi generate
# --------------------------------------------------------------------------


def test_nan_weights_end_generate_with_one_error_and_no_text(ckpts):
    proc, seconds = generate(ckpts["nan"], "--prompt", PROMPT, "--max-tokens", 8)
    assert_one_error(proc, seconds, NEEDLE + " at generated token 1:")
    assert proc.stdout == ""


def test_generate_stops_before_the_first_token_from_non_finite_logits(ckpts):
    k = ckpts["k"]
    args = ("--prompt", PROMPT, "--ignore-chat-template", "--max-tokens", 10)
    intact, _ = generate(ckpts["clean"], *args)
    assert intact.returncode == 0, intact.stderr
    proc, seconds = generate(ckpts["late"], *args)
    assert_one_error(proc, seconds, f"{NEEDLE} at generated token {k + 1}:")
    # The K good tokens were printed (the intact model's text so far), then the line ended.
    assert proc.stdout.endswith("\n") and proc.stdout[:-1] and intact.stdout.startswith(proc.stdout[:-1])
    # Stopping at K tokens, the bad logits never come. (Its text may end in one more character:
    # the detokenizer holds a token that is part of a character back until the end.)
    fine, _ = generate(ckpts["late"], "--prompt", PROMPT, "--ignore-chat-template", "--max-tokens", k)
    assert fine.returncode == 0 and fine.stdout.startswith(proc.stdout[:-1]), fine.stderr


def test_batch_mode_names_the_prompt_and_writes_no_row_of_its_batch(ckpts, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "hello"}) + "\n" + json.dumps({"id": "b", "prompt": "hi"}) + "\n")
    out = tmp_path / "out.jsonl"
    proc, seconds = generate(ckpts["nan"], "--prompts-file", prompts, "--output", out, "--max-tokens", 4, "--no-progress")
    assert_one_error(proc, seconds, f"prompt id 'a' (line 1): {NEEDLE} at generated token 1:")
    assert not out.exists() or out.read_text() == ""


def test_batch_mode_of_an_intact_model_is_unchanged(ckpts, tmp_path):
    """The batch loop replaced mlx-lm's batch_generate: rows still match single-prompt generation."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": 1, "prompt": PROMPT}) + "\n" + json.dumps({"id": 2, "prompt": "hello"}) + "\n")
    out = tmp_path / "out.jsonl"
    proc, _ = generate(ckpts["clean"], "--prompts-file", prompts, "--output", out, "--max-tokens", 10,
                       "--ignore-chat-template", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    single, _ = generate(ckpts["clean"], "--prompt", PROMPT, "--ignore-chat-template", "--max-tokens", 10)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2] and rows[0]["text"] + "\n" == single.stdout


# --------------------------------------------------------------------------
# moe-mpi serve
# --------------------------------------------------------------------------


def post(url: str, body: dict):
    """``(status, raw response body)`` of a completions request."""
    host, port = url.split("://")[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def test_serve_answers_the_broken_request_with_an_error_and_keeps_serving(ckpts, tmp_path):
    k, ids, tokens = ckpts["k"], ckpts["ids"], ckpts["tokens"]
    argv = mpirun_command(2, [sys.executable, "-m", "moe_mpi", "serve", "--model", str(ckpts["late"]), "--port", "0"])
    job = ServerJob(argv, tmp_path / "serve.log", env=ENV).start()
    try:
        url = job.wait_ready(timeout=TIMEOUT)
        model = str(ckpts["late"])

        def complete(prompt, max_tokens, stream=False):
            return post(url, {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream})

        def text(response):
            status, body = response
            assert status == 200, body
            return json.loads(body)["choices"][0]["text"]

        good = complete(ids, k)  # stops at the K-th token: never fed back
        assert json.loads(good[1])["usage"]["completion_tokens"] == k and text(good)
        # Whole response: a 500 in OpenAI's error shape, nothing else.
        status, body = complete(ids, k + 3)
        assert status == 500, body
        error = json.loads(body)["error"]
        assert error["type"] == "server_error" and error["code"] == "non_finite_logits"
        assert f"{NEEDLE} at generated token {k + 1}:" in error["message"]
        # A prompt holding the broken token fails at once.
        status, body = complete(ids + [tokens[k - 1]], 4)
        assert status == 500 and "at generated token 1:" in json.loads(body)["error"]["message"], body
        # A stream has sent its 200 and its text: the error is its last event, without [DONE].
        status, body = complete(ids, k + 3, stream=True)
        events = [line[len("data: "):] for line in body.decode().splitlines() if line.startswith("data: ")]
        assert status == 200 and events and "[DONE]" not in events, body
        last = json.loads(events[-1])
        assert last["error"]["code"] == "non_finite_logits" and "[DONE]" not in events
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])  # the good text came first
        if importlib.util.find_spec("openai") is not None:  # what its users see
            import openai

            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
            with pytest.raises(openai.InternalServerError, match="not finite"):
                client.completions.create(model=model, prompt=ids, max_tokens=k + 3, temperature=0)
            with pytest.raises(openai.APIError, match="not finite"):
                for _ in client.completions.create(model=model, prompt=ids, max_tokens=k + 3, temperature=0, stream=True):
                    pass
            failed = 5
        else:
            failed = 3
        # Still serving, with the same answer as before, and counting the failures.
        assert text(complete(ids, k)) == text(good)
        assert http_get(url, "/health")[0] == 200
        status, figures = http_get(url, "/status")
        assert figures["requests"]["failed"] == failed and figures["requests"]["active"] == 0
        assert all(r["failed"] == failed for r in figures["ranks"]), figures["ranks"]
        assert job.output().count("error:") == failed  # rank 0 logs each, once
        assert job.stop(signal.SIGTERM, timeout=30) < 30
    finally:
        if job.proc.poll() is None:
            job.stop(signal.SIGKILL, timeout=5)
