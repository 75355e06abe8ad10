"""``moe-mpi calibrate``: measure what the performance model needs, write a profile.

Run under ``mpirun`` with the ranks and hosts you will run models on::

    mpirun -n 2 --host mac1,mac2 moe-mpi calibrate --out cluster.json
    moe-mpi plan --model M --profile cluster.json

Every rank measures at once, so the rates are what each rank gets while the
others work too (with several ranks on one host they share its memory and
cores). Within ``--budget`` seconds (default 45) it measures:

* **bandwidth**: a read-only pass over a 256 MB array
  (:func:`moe_mpi.bench.roofline.stream_read`), bytes/s per rank;
* **flops**: a float32 matrix product ``[512, 2048] x [2048, 2048]``;
* **kernel tables**: seconds per weight byte of a weight matrix put through
  1 to 512 rows, per weight format: ``float32`` (moe_mpi's CPU kernels:
  the compiled matrix-vector loop up to 8 rows, BLAS above) and ``q4``
  (MLX's 4-bit ``quantized_matmul``, group 64); and the same for experts
  (``float32/expert``, ``q4/expert``): moe_mpi's own expert kernel
  (``compute`` of a loaded switch layer: gate, up, activation, down, the
  rows gathered and scattered) on a probe layer of 4 experts, hidden 1024,
  intermediate 2816, every expert given the same number of rows;
* **fixed costs**: the decode step and the prefill of two tiny random
  models (1 and 3 layers, hidden 64) on each rank alone, per code path
  (the numpy decode step; MLX's model code, float and 4-bit); the
  difference per layer is the cost per layer, the rest the cost per call;
* **rendezvous** (only where a host runs more ranks than it has cores):
  the extra wait per collective of evenly loaded ranks, against the
  compute between collectives (:func:`moe_mpi.sharing.measure_rendezvous`);
* **link** (2+ ranks): one-way latency and bandwidth between ranks 0 and 1
  (ping-pong), the all-reduce of 1 KiB to 2 MiB on each data path
  (``Communicator.all_sum`` on numpy arrays and on MLX arrays, and
  ``mx.distributed.all_sum``), each fitted to ``latency + bytes /
  bandwidth``, and rank 0's exchange with each worker as the central router
  makes it (request, rows, reply). Over a network each timed call starts
  2 ms after the barrier that lines the ranks up (:data:`NETWORK_GAP`), as
  a step's collectives start after a layer's compute.

The machine probes take what they take (15-30 s on a small machine); the
link's sweeps share what is left of the budget. Each times its sizes
smallest first and, on a slow link, makes fewer calls of the larger ones or
stops before those that would not fit (:mod:`moe_mpi.sizesweep`): at 10
Mbit/s one 2 MiB all-reduce takes 2-3 s, and the full sweeps took 12
minutes. The fits use the sizes measured; the profile's meta records them
and why each sweep stopped.

The profile (JSON) holds a :class:`moe_mpi.profiles.Machine` and a
:class:`moe_mpi.profiles.Link`; ``moe-mpi plan --profile`` reads it.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .argtypes import positive_float, positive_int
from .results import check_writable
from .runner import abort_on_error, add_debug_argument, collective_phase, parse_args
from .sharing import measure_rendezvous
from .sizesweep import SizeSweep, SweepBudgets, run_sweep, slowest_of

__all__ = ["fit_latency_bandwidth", "main", "setup_arg_parser"]

FLOAT_ROWS = (1, 2, 4, 8, 16, 64, 256, 512)
QUANT_ROWS = (1, 2, 4, 8, 16, 64)  # arithmetic-bound from a few rows: beyond, time grows with rows
ALLREDUCE_SIZES = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20)
#: Seconds between the barrier and a timed all-reduce or exchange over a
#: network. A step's collectives follow a layer's compute, not another
#: message; a link that holds a burst for an idle sender (``tc tbf``'s token
#: bucket, which the barrier's own messages drain) is slower back to back.
NETWORK_GAP = 0.002
#: --budget's default: the machine probes take 15-30 s on a small machine,
#: and issue 18 wants the whole calibration under a minute at any link rate.
DEFAULT_BUDGET = 45.0
EXCHANGE_SIZES = (1 << 10, 16 << 10, 256 << 10, 1 << 20)
PINGPONG_SIZES = (8, 1 << 10, 16 << 10, 64 << 10, 256 << 10)
PROBE_EXPERTS = 4


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-mpi calibrate",
        description="Measure memory bandwidth, kernel rates, fixed costs and the link's all-reduce "
        "and point-to-point costs on the ranks of this mpirun job, and write a profile for "
        "`moe-mpi plan --profile`.",
    )
    parser.add_argument("--out", metavar="FILE", required=True, help="profile to write (JSON)")
    parser.add_argument("--name", help="machine name in the profile (default: rank 0's hostname)")
    parser.add_argument("--link-name", default=None, help="link name in the profile (default: shared-memory or network)")
    parser.add_argument("--stream-mb", type=positive_int, default=256, help="bandwidth probe array, MB per rank (default 256)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timings per point, the median counts (default 3)")
    parser.add_argument(
        "--budget", type=positive_float, default=DEFAULT_BUDGET, metavar="SECONDS",
        help=f"seconds the calibration aims to finish in (default {DEFAULT_BUDGET:g}): the link's message "
        "sizes are timed smallest first, with fewer calls or stopping before the sizes that would not fit in "
        "what the machine probes left; the profile records where each sweep stopped (docs/perfmodel.md)",
    )
    parser.add_argument("--no-fixed", action="store_true", help="skip the tiny-model fixed costs (they need MLX's CPU or Metal backend and mlx-lm)")
    add_debug_argument(parser)
    return parser


# ---------------------------------------------------------------------------
# Fits and timing
# ---------------------------------------------------------------------------


def fit_latency_bandwidth(sizes: Sequence[float], seconds: Sequence[float]) -> Tuple[float, float]:
    """Least-squares ``seconds = latency + bytes / bandwidth``, each point weighted
    by 1/seconds (relative error, so the small sizes count as much as the large).

    Returns:
        ``(latency seconds, bandwidth bytes/s)``; latency is clamped at 0 and
        the bandwidth at the largest point's when the slope is not positive.

    Raises:
        ValueError: Fewer than two points.
    """
    x = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if x.size < 2 or x.size != y.size:
        raise ValueError(f"a latency/bandwidth fit needs 2+ points, got {x.size} sizes and {y.size} times")
    w = 1.0 / y
    a = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (latency, per_byte), *_ = np.linalg.lstsq(a, y * w, rcond=None)
    if per_byte <= 0:
        per_byte = y[-1] / x[-1]
    return max(float(latency), 0.0), float(1.0 / per_byte)


def _median_seconds(comm, fn: Callable[[], object], repeats: int) -> float:
    """Median of ``repeats`` timed runs of ``fn`` on this rank, every run
    started at a barrier so all ranks work at once (one warm-up first)."""
    fn()
    times = []
    for _ in range(repeats):
        comm.barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _slowest(comm, value: float) -> float:
    """The largest of every rank's ``value``: the rank that sets the pace."""
    return max(comm.allgather(value))


# ---------------------------------------------------------------------------
# Machine: bandwidth, flops, kernel tables
# ---------------------------------------------------------------------------


def _float32_kernel(rows: int):
    """(fn, weight bytes): ``rows`` rows through a float32 weight, as moe_mpi's CPU path does it."""
    import mlx.core as mx

    from .cpu import gemv

    k = 2048
    n = 8192 if rows <= 8 else max(256, 8192 * 16 // rows)  # ~64 MB for reads, smaller where compute rules
    w = np.random.default_rng(0).standard_normal((n, k), dtype=np.float32)
    x = np.ones((rows, k), dtype=np.float32)
    if rows <= 8:
        return (lambda: gemv.matvec(w, x)), w.nbytes
    wm, xm = mx.array(w), mx.array(x)
    mx.eval(wm, xm)
    return (lambda: mx.eval(xm @ wm.T)), w.nbytes


def _q4_kernel(rows: int):
    """(fn, weight bytes): ``rows`` rows through a 4-bit (group 64) weight, MLX's quantized_matmul."""
    import mlx.core as mx

    k = 2048
    n = 8192 if rows <= 8 else max(256, 8192 * 8 // rows)
    w = mx.random.normal((n, k), key=mx.random.key(0))
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    x = mx.ones((rows, k))
    mx.eval(wq, scales, biases, x)
    nbytes = wq.nbytes + scales.nbytes + biases.nbytes

    def run():
        mx.eval(mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=4))

    return run, nbytes


def kernel_table(comm, make: Callable, rows_list: Sequence[int], repeats: int) -> Dict[str, list]:
    """Seconds per weight byte at each row count (the slowest rank's median)."""
    per_byte = []
    for rows in rows_list:
        fn, nbytes = make(rows)
        per_byte.append(_slowest(comm, _median_seconds(comm, fn, repeats)) / nbytes)
    return {"rows": list(rows_list), "seconds_per_byte": per_byte}


def matmul_flops(comm, repeats: int) -> float:
    """FLOP/s of a float32 ``[512, 2048] x [2048, 2048]`` product (slowest rank)."""
    import mlx.core as mx

    a = mx.random.normal((512, 2048), key=mx.random.key(1))
    b = mx.random.normal((2048, 2048), key=mx.random.key(2))
    mx.eval(a, b)
    seconds = _slowest(comm, _median_seconds(comm, lambda: mx.eval(a @ b), repeats))
    return 2 * 512 * 2048 * 2048 / seconds


def _probe_layer(tmp: Path, bits: Optional[int], self_comm):
    """A loaded 1-layer probe model's switch layer and its bytes per expert."""
    from .loading import load_model
    from .synthetic import tiny_config, write_checkpoint

    config = tiny_config("qwen3_moe", hidden_size=1024, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=4, num_experts=PROBE_EXPERTS, num_experts_per_tok=1,
                         moe_intermediate_size=2816, intermediate_size=2816, vocab_size=512)
    path = write_checkpoint(tmp / f"probe-{bits}", config, quantize=bits, group_size=64, tokenizer=False)
    model, _ = load_model(path, self_comm, mode="ep")
    switch = model.ep_info.switches[0]
    from mlx.utils import tree_flatten

    nbytes = sum(a.nbytes for _, a in tree_flatten(switch.parameters())) / PROBE_EXPERTS
    return switch, nbytes


def expert_table(comm, switch, expert_bytes: float, rows_list: Sequence[int], repeats: int) -> Dict[str, list]:
    """Seconds per weight byte of ``switch.compute`` with ``rows`` rows per expert.

    All experts of the probe get the same rows in one call (as a decode step
    or a prefill hands a layer's experts their rows together), except from
    16 rows on, where one expert does (arithmetic-bound by then, so the
    cost per byte no longer depends on how many experts share the call).
    """
    import mlx.core as mx

    per_byte = []
    for rows in rows_list:
        experts = PROBE_EXPERTS if rows < 16 else 1
        x = mx.random.normal((experts * rows, 1024), key=mx.random.key(rows))
        ids = np.repeat(np.arange(experts), rows)
        mx.eval(x)
        seconds = _median_seconds(comm, lambda: mx.eval(switch.compute(x, ids)), repeats)
        per_byte.append(_slowest(comm, seconds) / (experts * expert_bytes))
    return {"rows": list(rows_list), "seconds_per_byte": per_byte}


def expert_tables(comm, repeats: int) -> Dict[str, dict]:
    """``float32/expert`` and ``q4/expert`` tables, each rank timing its own probe."""
    from mpi4py import MPI

    from .comm import Communicator

    self_comm = Communicator(MPI.COMM_SELF)
    out = {}
    with tempfile.TemporaryDirectory(prefix="moe-calibrate-") as tmp:
        for fmt, bits, rows in (("float32", None, FLOAT_ROWS), ("q4", 4, QUANT_ROWS)):
            switch, nbytes = _probe_layer(Path(tmp), bits, self_comm)
            out[f"{fmt}/expert"] = expert_table(comm, switch, nbytes, rows, repeats)
            del switch
    return out


# ---------------------------------------------------------------------------
# Fixed costs: tiny models on each rank alone
# ---------------------------------------------------------------------------


def _tiny_config(layers: int) -> dict:
    from .synthetic import tiny_config

    return tiny_config("qwen3_moe", hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=64, intermediate_size=64, vocab_size=512)


def _time_model(path: Path, env: Dict[str, str], self_comm, repeats: int) -> Tuple[float, float]:
    """``(decode step, prefill of 16 tokens)`` seconds of a tiny model loaded on this rank alone."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from .loading import load_model

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        model, _ = load_model(path, self_comm, mode="ep")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    prompt = mx.array(np.arange(16, dtype=np.int32)[None])

    def prefill():
        cache = make_prompt_cache(model)
        mx.eval(model(prompt, cache=cache))
        return cache

    cache = prefill()
    token = mx.array([[1]], dtype=mx.int32)

    def step():
        mx.eval(model(token, cache=cache))

    steps = [_timed(step) for _ in range(20 * repeats)]
    fills = [_timed(prefill) for _ in range(3 * repeats)]
    return statistics.median(steps[5:]), statistics.median(fills[1:])


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def fixed_costs(comm, repeats: int) -> Tuple[Dict[str, float], Dict[str, float]]:
    """``(per layer, per call)`` seconds by ``path/phase``, from 1- and 3-layer tiny models.

    Paths: ``numpy`` (the numpy decode step, float32), ``mlx`` (MLX's model
    code, float32), ``mlx-quantized`` (4-bit). Each rank times its own copy
    while the others time theirs.
    """
    from mpi4py import MPI

    from .comm import Communicator
    from .synthetic import write_checkpoint

    self_comm = Communicator(MPI.COMM_SELF)
    cases = {"numpy": ({}, None), "mlx": ({"MOE_MPI_NUMPY_DECODE": "0"}, None), "mlx-quantized": ({}, 4)}
    times: Dict[Tuple[str, int], Tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="moe-calibrate-") as tmp:
        for name, (env, bits) in cases.items():
            for layers in (1, 3):
                path = Path(tmp) / f"{name}-{layers}"
                write_checkpoint(path, _tiny_config(layers), quantize=bits, group_size=64, tokenizer=False)
                comm.barrier()
                times[name, layers] = _time_model(path, env, self_comm, repeats)
    per_layer, per_call = {}, {}
    for name in cases:
        for i, phase in enumerate(("decode", "prefill")):
            one = _slowest(comm, times[name, 1][i])
            three = _slowest(comm, times[name, 3][i])
            layer = max((three - one) / 2, 0.0)
            per_layer[f"{name}/{phase}"] = layer
            per_call[f"{name}/{phase}"] = max(one - layer, 0.0)
    return per_layer, per_call


# ---------------------------------------------------------------------------
# Link: ping-pong, all-reduce per data path, central exchange
# ---------------------------------------------------------------------------


def _allreduce_case(path: str, comm_np, comm_mlx, nbytes: int):
    import mlx.core as mx

    count = max(1, nbytes // 4)
    if path == "mpi4py-numpy":
        x = np.ones(count, dtype=np.float32)
        return lambda: comm_np.all_sum(x)
    a = mx.ones((count,), dtype=mx.float32)
    mx.eval(a)
    target = comm_np if path == "mlx-mpi4py" else comm_mlx
    return lambda: mx.eval(target.all_sum(a))


def allreduce_fits(comm, comm_mlx=None, gap: float = 0.0, budgets: Optional[SweepBudgets] = None) -> Dict[str, dict]:
    """Per data path: mean and median seconds per size (the slowest rank's), and
    the line through the medians. The model uses the medians: on a shared
    machine a few calls stalled by the scheduler for milliseconds dominate a
    mean of microsecond calls, and the decode benchmark's own spread holds them.
    Each call starts ``gap`` seconds after a barrier (:data:`NETWORK_GAP`).

    ``comm_mlx``: the ``mx.distributed`` communicator (:func:`mlx_communicator`),
    for the ``mlx-distributed`` path. ``budgets``: seconds per path; each
    path's sizes are timed smallest first and stop where the next would not
    fit (:class:`moe_mpi.sizesweep.SizeSweep`; its record is the entry's ``sweep``).
    """
    from .comm import Communicator

    comm_np = Communicator()
    out = {}
    for path in allreduce_paths(comm_mlx is not None):
        run = _allreduce_runner(comm, functools.partial(_allreduce_case, path, comm_np, comm_mlx), gap)
        sweep = SizeSweep(ALLREDUCE_SIZES, float("inf") if budgets is None else budgets[path], _allreduce_calls)
        rows = run_sweep(sweep, slowest_of(comm.allgather), run)
        means = [_slowest(comm, r[0]) for r in rows]
        medians = [_slowest(comm, r[1]) for r in rows]
        latency, bandwidth = fit_latency_bandwidth(sweep.measured, medians)
        out[path] = {"sizes": list(sweep.measured), "mean_s": means, "p50_s": medians,
                     "latency": latency, "bandwidth": bandwidth, "sweep": sweep.meta()}
    return out


def _allreduce_runner(comm, case: Callable[[int], Callable[[], object]], gap: float):
    """``run(nbytes, count)`` for :func:`moe_mpi.sizesweep.run_sweep`: ``count``
    calls of ``case(nbytes)``, each ``gap`` seconds after a barrier; returns
    ``((mean, median), median)`` of this rank's calls."""
    cases = {}

    def run(nbytes: int, count: int):
        if nbytes not in cases:
            cases.clear()  # one size's arrays at a time
            cases[nbytes] = case(nbytes)
        fn = cases[nbytes]
        times = []
        for _ in range(count):
            comm.barrier()
            if gap:
                time.sleep(gap)
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        median = float(np.median(times))
        return (float(np.mean(times)), median), median

    return run


def mlx_communicator():
    """A ``Communicator(backend="mlx")``, or None where MLX has no MPI group."""
    from .comm import Communicator

    try:
        return Communicator(backend="mlx")
    except (RuntimeError, ValueError):
        return None


def allreduce_paths(mlx_distributed: bool) -> List[str]:
    """The all-reduce data paths calibrate times, in order."""
    return ["mpi4py-numpy", "mlx-mpi4py"] + (["mlx-distributed"] if mlx_distributed else [])


def _allreduce_calls(nbytes: int) -> int:
    """Timed all-reduces of ``nbytes`` when time is no object: ~20 MB in all, 10..200 calls."""
    return max(10, min(200, int(2e7 // max(nbytes, 1))))


def pingpong_fit(comm, budget: float = float("inf")) -> dict:
    """One-way latency and bandwidth between ranks 0 and 1 (the others wait).

    The sizes are timed smallest first within ``budget`` seconds
    (:class:`moe_mpi.sizesweep.SizeSweep`), ranks 0 and 1 deciding together.
    """
    from mpi4py import MPI

    from .bench.pingpong import pingpong
    from .comm import Communicator

    world = comm.comm
    pair = world.Split(0 if comm.rank < 2 else MPI.UNDEFINED, comm.rank)
    rows, record = [], None
    if pair != MPI.COMM_NULL:
        def run(nbytes: int, count: int):
            seconds, p50, _ = pingpong(pair, nbytes, count, 0, check=False)
            return (seconds, p50), 2 * p50  # a call is a round trip

        sweep = SizeSweep(PINGPONG_SIZES, budget, _pingpong_calls, warmup=20)
        rows = run_sweep(sweep, slowest_of(Communicator(pair).allgather), run)
        record = sweep.meta()
        pair.Free()
    rows, record = comm.bcast((rows, record) if comm.rank == 0 else None)
    sizes = record["sizes"]
    latency, bandwidth = fit_latency_bandwidth(sizes, [r[1] for r in rows])
    return {"sizes": sizes, "mean_s": [r[0] for r in rows], "p50_s": [r[1] for r in rows],
            "latency": latency, "bandwidth": bandwidth, "sweep": record}


def _pingpong_calls(nbytes: int) -> int:
    return 2000 if nbytes <= 16 << 10 else 200


def exchange_fit(comm, repeats: int, gap: float = 0.0, budget: float = float("inf")) -> dict:
    """Rank 0's exchange with one worker, as :mod:`moe_mpi.central` makes it.

    Request (msgpack), rows out, reply of the same size back; the bytes of
    the fit are both ways together. Each worker in turn; the others wait.
    Each exchange starts ``gap`` seconds after a barrier, as in :func:`allreduce_fits`;
    the sizes are timed smallest first within ``budget`` seconds.
    """
    from .comm import Communicator

    ctl = Communicator()

    def run(both_ways: int, count: int):
        nbytes = both_ways // 2
        rows = np.ones(nbytes, dtype=np.uint8)
        times = []
        for worker in range(1, ctl.size):
            for _ in range(count):
                ctl.barrier()
                if gap:
                    time.sleep(gap)
                if ctl.rank == 0:
                    t = time.perf_counter()
                    ctl.send_obj({"layer": 0, "rows": [0], "experts": [0]}, worker, 11)
                    ctl.send_array(rows, worker, 12)
                    ctl.recv_array((nbytes,), np.uint8, worker, 13)
                    times.append(time.perf_counter() - t)
                elif ctl.rank == worker:
                    ctl.recv_obj(0, 11)
                    back = ctl.recv_array((nbytes,), np.uint8, 0, 12)
                    ctl.send_array(back, 0, 13)
        if not times:  # a worker: rank 0's times are the ones that count
            return (0.0, 0.0), 0.0
        median = float(np.median(times))
        # One "call" of the sweep is an exchange with every worker in turn.
        return (float(np.mean(times)), median), median * (ctl.size - 1)

    # Before the budget: 25 * repeats exchanges per worker, the first 5 untimed.
    sweep = SizeSweep(tuple(2 * n for n in EXCHANGE_SIZES), budget, lambda _: 25 * repeats - 5)
    rows = run_sweep(sweep, slowest_of(ctl.allgather), run)
    means, medians = ctl.bcast(([r[0] for r in rows], [r[1] for r in rows]))
    latency, bandwidth = fit_latency_bandwidth(sweep.measured, medians)
    return {"sizes": list(sweep.measured), "mean_s": means, "p50_s": medians, "latency": latency,
            "bandwidth": bandwidth, "sweep": sweep.meta()}


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(setup_arg_parser(), argv)
    from .comm import Communicator

    comm = Communicator()
    with abort_on_error(comm, debug=args.debug):
        with collective_phase(comm, debug=args.debug, name_ranks=False):
            if comm.rank == 0:  # before minutes of measuring
                check_writable(str(Path(args.out).expanduser()), "--out")
        start = time.perf_counter()
        profile = measure(comm, args)
        seconds = time.perf_counter() - start
        # Only rank 0 writes; the others wait for it, so that a write that
        # fails (its text then saved elsewhere, see save_text) ends the job
        # with one message.
        with collective_phase(comm, debug=args.debug, name_ranks=False):
            if comm.rank == 0:
                from .profiles import write_profile

                machine, link, meta = profile
                meta["seconds"] = seconds
                write_profile(str(Path(args.out).expanduser()), machine, link, meta)
                _print_summary(machine, link, meta, args.out)
    return 0


def measure(comm, args) -> tuple:
    """Every measurement, collective; ``(Machine, Link, meta)`` on every rank."""
    from .bench.machine import machine_info
    from .bench.roofline import stream_read
    from .cpu import switches
    from .profiles import AllReduceFit, KernelTable, Link, Machine

    start = time.perf_counter()  # --budget counts from here
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    info = machine_info(comm)
    ranks_per_host = max((len(node["ranks"]) for node in info.get("nodes") or []), default=1)
    cores = os.cpu_count() or 1
    say(f"# moe-mpi calibrate: {comm.size} rank(s), {ranks_per_host} per host, {cores} cores on rank 0's host", flush=True)
    bandwidth = min(comm.allgather(stream_read(comm, args.stream_mb))) * 1e9
    say(f"# read bandwidth per rank: {bandwidth / 1e9:.1f} GB/s", flush=True)
    flops = matmul_flops(comm, args.repeats)
    say(f"# float32 matmul per rank: {flops / 1e9:.1f} GFLOP/s", flush=True)
    tables = {
        "float32": kernel_table(comm, _float32_kernel, FLOAT_ROWS, args.repeats),
        "q4": kernel_table(comm, _q4_kernel, QUANT_ROWS, args.repeats),
    }
    tables.update(expert_tables(comm, args.repeats))
    say("# kernel tables: " + "; ".join(
        f"{k} " + " ".join(f"{r}:{1 / s / 1e9:.1f}" for r, s in zip(t["rows"], t["seconds_per_byte"]))
        for k, t in tables.items()) + " (rows:GB/s of weights)", flush=True)
    per_layer, per_call = ({}, {}) if args.no_fixed else fixed_costs(comm, args.repeats)
    rendezvous = ()
    if comm.size > 1 and ranks_per_host > cores:  # ranks share cores: each collective waits for one held back
        rendezvous = measure_rendezvous(comm, say=say)
    meta = {"hosts": info.get("hosts"), "ranks": comm.size, "ranks_per_host": ranks_per_host,
            "cpu": info.get("cpu"), "date": info.get("date"), "tables": tables}
    machine = Machine(
        name=args.name or socket.gethostname(),
        memory_bytes=float(info.get("memory_bytes") or 1),
        bandwidth=bandwidth, flops=flops, efficiency=1.0, usable_fraction=0.9,
        layer_seconds=per_layer, step_seconds=per_call,
        kernels={k: KernelTable(tuple(t["rows"]), tuple(t["seconds_per_byte"])) for k, t in tables.items()},
        numpy_decode=switches.enabled() and switches.get("MOE_MPI_NUMPY_DECODE") == "1", cores=cores, ranks_per_host=ranks_per_host,
        rendezvous=rendezvous,
        source=f"moe-mpi calibrate on {comm.size} rank(s), {info.get('cpu')}",
    )
    if comm.size < 2:
        link = Link(args.link_name or "none", 0.0, 1e15, source="one rank: no link measured")
        return machine, link, meta
    network = ranks_per_host < comm.size
    gap = NETWORK_GAP if network else 0.0
    # What the machine probes left of --budget, shared among the link's
    # sweeps as each begins (one that finishes early leaves its time to the
    # rest). Every rank must share it alike: the slowest rank's clock counts.
    # The all-reduce is every mode's link cost, so its paths get twice the
    # share of the central router's exchange, and that twice the ping-pong's
    # (whose figures price only mode allgather). Over 10 Mbit/s an all-reduce
    # path needs about 9 s to reach 1 MiB (and 2 MiB's cost along the line).
    comm_mlx = mlx_communicator()
    weights = {"pingpong": 0.5, **{p: 2.0 for p in allreduce_paths(comm_mlx is not None)}, "exchange": 1.0}
    budgets = SweepBudgets(args.budget, weights, lambda: _slowest(comm, time.perf_counter() - start))
    pp = pingpong_fit(comm, budgets["pingpong"])
    ar = allreduce_fits(comm, comm_mlx, gap, budgets)
    ex = exchange_fit(comm, args.repeats, gap, budgets["exchange"])
    sweeps = {"pingpong": pp, **{f"allreduce/{p}": f for p, f in ar.items()}, "exchange": ex}
    meta.update(pingpong=pp, allreduce=ar, exchange=ex, gap_s=gap, budget_s=args.budget,
                link_budget_s=budgets.link_budget,
                stopped_early=[name for name, f in sweeps.items() if f["sweep"]["stopped"]])
    name = args.link_name or ("network" if network else "shared-memory")
    link = Link(
        name, pp["latency"], pp["bandwidth"],
        allreduce={p: AllReduceFit(f["latency"], f["bandwidth"], comm.size, tuple(f["sizes"]), tuple(f["p50_s"]))
                   for p, f in ar.items()},
        exchange=AllReduceFit(ex["latency"], ex["bandwidth"], comm.size, tuple(ex["sizes"]), tuple(ex["p50_s"])),
        source=f"moe-mpi calibrate on {comm.size} ranks ({', '.join(sorted(set(info.get('hosts') or [])))})",
    )
    return machine, link, meta


def _print_summary(machine, link, meta, out) -> None:
    print("# fixed costs per layer / per call (ms): " + ", ".join(
        f"{k} {1e3 * machine.layer_seconds[k]:.3f}/{1e3 * machine.step_seconds[k]:.3f}" for k in machine.layer_seconds))
    if "pingpong" in meta:
        pp = meta["pingpong"]
        print(f"# ping-pong: latency {link.latency * 1e6:.2f} us, {_rate(link.bandwidth)}{_extent(pp)}")
        for path, fit in link.allreduce.items():
            print(f"# all-reduce {path}: {fit.latency * 1e6:.1f} us + bytes / {_rate(fit.bandwidth)}"
                  f"{_extent(meta['allreduce'][path])}")
        print(f"# central exchange: {link.exchange.latency * 1e6:.1f} us + bytes / {_rate(link.exchange.bandwidth)}"
              f"{_extent(meta['exchange'])}")
        if meta["stopped_early"]:
            print(f"# stopped early for --budget {meta['budget_s']:g} s "
                  f"({meta['link_budget_s']:.1f} s left for the link): {', '.join(meta['stopped_early'])}")
    print(f"# wrote {out} in {meta['seconds']:.1f} s")


def _rate(bytes_per_s: float) -> str:
    """``1.2e9`` -> ``"1.20 GB/s"``, ``1.2e6`` -> ``"1.20 MB/s"`` (slow links read 0.00 GB/s)."""
    if bytes_per_s >= 1e9:
        return f"{bytes_per_s / 1e9:.2f} GB/s"
    return f"{bytes_per_s / 1e6:.2f} MB/s"


def _extent(fit: dict) -> str:
    """`` (1 KiB..256 KiB of 2 MiB)`` when a sweep stopped before its largest size."""
    from .bench.machine import format_size

    sweep = fit["sweep"]
    if not sweep["stopped"]:
        return ""
    sizes = sweep["sizes"]
    return f" ({format_size(sizes[0])}..{format_size(sizes[-1])} of {format_size(sweep['planned_sizes'][-1])})"
