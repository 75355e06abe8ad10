"""Rank side of the collectives-on-one-stream test: ``backend="mlx"``, lazy all-reduces on two streams.

mlx-lm's ``generate_step`` runs on a stream of its own and starts one step
past the last token it yields (``mx.async_eval``); a forward pass made right
after, on the default stream, has all-reduces of its own. Unless every
collective runs on one stream, the two sets can run on two threads at once,
and ranks pair different all-reduces (``MPI_ERR_TRUNCATE``). Arguments:
model directory, mode, rounds. Prints ``ok <tokens>`` on rank 0.
"""

import sys

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from moe_mpi import Communicator, load


def main() -> None:
    comm = Communicator(backend="mlx")
    model, _ = load(sys.argv[1], comm=comm, mode=sys.argv[2])
    prompt = mx.array(np.arange(1, 9, dtype=np.int32))
    first = None
    for _ in range(int(sys.argv[3])):
        tokens = [int(t) for t, _ in generate_step(prompt, model, max_tokens=2)]
        first = first or tokens
        assert tokens == first, (tokens, first)
        cache = make_prompt_cache(model)  # a forward pass on the default stream at once
        model(mx.arange(5, dtype=mx.int32)[None], cache=cache)
        mx.eval([c.state for c in cache])
    comm.barrier()
    if comm.rank == 0:
        print("ok", first, flush=True)


if __name__ == "__main__":
    main()
