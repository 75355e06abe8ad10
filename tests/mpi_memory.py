"""Rank side of the memory test: peak RSS growth while loading a shard.

Run as ``mpirun -n N python -m mpi4py tests/mpi_memory.py MODEL [MODE]``
(sharded load), or plainly as ``python tests/mpi_memory.py MODEL --plain`` (plain
mlx-lm load, for contrast). Prints one JSON line on rank 0: each rank's
growth of peak RSS during the load, and the bytes of parameters it holds.
"""

import json
import resource
import sys

import mlx.core as mx
from mlx.utils import tree_flatten


def peak_rss_bytes() -> int:
    """Peak RSS of this process's address space.

    Linux keeps ``ru_maxrss`` across ``execve``, so a child of a big parent
    would start at the parent's peak; ``VmHWM`` starts afresh with the new
    address space.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes


def main() -> None:
    path = sys.argv[1]
    if "--plain" in sys.argv:
        from mlx_lm.utils import load

        before = peak_rss_bytes()
        model, _ = load(path)
        ranks = [(peak_rss_bytes() - before, sum(a.nbytes for _, a in tree_flatten(model.parameters())))]
        print(json.dumps({"ranks": ranks}), flush=True)
        return
    from moe_mpi import Communicator, load

    comm = Communicator()
    before = peak_rss_bytes()
    model, _ = load(path, comm=comm, mode=sys.argv[2] if len(sys.argv) > 2 else "ep")
    mx.eval(model.parameters())
    held = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    ranks = comm.allgather([peak_rss_bytes() - before, held])
    if comm.rank == 0:
        print(json.dumps({"ranks": ranks}), flush=True)


if __name__ == "__main__":
    main()
