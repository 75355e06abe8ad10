"""Faults under real ``mpirun``: a rank that dies, a rank that freezes.

Each test starts ``moe-mpi generate`` on real ranks, finds a rank's process
by the rank number its launcher gave it (``OMPI_COMM_WORLD_RANK`` in
``/proc/PID/environ``), hurts it at a known point, and then requires that
every process of the job is gone within a bound, that the job failed, that
the message names the rank, and that no process of the job is left.

Known points without hooks in the code:

* mid-generation: rank 0 has streamed text to stdout;
* mid-load: rank 1 is given (with mpirun's ``:`` syntax) a model directory
  whose ``model.safetensors`` is a named pipe; opening it blocks, so rank 1
  stays inside loading while rank 0 has loaded and waits for it.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moe_mpi import synthetic
from moe_mpi.launch import launch_again, mpirun_command

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
START_WITHIN = 90.0  # the job's start-up on a loaded 2-core machine
DIE_WITHIN = 10.0  # every process gone after a rank is lost (issue 19)
TIMEOUT = 3.0  # --timeout of the freeze tests
LONG = 100000  # --max-tokens: generation outlasts every test


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("faults") / "qwen3_moe", "qwen3_moe", seed=1)


@pytest.fixture(scope="module")
def endless_ckpt(ckpt, tmp_path_factory) -> Path:
    """``ckpt`` that never ends a greedy generation: it runs to --max-tokens.

    The tokenizer's own end-of-text token (id 0) stays an end-of-sequence
    id for mlx-lm whatever config.json says, so its row of the LM head is
    zeroed: its logit is 0 while the largest of the other 511 random logits
    is positive (all 511 negative: odds 2**-511). Otherwise greedy decoding
    met it after about 150 tokens, and on a loaded machine, where mpirun
    forwards stdout late, a test could stop a rank after the job had
    finished generating (then the others hang in MPI_Finalize).
    """
    import json

    from mlx_lm.utils import load_tokenizer
    from safetensors.numpy import load_file, save_file

    dst = shutil.copytree(ckpt, tmp_path_factory.mktemp("endless") / "model")
    config = json.loads((dst / "config.json").read_text())
    config["eos_token_id"] = [config["vocab_size"] + 7]
    (dst / "config.json").write_text(json.dumps(config))
    eos = sorted(t for t in load_tokenizer(dst).eos_token_ids if t < config["vocab_size"])
    assert not config.get("tie_word_embeddings"), "the LM head must be its own tensor here"
    for path in dst.glob("*.safetensors"):
        tensors = load_file(path)
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"][eos] = 0.0
            save_file(tensors, path, metadata={"format": "mlx"})
    return dst


@pytest.fixture(scope="module")
def blocking_ckpt(ckpt, tmp_path_factory) -> Path:
    """The checkpoint with a named pipe for its weights: loading it blocks."""
    dst = tmp_path_factory.mktemp("fifo") / "model"
    dst.mkdir()
    for f in ckpt.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    os.mkfifo(dst / "model.safetensors")
    return dst


def generate_argv(*args) -> list:
    return [sys.executable, "-m", "moe_mpi", "generate", *map(str, args)]


class Job:
    """A running ``mpirun`` job, its output collected by threads.

    Launched again, as :func:`moe_mpi.launch.run_mpirun` does, if mpirun
    failed before any rank ran (:data:`moe_mpi.launch.LAUNCH_FAILURES`).
    """

    def __init__(self, cmd: list):
        self.cmd = cmd
        self.launches = 0
        self._start()

    def _start(self) -> None:
        self.launches += 1
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
            start_new_session=True,  # its session id finds every process of the job
        )
        self.stdout, self.stderr = [], []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _relaunched(self) -> bool:
        """Starts the job again if mpirun ended, failing to start; whether it did."""
        if self.proc.poll() is None:
            return False
        for t in self._threads:
            t.join(5)
        if not launch_again(self.err + self.out, self.launches):
            return False
        self._start()
        return True

    @staticmethod
    def _pump(stream, into):
        for chunk in iter(lambda: stream.read(1), ""):
            into.append(chunk)

    @property
    def out(self) -> str:
        return "".join(self.stdout)

    @property
    def err(self) -> str:
        return "".join(self.stderr)

    def members(self) -> list:
        """Pids of every process in the job's session (mpirun, its daemon, the ranks)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if len(fields) > 3 and int(fields[3]) == self.proc.pid and fields[0] != "Z":
                pids.append(int(entry))
        return pids

    def rank_pid(self, rank: int) -> int:
        """The pid of ``rank``'s Python process (waits for it to exist)."""
        deadline = time.monotonic() + START_WITHIN
        while time.monotonic() < deadline:
            if self._relaunched():
                deadline = time.monotonic() + START_WITHIN
            for pid in self.members():
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    exe = os.readlink(f"/proc/{pid}/exe")
                except OSError:
                    continue
                if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env and "python" in exe:
                    return pid
            time.sleep(0.05)
        raise AssertionError(f"rank {rank} never started\n{self.err}")

    def wait_for_stdout(self, chars: int = 1) -> None:
        deadline = time.monotonic() + START_WITHIN
        while len(self.out) < chars:
            if self._relaunched():
                deadline = time.monotonic() + START_WITHIN
            assert self.proc.poll() is None, f"the job ended early\n{self.out}\n{self.err}"
            assert time.monotonic() < deadline, f"no output\n{self.err}"
            time.sleep(0.02)

    def wait_for_state(self, pid: int, state: str, seconds: float = START_WITHIN) -> None:
        """Waits until ``pid`` is in kernel state ``state`` (e.g. S: blocked)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat[stat.rfind(")") + 2] == state:
                return
            time.sleep(0.05)
        raise AssertionError(f"pid {pid} never reached state {state}\n{self.err}")

    def end(self, within: float) -> float:
        """Waits for mpirun to exit; returns the seconds it took, and then
        requires that no process of the job is left (killing leftovers)."""
        start = time.monotonic()
        hung = False
        try:
            self.proc.wait(timeout=within + 30)
        except subprocess.TimeoutExpired:
            hung = True
        finally:
            took = time.monotonic() - start
            left = self.members()
            for pid in left:
                with_signal(pid, signal.SIGKILL)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for t in self._threads:
                t.join(timeout=5)
        assert not hung, f"mpirun still running {took:.0f} s later\n{self.err}"
        assert not left, f"processes left after the job: {left}\n{self.err}"
        return took


def with_signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def blocked_in_fifo(pid: int) -> bool:
    """Whether ``pid`` has the named pipe open or is opening it (its wait channel)."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text() in ("fifo_open", "pipe_wait", "wait_for_partner")
    except OSError:
        return False


# --------------------------------------------------------------------------
# A rank dies
# --------------------------------------------------------------------------


def test_rank_killed_mid_generation(endless_ckpt):
    job = Job(mpirun_command(3, generate_argv("--model", endless_ckpt, "--max-tokens", LONG, "--ignore-chat-template")))
    victim = job.rank_pid(1)
    job.wait_for_stdout()
    os.kill(victim, signal.SIGKILL)
    took = job.end(DIE_WITHIN)
    assert job.proc.returncode != 0, job.err
    assert took < DIE_WITHIN, f"{took:.1f} s\n{job.err}"
    assert "rank 1" in job.err and "signal 9" in job.err, job.err  # mpirun names it


def start_with_rank_1_loading(ckpt, blocking_ckpt, *options):
    """A 2-rank generate in which rank 1 is stuck loading; returns the job and rank 1's pid.

    Rank 0 loads the real checkpoint and waits; rank 1 blocks opening the
    pipe of ``blocking_ckpt`` (mpirun's ``:`` syntax gives it that model).
    """
    cmd = mpirun_command(1, generate_argv("--model", ckpt, "--max-tokens", 4, *options))
    cmd += [":", "-n", "1", *generate_argv("--model", blocking_ckpt, "--max-tokens", 4, *options)]
    job = Job(cmd)
    victim = job.rank_pid(1)
    deadline = time.monotonic() + START_WITHIN
    while not blocked_in_fifo(victim):
        assert time.monotonic() < deadline and job.proc.poll() is None, job.err
        time.sleep(0.05)
    return job, victim


def test_rank_killed_mid_load(ckpt, blocking_ckpt):
    job, victim = start_with_rank_1_loading(ckpt, blocking_ckpt)
    os.kill(victim, signal.SIGKILL)
    took = job.end(DIE_WITHIN)
    assert job.proc.returncode != 0, job.err
    assert took < DIE_WITHIN, f"{took:.1f} s\n{job.err}"
    assert "rank 1" in job.err and "signal 9" in job.err, job.err


# --------------------------------------------------------------------------
# A rank freezes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("options", [(), ("--backend", "mlx", "--mode", "sliced")], ids=["mpi4py", "mlx-lazy"])
def test_rank_stopped_mid_generation_is_named(endless_ckpt, options):
    # With --backend mlx and every expert split, a forward pass is one lazy
    # graph: the ranks wait inside MLX's evaluation, not in a call of ours.
    job = Job(mpirun_command(3, generate_argv(
        "--model", endless_ckpt, "--max-tokens", LONG, "--ignore-chat-template", "--timeout", TIMEOUT, *options
    )))
    victim = job.rank_pid(2)
    job.wait_for_stdout()
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    job.end(TIMEOUT + DIE_WITHIN)
    took = time.monotonic() - stopped  # from the stop, not from the job's start
    assert job.proc.returncode != 0, job.err
    assert TIMEOUT <= took < TIMEOUT + DIE_WITHIN, f"{took:.1f} s\n{job.err}"
    assert job.err.count("moe-mpi: error:") == 1, job.err
    assert "rank 2 stopped answering" in job.err, job.err
    assert "--timeout 3" in job.err


def test_loading_rank_is_waited_for_while_it_answers_then_named_when_stopped(ckpt, blocking_ckpt):
    job, victim = start_with_rank_1_loading(ckpt, blocking_ckpt, "--timeout", 1)
    # Rank 1 is loading (blocked on the pipe) and its heartbeats go on:
    # several timeouts later rank 0 still waits for it.
    time.sleep(4)
    assert job.proc.poll() is None, job.err
    assert "error" not in job.err, job.err
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    job.end(DIE_WITHIN)
    took = time.monotonic() - stopped
    assert job.proc.returncode != 0, job.err
    assert took < 1 + DIE_WITHIN, f"{took:.1f} s\n{job.err}"
    assert job.err.count("moe-mpi: error:") == 1, job.err
    assert "rank 1 stopped answering" in job.err, job.err


# --------------------------------------------------------------------------
# An interrupted batch run
# --------------------------------------------------------------------------


def test_ctrl_c_on_mpirun_keeps_complete_rows_and_rerun_finishes(ckpt, tmp_path):
    import json

    total = 24
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"count {i} sheep"}) + "\n" for i in range(total)))
    out = tmp_path / "results.jsonl"
    args = ("--model", ckpt, "--prompts-file", prompts, "--output", out, "--batch-size", 2, "--max-tokens", 24)
    job = Job(mpirun_command(2, generate_argv(*args)))
    deadline = time.monotonic() + START_WITHIN
    while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
        assert time.monotonic() < deadline and job.proc.poll() is None, job.err
        time.sleep(0.01)
    # Ctrl-C in a terminal: SIGINT to mpirun (the ranks are in process groups of their own).
    os.kill(job.proc.pid, signal.SIGINT)
    job.end(DIE_WITHIN)
    assert job.proc.returncode != 0, job.err
    data = out.read_bytes()
    assert data.endswith(b"\n"), data[-200:]  # only complete rows
    kept = [json.loads(line) for line in data.decode().splitlines()]
    assert 2 <= len(kept) < total, "the job finished before it could be interrupted"

    rerun = Job(mpirun_command(2, generate_argv(*args)))
    rerun.end(START_WITHIN)
    assert rerun.proc.returncode == 0, rerun.err
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in final) == list(range(total))  # each id once
    assert final[: len(kept)] == kept


# --------------------------------------------------------------------------
# Ranks that disagree: refused before any compute
# --------------------------------------------------------------------------


def run_mpmd(first: list, second: list) -> tuple:
    """Rank 0 runs ``generate first``, rank 1 ``generate second``; returns (proc, seconds)."""
    cmd = mpirun_command(1, generate_argv(*first)) + [":", "-n", "1", *generate_argv(*second)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=START_WITHIN + 30)
    return proc, time.monotonic() - start


def assert_refused(proc, seconds: float, *needles):
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("moe-mpi: error:") == 1, proc.stderr  # one message
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stdout + proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert seconds < 30, f"{seconds:.1f} s"


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory) -> Path:
    """The same architecture and tensors as ``ckpt``, other weights."""
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("other") / "qwen3_moe", "qwen3_moe", seed=2)


def test_different_seed_on_one_rank_is_refused(ckpt):
    common = ["--model", ckpt, "--max-tokens", 4, "--temp", 0.7]
    proc, seconds = run_mpmd([*common, "--seed", 0], [*common, "--seed", 5])
    assert_refused(proc, seconds, "the ranks disagree on how to run: --seed: 0 on rank 0; 5 on rank 1")


def test_different_placement_on_one_rank_is_refused(ckpt):
    common = ["--model", ckpt, "--max-tokens", 4]
    proc, seconds = run_mpmd(common, [*common, "--placement", "round-robin"])
    assert_refused(proc, seconds, "the ranks disagree on the model they loaded: expert placement:")


def test_different_checkpoint_on_one_rank_is_refused(ckpt, other_ckpt):
    proc, seconds = run_mpmd(["--model", ckpt, "--max-tokens", 4], ["--model", other_ckpt, "--max-tokens", 4])
    assert_refused(proc, seconds, "the ranks disagree on the model they loaded: dense weights:")
    assert "checkpoint tensors" not in proc.stderr  # same names, shapes and dtypes


def test_same_model_at_different_paths_runs(ckpt, tmp_path):
    copy = shutil.copytree(ckpt, tmp_path / "copy")  # another Mac's copy of it
    proc, _ = run_mpmd(["--model", ckpt, "--max-tokens", 4], ["--model", copy, "--max-tokens", 4])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


# --------------------------------------------------------------------------
# The watchdog's rules (no processes: its counters and peers set by hand)
# --------------------------------------------------------------------------


def watchdog_at(entered: int, left: int, peers: dict, timeout: float = 3.0):
    """Rank 0 of 3 inside operation ``entered``; ``peers``: rank -> (seen, entered, left, phase)."""
    from types import SimpleNamespace

    from moe_mpi.mpi_activity import Activity
    from moe_mpi.watchdog import Peer, Watchdog

    activity = Activity()
    activity.entered, activity.left = entered, left
    dog = Watchdog(SimpleNamespace(rank=0, size=3), timeout, activity=activity)
    for r, (seen, e, l, phase) in peers.items():
        dog.peers[r] = Peer(r, "h", [], seen, e, l, phase)
    return dog


def test_watchdog_rules():
    from moe_mpi.watchdog import BUSY, RUNNING

    # Rank 2's last heartbeat is 5 s old; rank 1 waits with us.
    dog = watchdog_at(10, 9, {1: (99.0, 10, 9, RUNNING), 2: (95.0, 9, 9, RUNNING)})
    assert dog.check(97.0) is None  # starts the clock
    assert dog.check(99.9) is None  # 2.9 s < 3 s
    message = dog.check(100.1)
    assert message.startswith("rank 2 stopped answering (no heartbeat for 5.1 s)"), message
    assert "collective #10 (all_sum)" in message and "--timeout 3" in message

    # Operations that complete never fire, however long the run.
    dog = watchdog_at(10, 10, {1: (0.0, 10, 10, RUNNING), 2: (0.0, 10, 10, RUNNING)})
    assert dog.check(0.0) is None and dog.check(1000.0) is None

    # A rank alive but still loading is waited for; once it is silent, named.
    dog = watchdog_at(4, 3, {1: (99.0, 4, 3, RUNNING), 2: (99.5, 2, 2, BUSY)})
    assert dog.check(90.0) is None
    assert dog.check(100.0) is None
    dog.peers[2].seen = 90.0
    assert dog.check(100.0).startswith("rank 2 stopped answering")

    # A rank busy for longer than the timeout (loading; rank 0 of a server
    # waiting for requests) that has just left its busy phase, and whose
    # heartbeat came before it reached the operation, gets a whole timeout
    # to arrive before it is named.
    dog = watchdog_at(4, 3, {1: (99.0, 4, 3, RUNNING), 2: (99.5, 3, 3, BUSY)})
    dog.check(80.0)
    assert dog.check(100.0) is None  # 20 s waited, but rank 2 is busy
    dog.peers[2].phase, dog.peers[2].seen, dog.peers[1].seen = RUNNING, 100.5, 100.5
    assert dog.check(101.0) is None and dog.check(102.9) is None
    assert dog.check(103.1).startswith("rank 2 did not reach collective #4"), dog.check(103.1)

    # Alive and running, but not at the operation: named as such.
    dog = watchdog_at(4, 3, {1: (99.0, 4, 3, RUNNING), 2: (99.5, 2, 2, RUNNING)})
    dog.check(90.0)
    assert dog.check(100.0).startswith("rank 2 did not reach collective #4"), dog.check(100.0)

    # No heartbeat ever (UDP blocked): the timeout still ends the job.
    dog = watchdog_at(4, 3, {1: (None, 0, 0, RUNNING), 2: (None, 0, 0, RUNNING)})
    dog.check(90.0)
    assert dog.check(100.0).startswith("cannot tell which rank: no heartbeats from ranks 1, 2")

    # A forward pass whose all-reduces are in MLX's graph (--backend mlx)
    # computes as long as it takes: only a silent rank ends it.
    from moe_mpi.mpi_activity import LAZY

    dog = watchdog_at(4, 3, {1: (99.0, 4, 3, RUNNING), 2: (99.5, 4, 3, RUNNING)})
    dog.activity.kind = LAZY
    dog.check(0.0)
    assert dog.check(99.9) is None  # 100 s in one forward pass, every rank answering
    dog.peers[2].seen = 90.0
    message = dog.check(100.0)
    assert message.startswith("rank 2 stopped answering") and "forward pass" in message, message


# --------------------------------------------------------------------------
# A long run
# --------------------------------------------------------------------------


def test_soak_1000_decode_steps_on_3_ranks(ckpt):
    from moe_mpi.launch import run_mpirun

    here = Path(__file__).parent
    proc = run_mpirun(3, [sys.executable, "-m", "mpi4py", str(here / "mpi_soak.py"), str(ckpt), "1000", "100"], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("all_sum") == 3, proc.stdout
