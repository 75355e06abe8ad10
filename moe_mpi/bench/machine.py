"""What a benchmark ran on, and the result files every benchmark writes.

A number without its machine is not a result: :func:`machine_info` records,
for every rank, the host, CPU, memory, OS and the versions of Python, MLX,
mlx-lm, mpi4py and the MPI library, plus the exact command line and the
``mpirun`` that launched it. :func:`header_lines` turns that into the
``#``-prefixed header printed above a table (as OSU's and nccl-tests'
benchmarks do), and :func:`write_json` / :func:`write_csv` write results.

Shared by all ``moe-mpi bench`` commands. Nothing here imports ``mpi4py.MPI``
before MPI is initialised: :func:`machine_info` is given a communicator, so
MPI already is (and MLX initialised it first, see :func:`moe_mpi.comm.init_mpi`).
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from typing import Any

__all__ = [
    "format_load",
    "format_size",
    "header_lines",
    "launcher_command",
    "load_average",
    "local_info",
    "machine_info",
    "write_csv",
    "write_json",
]

# Process names of launchers whose command line is worth recording. Open MPI
# 5's mpirun execs prterun, which keeps the user's arguments.
_LAUNCHERS = ("mpirun", "mpiexec", "prterun", "orterun", "mpiexec.hydra")

# Environment variables set by the launcher (or read by moe_mpi) that explain
# how the job was laid out.
_ENV_VARS = (
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "OMPI_UNIVERSE_SIZE",
    "PMI_SIZE",
    "MLX_MPI_LIBNAME",
    "OMP_NUM_THREADS",
)

# Per-rank fields expected to be the same everywhere; a difference (say, two
# Macs with different MLX versions) is flagged in the header.
_SOFTWARE_FIELDS = ("python", "mlx", "mlx_lm", "mpi4py", "numpy", "mpi_library")


def format_size(nbytes: int) -> str:
    """``4096`` -> ``"4 KiB"``; binary units, as OSU's ``-m 4:1M`` means."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= factor:
            return f"{nbytes / factor:.4g} {unit}"
    return f"{nbytes} B"


def _run(argv: Sequence[str]) -> str | None:
    """Output of a small probe command, or None if it is missing or fails."""
    try:
        out = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _cpu_model() -> str | None:
    if sys.platform == "darwin":
        return _run(["sysctl", "-n", "machdep.cpu.brand_string"])
    text = _read("/proc/cpuinfo") or ""
    # x86 says "model name"; some ARM kernels only have "Hardware"/"Model".
    for key in ("model name", "Hardware", "Model", "cpu model"):
        for line in text.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or None


def _cores() -> dict[str, int | None]:
    cores: dict[str, int | None] = {"logical": os.cpu_count()}
    cpus = _cpus()
    if cpus is not None:
        # The cores this rank may run on: mpirun binds each rank to a core
        # by default, and containers or taskset restrict it further.
        cores["affinity"] = len(cpus)
    if sys.platform == "darwin":
        # Apple silicon: performance (perflevel0) and efficiency (perflevel1)
        # cores run at very different speeds, so record the split.
        for level, name in (("0", "performance"), ("1", "efficiency")):
            value = _run(["sysctl", "-n", f"hw.perflevel{level}.physicalcpu"])
            if value is not None and value.isdigit():
                cores[name] = int(value)
    return cores


def _cpus() -> list[int] | None:
    """The CPUs this rank may run on (Linux), sorted; None where unknown."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return sorted(os.sched_getaffinity(0))


def _boot_id() -> str | None:
    # Tells machines apart where hostnames cannot: network namespaces (or
    # containers) on one machine have hostnames of their own but one kernel.
    text = _read("/proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


def cpu_ranges(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts: list[str] = []
    for cpu in sorted(cpus):
        if parts and cpu == parts[-1][1] + 1:
            parts[-1][1] = cpu
        else:
            parts.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def shared_cpu_warnings(info: Mapping[str, Any]) -> list[str]:
    """Warnings for ranks on one machine that are bound to the same CPUs.

    Two ranks pinned to one core run at half speed each, and nothing else
    would show it. Machines are told apart by boot id where known (fake
    hosts on one machine share it), else by hostname. Ranks free to run
    on every CPU of their machine are not bound and never warned about.
    """
    warnings = []
    seen: dict[Any, list[tuple[int, set[int]]]] = {}
    for facts in info.get("ranks", []):
        cpus = facts.get("cpus")
        logical = (facts.get("cores") or {}).get("logical")
        if not cpus or (logical is not None and len(cpus) >= logical):
            continue
        machine = facts.get("boot_id") or facts.get("hostname")
        for other, other_cpus in seen.setdefault(machine, []):
            common = other_cpus & set(cpus)
            if common:
                warnings.append(
                    f"WARNING: ranks {other} and {facts['rank']} are bound to the same CPUs "
                    f"({cpu_ranges(common)}) on one machine: they share cores"
                )
        seen[machine].append((facts["rank"], set(cpus)))
    return warnings


def _memory_bytes() -> int | None:
    if sys.platform == "darwin":
        value = _run(["sysctl", "-n", "hw.memsize"])
        return int(value) if value and value.isdigit() else None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) * 1024  # reported in kB
    return None


def _os_name() -> str:
    if sys.platform == "darwin":
        release = platform.mac_ver()[0]
        if release:
            return f"macOS {release} ({platform.machine()})"
    return platform.platform()


def _version(distribution: str) -> str | None:
    # From the installed metadata: importing mlx_lm just for its version
    # would pull in transformers and take seconds.
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _mpi_library() -> str | None:
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        # Importing mpi4py.MPI here could initialise MPI behind MLX's back.
        return None
    # Open MPI's string ends in a NUL and spreads over lines; make it one line.
    text = mpi.Get_library_version().replace("\0", " ")
    return " ".join(text.split()).rstrip(", ")


def _process_cmdline(pid: int) -> list[str] | None:
    """argv of process ``pid`` (Linux /proc; macOS/BSD ``ps``)."""
    raw = _read(f"/proc/{pid}/cmdline")
    if raw is not None:
        return [arg for arg in raw.split("\0") if arg] or None
    text = _run(["ps", "-o", "args=", "-p", str(pid)])
    # ps joins argv with spaces, so quoting is lost; good enough to read.
    return text.split() if text else None


def _parent_pid(pid: int) -> int | None:
    stat = _read(f"/proc/{pid}/stat")
    if stat is not None:
        # Fields after the parenthesised command: state ppid ...
        fields = stat[stat.rfind(")") + 2 :].split()
        return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
    text = _run(["ps", "-o", "ppid=", "-p", str(pid)])
    return int(text) if text and text.isdigit() else None


def launcher_command() -> list[str] | None:
    """argv of the ``mpirun`` that started this rank, if it runs on this host.

    Walks up a few parent processes looking for an MPI launcher (rank 0 is
    normally a child of ``mpirun``/``prterun``; ranks on other hosts are
    children of a daemon such as ``prted`` and return None).
    """
    pid = os.getppid()
    for _ in range(4):
        if pid is None or pid <= 1:
            return None
        argv = _process_cmdline(pid)
        if argv and os.path.basename(argv[0]) in _LAUNCHERS:
            return argv
        pid = _parent_pid(pid)
    return None


def load_average() -> list[float] | None:
    """The host's 1, 5 and 15 minute load averages, if the OS reports them.

    Worth recording with every timing: on a host whose load exceeds its
    cores, latencies of microseconds are dominated by scheduler stalls.
    """
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def format_load(loadavg: Sequence[float] | None) -> str:
    """``[1.5, 2, 3]`` -> ``"1.50 2.00 3.00"``; ``None`` -> ``"n/a"``."""
    return " ".join(f"{x:.2f}" for x in loadavg) if loadavg else "n/a"


def local_info() -> dict[str, Any]:
    """Facts about this process's host and software. No MPI calls."""
    try:
        import mlx.core as mx

        mlx_version = mx.__version__
        mlx_device = str(mx.default_device())
    except ImportError:
        mlx_version = mlx_device = None
    try:
        import mpi4py

        mpi4py_version = mpi4py.__version__
    except ImportError:
        mpi4py_version = None
    return {
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": _cores(),
        "cpus": _cpus(),
        "boot_id": _boot_id(),
        "memory_bytes": _memory_bytes(),
        "loadavg": load_average(),
        "os": _os_name(),
        "python": platform.python_version(),
        "mlx": mlx_version,
        "mlx_device": mlx_device,
        "mlx_lm": _version("mlx-lm"),
        "mpi4py": mpi4py_version,
        "numpy": _version("numpy"),
        "mpi_library": _mpi_library(),
    }


def _as_communicator(comm):
    """A private :class:`moe_mpi.comm.Communicator` over ``comm``'s processes.

    Private so the gather below does not show up in the caller's collective
    counters (a bench may report them).
    """
    from ..comm import Communicator

    mpi_comm = getattr(comm, "comm", comm)  # a Communicator or an mpi4py comm
    return Communicator(mpi_comm)


def machine_info(comm=None) -> dict[str, Any]:
    """Describe every rank's machine and the run's command line.

    Collective over ``comm``: every rank must call it, and every rank gets
    the same dict. Host facts are gathered with msgpack (not pickle).

    Args:
        comm: A :class:`moe_mpi.comm.Communicator` or an mpi4py
            intracommunicator, or ``None`` for this process alone (no MPI
            calls; ``mpi_library`` is then only known if MPI is initialised).

    Returns:
        A JSON-serialisable dict. Top-level ``cpu``, ``cores``,
        ``memory_bytes``, ``loadavg`` (1/5/15 min, now), ``os`` and software
        versions are rank 0's;
        ``ranks`` lists every rank's own facts (among them ``cpus``, the CPUs
        it may run on, and ``boot_id``, which tells machines apart where
        hostnames cannot); ``hosts`` is the hostname of
        each rank (index = rank); ``nodes`` groups ranks by host;
        ``mismatches`` names software fields that differ between ranks;
        ``argv``/``command`` are the Python command line,
        ``launcher`` the ``mpirun`` command line when rank 0 could see it,
        and ``env`` the launcher's layout variables.
    """
    local = local_info()
    if comm is None:
        per_rank = [local]
        size = 1
    else:
        private = _as_communicator(comm)
        per_rank = private.allgather(local)
        size = private.size
    first = per_rank[0]
    nodes: dict[str, dict[str, Any]] = {}
    for rank, facts in enumerate(per_rank):
        node = nodes.setdefault(
            facts["hostname"],
            {
                "hostname": facts["hostname"],
                "ranks": [],
                "cpu": facts["cpu"],
                "cores": facts["cores"],
                "memory_bytes": facts["memory_bytes"],
                "loadavg": facts["loadavg"],
                "os": facts["os"],
            },
        )
        node["ranks"].append(rank)
    mismatches = sorted(
        field
        for field in _SOFTWARE_FIELDS
        if len({str(facts.get(field)) for facts in per_rank}) > 1
    )
    # sys.orig_argv (3.10+) is what was typed after the interpreter name,
    # e.g. ['python', '-m', 'moe_mpi', 'bench', ...]; sys.argv[0] would be a
    # full path to __main__.py.
    argv = list(getattr(sys, "orig_argv", sys.argv))
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "world_size": size,
        "hosts": [facts["hostname"] for facts in per_rank],
        "nodes": list(nodes.values()),
        "argv": argv,
        "command": shlex.join(argv),
        "launcher": launcher_command(),
        "env": {var: os.environ[var] for var in _ENV_VARS if var in os.environ},
        "mismatches": mismatches,
        "ranks": [dict(facts, rank=rank) for rank, facts in enumerate(per_rank)],
    }
    for field in (
        "cpu",
        "cores",
        "memory_bytes",
        "loadavg",
        "os",
        *_SOFTWARE_FIELDS,
        "mlx_device",
    ):
        info[field] = first[field]
    return info


def _hosts_text(info: Mapping[str, Any]) -> str:
    parts = []
    for node in info["nodes"]:
        ranks = node["ranks"]
        if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 1:
            which = f"ranks {ranks[0]}-{ranks[-1]}"
        else:
            which = (
                "rank" + ("s " if len(ranks) > 1 else " ") + ",".join(map(str, ranks))
            )
        parts.append(f"{node['hostname']} ({which})")
    count = len(info["nodes"])
    return f"{count} host{'s' if count != 1 else ''}: " + ", ".join(parts)


def _cpus_lines(info: Mapping[str, Any]) -> list[str]:
    ranks = info.get("ranks") or []
    if not ranks or any(not facts.get("cpus") for facts in ranks):
        return []
    line = "cpus per rank: " + "; ".join(f"{facts['rank']}: {cpu_ranges(facts['cpus'])}" for facts in ranks)
    return [line, *shared_cpu_warnings(info)]


def header_lines(
    info: Mapping[str, Any], title: str, extra: Iterable[str] = ()
) -> list[str]:
    """The ``#`` header above a result table: what ran, where, with what.

    Args:
        info: From :func:`machine_info`.
        title: First line, e.g. ``"moe-mpi bench collectives: ..."``.
        extra: Further lines (method, columns), without the ``# `` prefix.
    """
    memory = info.get("memory_bytes")
    cores = info.get("cores") or {}
    cores_text = ", ".join(f"{v} {k}" for k, v in cores.items() if v is not None)
    lines = [
        title,
        f"command: {info['command']}",
    ]
    if info.get("launcher"):
        lines.append(f"launcher: {shlex.join(info['launcher'])}")
    lines += [
        f"ranks: {info['world_size']} on {_hosts_text(info)}",
        f"cpu (rank 0): {info.get('cpu')}; cores: {cores_text}; memory: "
        + (format_size(memory) if memory else "unknown"),
        *_cpus_lines(info),
        "load average (1/5/15 min) at start: "
        + "; ".join(
            f"{node['hostname']} {format_load(node['loadavg'])}"
            for node in info["nodes"]
        ),
        f"os (rank 0): {info.get('os')}; python {info.get('python')}",
        f"mpi: {info.get('mpi_library')}",
        f"mpi4py {info.get('mpi4py')}; mlx {info.get('mlx')} "
        f"({info.get('mlx_device')}); mlx-lm {info.get('mlx_lm')}; "
        f"numpy {info.get('numpy')}",
        f"date: {info['date']}",
    ]
    if info.get("mismatches"):
        lines.append(
            "WARNING: ranks differ in "
            + ", ".join(info["mismatches"])
            + " (see the JSON output)"
        )
    lines += list(extra)
    return ["# " + line if line else "#" for line in lines]


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON (UTF-8), ending with a newline.

    Raises:
        UserError: The file could not be written; the JSON was saved to
            another file, which the message names.
    """
    from ..results import save_text

    save_text(path, json.dumps(payload, indent=2) + "\n", "the results file")


def write_csv(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
) -> None:
    """Write ``rows`` (dicts) as CSV with a header row of ``columns``."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
