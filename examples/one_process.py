"""moe_mpi's forward pass against mlx-lm's, in one process: what is left when nothing travels.

    .venv/bin/python examples/one_process.py --model ~/.cache/moe_mpi/synthetic/<name>-q4

Loads the model twice in this process, with ``moe_mpi.load`` (one rank,
every expert local) and with mlx-lm's ``load``, and times, interleaved, in
each round:

* ``prefill 1`` and ``prefill N``: one forward pass of the first 1 and N
  prompt tokens into a new cache;
* ``decode``: the mean of ``--steps`` one-token steps after an N-token prompt.

Each pass is evaluated (``mx.eval``) before the clock stops. It prints the
median of each side and moe_mpi ÷ mlx-lm per round. Any difference is
moe_mpi's own work (its switch layers, the CPU speed path's kernels), since
one rank has nothing to communicate. The logits of the two are compared
first (float32 allclose 1e-4 relative to their scale).
"""

import argparse
import time

import moe_mpi  # noqa: F401  (loads OpenBLAS for MLX)
import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load as mlx_lm_load

from moe_mpi import Communicator, load


def prefill_seconds(model, prompt: mx.array) -> float:
    cache = make_prompt_cache(model)
    start = time.perf_counter()
    mx.eval(model(prompt[None], cache=cache))
    return time.perf_counter() - start


def decode_seconds(model, prompt: mx.array, steps: int) -> float:
    cache = make_prompt_cache(model)
    mx.eval(model(prompt[None], cache=cache))
    token = prompt[None, -1:]
    start = time.perf_counter()
    for _ in range(steps):
        mx.eval(model(token, cache=cache))
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=30, help="prompt tokens N (default: 30)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per round (default: 16)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    ours, _ = load(args.model, comm=Communicator())
    ref, _ = mlx_lm_load(args.model)
    vocab = ref.args.vocab_size
    prompt = mx.array(np.random.default_rng(0).integers(1, vocab, args.tokens))
    want, got = np.array(ref(prompt[None]), np.float32), np.array(ours(prompt[None]), np.float32)
    diff, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    if diff > 1e-4 * scale:
        raise SystemExit(f"logits differ by {diff:.3g} at scale {scale:.3g}: not the same model")
    print(f"{args.model}: logits agree (max |diff| {diff:.2g} at scale {scale:.3g})")
    work = {
        "prefill 1": lambda m: prefill_seconds(m, prompt[:1]),
        f"prefill {args.tokens}": lambda m: prefill_seconds(m, prompt),
        "decode": lambda m: decode_seconds(m, prompt, args.steps),
    }
    times = {(name, side): [] for name in work for side in ("moe_mpi", "mlx-lm")}
    for _ in range(args.rounds):
        for name, fn in work.items():
            for side, model in (("moe_mpi", ours), ("mlx-lm", ref)):
                times[(name, side)].append(fn(model))
    print("| pass | moe_mpi ms (median) | mlx-lm ms (median) | moe_mpi ÷ mlx-lm per round |")
    print("|---|---|---|---|")
    for name in work:
        a, b = np.array(times[(name, "moe_mpi")]), np.array(times[(name, "mlx-lm")])
        per_round = ", ".join(f"{r:.2f}" for r in a / b)
        print(f"| {name} | {np.median(a) * 1e3:.1f} | {np.median(b) * 1e3:.1f} | {per_round} |")


if __name__ == "__main__":
    main()
