"""``moe-mpi bench plot``: one figure from the JSON results of several runs.

::

    moe-mpi bench plot decode-n1.json decode-n2.json decode-n3.json \\
        collectives.json -o scaling.png

Each file is a ``--json`` result of ``moe-mpi bench decode | prefill | layer``
or ``collectives``. Per benchmark and model:

* results of several world sizes: one panel per batch size / prompt length /
  token count, tokens/s (layer: ms per call) against the number of ranks,
  one line per mode;
* results of one world size: one grouped bar chart, one bar per mode, and,
  when the rows measured it, a second one of the balance (each MoE layer's
  busiest rank over the mean).

A ``collectives`` result adds a panel of all-reduce latency against message
size, one line per data path (and world size). Needs matplotlib (the
``[bench]`` extra). No MPI: run it anywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import UserError
from ..runner import add_debug_argument, format_error, parse_args, print_error
from .machine import format_size

__all__ = ["load_results", "main", "plot_results", "setup_arg_parser"]

#: benchmark -> (row key of the x groups, value plotted, axis label, log scale)
_SERIES = {
    "decode": ("batch", "tokens_per_s", "decode tokens/s", False),
    "prefill": ("length", "tokens_per_s", "prefill tokens/s", False),
    "layer": ("tokens", "layer_ms", "ms per MoE layer call", True),
}
#: the balance panel: each MoE layer's busiest rank over the mean, averaged
_IMBALANCE = "busiest rank / mean (per layer)"


def load_results(paths: Sequence[str]) -> List[Dict[str, Any]]:
    """Reads result files; each must name a known benchmark.

    Raises:
        UserError: A file is unreadable, not JSON, or not a bench result.
    """
    results = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise UserError(f"{path}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not JSON ({e})") from None
        benchmark = data.get("benchmark") if isinstance(data, dict) else None
        if benchmark not in (*_SERIES, "collectives"):
            raise UserError(
                f"{path}: not a result of moe-mpi bench decode/prefill/layer/collectives "
                f"(benchmark={benchmark!r})"
            )
        data["_path"] = path
        results.append(data)
    return results


def _world_size(result: Dict[str, Any]) -> int:
    return int(result.get("world_size") or result["machine"]["world_size"])


def _model_name(result: Dict[str, Any]) -> str:
    model = result.get("model") or {}
    return model.get("synthetic") or str(model.get("path", "?")).rstrip("/").rsplit("/", 1)[-1]


def _panels(results: Sequence[Dict[str, Any]]) -> List[Tuple[str, Any]]:
    """``(kind, data)`` per panel, in a stable order."""
    panels: List[Tuple[str, Any]] = []
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = defaultdict(list)
    for result in results:
        if result["benchmark"] != "collectives":
            groups[result["benchmark"], _model_name(result)].append(result)
    for (benchmark, model), runs in groups.items():
        sizes = sorted({_world_size(r) for r in runs})
        key = _SERIES[benchmark][0]
        if len(sizes) > 1:
            values = sorted({row[key] for r in runs for row in r["rows"] if key in row})
            for value in values:
                panels.append(("scaling", (benchmark, model, key, value, runs)))
        else:
            _, field, label, log = _SERIES[benchmark]
            panels.append(("bars", (benchmark, model, runs, field, label, log)))
            if any(row.get("imbalance") is not None for r in runs for row in r["rows"]):
                panels.append(("bars", (benchmark, model, runs, "imbalance", _IMBALANCE, False)))
    collectives = [r for r in results if r["benchmark"] == "collectives"]
    if collectives:
        panels.append(("collectives", collectives))
    return panels


def _draw_scaling(ax, benchmark, model, key, value, runs, colors) -> None:
    _, field, label, log = _SERIES[benchmark]
    series: Dict[str, Dict[int, float]] = defaultdict(dict)
    for result in runs:
        n = _world_size(result)
        for row in result["rows"]:
            if row.get(key) == value and row.get(field) is not None:
                series[row["mode"]][n] = row[field]
    for mode, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=mode, color=colors[mode])
    ax.set_xlabel("ranks")
    ax.set_xticks(sorted({_world_size(r) for r in runs}))
    ax.set_ylabel(label)
    if log:
        ax.set_yscale("log")
    ax.set_title(f"{benchmark}, {model}, {key}={value}", fontsize=9)


def _draw_bars(ax, benchmark, model, runs, field, label, log, colors) -> None:
    key = _SERIES[benchmark][0]
    rows = [row for r in runs for row in r["rows"] if row.get(field) is not None]
    modes = [m for m in colors if any(row["mode"] == m for row in rows)]
    keys = list(dict.fromkeys(row[key] for row in rows))
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        values = {row[key]: row[field] for row in rows if row["mode"] == mode}
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(keys))]
        ax.bar(xs, [values.get(k, 0) for k in keys], width, label=mode, color=colors[mode])
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{key}={k}" for k in keys], fontsize=8)
    ax.set_ylabel(label)
    if log:
        ax.set_yscale("log")
    if field == "imbalance":
        ax.set_ylim(bottom=0.9)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")  # perfect balance
    ax.set_title(f"{benchmark}, {model}, {_world_size(runs[0])} ranks", fontsize=9)


def _draw_collectives(ax, results) -> None:
    for result in results:
        n = _world_size(result)
        by_path: Dict[str, List[Tuple[int, float]]] = defaultdict(list)
        for row in result["rows"]:
            if row["size_bytes"] > 0:
                by_path[row["path"]].append((row["size_bytes"], row["avg_us"]))
        for path, points in by_path.items():
            xs, ys = zip(*sorted(points))
            label = path if len(results) == 1 else f"{path}, {n} ranks"
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({row["size_bytes"] for r in results for row in r["rows"] if row["size_bytes"] > 0})
    if len(ticks) > 8:
        ticks = ticks[:: math.ceil(len(ticks) / 8)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([format_size(t).replace(" ", "") for t in ticks], rotation=45, fontsize=7)
    ax.set_xlabel("message size")
    ax.set_ylabel("all-reduce latency (µs)")
    ax.set_title("sum all-reduce (moe-mpi bench collectives)", fontsize=9)


def plot_results(results: Sequence[Dict[str, Any]], filename: str, title: Optional[str] = None) -> int:
    """Draws every panel of ``results`` into ``filename``; returns the panel count.

    Raises:
        UserError: matplotlib is missing, or there is nothing to plot.
    """
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "moe-mpi bench plot needs matplotlib (the [bench] extra); install it with "
            f"`{sys.executable} -m pip install matplotlib`"
        ) from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    panels = _panels(results)
    if not panels:
        raise UserError("nothing to plot")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), dpi=110, squeeze=False)
    # One colour per mode in every panel, in the order modes first appear.
    modes = dict.fromkeys(row["mode"] for r in results for row in r["rows"] if "mode" in row)
    colors = {mode: f"C{i % 10}" for i, mode in enumerate(modes)}
    for ax, (kind, data) in zip(axes.flat, panels):
        if kind == "scaling":
            _draw_scaling(ax, *data, colors)
        elif kind == "bars":
            _draw_bars(ax, *data, colors)
        else:
            _draw_collectives(ax, data)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    cpu = next((r["machine"].get("cpu") for r in results if r.get("machine")), None)
    fig.suptitle(title or f"moe-mpi bench ({cpu or 'unknown cpu'})", fontsize=10)
    fig.tight_layout()
    fig.savefig(filename)
    plt.close(fig)
    return len(panels)


def setup_arg_parser() -> argparse.ArgumentParser:
    """The options of ``moe-mpi bench plot``."""
    parser = argparse.ArgumentParser(
        prog="moe-mpi bench plot",
        description="Plot JSON results of moe-mpi bench decode/prefill/layer (tokens/s by "
        "mode and, given runs with different -n, by rank count) and of bench "
        "collectives (all-reduce latency against message size).",
    )
    parser.add_argument("results", nargs="+", metavar="RESULT.json", help="--json files of bench runs")
    parser.add_argument("-o", "--output", required=True, metavar="FILE.png", help="image to write")
    parser.add_argument("--title", help="figure title")
    add_debug_argument(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``moe-mpi bench plot``; returns 0, or 1 on bad input."""
    args = parse_args(setup_arg_parser(), argv)
    try:
        count = plot_results(load_results(args.results), args.output, args.title)
    except UserError as e:
        if args.debug:
            raise
        print_error(format_error(e))
        return 1
    print(f"wrote {args.output} ({count} panel{'s' if count != 1 else ''})")
    return 0


if __name__ == "__main__":  # python -m moe_mpi.bench.plot ...
    raise SystemExit(main())
