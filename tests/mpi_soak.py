"""Rank side of the soak test in tests/test_faults.py: ``mpirun ... python -m mpi4py``.

argv: checkpoint, steps, warm-up steps. Every rank loads its shard with the
routing guard and the watchdog's counters running as in ``moe-mpi generate``,
then decodes greedily for ``steps`` steps on one KV cache. Checked on every
rank: exactly one all-reduce per MoE layer per step (no repair, no other
collective), and peak RSS after the run at most 5% above the peak after the
warm-up steps. Prints one line per rank with the figures.
"""

import resource
import sys
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from moe_mpi import Communicator, load
from moe_mpi.guard import guard_routing
from moe_mpi.watchdog import start_watchdog


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ckpt, steps, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    comm = Communicator()
    watchdog = start_watchdog(comm, 60)
    model, _ = load(ckpt, comm=comm)
    guard = guard_routing(model)
    layers = model.ep_info.num_moe_layers
    cache = make_prompt_cache(model)
    logits = model(mx.array([[1, 2, 3, 4]]), cache=cache)
    token = int(np.argmax(np.array(logits[0, -1])))
    for _ in range(warmup):
        token = int(np.argmax(np.array(model(mx.array([[token]]), cache=cache)[0, -1])))
    base = peak_rss_mb()
    comm.reset_stats()
    start = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(np.array(model(mx.array([[token]]), cache=cache)[0, -1])))
    seconds = time.perf_counter() - start
    counts = {k: v["calls"] for k, v in comm.snapshot().items() if v["calls"]}
    end = peak_rss_mb()
    watchdog.stop()
    assert counts == {"all_sum": steps * layers}, counts
    assert guard.repairs == 0, guard.events
    growth = end / base - 1
    print(
        f"rank {comm.rank}: {steps} steps in {seconds:.1f} s, all_sum {counts['all_sum']} = {steps} x {layers}, "
        f"peak RSS {base:.1f} -> {end:.1f} MB ({100 * growth:+.2f}%)",
        flush=True,
    )
    assert growth <= 0.05, growth


if __name__ == "__main__":
    main()
