"""Prefill of a batch of prompts: whole, as two halves, and as two halves overlapped.

Run under mpirun, or on fake hosts with a slow link (examples/netns_bench.py
runs ``moe-mpi`` commands; this is a script, so start it through
``--script``)::

    .venv/bin/python examples/netns_bench.py --rate 10mbit --script examples/overlap_prefill.py -- \\
        --model ~/.cache/moe_mpi/synthetic/dbrx-like-1fdb66428611-q4 --batch 8 --tokens 34

Each of B random prompts of T tokens is prefilled into a fresh cache:
``whole`` in one forward pass of B rows, ``halves`` as two passes of B/2
one after the other, ``overlap`` as the same two passes in turns
(:class:`moe_mpi.overlap.Interleave`), each half's all-reduce on the wire
while the other computes. The last position's logits of every row are
checked against ``whole``'s. Rank 0 prints the seconds of each.
"""

import argparse
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

import moe_mpi
from moe_mpi import Communicator
from moe_mpi.overlap import Interleave


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=34)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    comm = Communicator()
    model, tokenizer = moe_mpi.load(args.model, comm=comm, mode=args.mode, progress=False)
    interleave = Interleave(comm)
    prompts = mx.array(np.random.default_rng(0).integers(0, tokenizer.vocab_size, (args.batch, args.tokens)))  # [B, T]
    half = args.batch // 2

    def forward(rows):
        cache = make_prompt_cache(model)
        return lambda: model(rows, cache=cache)

    def run(kind: str) -> np.ndarray:
        if kind == "whole":
            outs = [forward(prompts)()]
        else:
            passes = [forward(prompts[:half]), forward(prompts[half:])]
            outs = interleave.run(passes) if kind == "overlap" else [p() for p in passes]
        mx.eval(outs)
        return np.concatenate([np.array(o[:, -1]) for o in outs])  # [B, vocab]

    reference = run("whole")
    for _ in range(args.rounds):
        for kind in ("whole", "halves", "overlap"):
            comm.barrier()
            start = time.perf_counter()
            logits = run(kind)
            seconds = time.perf_counter() - start
            diff = float(np.abs(logits - reference).max())
            greedy = "same" if (logits.argmax(-1) == reference.argmax(-1)).all() else "DIFFERENT"
            if comm.rank == 0:
                print(f"{kind:8s} {seconds:7.2f} s  {args.batch * args.tokens / seconds:6.1f} prompt tok/s  "
                      f"last-token logits within {diff:.1e} of whole's, greedy tokens {greedy}", flush=True)
    interleave.close()


if __name__ == "__main__":
    main()
