"""``moe-mpi serve`` under faults, with real ``mpirun`` and the ``openai`` client.

* The watchdog (``--timeout``): an idle server waits for requests far
  longer than its timeout without a word; a rank stopped with SIGSTOP while
  a batch runs is named, and every process of the job ends, non-zero; a rank
  stopped while the server is idle is named when the next request needs it,
  and a stopped rank 0 (no request can come) by the other rank.
* The start-up fingerprint: ranks started (with mpirun's ``:``) with
  different batch options or different checkpoints are refused with one
  message before anything listens; options that only rank 0's HTTP side
  reads may differ.
* The routing guard inside the serving engine: ``tests/mpi_serve_guard.py``
  (rank 1 routes layer 0 differently; see there).

The model is the tiny random qwen3_moe of the other tests; the requests
bias its end-of-sequence token away (``logit_bias``), so that each runs to
its ``max_tokens``.
"""

import json
import os
import shutil
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
from moe_mpi.bench.serve import ServerJob, http_get  # noqa: E402
from moe_mpi.launch import kill_job, mpirun_command, run_mpirun  # noqa: E402
from routed_ckpts import negated_router_pair  # noqa: E402  (tests/routed_ckpts.py)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

HERE = Path(__file__).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
READY_WITHIN = 120.0
DIE_WITHIN = 10.0  # every process gone after the watchdog fires (as tests/test_faults.py)
TIMEOUT = 2.0  # --timeout of these servers
# A rank is silent once its last heartbeat is --timeout old, and that one may
# have been sent up to one heartbeat interval (timeout / 4) before it stopped.
EARLIEST = TIMEOUT - TIMEOUT / 4
#: max_tokens of a request that outlasts the test. Not a few thousand: the
#: tiny model decodes about 1000 tokens/s, and on a loaded machine a client
#: can read its fifth chunk after the server has sent the last one.
LONG = 100_000
CONTEXT = 1 << 17


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    config = synthetic.tiny_config("qwen3_moe", max_position_embeddings=CONTEXT)
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("serve-faults") / "qwen3_moe", config, seed=1)


def no_end(ckpt) -> dict:
    """A ``logit_bias`` that keeps the model from ending a request early."""
    eos = json.loads((ckpt / "config.json").read_text())["eos_token_id"]
    return {str(t): -100.0 for t in (eos if isinstance(eos, list) else [eos])}


def serve_program(ckpt, *extra) -> list:
    return [sys.executable, "-m", "moe_mpi", "serve", "--model", str(ckpt), *map(str, extra)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list, tmp: Path, url=None) -> ServerJob:
    job = ServerJob(argv, tmp / f"serve-{time.monotonic_ns()}.log", url=url, env=ENV).start()
    try:
        job.wait_ready(timeout=READY_WITHIN)
    except RuntimeError:
        kill_job(job.proc)  # mpirun and every rank left in its session
        raise
    return job


def rank_pids(url: str) -> list:
    status, body = http_get(url, "/status")
    assert status == 200, body
    return [r["pid"] for r in body["ranks"]]


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def ended(job: ServerJob, pids: list, since: float, within: float) -> float:
    """Waits for mpirun to exit; returns the seconds since ``since``. Then
    every rank must be gone (leftovers are killed, and the test fails)."""
    try:
        job.proc.wait(timeout=max(0.0, since + within - time.monotonic()) + 20)
    except subprocess.TimeoutExpired:
        pass
    took = time.monotonic() - since
    left = [pid for pid in pids if alive(pid)]
    if job.proc.poll() is None or left:
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        kill_job(job.proc)
        pytest.fail(f"the job did not end ({took:.0f} s; ranks left: {left})\n{job.output()[-3000:]}")
    return took


class Streamer(threading.Thread):
    """A streaming chat request on its own thread: chunks counted, the error kept."""

    def __init__(self, url: str, ckpt: Path, max_tokens: int):
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        self.model, self.max_tokens, self.bias = str(ckpt), max_tokens, no_end(ckpt)
        self.chunks, self.error, self.finish = 0, None, None

    def run(self):
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": "go on"}],
                max_tokens=self.max_tokens, temperature=0.0, stream=True, logit_bias=self.bias,
            )
            for chunk in stream:
                self.chunks += 1
                for choice in chunk.choices:
                    self.finish = choice.finish_reason or self.finish
        except Exception as e:  # noqa: BLE001 - the test looks at it
            self.error = e

    def wait_for_chunks(self, n: int, job: ServerJob) -> None:
        deadline = time.monotonic() + READY_WITHIN
        while self.chunks < n:
            assert self.error is None, self.error
            assert job.proc.poll() is None and time.monotonic() < deadline, job.output()[-3000:]
            time.sleep(0.02)


def chat(url: str, ckpt: Path, prompt: str, max_tokens: int = 4):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    return client.chat.completions.create(
        model=str(ckpt), messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0,
        logit_bias=no_end(ckpt),
    )


# --------------------------------------------------------------------------
# The watchdog
# --------------------------------------------------------------------------


@pytest.mark.parametrize("victim", [1, 0])
def test_rank_stopped_mid_batch_is_named_and_the_job_ends(ckpt, tmp_path, victim):
    job = start(mpirun_command(2, serve_program(ckpt, "--port", 0, "--timeout", TIMEOUT)), tmp_path)
    try:
        pids = rank_pids(job.url)
        streams = [Streamer(job.url, ckpt, LONG) for _ in range(3)]
        for s in streams:
            s.start()
        for s in streams:
            s.wait_for_chunks(5, job)
        os.kill(pids[victim], signal.SIGSTOP)
        took = ended(job, pids, time.monotonic(), TIMEOUT + DIE_WITHIN)
    finally:
        kill_job(job.proc)  # mpirun and every rank left in its session
    out = job.output()
    print(f"\nrank {victim} stopped mid-batch: the job ended {took:.1f} s later (--timeout {TIMEOUT:g})")
    assert job.proc.returncode != 0, out
    assert EARLIEST <= took < TIMEOUT + DIE_WITHIN, f"{took:.1f} s\n{out}"
    assert out.count("moe-mpi: error:") == 1, out
    assert f"rank {victim} stopped answering" in out and f"--timeout {TIMEOUT:g}" in out, out
    for s in streams:
        s.join(30)
        # The clients learn of it: their connection closes before the end.
        assert not s.is_alive() and (s.error is not None or s.finish is None), (s.error, s.finish)


def test_idle_server_outlives_its_timeout_and_a_rank_stopped_while_idle_is_named_at_the_next_request(ckpt, tmp_path):
    job = start(mpirun_command(2, serve_program(ckpt, "--port", 0, "--timeout", TIMEOUT)), tmp_path)
    try:
        pids = rank_pids(job.url)
        for _ in range(2):
            # Idle for several timeouts: rank 1 waits in the step's broadcast
            # all along, while rank 0 waits for requests (busy, answering).
            time.sleep(3 * TIMEOUT)
            assert job.proc.poll() is None, job.output()
            reply = chat(job.url, ckpt, "still there?")
            assert reply.usage.completion_tokens == 4
            # A burst of requests after the idle spell, then idle again.
            streams = [Streamer(job.url, ckpt, 16) for _ in range(4)]
            for s in streams:
                s.start()
            for s in streams:
                s.join(60)
                assert s.error is None and s.finish == "length", (s.error, s.finish)
        assert "error" not in job.output().lower(), job.output()

        # Rank 1 stops while idle. Nobody waits for it in MPI (rank 0 waits
        # for requests), so the job lives on...
        os.kill(pids[1], signal.SIGSTOP)
        time.sleep(2 * TIMEOUT)
        assert job.proc.poll() is None, job.output()
        # ... until a request needs it.
        asked = time.monotonic()
        stream = Streamer(job.url, ckpt, 8)
        stream.start()
        took = ended(job, pids, asked, TIMEOUT + DIE_WITHIN)
        stream.join(30)
    finally:
        kill_job(job.proc)  # mpirun and every rank left in its session
    out = job.output()
    print(f"\nrank 1 stopped while idle: the job ended {took:.1f} s after the next request (--timeout {TIMEOUT:g})")
    assert job.proc.returncode != 0, out
    assert took < TIMEOUT + DIE_WITHIN, f"{took:.1f} s\n{out}"
    assert out.count("moe-mpi: error:") == 1 and "rank 1 stopped answering" in out, out
    assert stream.error is not None or stream.finish is None, (stream.error, stream.finish)


def test_rank_0_stopped_while_idle_is_named_by_the_others(ckpt, tmp_path):
    job = start(mpirun_command(2, serve_program(ckpt, "--port", 0, "--timeout", TIMEOUT)), tmp_path)
    try:
        pids = rank_pids(job.url)
        time.sleep(1)  # the status query's step is over: idle
        os.kill(pids[0], signal.SIGSTOP)  # no client can reach the server any more
        took = ended(job, pids, time.monotonic(), TIMEOUT + DIE_WITHIN)
    finally:
        kill_job(job.proc)  # mpirun and every rank left in its session
    out = job.output()
    print(f"\nrank 0 stopped while idle: the job ended {took:.1f} s later (--timeout {TIMEOUT:g})")
    assert job.proc.returncode != 0, out
    # Silence counts from rank 0's last heartbeat, up to one interval
    # (timeout / 4) before the SIGSTOP.
    assert EARLIEST <= took < TIMEOUT + DIE_WITHIN, f"{took:.1f} s\n{out}"
    assert out.count("moe-mpi: error:") == 1 and "rank 0 stopped answering" in out, out


@pytest.mark.parametrize("timeout", [TIMEOUT, 0])
def test_ranks_of_a_server_whose_mpirun_was_killed_exit(ckpt, tmp_path, timeout):
    """kill -9 of mpirun leaves Open MPI's ranks running; an idle server's would
    go on serving with no launcher. They notice their parent is gone and exit,
    with the watchdog's timeout on or off (--timeout 0)."""
    job = start(mpirun_command(2, serve_program(ckpt, "--port", 0, "--timeout", timeout)), tmp_path)
    try:
        pids = rank_pids(job.url)
        time.sleep(1)  # idle
        job.proc.kill()  # mpirun alone, not its session
        job.proc.wait(timeout=10)
        since = time.monotonic()
        while any(alive(pid) for pid in pids) and time.monotonic() - since < DIE_WITHIN:
            time.sleep(0.1)
        left = [pid for pid in pids if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"ranks {left} still ran {DIE_WITHIN:g} s after mpirun was killed\n{job.output()[-3000:]}"
        print(f"\nmpirun killed (--timeout {timeout:g}): every rank gone {time.monotonic() - since:.1f} s later")
    finally:
        kill_job(job.proc)


# --------------------------------------------------------------------------
# The start-up fingerprint
# --------------------------------------------------------------------------


def run_mpmd(first: list, second: list, port: int):
    cmd = mpirun_command(1, serve_program(*first, "--port", port)) + [":", "-n", "1", *serve_program(*second, "--port", port)]
    begin = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=READY_WITHIN)
    return proc, time.monotonic() - begin


@pytest.mark.parametrize("case", ["options", "checkpoint"])
def test_ranks_that_disagree_are_refused_before_anything_listens(ckpt, tmp_path, case):
    port = free_port()
    if case == "options":
        proc, seconds = run_mpmd([ckpt, "--decode-concurrency", 8], [ckpt, "--decode-concurrency", 4], port)
        needle = "the ranks disagree on how to run: --decode-concurrency: 8 on rank 0; 4 on rank 1; refusing to run"
    else:
        other = synthetic.write_checkpoint(tmp_path / "other", "qwen3_moe", seed=2)
        shutil.copy(ckpt / "config.json", other / "config.json")  # the same config: only the weights differ
        proc, seconds = run_mpmd([ckpt], [other], port)
        needle = "the ranks disagree on the model they loaded: dense weights:"
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("moe-mpi: error:") == 1, proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and seconds < 60, (seconds, proc.stderr)
    assert " at http://" not in proc.stderr  # never listened


def test_options_only_rank_0_reads_may_differ(ckpt, tmp_path):
    # Rank 1's HTTP options are never used; neither its key nor its request
    # defaults change what the ranks compute.
    port = free_port()
    first = serve_program(ckpt, "--port", port, "--api-key", "sesame", "--max-tokens", 5)
    second = serve_program(ckpt, "--port", port + 1, "--api-key", "rank-1-key", "--max-tokens", 9, "--temp", 0.5)
    argv = mpirun_command(1, first) + [":", "-n", "1", *second]
    job = start(argv, tmp_path, url=f"http://127.0.0.1:{port}")
    try:
        client = openai.OpenAI(base_url=job.url + "/v1", api_key="sesame", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=str(ckpt), messages=[{"role": "user", "content": "hi"}])
        assert reply.usage.completion_tokens == 5  # rank 0's --max-tokens
    finally:
        job.stop(signal.SIGTERM, timeout=10)
    assert "rank-1-key" not in job.output()


def test_stop_with_sigkill_leaves_no_rank_behind(ckpt, tmp_path):
    # mpirun cannot pass SIGKILL on to its ranks; ServerJob.stop (the tests'
    # and bench serve's clean-up) must end them itself.
    job = start(mpirun_command(2, serve_program(ckpt, "--port", 0)), tmp_path)
    pids = rank_pids(job.url)
    job.stop(signal.SIGKILL, timeout=5)
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks left running after stop(SIGKILL): {left}"


# --------------------------------------------------------------------------
# The routing guard in the serving engine
# --------------------------------------------------------------------------

PROMPTS = [[1, 5, 9, 42, 7], [100, 3, 12], [8, 8, 8, 8, 8, 8, 8], [300, 301]]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def guard_ckpts(tmp_path_factory):
    """(checkpoint, its copy with MoE layer 0's router negated, reference tokens .json)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load as mlx_lm_load

    root = tmp_path_factory.mktemp("serve-guard")
    real, negated = negated_router_pair(root)
    model, _ = mlx_lm_load(str(real))
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    reference = [
        [int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=MAX_TOKENS, sampler=greedy)]
        for p in PROMPTS
    ]
    ref = root / "reference.json"
    ref.write_text(json.dumps({"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "tokens": reference}))
    return real, negated, ref


def run_guard_ranks(n: int, guard_ckpts, mode: str):
    real, negated, ref = guard_ckpts
    argv = [sys.executable, "-m", "mpi4py", str(HERE / "mpi_serve_guard.py"), str(real), str(negated), str(ref), mode]
    return run_mpirun(n, argv, timeout=300, env=ENV)


def test_engine_repairs_a_divergence_on_every_rank_and_counts_it(guard_ckpts):
    proc = run_guard_ranks(3, guard_ckpts, "repair")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1, 2], proc.stdout
    ref = json.loads(guard_ckpts[2].read_text())["tokens"]
    assert rows[0]["tokens"] == ref  # rank 0's routing: the real checkpoint's tokens
    repairs = {r["figures"]["routing_repairs"] for r in rows}
    assert len(repairs) == 1 and repairs.pop() == rows[0]["figures"]["forward_passes"] > 0
    for r in rows:
        f = r["figures"]
        # Layer 0 redone in every forward pass: one more all-reduce each.
        assert f["all_reduces"] == 2 * f["forward_passes"] + f["routing_repairs"], f
        assert f["first_routing_repair"][:2] == [0, [1]], f
    status = rows[0]["status"]
    assert status["routing"]["guard"] == "repair" and status["routing"]["repairs"] == rows[0]["figures"]["routing_repairs"]
    assert status["routing"]["first_repair"]["layer"] == 0 and status["routing"]["first_repair"]["ranks"] == [1]
    assert rows[0]["warning"].startswith("the ranks' routing diverged in"), rows[0]["warning"]


def test_strict_routing_ends_the_serving_job_with_one_message(guard_ckpts):
    proc = run_guard_ranks(2, guard_ckpts, "strict")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.count("moe-mpi: error:") == 1, proc.stderr
    assert "MoE layer 0: rank 1 routed" in proc.stderr and "--strict-routing" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_reference_tokens_are_not_what_rank_1_alone_would_give(guard_ckpts):
    """The divergence is real: the negated checkpoint alone gives other tokens (else the repair test proves nothing)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load as mlx_lm_load

    _, negated, ref = guard_ckpts
    model, _ = mlx_lm_load(str(negated))
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    other = [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=MAX_TOKENS, sampler=greedy)] for p in PROMPTS]
    assert other != json.loads(ref.read_text())["tokens"]
