"""Rank side of the multi-host test: run under ``mpirun ... python -m mpi4py``.

Usage: ``mpi_multihost.py CASES.json IFACE``. Runs the equivalence checks of
tests/mpi_equivalence.py (logits and greedy tokens against single-process
mlx-lm) for each case, and reports where every rank ran: its hostname, its
network namespace, and how many bytes went out and in through ``IFACE``
compared with the bytes its all-reduces contributed. Rank 0 prints the
reports as one ``MULTIHOST {json}`` line.
"""

import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mpi_equivalence import check_case  # noqa: E402

from moe_mpi import Communicator  # noqa: E402


class CountingCommunicator(Communicator):
    """Keeps the all-reduce payload bytes that ``check_case``'s resets would drop."""

    all_sum_bytes = 0

    def reset_stats(self) -> None:
        self.all_sum_bytes += self.snapshot().get("all_sum", {}).get("bytes", 0)
        super().reset_stats()


def iface_bytes(iface: str):
    """(tx, rx) byte counters of a network interface of this namespace."""
    base = Path("/sys/class/net") / iface / "statistics"
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def main() -> None:
    comm = CountingCommunicator()
    cases = json.loads(Path(sys.argv[1]).read_text())
    iface = sys.argv[2]
    tx0, rx0 = iface_bytes(iface)
    for case in cases:
        msg = check_case(comm, case)
        if comm.rank == 0:
            print(f"[{comm.size} ranks] {msg}", flush=True)
    comm.reset_stats()  # fold the last case's counts into all_sum_bytes
    tx1, rx1 = iface_bytes(iface)
    report = dict(
        rank=comm.rank,
        hostname=socket.gethostname(),
        netns=os.stat("/proc/self/ns/net").st_ino,
        tx_bytes=tx1 - tx0,
        rx_bytes=rx1 - rx0,
        all_sum_bytes=comm.all_sum_bytes,
    )
    reports = comm.allgather(report)
    if comm.rank == 0:
        print("MULTIHOST " + json.dumps(reports), flush=True)
    comm.barrier()


if __name__ == "__main__":
    main()
