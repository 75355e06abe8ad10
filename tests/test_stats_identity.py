"""Router statistics know the model they were recorded on (``moe_mpi/routing.py``, docs/balance.md).

Two tiny qwen3_moe checkpoints of one shape (2 MoE layers of 8 experts,
top-2), different weights. ``moe-mpi profile`` on the first (1 rank, ep)
writes a version 2 file with the digest of its routers; the second model
must refuse it (``generate``, ``info``, ``plan``, ``shard_experts``) with
one error line, while the first takes it in another mode on another number
of ranks. A version 1 file (no identity) is still read, checked by shape,
with one warning. Real ``mpirun``; the pytest process never initialises MPI.
"""

import json
import os
import sys
import time

import pytest

from moe_mpi import synthetic
from moe_mpi.launch import run_mpirun
from moe_mpi.routing import RoutingStats

TIMEOUT = 120
FAIL_WITHIN = 20.0
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
REFUSED = "were recorded on another model"
NO_IDENTITY = "they are checked against this model's shape only"


def moe_mpi(*args):
    return [sys.executable, "-m", "moe_mpi", *map(str, args)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    return {name: synthetic.write_checkpoint(root / name, "qwen3_moe", seed=seed) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def stats_a(ckpts, tmp_path_factory):
    """``moe-mpi profile`` of model a, on 1 rank (mode ep)."""
    root = tmp_path_factory.mktemp("profile")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello world", "the quick brown fox")))
    out = root / "stats-a.json"
    proc = run_mpirun(1, moe_mpi("profile", "--model", ckpts["a"], "--prompts-file", prompts, "--output", out,
                                 "--max-tokens", 8, "--no-progress"), timeout=TIMEOUT, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return out


def generate(n, ckpt, *args):
    start = time.monotonic()
    proc = run_mpirun(n, moe_mpi("generate", "--model", ckpt, "--prompt", "hello", "--max-tokens", 4, *args),
                      timeout=TIMEOUT, env=ENV)
    return proc, time.monotonic() - start


def assert_refused(proc, seconds=0.0):
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert proc.stderr.count("error:") == 1 and proc.stderr.count(REFUSED) == 1, output
    assert "Traceback" not in output and proc.stdout == "", output
    assert seconds < FAIL_WITHIN, f"took {seconds:.1f} s\n{output}"


def test_profile_records_the_identity_of_its_model(ckpts, stats_a):
    from mlx_lm.utils import load as mlx_lm_load

    from moe_mpi.shard import model_identity

    data = json.loads(stats_a.read_text())
    assert data["format"] == "moe_mpi.routing" and data["version"] == 2
    assert data["model"]["path"] == str(ckpts["a"]) and data["model"]["ranks"] == 1
    # The digest of model a's routers as mlx-lm loads it, whole: no rank, mode or CPU path in it.
    model, _ = mlx_lm_load(str(ckpts["a"]))
    assert data["identity"] == model_identity(model) and len(data["identity"]["routers"]) == 16
    other, _ = mlx_lm_load(str(ckpts["b"]))
    assert model_identity(other) != data["identity"]


def test_statistics_of_another_model_of_the_same_shape_are_refused(ckpts, stats_a):
    proc, seconds = generate(2, ckpts["b"], "--mode", "auto", "--stats", stats_a)
    assert_refused(proc, seconds)
    assert f"(digest {json.loads(stats_a.read_text())['identity']['routers']} in the file" in proc.stderr
    # ep places by statistics too.
    assert_refused(*generate(2, ckpts["b"], "--mode", "ep", "--stats", stats_a))


def test_a_models_own_statistics_serve_it_in_any_mode_on_any_ranks(ckpts, stats_a):
    proc, _ = generate(2, ckpts["a"], "--mode", "auto", "--stats", stats_a)  # recorded on 1 rank, ep
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    assert "warning" not in proc.stderr and "error" not in proc.stderr, proc.stderr


def test_info_and_plan_check_a_checkpoint_too(ckpts, stats_a):
    import subprocess

    def run(*args):
        return subprocess.run(moe_mpi(*args), capture_output=True, text=True, timeout=TIMEOUT, env=ENV)

    info = ("info", "--np", 2, "--mode", "auto", "--stats", stats_a)
    assert_refused(run(*info, "--model", ckpts["b"]))
    ok = run(*info, "--model", ckpts["a"])
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    plan = ("plan", "--machines", "m2-ultra-64:2", "--link", "tb5-rdma", "--modes", "ep,auto", "--stats", stats_a)
    assert_refused(run(*plan, "--model", ckpts["b"]))
    ok = run(*plan, "--model", ckpts["a"])
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr


def test_shard_experts_refuses_them_too(ckpts, stats_a):
    from mlx_lm.utils import load as mlx_lm_load

    from moe_mpi.memory import PlanningComm
    from moe_mpi.shard import shard_experts

    model, _ = mlx_lm_load(str(ckpts["b"]))
    with pytest.raises(ValueError, match=REFUSED):
        shard_experts(model, PlanningComm(0, 1), mode="auto", stats=RoutingStats.load(stats_a))


def test_a_version_1_file_is_read_by_shape_with_one_warning(ckpts, stats_a, tmp_path):
    data = json.loads(stats_a.read_text())
    data["version"] = 1
    del data["identity"]
    old = tmp_path / "stats-v1.json"
    old.write_text(json.dumps(data))
    proc, _ = generate(2, ckpts["b"], "--mode", "auto", "--stats", old)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    assert proc.stderr.count("warning:") == 1 and NO_IDENTITY in proc.stderr, proc.stderr


def test_the_file_format(tmp_path, stats_a):
    stats = RoutingStats.load(stats_a)
    assert stats.identity and stats.source == str(stats_a) and stats.model["model_type"] == "qwen3_moe"
    assert stats.check_model(dict(stats.identity)) is None
    with pytest.raises(ValueError, match=REFUSED):
        stats.check_model({"routers": "0" * 16})
    assert NO_IDENTITY in RoutingStats([8, 8]).check_model(dict(stats.identity))
    # Saved again, it keeps what it was recorded on.
    stats.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["identity"] == stats.identity
    # Written without a model: no identity, so checked by shape only.
    RoutingStats([8, 8]).save(tmp_path / "bare.json")
    assert json.loads((tmp_path / "bare.json").read_text())["identity"] is None
    data = json.loads(stats_a.read_text())
    for change, message in (
        ({"version": 3}, "this moe_mpi reads 1, 2"),
        ({"identity": ["routers"]}, '"identity" must be an object of strings'),
    ):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**data, **change}))
        with pytest.raises(ValueError, match=message):
            RoutingStats.load(bad)
