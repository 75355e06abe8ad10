"""Rank side of the error-handling tests in tests/test_generate.py.

Run under ``mpirun -n N python tests/mpi_errors_helper.py MODE``:

* ``abort``: rank 1 raises outside any collective phase while rank 0 waits
  in a barrier, the situation of an unexpected error mid-generation. Without
  :func:`moe_mpi.runner.abort_on_error` rank 0 would wait forever.
* ``collective``: every rank raises the same :class:`CollectiveError` at the
  same point; rank 0 reports it once and all ranks exit with code 1.
"""

import sys

from moe_mpi import Communicator
from moe_mpi.errors import CollectiveError
from moe_mpi.runner import abort_on_error


def main() -> None:
    mode = sys.argv[1]
    comm = Communicator()
    with abort_on_error(comm):
        if mode == "abort":
            if comm.rank == 1:
                raise RuntimeError("unexpected failure on rank 1 only")
            comm.barrier()  # rank 1 never arrives
        elif mode == "collective":
            raise CollectiveError("the ranks disagree (raised on every rank)")
        else:
            raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
