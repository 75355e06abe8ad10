"""``moe-mpi bench pingpong``: point-to-point latency, osu_latency style.

Rank 0 sends a message to rank 1, which sends it back; the one-way latency is
half the round trip. This is the floor under every collective between two
hosts (a 2-rank all-reduce of a small message costs about one such exchange
plus reduction and Python overhead)::

    mpirun -n 2 moe-mpi bench pingpong                    # 0 B .. 4 MiB
    mpirun -n 2 --host mac1,mac2 moe-mpi bench pingpong -m 1:64K --json pp.json

Method (OSU's ``osu_latency``): per size, a barrier, ``-x`` warm-up round
trips, then ``-i`` timed round trips timed as one loop with ``MPI.Wtime`` on
rank 0; latency = elapsed / (2 * iterations). As in OSU (and ``python -m
mpi4py.bench pingpong``), each rank sends from a buffer of its own that no
receive writes. ``--echo`` makes rank 1 send back the buffer it has just
received into instead: the data to send was just written by that rank's
core, as an all-reduce's partial sums are, and on a shared-memory host that
costs more (docs/perfmodel.md, "Ping-pong"). Each round trip is also timed
alone, and ``p50`` (median round trip / 2, not in OSU) shows the latency
without the scheduler stalls that dominate the mean on a busy host. Sizes above
``--large-threshold`` use ``--iterations-large``/``--warmup-large``. Buffers
are numpy ``uint8`` arrays sent with mpi4py's ``Send``/``Recv`` (buffers, not
pickled objects). Other ranks sit out, sleeping rather than spinning in MPI
so they do not steal the CPU from the pair on a shared host.

Check: the payload is pseudo-random bytes 1..255; after the timed loop one
more round trip runs into zeroed buffers and both ranks compare what they
received, ``#wrong`` being the number of wrong bytes (rank 1's received
message plus what rank 1 echoes back to rank 0). Any wrong byte makes the
command exit 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..barrier import quiet_barrier
from ..errors import UserError
from ..runner import abort_on_error, add_debug_argument, collective_phase, parse_args
from .sweep import (
    add_loop_arguments,
    add_output_arguments,
    check_outputs,
    emit_footer,
    loop_counts,
    message_sizes,
    plot_latency,
    write_results,
)
from .machine import format_size, header_lines, machine_info

__all__ = ["main", "pingpong", "setup_arg_parser"]

# osu_latency's defaults: 10000/1000 iterations, 100/10 warm-up round trips,
# 8 KiB large-message threshold.
DEFAULT_SIZES = "0:4M"
DEFAULT_ITERATIONS = 10000
DEFAULT_ITERATIONS_LARGE = 1000
DEFAULT_WARMUP = 100
DEFAULT_WARMUP_LARGE = 10

_CSV_COLUMNS = (
    "size_bytes",
    "iterations",
    "warmup",
    "latency_us",
    "p50_us",
    "bandwidth_GBps",
    "wrong",
)

# How often a rank that sits out polls its pending barrier.


def payload(nbytes: int) -> np.ndarray:
    """The message: ``nbytes`` pseudo-random bytes in 1..255 (never 0)."""
    rng = np.random.default_rng(nbytes)
    return rng.integers(1, 256, size=nbytes, dtype=np.uint8)


def pingpong(
    pair, nbytes: int, iterations: int, warmup: int, check: bool = True, echo: bool = False
) -> tuple[float, float, int]:
    """Time round trips of ``nbytes`` between ranks 0 and 1 of ``pair``.

    Args:
        pair: An mpi4py communicator of exactly the two ranks.
        nbytes: Message size.
        iterations: Timed round trips.
        warmup: Untimed round trips first.
        check: Run one more round trip into zeroed buffers and count wrong
            bytes.
        echo: Rank 1 sends back the buffer it received into (just written
            by its core) rather than its own send buffer (OSU's way).

    Returns:
        ``(seconds, p50_seconds, wrong)``: the one-way latency as OSU
        computes it (the whole timed loop / (2 * iterations)), the median
        round trip / 2 (robust to scheduler stalls on a busy machine), both
        as measured on this rank (rank 0's are the ones reported), and the
        number of wrong bytes this rank received.
    """
    from mpi4py import MPI

    rank = pair.Get_rank()
    peer = 1 - rank
    expected = payload(nbytes)
    send = expected.copy()
    recv = np.zeros(nbytes, dtype=np.uint8)
    wtime = MPI.Wtime
    # Each round trip is also timed alone, for the median; two Wtime calls
    # add well under 1% to even the fastest round trip.
    round_trips = np.empty(iterations, dtype=np.float64)
    pair.Barrier()
    start = wtime()
    last = start
    for i in range(warmup + iterations):
        if i == warmup:
            start = last = wtime()
        if rank == 0:
            pair.Send(send, dest=peer, tag=1)
            pair.Recv(recv, source=peer, tag=1)
        else:
            pair.Recv(recv, source=peer, tag=1)
            # OSU sends from a buffer no receive writes; --echo sends what
            # just arrived (data fresh in this core's cache).
            pair.Send(recv if echo else send, dest=peer, tag=1)
        if i >= warmup:
            now = wtime()
            round_trips[i - warmup] = now - last
            last = now
    seconds = (last - start) / (2 * iterations)
    wrong = 0
    if check:
        recv.fill(0)
        pair.Barrier()
        if rank == 0:
            pair.Send(send, dest=peer, tag=2)
            pair.Recv(recv, source=peer, tag=2)
        else:
            # Echo what arrived, so rank 0's check covers both directions.
            pair.Recv(recv, source=peer, tag=2)
            pair.Send(recv, dest=peer, tag=2)
        wrong = int(np.count_nonzero(recv != expected))
    return seconds, float(np.median(round_trips)) / 2, wrong


def run_pingpong(comm, args: argparse.Namespace, emit) -> list[dict[str, Any]]:
    """Run the sweep; rows on rank 0 (and an empty list elsewhere).

    Args:
        comm: A :class:`moe_mpi.comm.Communicator` with at least 2 ranks.
        args: Parsed options.
        emit: Prints a line on rank 0.
    """
    from mpi4py import MPI

    world = comm.comm
    rank = comm.rank
    in_pair = rank < 2
    pair = world.Split(0 if in_pair else MPI.UNDEFINED, rank)
    rows: list[dict[str, Any]] = []
    check = not args.no_check
    try:
        if in_pair:
            for nbytes in message_sizes(*args.message_size):
                iterations, warmup = loop_counts(args, nbytes)
                seconds, p50, wrong = pingpong(pair, nbytes, iterations, warmup, check, args.echo)
                # Rank 0's clock timed the loop; rank 1 adds its wrong bytes.
                both = np.empty((2, 3), dtype=np.float64)
                mine = np.array([seconds, p50, wrong], dtype=np.float64)
                pair.Allgather(mine, both)
                latency_us = float(both[0, 0]) * 1e6
                row = {
                    "size_bytes": nbytes,
                    "iterations": iterations,
                    "warmup": warmup,
                    "latency_us": latency_us,
                    "p50_us": float(both[0, 1]) * 1e6,
                    "bandwidth_GBps": nbytes / (latency_us * 1e-6) / 1e9
                    if latency_us > 0
                    else 0.0,
                    "wrong": int(both[:, 2].sum()) if check else None,
                }
                rows.append(row)
                emit(_format_row(row))
    finally:
        if pair != MPI.COMM_NULL:
            pair.Free()
    # Ranks 2.. wait here, asleep, for the whole sweep.
    quiet_barrier(world, idle=not in_pair)
    return rows if rank == 0 else []


_TABLE_HEADER = (
    f"# {'size(B)':>10} {'latency(us)':>12} {'p50(us)':>10} {'GB/s':>9} "
    f"{'#wrong':>7} {'iters':>7}"
)


def _format_row(row: Mapping[str, Any]) -> str:
    wrong = "n/a" if row["wrong"] is None else str(row["wrong"])
    return (
        f"  {row['size_bytes']:>10} {row['latency_us']:>12.2f} {row['p50_us']:>10.2f} "
        f"{row['bandwidth_GBps']:>9.3f} {wrong:>7} {row['iterations']:>7}"
    )


def setup_arg_parser() -> argparse.ArgumentParser:
    """The options of ``moe-mpi bench pingpong``."""
    parser = argparse.ArgumentParser(
        prog="moe-mpi bench pingpong",
        description="Point-to-point latency between ranks 0 and 1 (mpi4py "
        "Send/Recv on numpy buffers), in the style of osu_latency. Run under "
        "mpirun with 2 or more ranks; ranks above 1 sit out.",
    )
    add_loop_arguments(
        parser,
        sizes=DEFAULT_SIZES,
        default_min=0,
        iterations=DEFAULT_ITERATIONS,
        iterations_large=DEFAULT_ITERATIONS_LARGE,
        warmup=DEFAULT_WARMUP,
        warmup_large=DEFAULT_WARMUP_LARGE,
    )
    parser.add_argument(
        "--echo",
        action="store_true",
        help="rank 1 sends back the buffer it just received into (data fresh in its cache, as "
        "an all-reduce's partial sums are) instead of its own send buffer (osu_latency's way)",
    )
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip checking the received bytes (#wrong shows n/a)",
    )
    add_output_arguments(parser)
    add_debug_argument(parser)
    return parser


def _method_lines(args, info) -> list[str]:
    iterations_large, warmup_large = loop_counts(args, args.large_threshold + 1)
    hosts = info["hosts"]
    same = hosts[0] == hosts[1]
    return [
        f"pair: rank 0 on {hosts[0]}, rank 1 on {hosts[1]}"
        + (" (same host)" if same else " (different hosts)"),
        f"sizes: {format_size(args.message_size[0])} to "
        f"{format_size(args.message_size[1])}; payload: numpy uint8, mpi4py Send/Recv; rank 1 sends "
        + ("back the buffer it received into (--echo)" if args.echo else "from its own send buffer (osu_latency)"),
        f"loop: -x {args.warmup} warm-up + -i {args.iterations} timed round trips"
        f" per size; above {format_size(args.large_threshold)}: {warmup_large} +"
        f" {iterations_large}",
        "latency: one-way = (rank 0's MPI.Wtime over the timed loop) / (2 *"
        " iterations) (osu_latency); p50: rank 0's median round trip / 2 (robust"
        " to scheduler stalls); GB/s = size / latency, 1e9 B/s",
        "#wrong: "
        + (
            "bytes differing from what was sent (rank 1's receive + rank 0's echo)"
            if not args.no_check
            else "not checked (--no-check)"
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``moe-mpi bench pingpong`` with ``argv`` (default: sys.argv[1:]).

    Returns:
        0, or 1 if any byte arrived wrong.
    """
    args = parse_args(setup_arg_parser(), argv)
    from ..comm import Communicator

    comm = Communicator()  # initialises MPI (MLX first), see moe_mpi.comm
    with abort_on_error(comm, debug=args.debug):
        with collective_phase(comm, debug=args.debug):
            if comm.size < 2:
                raise UserError(
                    "pingpong needs 2 ranks: run it as `mpirun -n 2 moe-mpi bench pingpong`"
                )
            if comm.rank == 0:
                check_outputs(args)
        info = machine_info(comm)

        def emit(line: str) -> None:
            if comm.rank == 0:
                print(line, flush=True)

        title = "moe-mpi bench pingpong: point-to-point latency (osu_latency style)"
        for line in header_lines(info, title, _method_lines(args, info)):
            emit(line)
        emit("#")
        emit(_TABLE_HEADER)
        rows = run_pingpong(comm, args, emit)
        wrong = comm.bcast(sum(row["wrong"] or 0 for row in rows))
        load_end = emit_footer(emit, wrong, not args.no_check)
        with collective_phase(comm, debug=args.debug):
            if comm.rank == 0:
                config = {
                    "timing": "osu_latency: rank 0 times the loop of round "
                    "trips with MPI.Wtime; one-way = elapsed / (2 * iterations)",
                    "echo": args.echo,
                }
                write_results(args, "pingpong", info, config, rows, wrong, load_end, _CSV_COLUMNS)
                if args.plot:
                    latencies = [row["latency_us"] for row in rows]
                    name = "mpi4py Send/Recv (numpy)"
                    plot_latency(
                        {
                            name: (
                                [row["size_bytes"] for row in rows],
                                latencies,
                                latencies,
                                latencies,
                            )
                        },
                        args.plot,
                        f"one-way latency, rank 0 on {info['hosts'][0]}, "
                        f"rank 1 on {info['hosts'][1]}\n"
                        "solid: osu_latency (loop time / 2 iterations); dashed: p50",
                        medians={name: [row["p50_us"] for row in rows]},
                    )
    return 1 if wrong else 0
