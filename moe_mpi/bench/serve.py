"""``moe-mpi bench serve``: concurrent clients against ``moe-mpi serve`` and ``mlx_lm.server``.

Run it alone, not under ``mpirun``: it starts each server itself with
``mpirun``, on the same ranks, model files and BLAS, one after the other::

    moe-mpi bench serve --synthetic dbrx-like --np 2 --clients 1,4,16,64
    moe-mpi bench serve --synthetic dbrx-like --quantize 4
    sudo .venv/bin/python examples/netns_bench.py --rate 10mbit --driver -- bench serve --synthetic dbrx-like

(the last puts each rank on a fake host of its own and passes the cluster in
``--cluster``; see ``examples/netns_bench.py``).

Servers (``--servers``):

* ``moe-mpi``: ``moe-mpi serve`` (``--mode ep``); ``moe-mpi-sliced``,
  ``moe-mpi-auto``: ``moe-mpi serve --mode sliced|auto``; a ``+heads``
  suffix adds ``--attention split``, ``+overlap`` ``--overlap`` (two-batch
  overlap), ``+mlx`` ``--backend mlx`` (the all-reduce in MLX's graph), in
  any order; ``moe-mpi-unguarded``: ``--mode ep``
  with ``--no-routing-guard`` (what the routing guard costs);
* ``mlx-lm``: ``mlx_lm.server`` as mlx-lm ships it, tensor parallel through
  its ``sharded_load``; started through :func:`run_mlx_lm_server`, which
  only imports ``moe_mpi`` first so that it gets the same BLAS;
* ``mlx-lm+kernels``: the same with moe_mpi's CPU kernels on its
  tensor-parallel model (:mod:`moe_mpi.cpu.tensor_parallel`, as
  ``bench decode --tp-cpu-path``): like with like on a CPU.

Method, per server: start it, wait for ``/health``, send one warm-up
request; then for each client count C, C client threads send C x ``--requests``
(at least ``--min-requests``, at most ``--max-requests``) streaming chat completions, each thread one
at a time (greedy, with
``max_tokens`` and prompts of random words, distinct across the whole run,
so the prompt caches never hit). A request's time to first token (TTFT) is
from sending it to the first chunk with text; its rate is its completion
tokens over its whole time, from sending to the last chunk. Aggregate tokens/s is every
completion token of the level over the level's wall time. Token counts are
the servers' own usage reports.

Every server gets the same prompts at each level, so the greedy texts are
compared across servers, prompt by prompt, against the first server's
(``texts equal``). On a random-weight model a batched or differently summed
forward pass can flip a near-tie between two tokens, so the check reports
agreement rather than failing; a server whose texts mostly differ is
computing something else.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..argtypes import int_list, port, positive_int
from ..launch import launch_again
from ..runner import PROG, env_rank, fail, parse_args
from .serve_clients import (
    agreement, agreement_lines, fmt, host_port, make_prompts, run_level, stream_chat, summarize_level,
)

__all__ = ["ServerJob", "main", "run_mlx_lm_server", "setup_arg_parser", "stream_chat"]

#: moe-mpi servers (modes and the unguarded one), before any suffix.
MOE_MPI_SERVERS = ("moe-mpi", "moe-mpi-sliced", "moe-mpi-auto", "moe-mpi-unguarded")
#: Suffixes of a moe-mpi server, in any order, and the options they add.
SUFFIXES = {"+heads": ["--attention", "split"], "+vocab": ["--lm-head", "split"], "+overlap": ["--overlap"],
            "+mlx": ["--backend", "mlx"]}
SERVERS = MOE_MPI_SERVERS + ("mlx-lm", "mlx-lm+kernels")
BASELINES = ("mlx-lm", "mlx-lm+kernels")
DEFAULT_CLIENTS = [1, 4, 16, 64]
READY_TIMEOUT = 900.0  # loading a 3 GB model over a slow fake link takes a while
_URL = re.compile(r" at (http://\S+) ")


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------


class ServerJob:
    """A server started with ``mpirun`` in a session of its own.

    Args:
        argv: The full command line (``mpirun ...``).
        log: File that gets the job's stdout and stderr.
        url: The server's base URL; None: read it from the log, where
            ``moe-mpi serve`` prints it (for ``--port 0``).
        env: Environment of the job.
    """

    def __init__(self, argv: Sequence[str], log: Path, url: Optional[str] = None, env=None):
        self.argv = [str(a) for a in argv]
        self.log = Path(log)
        self.url = url
        self.env = env
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "ServerJob":
        """Starts the job (returns at once)."""
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return self

    def output(self) -> str:
        """Everything the job has written so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> str:
        """Waits until ``GET /health`` answers 200; returns the base URL.

        A job whose ``mpirun`` failed before any rank ran (a message of
        :data:`moe_mpi.launch.LAUNCH_FAILURES`) is started again, up to
        :data:`moe_mpi.launch.LAUNCH_ATTEMPTS` launches in all, as
        :func:`moe_mpi.launch.run_mpirun` does (:func:`moe_mpi.launch.launch_again`).

        Raises:
            RuntimeError: The job ended, or did not get ready in time.
        """
        deadline = time.monotonic() + timeout
        launches = 1
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if launch_again(self.output(), launches, env=self.env):
                    launches += 1
                    self.start()
                    continue
                raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n{self.output()[-4000:]}")
            if self.url is None:
                found = _URL.search(self.output())
                self.url = found.group(1) if found else None
            if self.url is not None and http_get(self.url, "/health", timeout=5)[0] == 200:
                return self.url
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n{self.output()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> float:
        """Sends ``sig`` to ``mpirun`` and waits for it; returns the seconds it took.

        If it has not ended within ``timeout``, every process of the job's
        session is killed; after ``SIGKILL``, which mpirun cannot pass on to
        its ranks, too.
        """
        from ..launch import kill_job

        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        start = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_job(self.proc, self.env)
        seconds = time.monotonic() - start
        if sig == signal.SIGKILL:
            kill_job(self.proc, self.env)  # the ranks, orphaned in the job's session
        return seconds


def http_get(url: str, path: str, timeout: float = 30.0) -> tuple:
    """``(status, parsed JSON or None)`` of ``GET url+path``; ``(None, None)`` if unreachable."""
    host, port = host_port(url)
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        conn.close()
    except OSError:
        return None, None
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, None


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def split_server(kind: str) -> Tuple[str, List[str]]:
    """``(base, options)`` of a server name: ``moe-mpi-auto+heads+overlap`` is
    ``moe-mpi-auto`` with ``--attention split --overlap``.

    Raises:
        ValueError: Not a known server, or a suffix on an mlx-lm server or twice.
    """
    if kind in SERVERS:
        return kind, []
    base, *suffixes = kind.split("+")
    suffixes = ["+" + x for x in suffixes]
    if base not in MOE_MPI_SERVERS or any(x not in SUFFIXES for x in suffixes) or len(set(suffixes)) < len(suffixes):
        raise ValueError(kind)
    return base, [option for x in suffixes for option in SUFFIXES[x]]


def server_argv(kind: str, args: argparse.Namespace, model: Path, host: str, port: int, cluster: Optional[dict]) -> List[str]:
    """The ``mpirun`` command line of one server."""
    from ..launch import mpirun_command

    python = [sys.executable]
    if kind.startswith("moe-mpi"):
        base, options = split_server(kind)
        mode = base.split("-")[2] if base.count("-") == 2 and base != "moe-mpi-unguarded" else "ep"
        program = python + ["-m", "moe_mpi", "serve", "--mode", mode, *options]
        if base == "moe-mpi-unguarded":
            program.append("--no-routing-guard")
    else:
        program = python + ["-m", "moe_mpi.bench.serve", "--mlx-lm-server"]
        if kind == "mlx-lm+kernels":
            program.append("--kernels")
    program += ["--model", str(model), "--host", host, "--port", str(port), "--log-level", "WARNING"]
    if cluster is None:
        # As the other benchmarks: 2 ranks on 2 cores are bound one per core.
        return mpirun_command(args.np, program, oversubscribe=args.np > (os.cpu_count() or 1))
    return mpirun_command(
        args.np, [*cluster["rank_prefix"], *program], oversubscribe=False, extra=cluster["mpirun_extra"]
    )


def run_mlx_lm_server(argv: Sequence[str]) -> None:
    """``mlx_lm.server``'s ``main`` on the BLAS moe_mpi uses (the baseline's ranks run this).

    ``--kernels`` also gives its tensor-parallel model moe_mpi's CPU kernels.
    MPI is initialised the way moe_mpi does it (MLX first), so that MLX's
    group and mpi4py share the job.
    """
    import mlx_lm.server as server

    from .. import comm as comm_module

    comm_module.init_mpi()
    argv = list(argv)
    kernels = "--kernels" in argv
    if kernels:
        argv.remove("--kernels")
        base = server.ModelProvider

        class KernelsModelProvider(base):
            """mlx-lm's provider, then moe_mpi's CPU kernels on the loaded model."""

            def _load(self, *a, **kw):
                super()._load(*a, **kw)
                if self.tensor_group is not None:
                    from ..cpu.tensor_parallel import accelerate_tensor_parallel

                    comm = comm_module.Communicator(backend="mlx", group=self.tensor_group)
                    accelerate_tensor_parallel(self.model, comm)

        server.ModelProvider = KernelsModelProvider
    sys.argv = ["mlx_lm.server", *argv]
    server.main()


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------

class _Alone:
    """A stand-in communicator for a process with no MPI (this driver)."""

    rank = 0
    size = 1

    def Get_size(self) -> int:  # noqa: N802 - mpi4py's name, for quiet_barrier
        return 1


def prepare_model(args: argparse.Namespace) -> Path:
    """The model to serve: ``--model``, or the synthetic shape (written once), quantized with mlx-lm's ``convert -q``."""
    from .shapes import ensure_synthetic

    if args.model is not None:
        source = Path(args.model)
    else:
        source = ensure_synthetic(args.synthetic, _Alone(), args.cache_dir, args.debug)
    if not args.quantize:
        return source
    target = source.with_name(f"{source.name}-q{args.quantize}")
    if not (target / "config.json").exists():
        tmp = target.with_name(f".{target.name}-tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # convert refuses an existing path
        cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source), "--mlx-path", str(tmp),
               "-q", "--q-bits", str(args.quantize)]
        print(f"# quantizing: {shlex.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def _status_delta(before: Optional[dict], after: Optional[dict]) -> Optional[Dict[str, Any]]:
    """What moe-mpi serve's ``/status`` says about one level (rank 0 and the slowest rank)."""
    if not before or not after:
        return None

    def diff(key, rank=0):  # None where not measured (seconds of --backend mlx's all-reduces)
        a, b = after["ranks"][rank][key], before["ranks"][rank][key]
        return None if a is None or b is None else a - b

    steps = diff("steps")
    ranks = range(len(after["ranks"]))
    return {
        "steps": steps,
        "decode_steps": diff("decode_steps"),
        "control_broadcasts_per_step": diff("control_broadcasts") / steps if steps else None,
        "control_bytes_per_broadcast": diff("control_bytes") / max(diff("control_broadcasts"), 1),
        "all_reduce_s": [diff("all_reduce_seconds", r) for r in ranks],
        "expert_s": [diff("expert_seconds", r) for r in ranks],
        "all_reduces_per_step": diff("all_reduces") / steps if steps else None,
    }


def bench_server(kind: str, args: argparse.Namespace, model: Path, cluster: Optional[dict], workdir: Path) -> List[Dict[str, Any]]:
    """Starts one server, runs every client level against it, stops it."""
    host = cluster["address"] if cluster else "127.0.0.1"
    port = free_port() if cluster is None else args.port
    argv = server_argv(kind, args, model, cluster["address"] if cluster else host, port, cluster)
    job = ServerJob(argv, workdir / f"{kind}.log", url=f"http://{host}:{port}")
    print(f"# {kind}: {shlex.join(argv)}", flush=True)
    job.start()
    rows = []
    try:
        url = job.wait_ready()
        name = "default_model"
        prompts = iter(make_prompts(10_000, args.prompt_words, seed=args.seed))
        stream_chat(url, name, next(prompts), 8)  # warm-up
        for clients in args.clients:
            count = min(max(clients * args.requests, args.min_requests), args.max_requests)
            ours = kind.startswith("moe-mpi")
            before = http_get(url, "/status")[1] if ours else None
            records, wall = run_level(url, name, clients, [next(prompts) for _ in range(count)], args.max_tokens)
            after = http_get(url, "/status")[1] if ours else None
            row = {"server": kind, "clients": clients, **summarize_level(records, wall), "status": _status_delta(before, after)}
            rows.append(row)
            print(format_row(row), flush=True)
    finally:
        job.stop()
    return rows


TABLE_HEAD = "| clients | server | aggregate tok/s | TTFT p50 ms | TTFT p95 ms | TTFT mean ms | per-request tok/s (p50) | requests | tokens | prompt tokens (mean) |"


def format_row(row: Dict[str, Any]) -> str:
    """One table row."""
    failed = f" ({row['failed']} failed)" if row["failed"] else ""
    return (
        f"| {row['clients']} | {row['server']} | {fmt(row['aggregate_tps'], '.1f')} | "
        f"{fmt(row['ttft_p50_ms'], '.0f')} | {fmt(row['ttft_p95_ms'], '.0f')} | {fmt(row.get('ttft_mean_ms'), '.0f')} | "
        f"{fmt(row['request_tps_p50'], '.1f')} | {row['requests']}{failed} | {row['tokens']} | "
        f"{fmt(row['prompt_tokens_mean'], '.0f')} |"
    )


def _known(kind: str) -> bool:
    try:
        split_server(kind)
    except ValueError:
        return False
    return True


def ratio_lines(rows: List[Dict[str, Any]]) -> List[str]:
    """moe-mpi against each baseline, per client count: aggregate tokens/s, TTFT p50 and mean."""
    lines = []
    for kind in dict.fromkeys(r["server"] for r in rows if r["server"] not in BASELINES):
        ours = {r["clients"]: r for r in rows if r["server"] == kind}
        for base in BASELINES:
            theirs = {r["clients"]: r for r in rows if r["server"] == base}
            for clients in sorted(set(ours) & set(theirs)):
                a, b = ours[clients], theirs[clients]
                if a["aggregate_tps"] and b["aggregate_tps"] and a["ttft_p50_ms"] and b["ttft_p50_ms"]:
                    lines.append(
                        f"# {clients} clients: {kind} / {base}: aggregate {a['aggregate_tps'] / b['aggregate_tps']:.2f}x, "
                        f"TTFT p50 {a['ttft_p50_ms'] / b['ttft_p50_ms']:.2f}x"
                        + (f", mean {a['ttft_mean_ms'] / b['ttft_mean_ms']:.2f}x" if a.get("ttft_mean_ms") and b.get("ttft_mean_ms") else "")
                        + " (lower is better)"
                    )
    guarded = {r["clients"]: r for r in rows if r["server"] == "moe-mpi"}
    for b in rows:
        a = guarded.get(b["clients"]) if b["server"] == "moe-mpi-unguarded" else None
        if a is not None and a["aggregate_tps"] and b["aggregate_tps"]:
            lines.append(
                f"# {b['clients']} clients: routing guard on / off (moe-mpi / moe-mpi-unguarded): "
                f"aggregate {a['aggregate_tps'] / b['aggregate_tps']:.3f}x"
            )
    return lines


def setup_arg_parser() -> argparse.ArgumentParser:
    """Set up and return the argument parser."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} bench serve",
        description="Concurrent streaming clients against moe-mpi serve and mlx_lm.server, "
        "both started here with mpirun on the same ranks, model and BLAS. Run alone, not under mpirun.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--synthetic", default="dbrx-like", help="Synthetic shape (default: dbrx-like; see bench decode).")
    source.add_argument("--model", default=None, help="A model directory instead of a synthetic shape.")
    parser.add_argument("--cache-dir", default=None, help="Where synthetic checkpoints are cached.")
    parser.add_argument("--quantize", type=int, choices=[4, 8], default=None, help="Serve a copy quantized by mlx-lm's convert -q with this many bits.")
    parser.add_argument("--np", type=positive_int, default=2, help="Ranks (default: 2).")
    parser.add_argument("--servers", default="moe-mpi,mlx-lm", help=f"Comma-separated, from {', '.join(SERVERS)}; a moe-mpi server may add +heads, +vocab, +overlap and +mlx (default: moe-mpi,mlx-lm).")
    parser.add_argument("--clients", type=int_list, default=DEFAULT_CLIENTS, help="Client counts (default: 1,4,16,64).")
    parser.add_argument("--requests", type=positive_int, default=2, help="Requests per client per level (default: 2).")
    parser.add_argument("--min-requests", type=positive_int, default=8, help="Requests per level at least (default: 8).")
    parser.add_argument("--max-requests", type=positive_int, default=64, help="Requests per level at most (default: 64).")
    parser.add_argument("--max-tokens", type=positive_int, default=64, help="max_tokens of every request (default: 64).")
    parser.add_argument("--prompt-words", type=positive_int, default=4, help="Random words per prompt (default: 4, about 35 tokens with the chat template on the synthetic tokenizer).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prompts.")
    parser.add_argument("--port", type=port, default=18080, help="Port with --cluster (default: 18080); otherwise a free one.")
    parser.add_argument("--cluster", default=None, help="A cluster file from examples/netns_bench.py --driver (fake hosts).")
    parser.add_argument("--json", default=None, help="Write the results here.")
    parser.add_argument("--logs", default=None, help="Directory for the servers' logs (default: a new temporary one).")
    parser.add_argument("--debug", action="store_true", help="Tracebacks on errors.")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``moe-mpi bench serve``."""
    args = parse_args(setup_arg_parser(), argv)
    if env_rank() != 0 or "OMPI_COMM_WORLD_SIZE" in os.environ:
        fail("bench serve starts its servers with mpirun itself: run it alone, not under mpirun")
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(k for k in set(servers) if not _known(k))
    if unknown:
        fail(f"--servers: unknown {', '.join(unknown)}; choose from {', '.join(SERVERS)}, a moe-mpi one with +heads, +vocab, +overlap or +mlx")
    # SIGTERM (e.g. netns_bench's timeout) ends this process through the
    # finally blocks that stop the server jobs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cluster = None
    if args.cluster:
        cluster = json.loads(Path(args.cluster).read_text())
        args.np = len(cluster["hosts"])
    model = prepare_model(args)
    from .machine import local_info
    from .report import code_version

    info = {"machine": local_info(), "code": code_version(), "command": [PROG, "bench", "serve", *(argv or sys.argv[2:])]}
    link = cluster["link"] if cluster else f"one host, {args.np} ranks (shared memory)"
    header = [
        f"# {PROG} bench serve: {model.name}, {args.np} ranks; {link}",
        f"# machine: {info['machine']['cpu']}, {os.cpu_count()} CPUs; mlx {info['machine']['mlx']}, mlx-lm {info['machine']['mlx_lm']}; load {info['machine']['loadavg']}",
        f"# code: {info['code']}",
        f"# per level: clients x {args.requests} (at least {args.min_requests}, at most {args.max_requests}) streaming chat requests, greedy, max_tokens {args.max_tokens}, prompts of {args.prompt_words} random words",
        TABLE_HEAD,
        "|---" * TABLE_HEAD.count(" | ") + "|---|",
    ]
    print("\n".join(header), flush=True)
    rows = []
    workdir = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="moe-bench-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"# server logs: {workdir}", flush=True)
    for kind in servers:
        rows += bench_server(kind, args, model, cluster, workdir)
    for line in ratio_lines(rows):
        print(line)
    checks = agreement(rows)
    for line in agreement_lines(checks):
        print(line)
    if args.json:
        from .machine import write_json

        write_json(args.json, {**info, "model": str(model), "link": link, "options": vars(args), "rows": rows, "output_check": checks})
    return 0


if __name__ == "__main__":
    # The baseline's ranks: python -m moe_mpi.bench.serve --mlx-lm-server [--kernels] MLX_LM_SERVER_ARGS...
    if sys.argv[1:2] != ["--mlx-lm-server"]:
        sys.exit(f"usage: {PROG} bench serve ... (this module's own entry runs the mlx_lm.server baseline)")
    run_mlx_lm_server(sys.argv[2:])
