"""The routing guard (moe_mpi.guard) under real ``mpirun``, on both decode paths.

A divergence is forced the blunt way: rank 1 loads a copy of the checkpoint
whose first MoE layer's router is negated, so that rank routes every token
of that layer to other experts than rank 0 does. The guard must see it in
the layer's own all-reduce, redo the layer with rank 0's routing and give
mlx-lm's output for the real checkpoint; with ``strict`` every rank must
raise the same error. Without a divergence, guarded logits must be
bit-identical to unguarded ones.
"""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load as mlx_lm_load

from moe_mpi.guard import routing_hash
from moe_mpi.launch import run_mpirun
from routed_ckpts import negated_router_pair  # tests/routed_ckpts.py

HERE = Path(__file__).parent
PROMPT = [1, 5, 9, 42, 7, 100, 3, 12]
DECODE_STEPS = 4


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(checkpoint, its copy with MoE layer 0's router negated, reference .npz)."""
    root = tmp_path_factory.mktemp("guard")
    ckpt, other = negated_router_pair(root)

    model, _ = mlx_lm_load(str(ckpt))
    cache = make_prompt_cache(model)
    out = [np.array(model(mx.array(PROMPT)[None], cache=cache)[:, -1])]
    for _ in range(DECODE_STEPS):
        token = mx.array([[int(np.argmax(out[-1][0]))]])
        out.append(np.array(model(token, cache=cache)[:, -1]))
    ref = root / "ref.npz"
    np.savez(ref, prompt=np.array(PROMPT), **{f"logits{i}": o for i, o in enumerate(out)})
    return ckpt, other, ref


def run_ranks(n: int, ckpts, mode: str):
    ckpt, other, ref = ckpts
    argv = [sys.executable, "-m", "mpi4py", str(HERE / "mpi_routing_guard.py"), str(ckpt), str(other), str(ref), mode]
    proc = run_mpirun(n, argv, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_hash_is_exact_and_order_free():
    inds = np.array([[0, 1], [1, 0], [0, 2], [127, 126]])
    h = routing_hash(inds)
    assert h.dtype == np.float32 and h[0] == h[1] and h[0] != h[2]
    assert (h >= 1).all() and (h < 2**24).all() and (h == np.round(h)).all()


def test_guard_without_divergence_is_bit_identical(ckpts):
    out = run_ranks(2, ckpts, "clean")
    assert out.count("bit-identical") == 2, out


def test_guard_repairs_a_divergence_with_rank0_routing(ckpts):
    out = run_ranks(3, ckpts, "repair")
    assert out.count("calls match mlx-lm") == 3, out


def test_strict_routing_fails_on_every_rank(ckpts):
    out = run_ranks(2, ckpts, "strict")
    assert out.count("MoE layer 0: rank 1 routed") == 2, out
    assert "--strict-routing" in out
