"""Decode speed against the link between hosts: one all-reduce per layer or two.

Reads the results of a sweep over link rates made with
``examples/netns_bench.py`` (a ``bench collectives`` and a ``bench decode``
run per rate; each file's ``link`` entry says which rate) and, optionally, a
shared-memory ``bench decode`` run of the same command. Prints, per link:

* the all-reduce time of a decode step's message, p50 of ``bench
  collectives`` at ``[B, hidden]`` float32 (3 KiB at B=1, 24 KiB at B=8 for
  hidden 768) on the path each mode uses (moe_mpi: ``mpi4py-numpy``; mlx-lm
  tensor parallel: ``mlx-distributed``);
* each mode's decode tokens/s and ms per step (its median round).

Then, per mode and batch size, a least-squares fit of ms per step against
the all-reduce time over the TCP runs: its slope is how many all-reduce
times one decode step pays, to be read beside the all-reduces the step does
(8 for one per MoE layer on 8 layers, 16 for tensor parallelism's two)::

    python examples/link_sweep.py docs/results/net-*.json [--plot docs/img/link-sweep-dbrx-n2.png]

No MPI, no root: it only reads JSON (``--plot`` needs matplotlib).
"""

import argparse
import json
import sys
from collections import defaultdict

import numpy as np

# Data path of bench collectives that each decode mode's all-reduce takes.
PATH_OF_MODE = {"mlx-lm-tp": "mlx-distributed"}
DEFAULT_PATH = "mpi4py-numpy"


def link_label(result) -> str:
    link = result.get("link")
    if link is None:
        return "shared memory"
    return f"tcp {link['rate']}" if link.get("rate") else "tcp (veth)"


def load(paths):
    """Splits the files into collectives and decode results, keyed by link label."""
    collectives, decode = {}, {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        kind = data.get("benchmark")
        target = {"collectives": collectives, "decode": decode}.get(kind)
        if target is None:
            sys.exit(f"{path}: not a bench collectives or decode result")
        label = link_label(data)
        if label in target:
            sys.exit(f"{path}: a second {kind} result for link '{label}'")
        target[label] = data
    return collectives, decode


def mode_label(result, mode: str) -> str:
    """``mode``, marked when tensor parallelism ran with moe_mpi's CPU kernels."""
    description = result["modes"].get(mode, {}).get("description") or ""
    return f"{mode} + kernels" if "--tp-cpu-path" in description else mode


def allreduce_us(result, path: str, size: int):
    """p50 all-reduce time (us) of ``size`` bytes on ``path``, or None."""
    for row in result["rows"]:
        if row["path"] == path and row["size_bytes"] == size:
            return row["p50_us"]
    return None


def sweep(collectives, decode):
    """Rows (link, mode, batch, all-reduce us, tok/s, ms/step, all-reduces per step), shared memory first."""
    def order(label):  # shared memory, veth, then by falling rate
        if label == "shared memory":
            return (0, 0)
        rate = decode[label]["link"].get("rate")
        if not rate:
            return (1, 0)
        digits = "".join(c for c in rate if c.isdigit() or c == ".")
        scale = {"g": 1e9, "m": 1e6, "k": 1e3}.get(rate.lower().replace(digits, "")[:1], 1)
        return (2, -float(digits) * scale)

    rows = []
    for label in sorted(decode, key=order):
        result = decode[label]
        hidden = result["model"]["config"]["hidden_size"]
        for row in result["rows"]:
            size = 4 * hidden * row["tokens_per_step"]  # [B, hidden] float32
            path = PATH_OF_MODE.get(row["mode"], DEFAULT_PATH)
            us = allreduce_us(collectives[label], path, size) if label in collectives else None
            rows.append(dict(link=label, mode=row["mode"], label=mode_label(result, row["mode"]),
                             batch=row["batch"], allreduce_us=us,
                             tokens_per_s=row["tokens_per_s"], step_ms=row["step_ms"],
                             allreduces=row.get("collectives_per_step")))
    return rows


def fits(rows):
    """(mode, batch) -> (slope, intercept ms, points) over the rows with a measured all-reduce time."""
    groups = defaultdict(list)
    for r in rows:
        if r["allreduce_us"] is not None:
            groups[(r["mode"], r["batch"])].append((r["allreduce_us"] / 1000, r["step_ms"]))
    out = {}
    for key, points in groups.items():
        if len(points) >= 2:
            x, y = np.array(points).T
            slope, intercept = np.polyfit(x, y, 1)
            out[key] = (slope, intercept, len(points))
    return out


def plot(rows, filename: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for label in dict.fromkeys(r["label"] for r in rows):
            pts = sorted((r["allreduce_us"] / 1000, r["tokens_per_s"]) for r in rows
                         if r["label"] == label and r["batch"] == batch and r["allreduce_us"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel(f"all-reduce time of a [{batch}, hidden] fp32 message (ms, p50)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("decode over TCP between 2 fake hosts, link rate swept")
    fig.tight_layout()
    fig.savefig(filename, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="bench collectives / decode --json results")
    parser.add_argument("--plot", metavar="FILE.png", help="tokens/s against all-reduce time, per batch size")
    args = parser.parse_args(argv)
    collectives, decode = load(args.files)
    if not decode:
        sys.exit("no bench decode result among the files")
    rows = sweep(collectives, decode)
    first = next(iter(decode.values()))
    for mode, info in first["modes"].items():
        print(f"# {mode}: {info.get('description')}")
    print(f"{'link':>14} {'mode':>10} {'B':>3} {'allreduce_us':>12} {'tok/s':>7} {'ms/step':>8} {'ar/step':>7}")
    for r in rows:
        us = "-" if r["allreduce_us"] is None else f"{r['allreduce_us']:.1f}"
        ar = "-" if r["allreduces"] is None else f"{r['allreduces']:g}"
        print(f"{r['link']:>14} {r['mode']:>10} {r['batch']:>3} {us:>12} {r['tokens_per_s']:>7.1f} {r['step_ms']:>8.2f} {ar:>7}")
    print("#\n# fit over the TCP runs: ms/step = intercept + slope * all-reduce ms")
    print(f"{'mode':>10} {'B':>3} {'slope':>6} {'ar/step':>7} {'intercept_ms':>12} {'runs':>4}")
    counts = {(r["mode"], r["batch"]): r["allreduces"] for r in rows}
    for (mode, batch), (slope, intercept, n) in fits(rows).items():
        ar = counts[(mode, batch)]
        print(f"{mode:>10} {batch:>3} {slope:>6.1f} {'-' if ar is None else f'{ar:g}':>7} {intercept:>12.2f} {n:>4}")
    if args.plot:
        plot(rows, args.plot)
        print(f"# plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
