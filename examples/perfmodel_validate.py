"""Predict, then compare: the performance model against ``moe-mpi bench decode | prefill`` runs.

Each bench result (``--json``) is matched with the calibration profiles of
the same job (``moe-mpi calibrate --out`` run right before and right after
the benchmark, so both see the same spell of a drifting VM): the model
predicts every row with each profile, and the row's prediction is the mean
of the two. Prints one line per row (phase, format, mode, N, batch or
prompt length, link, measured and predicted tokens/s, error) and the median
and worst absolute error, against the bench's figure (its median round)
and against the row's fastest round (a stall of the shared VM only ever
slows a round, so the fastest is the one least disturbed)::

    python examples/perfmodel_validate.py --run DIR [--run DIR ...] [--json out.json] [--markdown] [--plot out.png]

A run directory holds ``calib-before.json``, ``calib-after.json`` and any
number of ``decode*.json`` / ``prefill*.json`` bench results.
``examples/perfmodel_grid.py`` makes them. No MPI: it only reads JSON.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_mpi.perfmodel import ModelShape, predict  # noqa: E402
from moe_mpi.profiles import read_profile  # noqa: E402


def link_label(result) -> str:
    link = result.get("link")
    if link is None:
        return "shared memory"
    return f"tcp {link['rate']}" if link.get("rate") else "tcp (veth)"


def predict_row(shape, profile, mode, ranks, tokens, phase, context):
    machine, link, _ = profile
    return predict(shape, mode, [machine] * ranks, link, tokens, phase, context)


def rows_of(run: Path):
    """Measured and predicted rows of every bench result in one run directory."""
    profiles = [read_profile(run / name) for name in ("calib-before.json", "calib-after.json") if (run / name).exists()]
    if not profiles:
        sys.exit(f"{run}: no calib-before.json / calib-after.json")
    out = []
    for path in sorted(run.glob("*.json")):
        data = json.loads(path.read_text())
        phase = data.get("benchmark")
        if phase not in ("decode", "prefill"):
            continue
        config = data["model"]["config"]
        shape = ModelShape.from_config(config)
        n = data["world_size"]
        cfg = data.get("config", {})
        for row in data["rows"]:
            mode = row["mode"]
            if mode == "single" or not row.get("verified", True):
                continue
            tokens = row["batch"] if phase == "decode" else row["length"]
            # Decode attention reads the prompt, the warm-up and on average half the timed steps.
            context = cfg.get("prompt_tokens", 32) + cfg.get("warmup", 8) + cfg.get("steps", 32) // 2 if phase == "decode" else 0
            preds = [predict_row(shape, p, mode, n, tokens, phase, context) for p in profiles]
            predicted = statistics.mean(p.tokens_per_s for p in preds)
            measured = row["tokens_per_s"]
            best = max(row.get("rounds_tokens_per_s") or [measured])
            out.append(dict(
                run=run.name, file=path.name, phase=phase, format=shape.fmt, mode=mode, ranks=n, tokens=tokens,
                link=link_label(data), measured=measured, predicted=predicted,
                predicted_each=[p.tokens_per_s for p in preds], error=predicted / measured - 1,
                best=best, error_best=predicted / best - 1,
                rounds=row.get("rounds_tokens_per_s"), comm_share_predicted=statistics.mean(p.comm_share for p in preds),
                parts={k: statistics.mean(p.parts[k] for p in preds) for k in preds[0].parts},
                step_s=1 / measured * tokens,
            ))
    return out


def summary(rows, key="error"):
    errors = [abs(r[key]) for r in rows]
    return statistics.median(errors), max(errors)


def plot(rows, path) -> None:
    """Predicted against measured tokens/s, one point per row (its fastest
    round, a bar down to the bench's figure), with the +-25% band of the goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    colors = {1: "tab:gray", 2: "tab:blue", 3: "tab:orange"}
    markers = {("decode", True): "o", ("decode", False): "s", ("prefill", True): "^", ("prefill", False): "D"}
    seen = set()
    for r in rows:
        shared = r["link"] == "shared memory"
        label = f"{r['phase']} {'shared memory' if shared else 'TCP'}, N={r['ranks']}"
        ax.plot([r["best"], r["measured"]], [r["predicted"]] * 2, color=colors.get(r["ranks"], "k"), lw=0.8, alpha=0.6)
        ax.scatter(r["best"], r["predicted"], s=22, color=colors.get(r["ranks"], "k"),
                   marker=markers[(r["phase"], shared)], label=None if label in seen else label)
        seen.add(label)
    lo = min(min(r["predicted"], r["measured"]) for r in rows) / 1.5
    hi = max(max(r["predicted"], r["best"]) for r in rows) * 1.5
    xs = [lo, hi]
    ax.plot(xs, xs, color="k", lw=0.8)
    ax.fill_between(xs, [x * 0.75 for x in xs], [x * 1.25 for x in xs], color="k", alpha=0.08, label="within 25%")
    ax.set(xscale="log", yscale="log", xlim=xs, ylim=xs, xlabel="measured tokens/s (fastest round; bar: the bench's figure)",
           ylabel="predicted tokens/s", title=f"moe_mpi performance model: {len(rows)} rows")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, type=Path, help="a run directory (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--plot", metavar="FILE", help="draw predicted against measured (needs matplotlib)")
    args = parser.parse_args(argv)
    rows = [r for run in args.run for r in rows_of(run)]
    if not rows:
        sys.exit("no decode/prefill bench results in the run directories")
    if args.markdown:
        print("| phase | format | mode | N | B / L | link | measured tok/s (rounds) | predicted | error | error vs best round |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    else:
        print(f"{'phase':>7} {'fmt':>7} {'mode':>10} {'N':>2} {'B/L':>4} {'link':>14} {'measured':>9} {'predicted':>9} {'error':>6}  rounds")
    for r in rows:
        rounds = ", ".join(f"{x:.1f}" for x in r["rounds"] or [])
        if args.markdown:
            print(f"| {r['phase']} | {r['format']} | {r['mode']} | {r['ranks']} | {r['tokens']} | {r['link']} | "
                  f"{r['measured']:.1f} ({rounds}) | {r['predicted']:.1f} | {100 * r['error']:+.0f}% | {100 * r['error_best']:+.0f}% |")
        else:
            print(f"{r['phase']:>7} {r['format']:>7} {r['mode']:>10} {r['ranks']:>2} {r['tokens']:>4} {r['link']:>14} "
                  f"{r['measured']:>9.1f} {r['predicted']:>9.1f} {100 * r['error']:>+5.0f}%  {rounds}")
    median, worst = summary(rows)
    print(f"# {len(rows)} rows: median |error| {100 * median:.0f}%, worst {100 * worst:.0f}% (against the bench's figure: its median round)")
    median, worst = summary(rows, "error_best")
    print(f"# against each row's fastest round: median |error| {100 * median:.0f}%, worst {100 * worst:.0f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
