"""Where a batch-1 decode step goes, phase by phase, on every rank.

``moe-mpi bench decode`` gives tokens/s; this splits one ``ep`` (or
``sliced``) decode step of the dbrx-like synthetic model into its phases by
timing the library's building blocks in place:

* ``rms norms``: every RMS norm (the two per layer around attention and
  MoE, the query and key norms, the final norm);
* ``rope``, ``kv cache``, ``sdpa``: the rest of mlx-lm's attention around
  the projections (rotary embedding, cache update, attention itself);
* ``dense proj``: the replicated one-row products (attention projections,
  routers, LM head: :class:`moe_mpi.cpu.layers.NumpyLinear`);
* ``experts``: this rank's experts for the token (the switch layer);
* ``all-reduce``: the one collective per MoE layer, waiting for the busier
  rank included;
* ``other``: the rest of the step (embedding, residual adds, router top-k,
  the router-weighted sum, argmax, Python).

Each timed call first evaluates its inputs (that time goes to ``other``)
and then its output, so every phase holds its own work only. The extra
syncs make the instrumented step a little slower than the plain one,
which is timed first, untouched::

    mpirun -n 2 .venv/bin/python examples/decode_phases.py [--mode sliced] [--mlx-norms]

(as root add ``--allow-run-as-root``). ``--mlx-norms`` gives RMS norms and
RoPE back to MLX (:class:`moe_mpi.cpu.layers.NumpyRMSNorm`, :class:`~moe_mpi.cpu.layers.NumpyRoPE`
off), to compare the two. Writes the synthetic checkpoint on first use, as
``moe-mpi bench`` does.

It splits the step of mlx-lm's model code (with moe_mpi's numpy kernels), so
it turns moe_mpi's numpy decode step off (``MOE_MPI_NUMPY_DECODE=0``),
which would otherwise run the whole step in numpy, out of reach of the
instrumentation.
"""

import argparse
import os
import sys
import time
from collections import defaultdict

os.environ["MOE_MPI_NUMPY_DECODE"] = "0"  # the phases of mlx-lm's code, not the numpy step

import moe_mpi  # noqa: E402
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache

from moe_mpi.cpu import layers
from moe_mpi.bench.shapes import ensure_synthetic
from moe_mpi.experts import LocalExperts

STEPS, WARMUP, PROMPT = 30, 8, 32


def _timed(times, phase, fn):
    """``fn`` with its inputs evaluated first, its output evaluated, timed."""

    def call(*args, **kwargs):
        mx.eval([a for a in (*args, *kwargs.values()) if isinstance(a, mx.array)])
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        mx.eval(out)
        times[phase] += time.perf_counter() - start
        return out

    return call


def instrument(model, comm, times) -> None:
    """Times the building blocks of ``model``'s decode step into ``times``.

    Patches the classes the model's modules actually have (the host-path
    mixins included), so a fallback to the plain class is not counted twice.
    """
    phases = ((nn.RMSNorm, "rms norms"), (nn.RoPE, "rope"), (nn.Linear, "dense proj"), (LocalExperts, "experts"))
    patched = set()
    for _, m in model.named_modules():
        cls = type(m)
        for kind, phase in phases:
            if isinstance(m, kind) and cls not in patched:
                cls.__call__ = _timed(times, phase, cls.__call__)
                patched.add(cls)
    KVCache.update_and_fetch = _timed(times, "kv cache", KVCache.update_and_fetch)
    # mlx-lm's model files import the attention function by name.
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("mlx_lm.models.") and hasattr(mod, "scaled_dot_product_attention"):
            mod.scaled_dot_product_attention = _timed(times, "sdpa", mod.scaled_dot_product_attention)
    comm.all_sum = _timed(times, "all-reduce", comm.all_sum)  # the blocks share this object


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="ep", choices=["ep", "sliced"])
    parser.add_argument("--synthetic", default="dbrx-like")
    parser.add_argument("--cache-dir", default=None, help="where synthetic checkpoints live (as for moe-mpi bench)")
    parser.add_argument("--mlx-norms", action="store_true", help="RMS norms and RoPE in MLX, not numpy")
    args = parser.parse_args()
    comm = moe_mpi.Communicator()
    path = ensure_synthetic(args.synthetic, comm, args.cache_dir, False)
    model, _ = moe_mpi.load(path, comm=comm, mode=args.mode)
    if args.mlx_norms:
        for _, m in model.named_modules():
            for mixin, plain in ((layers.NumpyRMSNorm, nn.RMSNorm), (layers.NumpyRoPE, nn.RoPE)):
                if isinstance(m, mixin):
                    m.__class__ = plain
    cache = make_prompt_cache(model)
    mx.eval(model(mx.arange(1, PROMPT + 1)[None], cache=cache))
    token = mx.array([1])

    def step(token):
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(token)
        return token

    for _ in range(WARMUP):
        token = step(token)
    comm.barrier()
    start = time.perf_counter()
    for _ in range(STEPS):
        token = step(token)
    plain_ms = (time.perf_counter() - start) / STEPS * 1e3

    times = defaultdict(float)
    instrument(model, comm, times)
    for _ in range(WARMUP):
        token = step(token)
    times.clear()
    comm.barrier()
    start = time.perf_counter()
    for _ in range(STEPS):
        token = step(token)
    total = (time.perf_counter() - start) / STEPS * 1e3
    phases = {k: v / STEPS * 1e3 for k, v in times.items()}
    phases["other"] = total - sum(phases.values())
    rows = comm.comm.gather(phases)
    if comm.rank == 0:
        order = ["rms norms", "rope", "kv cache", "sdpa", "dense proj", "experts", "all-reduce", "other"]
        host_kernels = "MLX norms and RoPE" if args.mlx_norms else "numpy norms and RoPE"
        print(f"# {args.synthetic}, mode {args.mode}, {comm.size} ranks, batch 1, {host_kernels}")
        print(f"# plain step {plain_ms:.1f} ms ({1e3 / plain_ms:.1f} tok/s); instrumented step {total:.1f} ms")
        print("phase (ms/step)  " + "".join(f"{'rank ' + str(r):>9s}" for r in range(len(rows))))
        for phase in order:
            print(f"{phase:16s} " + "".join(f"{row.get(phase, 0.0):9.2f}" for row in rows))


if __name__ == "__main__":
    main()
