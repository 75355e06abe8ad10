"""Two-batch overlap (``moe-mpi serve --overlap``, :mod:`moe_mpi.overlap`) under real ``mpirun``.

Greedy texts served in two cohorts, their all-reduces overlapped, must be
those of each prompt served alone and of ``moe-mpi generate``; every
all-reduce is still one per MoE layer and forward pass, and every rank
counts the same ones as started while the other cohort computed. A client
that leaves mid-stream frees its slot in its cohort. (The per-architecture,
per-mode exactness of the cohorts is in tests/mpi_equivalence.py.)
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from moe_mpi import synthetic  # noqa: E402
from moe_mpi.bench.serve import http_get  # noqa: E402
from moe_mpi.launch import run_mpirun  # noqa: E402
from openai_stream import collect, open_stream  # noqa: E402  (tests/openai_stream.py)
from serve_jobs import ENV, ranks_gone, start_server  # noqa: E402  (tests/serve_jobs.py)

TIMEOUT = 120
MAX_TOKENS = 12
CONTEXT = 1 << 16
PROMPTS = [f"question {i}: what is {i} plus {i + 1}" for i in range(16)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    config = synthetic.tiny_config("qwen3_moe", max_position_embeddings=CONTEXT)
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("overlap") / "qwen3_moe", config, seed=1)


def chat(client, model_id, prompt, **kwargs):
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    kwargs.setdefault("temperature", 0.0)
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": prompt}], **kwargs)


def generate_text(ckpt: Path, prompt: str) -> str:
    argv = [sys.executable, "-m", "moe_mpi", "generate", "--model", str(ckpt), "--prompt", prompt,
            "--max-tokens", str(MAX_TOKENS)]
    proc = run_mpirun(2, argv, timeout=TIMEOUT, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout[:-1]


def no_end(ckpt: Path) -> list:
    from mlx_lm.utils import load_tokenizer

    return list(load_tokenizer(ckpt).eos_token_ids)


def leave_mid_stream(url: str, ckpt: Path) -> None:
    """Starts an endless stream and hangs up after two chunks."""
    sock = open_stream(url, str(ckpt), CONTEXT - 40, no_end(ckpt))
    received = b""
    while received.count(b"data: ") < 2:
        received += sock.recv(4096)
    sock.close()


@pytest.mark.parametrize("n, extra", [(2, ()), (3, ("--mode", "auto", "--attention", "split"))],
                         ids=["2-ranks", "3-ranks-auto-heads"])
def test_overlapped_cohorts_serve_each_prompt_as_alone(n, extra, ckpt, tmp_path):
    job = start_server(n, ckpt, tmp_path, "--overlap", *extra)
    try:
        client = openai.OpenAI(base_url=job.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        model_id = str(ckpt)
        alone = {p: chat(client, model_id, p).choices[0].message.content for p in PROMPTS}
        if n == 2:
            assert alone[PROMPTS[0]] == generate_text(ckpt, PROMPTS[0])
        before = http_get(job.url, "/status")[1]["ranks"]
        results, errors = {}, []

        def one(prompt):
            try:
                stream = chat(client, model_id, prompt, stream=True, stream_options={"include_usage": True})
                results[prompt] = collect(stream)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
        leaver = threading.Thread(target=leave_mid_stream, args=(job.url, ckpt))
        for t in [leaver, *threads]:
            t.start()
        for t in [leaver, *threads]:
            t.join(TIMEOUT)
        assert not errors, errors
        assert {p: text for p, (text, _, _) in results.items()} == alone
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = http_get(job.url, "/status")[1]
            if status["requests"]["active"] == 0:
                break
            time.sleep(0.1)
        assert status["requests"]["active"] == 0 and status["requests"]["cancelled"] == 1, status["requests"]
        rows = status["ranks"]
        model = status["model"]
        per_call = model["all_reduces_per_forward_pass"]
        assert model["overlap"] and per_call == model["moe_layers"] * (2 if "split" in extra else 1), model
        for b, r in zip(before, rows):
            overlapped = r["all_reduces_overlapped"] - b["all_reduces_overlapped"]
            assert overlapped > 0 and r["all_reduces_overlapped"] == rows[0]["all_reduces_overlapped"], rows
            # Still one all-reduce per layer and forward pass (each cohort's pass is one).
            assert r["all_reduces"] + r["all_reduces_skipped"] == r["forward_passes"] * per_call, r
            assert r["cohorts"] == [0, 0], r["cohorts"]
            assert set(r["other_collectives"]) <= {"allgather"}, r["other_collectives"]
        assert job.stop(signal.SIGTERM, timeout=10) < 10
    finally:
        job.stop(signal.SIGKILL, timeout=5)


def test_overlap_needs_the_mpi4py_backend(ckpt):
    argv = [sys.executable, "-m", "moe_mpi", "serve", "--model", str(ckpt), "--port", "0", "--overlap",
            "--backend", "mlx"]
    proc = run_mpirun(2, argv, timeout=TIMEOUT, env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("--overlap needs --backend mpi4py") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def read_until_closed(url: str, ckpt: Path) -> None:
    """An endless stream, read until the server goes away."""
    with open_stream(url, str(ckpt), CONTEXT - 40, no_end(ckpt)) as sock:
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass


def test_a_rank_that_dies_mid_step_takes_the_overlapped_job_down(ckpt, tmp_path):
    # Both cohorts busy (two endless streams), so that the dead rank leaves
    # an all-reduce half done on the live rank's wire thread.
    job = start_server(2, ckpt, tmp_path, "--overlap")
    try:
        pids = [r["pid"] for r in http_get(job.url, "/status")[1]["ranks"]]
        for _ in range(2):
            threading.Thread(target=read_until_closed, args=(job.url, ckpt), daemon=True).start()
        deadline = time.monotonic() + 30
        while http_get(job.url, "/status")[1]["ranks"][0]["cohorts"] != [1, 1]:
            assert time.monotonic() < deadline, "the two streams never ran in two cohorts"
            time.sleep(0.05)
        os.kill(pids[1], signal.SIGKILL)
        job.proc.wait(timeout=15)
        assert job.proc.returncode != 0
        out = job.output()
        assert "rank 1" in out and ("signal 9" in out or "Killed" in out), out
        assert http_get(job.url, "/health") == (None, None)  # nothing accepts requests
        assert ranks_gone(pids, 5.0)
    finally:
        job.stop(signal.SIGKILL, timeout=5)
