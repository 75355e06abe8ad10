"""Environment probes, result rows, tables, JSON and plots of the model benchmarks.

Shared by ``moe-mpi bench decode | prefill | layer``. The probes say what a
number was measured with: which BLAS each rank loaded (the Linux MLX wheel's
bundled reference BLAS is ~70x slower than OpenBLAS, so a comparison between
modes is only fair if every rank has the same one) and how many threads it may
use, and each rank's peak memory.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..cpu import gemv
from ..cpu.blas import blas_info as preload_info
from ..cpu.blas import mapped_libraries
from ..errors import UserError
from .machine import write_json

__all__ = [
    "blas_info",
    "blas_lines",
    "format_table",
    "memory_info",
    "plot_bars",
    "reset_peak_rss",
    "throughput_row",
    "write_results",
]

# Environment variables that decide the BLAS and its threads.
BLAS_ENV = ("LD_PRELOAD", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

# ------------------------------------------------------------------ probes


def _blas_kind(libs: Optional[List[str]]) -> str:
    if libs is None:
        return "Accelerate (macOS)" if sys.platform == "darwin" else "unknown"
    # numpy's bundled scipy-openblas exports prefixed symbols (scipy_sgemm_...)
    # that MLX never calls: it says nothing about MLX's BLAS.
    names = " ".join(
        os.path.basename(lib).lower() for lib in libs if "scipy_openblas" not in lib
    )
    # A preloaded OpenBLAS interposes the cblas symbols even though MLX's
    # bundled libblas stays mapped, so OpenBLAS wins when both are present.
    if "openblas" in names:
        return "openblas"
    if "mkl" in names:
        return "mkl"
    if "blis" in names:
        return "blis"
    if "libblas" in names:
        return "reference (libblas bundled with the mlx wheel)"
    return "unknown"


def _matmul_gflops() -> float:
    """This rank's float32 matmul speed (GFLOP/s), measured with the others running."""
    import mlx.core as mx

    # Small enough to cost ~0.1 s even with the slow reference BLAS.
    m, k = 128, 512
    a = mx.random.normal((m, k), key=mx.random.key(1))
    b = mx.random.normal((k, k), key=mx.random.key(2))
    mx.eval(a, b, a @ b)  # warm-up
    reps = 3
    start = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    seconds = time.perf_counter() - start
    return 2 * m * k * k * reps / seconds / 1e9


def blas_info(probe: bool = True) -> Dict[str, Any]:
    """This rank's BLAS: mapped libraries, kind, thread settings, and speed.

    ``preload`` is what ``import moe_mpi`` did about the BLAS
    (:func:`moe_mpi.cpu.blas.blas_info`); the mapped libraries and the measured
    matmul speed say what MLX actually got.
    """
    libs = mapped_libraries()
    return {
        "kind": _blas_kind(libs),
        "libraries": libs,
        "preload": preload_info(),
        "env": {var: os.environ.get(var) for var in BLAS_ENV},
        "matmul_gflops": _matmul_gflops() if probe else None,
        "gemv": gemv.describe(),
    }


def code_version() -> Dict[str, Any]:
    """The git commit of the moe_mpi source that ran, and its modified files.

    The expert kernels change often; a result without the code version
    cannot be compared with another. Empty when not run from a git checkout.
    """
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*argv: str) -> Optional[str]:
        try:
            out = subprocess.run(
                ["git", "-C", root, *argv], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {}
    status = git("status", "--porcelain", "--", "moe_mpi") or ""
    return {"commit": commit.strip(), "modified": porcelain_paths(status)}


def porcelain_paths(status: str) -> List[str]:
    """The paths of ``git status --porcelain`` output (``XY path`` per line).

    The two status columns may both be blank-led (`` M path``), so the
    output must not be stripped before the columns are cut off.
    """
    return [line[3:] for line in status.splitlines() if len(line) > 3]


def blas_lines(
    per_rank: Sequence[Mapping[str, Any]], ranks_per_host: Mapping[str, int]
) -> List[str]:
    """Header lines (without ``# ``) describing every rank's BLAS, with warnings."""
    lines = []
    for rank, info in enumerate(per_rank):
        threads = info["env"].get("OPENBLAS_NUM_THREADS") or "unset"
        gflops = info.get("matmul_gflops")
        speed = f"; matmul {gflops:.1f} GFLOP/s" if gflops else ""
        lines.append(
            f"blas rank {rank}: {info['kind']}; OPENBLAS_NUM_THREADS={threads}{speed}; "
            f"decode matrix-vector: {info.get('gemv', 'n/a')}"
        )
    return lines + blas_warnings(per_rank, ranks_per_host)


def blas_warnings(
    per_rank: Sequence[Mapping[str, Any]], ranks_per_host: Mapping[str, int]
) -> List[str]:
    """Warnings: ranks with different BLAS or threads, slow BLAS, oversubscription."""
    warnings = []
    kinds = {info["kind"] for info in per_rank}
    threads = {info["env"].get("OPENBLAS_NUM_THREADS") for info in per_rank}
    if len(kinds) > 1:
        warnings.append(
            f"WARNING: ranks use different BLAS ({', '.join(sorted(kinds))}); modes are not comparable"
        )
    if len(threads) > 1:
        warnings.append("WARNING: ranks have different OPENBLAS_NUM_THREADS")
    if len({info.get("gemv") for info in per_rank}) > 1:
        warnings.append("WARNING: ranks use different matrix-vector kernels for decode")
    if any(k.startswith("reference") for k in kinds):
        warnings.append(
            "WARNING: MLX's bundled reference BLAS is slow: install OpenBLAS on every host "
            "(apt-get install libopenblas0-pthread; import moe_mpi preloads it) or pass "
            "mpirun -x LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
        )
    if "openblas" in kinds and None in threads:
        cores = os.cpu_count() or 1
        if max(ranks_per_host.values(), default=1) > 1:
            warnings.append(
                f"WARNING: OPENBLAS_NUM_THREADS unset: each of several ranks per host may start "
                f"{cores} BLAS threads (oversubscription); set it to cores / ranks per host"
            )
    return warnings


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0).

    Returns:
        Whether it worked; if not, VmHWM is the peak since the process started.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_info(rss_floor_bytes: int = 0) -> Dict[str, Optional[int]]:
    """This rank's MLX peak memory and peak/current RSS, in bytes.

    Args:
        rss_floor_bytes: A peak RSS seen before VmHWM was last reset, taken
            into the peak.
    """
    import mlx.core as mx

    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return {
        "mlx_peak_bytes": int(mx.get_peak_memory()),
        "mlx_active_bytes": int(mx.get_active_memory()),
        "peak_rss_bytes": max(hwm * 1024, rss_floor_bytes) if hwm is not None else None,
        "rss_bytes": rss * 1024 if rss is not None else None,
    }


# -------------------------------------------------------------------- rows


def _calls_and_bytes(counters: Mapping[str, Mapping[str, float]]):
    calls = {k: int(v["calls"]) for k, v in counters.items() if v["calls"]}
    nbytes = sum(v["bytes"] for v in counters.values())
    seconds = sum(v["seconds"] for v in counters.values())
    return calls, nbytes, seconds


def throughput_row(
    mode: str,
    counted: str,
    key: Dict[str, Any],
    tokens_per_step: int,
    step_seconds: Sequence[float],
    walls: Sequence[float],
    counters: Sequence[Mapping[str, Mapping[str, float]]],
    code_counts: Optional[Dict[str, float]] = None,
    imbalance: Optional[Dict[str, Any]] = None,
    imbalance_method: str = "",
) -> Dict[str, Any]:
    """One result row from per-step times on rank 0 and every rank's counters.

    Args:
        mode: Mode name.
        counted: ``"measured"`` (counters), ``"code"`` (``code_counts``) or
            ``"none"`` (no communication: ``single``).
        key: The row's workload parameters, e.g. ``{"batch": 8}``.
        tokens_per_step: Tokens one step processes (batch, or prompt length).
        step_seconds: Rank 0's time of each timed step.
        walls: Every rank's wall time over the timed window.
        counters: Every rank's counter snapshot over the window.
        code_counts: For ``counted="code"``: ``{"calls_per_step", "bytes_per_step"}``.
        imbalance: From :func:`moe_mpi.bench.routing.routing_imbalance`, or
            ``{"per_layer": 1.0}`` by construction, or None.
        imbalance_method: How ``imbalance`` was obtained.
    """
    steps = len(step_seconds)
    mean = float(np.mean(step_seconds))
    row: Dict[str, Any] = {
        "mode": mode,
        **key,
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "step_ms": mean * 1e3,
        "step_ms_median": float(np.median(step_seconds)) * 1e3,
        "tokens_per_s": tokens_per_step / mean,
        "ms_per_token": mean * 1e3 / tokens_per_step,
        "counted": counted,
        "wall_seconds": [float(w) for w in walls],
    }
    tokens = steps * tokens_per_step
    if counted == "measured":
        calls, nbytes, _ = _calls_and_bytes(counters[0])
        row["collectives_per_step"] = sum(calls.values()) / steps
        row["collectives_per_token"] = sum(calls.values()) / tokens
        row["bytes_per_token"] = nbytes / tokens
        row["collective_kinds_per_step"] = {k: c / steps for k, c in calls.items()}
        shares = []
        for wall, c in zip(walls, counters):
            shares.append(_calls_and_bytes(c)[2] / wall if wall > 0 else None)
        row["comm_seconds"] = [_calls_and_bytes(c)[2] for c in counters]
        row["comm_share"] = shares
        if any(not v.get("timed", True) for c in counters for v in c.values()):
            row["comm_seconds"] = row["comm_share"] = None  # --backend mlx: in MLX's graph, not timed
    elif counted == "code" and code_counts:
        row["collectives_per_step"] = code_counts["calls_per_step"]
        row["collectives_per_token"] = code_counts["calls_per_step"] / tokens_per_step
        row["bytes_per_token"] = code_counts["bytes_per_step"] / tokens_per_step
        row["comm_share"] = None
    else:
        row["collectives_per_step"] = row["collectives_per_token"] = row[
            "bytes_per_token"
        ] = 0
        row["comm_share"] = None
    row["imbalance"] = imbalance["per_layer"] if imbalance else None
    row["imbalance_detail"] = imbalance
    row["imbalance_method"] = imbalance_method if imbalance else None
    return row


def attach_mode_info(results: Mapping[str, Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Every mode's rows with its memory and guard check added; skipped modes as stubs."""
    rows = []
    for name, entry in results.items():
        if entry["status"] != "ok":
            rows.append({"mode": name, "skipped": entry["reason"]})
            continue
        memory = entry.get("memory") or []
        for row in entry["rows"]:
            row = dict(row)
            row["guard_logits_max_abs_diff"] = entry.get("logits_max_abs_diff")
            row["model_bytes"] = entry.get("model_bytes")
            row["mlx_peak_bytes"] = [m["mlx_peak_bytes"] for m in memory]
            row["peak_rss_bytes"] = [m["peak_rss_bytes"] for m in memory]
            rows.append(row)
    return rows


def switch_lines(per_rank: Sequence[Mapping[str, str]]) -> List[str]:
    """Header lines: the ``MOE_MPI_*`` switches in force (one line, or one per rank if they differ)."""
    def text(switches: Mapping[str, str]) -> str:
        return ", ".join(f"{k}={v}" for k, v in switches.items()) or "none set (defaults)"

    if all(dict(s) == dict(per_rank[0]) for s in per_rank):
        return [f"switches: {text(per_rank[0])}"]
    return [f"switches rank {r}: {text(s)}" for r, s in enumerate(per_rank)]


def check_lines(results: Mapping[str, Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]) -> List[str]:
    """Lines under the table: per mode, how it was built, what code ran, and whether its output matched."""
    lines = ["#"]
    for name, entry in results.items():
        if entry["status"] != "ok":
            continue
        mine = [r for r in rows if r.get("mode") == name and not r.get("skipped")]
        wrong = [r for r in mine if r.get("verified") is False]
        checked = sum(r.get("tokens_checked") or 0 for r in mine)
        if wrong:
            verdict = "output WRONG: " + "; ".join(f"{_params(r)}: {r['mismatch']}" for r in wrong)
        elif any(r.get("verified") for r in mine):
            verdict = f"output matches single-process mlx-lm ({checked} greedy tokens, logits within rounding)"
        else:
            verdict = "no output to check against mlx-lm" if name != "single" else "the reference"
        guard = entry.get("logits_max_abs_diff")
        paths = [r.get("decode_path") for r in mine if r.get("decode_path")]
        ran = ""
        if paths:
            numpy_steps = sum(p["numpy_steps"] for p in paths)
            total = numpy_steps + sum(p["model_code_steps"] for p in paths)
            ran = f"; timed steps in moe_mpi's numpy decode step: {numpy_steps} of {total}"
        lines.append(
            f"# {name}: built in {entry['load_seconds']:.1f} s; {verdict}; guard prompt logits max "
            f"|diff| {'n/a' if guard is None else f'{guard:.2e}'}{ran}"
        )
        if entry.get("decode_step_off") and entry.get("decode_step_off") != "the CPU speed path is off (MLX on a GPU, or MOE_MPI_CPU=0)":
            lines.append(f"#   no numpy decode step: {entry['decode_step_off']}")
        for r in mine:
            layers = (r.get("imbalance_detail") or {}).get("layers")
            if layers:
                lines.append(f"#   busiest rank / mean, per MoE layer, {_params(r)}: " + " ".join(f"{v:.2f}" for v in layers))
    return lines


def _params(row: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={row[k]}" for k in _ROW_KEYS if k in row)


# ------------------------------------------------------------------ rounds

_ROW_KEYS = ("batch", "length", "tokens")  # a row's workload parameter


def _row_key(row: Mapping[str, Any]) -> tuple:
    return (row["mode"],) + tuple((k, row[k]) for k in _ROW_KEYS if k in row)


def median_rounds(rounds: Sequence[Sequence[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Per mode and workload, the row of the round with the median tok/s.

    With one round, its rows unchanged. Otherwise each returned row is one
    measured round (so its columns stay consistent with each other), with
    ``rounds_tokens_per_s`` listing every round's figure; with an even count
    the lower median is taken. A mode wrong in any round is wrong: its first
    wrong round is returned. Rows keep the first round's order.
    """
    if len(rounds) == 1:
        return list(rounds[0])
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for rows in rounds:
        for row in rows:
            groups.setdefault(_row_key(row), []).append(row)
    out = []
    for row in rounds[0]:
        members = groups[_row_key(row)]
        if row.get("skipped"):
            out.append(row)
            continue
        wrong = [r for r in members if r.get("verified") is False]
        if wrong:
            chosen = dict(wrong[0])
        else:
            ranked = sorted(members, key=lambda r: r["tokens_per_s"])
            chosen = dict(ranked[(len(ranked) - 1) // 2])
        chosen["rounds_tokens_per_s"] = [r.get("tokens_per_s") for r in members]
        out.append(chosen)
    return out


def round_lines(rounds: Sequence[Sequence[Mapping[str, Any]]]) -> List[str]:
    """One line per mode and workload: tok/s of every round."""
    lines = ["#", "# tok/s by round (the table below shows each mode's median round)"]
    seen = []
    for row in rounds[0]:
        if not row.get("skipped"):
            seen.append(_row_key(row))
    for key in seen:
        figures = [
            speed(r, "tokens_per_s", ".1f") for rows in rounds for r in rows
            if not r.get("skipped") and _row_key(r) == key
        ]
        label = " ".join([key[0]] + [f"{k}={v}" for k, v in key[1:]])
        lines.append(f"#   {label:24s} " + " ".join(f"{f:>8}" for f in figures))
    return lines


# ------------------------------------------------------------------ tables


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``; "n/a" for a missing (None) value."""
    return "n/a" if value is None else format(value, spec)


def speed(row: Mapping[str, Any], key: str, spec: str) -> str:
    """A speed figure of ``row``; "WRONG" where its output did not match mlx-lm's."""
    if row.get("verified") is False:
        return "WRONG"
    return fmt(row.get(key), spec)


def _mib_max(values: Optional[Sequence[Optional[int]]]) -> str:
    values = [v for v in (values or []) if v is not None]
    return f"{max(values) / 2**20:.0f}" if values else "n/a"


def _percent_list(values: Optional[Sequence[Optional[float]]]) -> str:
    if not values:
        return "n/a"
    return "/".join("?" if v is None else f"{100 * v:.0f}" for v in values)


def format_table(
    columns: Sequence[tuple], rows: Sequence[Mapping[str, Any]]
) -> List[str]:
    """Aligned text table. ``columns``: ``(title, width, row -> text)`` tuples."""
    lines = ["# " + " ".join(f"{title:>{width}}" for title, width, _ in columns)]
    for row in rows:
        if row.get("skipped"):
            lines.append(f"  {row['mode']:>{columns[0][1]}} skipped: {row['skipped']}")
            continue
        lines.append(
            "  " + " ".join(f"{get(row):>{width}}" for _, width, get in columns)
        )
    return lines


def throughput_columns(key: str, key_title: str) -> List[tuple]:
    """Columns of the decode/prefill tables, ``key`` being the row parameter."""
    return [
        ("mode", 10, lambda r: r["mode"]),
        (key_title, 6, lambda r: str(r[key])),
        ("tok/s", 9, lambda r: speed(r, "tokens_per_s", ".1f")),
        ("ms/tok", 8, lambda r: speed(r, "ms_per_token", ".2f")),
        ("ms/step", 9, lambda r: speed(r, "step_ms", ".2f")),
        (
            "coll/tok",
            8,
            lambda r: (
                fmt(r["collectives_per_token"], ".3g")
                + ("*" if r["counted"] == "code" else "")
            ),
        ),
        ("KiB/tok", 8, lambda r: fmt(r["bytes_per_token"] / 1024, ".3g")),
        ("comm%/rank", 11, lambda r: _percent_list(r.get("comm_share"))),
        ("imbal", 6, lambda r: fmt(r["imbalance"], ".2f")),
        ("modelMiB", 8, lambda r: _mib_max(r.get("model_bytes"))),
        ("peakMiB", 8, lambda r: _mib_max(r.get("mlx_peak_bytes"))),
        ("rssMiB", 7, lambda r: _mib_max(r.get("peak_rss_bytes"))),
        ("|dlogit|", 9, lambda r: fmt(r.get("logits_max_abs_diff", r.get("guard_logits_max_abs_diff")), ".1e")),
        ("output", 6, lambda r: {True: "ok", False: "WRONG", None: "-"}[r.get("verified")]),
    ]


def legend_lines(imbalance_method: str) -> List[str]:
    """Explanations printed under the decode/prefill tables."""
    return [
        "tok/s, ms/tok: throughput over the timed steps (rank 0's mean step time); "
        "ms/step: one step (batch B decode: B tokens; prefill: the whole prompt)",
        "coll/tok, KiB/tok: collectives (ep: all-reduces) or point-to-point messages "
        "(central: sends+receives through rank 0) per token, and their payload; "
        "* = mlx-lm-tp, counted from mlx-lm's code (2 all_sum per layer: attention "
        "o_proj and MoE), not measured",
        "comm%/rank: Communicator seconds (incl. waiting for slower ranks) / wall time "
        "per rank; central workers wait in receive for rank 0 most of the time",
        f"imbal: {imbalance_method}",
        "modelMiB: MLX memory held after loading (mx.get_active_memory); peakMiB: "
        "mx.get_peak_memory(), rssMiB: VmHWM, per mode, load included; max over ranks",
        "|dlogit|: max abs difference of the last timed step's logits from single-process "
        "mlx-lm's on the same workload (prefill: the prompt's last position)",
        "output: ok = every greedy token of every step (warm-up and timed) equals single-process "
        "mlx-lm's and the logits agree within rounding; WRONG = not, and its speed is not a result",
    ]


# --------------------------------------------------------------- outputs


def check_plot_available(path: Optional[str]) -> None:
    """Fail early (before a long run) if ``--plot`` cannot work.

    Raises:
        UserError: matplotlib missing, or the output directory does not exist.
    """
    import importlib.util

    if path and importlib.util.find_spec("matplotlib") is None:
        raise UserError(
            "--plot needs matplotlib (the [bench] extra); install it with "
            f"`{sys.executable} -m pip install matplotlib`"
        )


def check_output_dirs(*paths: Optional[str]) -> None:
    """Raises UserError if an output file cannot be written (a directory, or its directory missing or read-only)."""
    from ..results import check_writable

    for path in paths:
        check_writable(path, "output file")


def write_results(path: str, payload: Mapping[str, Any]) -> None:
    """Write the JSON result file (indented, UTF-8)."""
    write_json(path, payload)


def plot_bars(
    rows: Sequence[Mapping[str, Any]],
    key: str,
    value: str,
    filename: str,
    title: str,
    ylabel: str,
    log: bool = False,
) -> None:
    """Grouped bar chart: one group per ``row[key]``, one bar per mode."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("skipped") and r.get(value) is not None]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    keys = list(dict.fromkeys(r[key] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        values = {r[key]: r[value] for r in rows if r["mode"] == mode}
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(keys))]
        ys = [values.get(k, 0) for k in keys]
        bars = ax.bar(xs, ys, width, label=mode)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{key}={k}" for k in keys])
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(filename)
    plt.close(fig)
