"""Rank side of tests/test_numpy_decode.py: run under ``mpirun ... python -m mpi4py``.

argv: checkpoint directory, reference .npz, mode (``ep``, ``sliced`` or ``auto``),
optionally a layouts file.
Every rank loads its shard and replays the reference's calls on one KV
cache: a prompt (MLX), decode steps (the numpy step), a 2-token chunk (MLX
again, on the cache the numpy steps filled), more decode steps. Each call's
logits must match single-process mlx-lm (allclose 1e-4), the decode steps
must have run in numpy, and each forward call must make one all-reduce per MoE
layer.
"""

import sys

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from moe_mpi import Communicator, load

comm = Communicator()
model, _ = load(sys.argv[1], comm=comm, mode=sys.argv[3], layouts=sys.argv[4] if len(sys.argv) > 4 else None)
ref = np.load(sys.argv[2])
path = model.cpu_path
assert path.decode_step is not None, f"the numpy decode step was not installed: {path.decode_step_off}"
cache = make_prompt_cache(model)
calls = [c for c in ref.files if c.startswith("in")]
for name in sorted(calls, key=lambda c: int(c[2:])):
    i = int(name[2:])
    before = comm.snapshot()["all_sum"]["calls"]
    got = np.array(model(mx.array(ref[name]), cache=cache))
    want = ref[f"out{i}"]
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4), (name, float(np.abs(got - want).max()))
    assert comm.snapshot()["all_sum"]["calls"] - before == int(ref["moe_layers"]), name
decode = sum(ref[c].shape[1] == 1 for c in calls)
assert path.numpy_steps == decode, (path.numpy_steps, decode)
print(f"rank {comm.rank}: {len(calls)} calls, {decode} in numpy, match", flush=True)
