"""A batch's prefill (or decode steps): whole, as two halves, and as two halves overlapped.

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
checked against ``whole``'s. With ``--decode N``, the batch is prefilled
(untimed) and N greedy decode steps are timed instead, each half with its own
cache, and every step's tokens are checked against ``whole``'s. Rank 0
prints the seconds of each.
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
    parser.add_argument("--decode", type=int, default=0, metavar="STEPS", help="time STEPS decode steps, not the prefill")
    args = parser.parse_args()
    comm = Communicator()
    model, tokenizer = moe_mpi.load(args.model, comm=comm, mode=args.mode, progress=False)
    interleave = Interleave(comm)
    prompts = mx.array(np.random.default_rng(0).integers(0, tokenizer.vocab_size, (args.batch, args.tokens)))  # [B, T]
    half = args.batch // 2

    def step(parts, caches, kind):
        calls = [lambda i=i: model(parts[i], cache=caches[i]) for i in range(len(parts))]
        outs = interleave.run(calls) if kind == "overlap" else [c() for c in calls]
        mx.eval(outs)
        return [o[:, -1] for o in outs]  # [rows, vocab] each

    def run(kind: str):
        """(seconds timed, last logits [B, vocab], greedy tokens [B, steps])."""
        parts = [prompts] if kind == "whole" else [prompts[:half], prompts[half:]]
        caches = [make_prompt_cache(model) for _ in parts]
        comm.barrier()
        start = time.perf_counter()
        last = step(parts, caches, kind)
        tokens = []
        if args.decode:
            start = time.perf_counter()  # the prefill above is untimed
            for _ in range(args.decode):
                parts = [mx.argmax(x, axis=-1)[:, None] for x in last]  # [rows, 1]
                tokens.append(np.concatenate([np.array(p[:, 0]) for p in parts]))
                last = step(parts, caches, kind)
        seconds = time.perf_counter() - start
        return seconds, np.concatenate([np.array(x) for x in last]), np.stack(tokens, 1) if tokens else None

    _, reference, ref_tokens = run("whole")
    rows = args.batch * (args.decode or args.tokens)
    for _ in range(args.rounds):
        for kind in ("whole", "halves", "overlap"):
            seconds, logits, tokens = run(kind)
            diff = float(np.abs(logits - reference).max())
            same = (logits.argmax(-1) == reference.argmax(-1)).all() and (tokens is None or (tokens == ref_tokens).all())
            if comm.rank == 0:
                what = f"{args.decode} decode steps" if args.decode else "prefill"
                print(f"{kind:8s} {seconds:7.2f} s  {rows / seconds:6.1f} tok/s ({what})  "
                      f"last logits within {diff:.1e} of whole's, greedy tokens {'same' if same else 'DIFFERENT'}",
                      flush=True)
    interleave.close()


if __name__ == "__main__":
    main()
