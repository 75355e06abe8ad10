"""Where slices get thin: predicted decode tokens/s of ep, sliced and auto per expert width and N.

Issue 17 expects `sliced` to lose to whole experts once slices get thin
(many machines, narrow experts). This script asks moe_mpi's own two cost
models where that happens, for Macs and links built into moe_mpi/profiles.py:

* the balance optimizer of ``--mode auto`` (``moe_mpi.balance``): the
  layout ``auto`` would load on N ranks (uniform routing, the defaults of a
  run: no copies), and its cost, slice penalty ``1 + c(m) / (I / N)``
  included (``balance.slice_overhead``: ``c`` by the rows ``m`` and format),
  of every expert whole (``balance.ep_layout``), every expert split
  (``Layout.all_split``) and its own choice (``balance.layout_cost``,
  averaged over ``balance.BATCHES`` as the search averages it);
* the performance model of ``moe-mpi plan`` (``moe_mpi.perfmodel``):
  decode tokens/s of ``ep``, ``sliced`` and ``auto``, made by the calls
  ``plan.plan_rows`` makes (``default_layouts``, ``predict``,
  ``memory_per_rank``).

The shape: a base config (``--base``: a known model or synthetic shape as
``moe-mpi plan --model`` takes it, ``:q4`` for 4-bit) with only the routed
experts' intermediate size set to each of ``--widths``; hidden size, layers,
experts and top-k stay the base's. ``--write-configs DIR`` writes each
width's config.json to ``DIR/w<width>/`` so that ``moe-mpi plan --model
DIR/w<width> ...`` reproduces a row. No MPI, no weights; predictions for
Macs from spec figures (the roofline), not measurements::

    python examples/thin_slices.py --base dbrx:q4 --machines m2-ultra-192,m4-max-64 \\
        --link 10gbe,tb5-rdma --widths 256,768,1536,2688,10752 --ranks 2-8 --batch 1,8

Prints markdown: auto's layout per width and N with the optimizer's costs;
one table of tokens/s per machine, link and batch; a summary per width
(the smallest N at which ``ep`` or ``auto`` is predicted faster than
``sliced``, or "never").
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_mpi.balance import BATCHES, SLICE_OVERHEAD, ep_layout, layout_cost, slice_overhead  # noqa: E402
from moe_mpi.layout import Layout  # noqa: E402
from moe_mpi.perfmodel import ModelShape, default_layouts, memory_per_rank, predict  # noqa: E402
from moe_mpi.plan import model_config  # noqa: E402
from moe_mpi.profiles import find_link, find_machine  # noqa: E402

MODES = ("ep", "sliced", "auto")


def width_config(base: str, width: int) -> dict:
    """``base``'s config (as ``moe-mpi plan --model`` reads it) with the routed experts' width set."""
    config = copy.deepcopy(model_config(base)[0])
    if isinstance(config.get("ffn_config"), dict):  # dbrx
        config["ffn_config"]["ffn_hidden_size"] = width
    elif "moe_intermediate_size" in config:  # qwen3_moe, qwen2_moe
        config["moe_intermediate_size"] = width
    else:  # mixtral: its intermediate_size is the experts'
        config["intermediate_size"] = width
    got = ModelShape.from_config(config).expert_inter
    if got != width:
        raise SystemExit(f"--base {base}: could not set the expert width to {width} (read back {got})")
    return config


def parse_ranks(text: str):
    out = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    if not out or min(out) < 2:
        raise SystemExit(f"--ranks {text!r}: machine counts of 2 or more, e.g. 2-8 or 2,4,8")
    return sorted(out)


def ints(text: str):
    return [int(x) for x in text.split(",") if x.strip()]


def describe(layout: Layout) -> str:
    split = len(layout.split)
    if split == layout.num_experts:
        return "split"
    if split == 0 and not layout.replicated:
        return "whole"
    return f"{split}/{layout.num_experts} split" + (f", {len(layout.replicated)} copied" if layout.replicated else "")


def optimizer_rows(shape: ModelShape, n: int):
    """auto's layouts on n ranks, and the optimizer's cost of whole, split and auto's choice."""
    layouts = default_layouts(shape, "auto", n)
    p = np.full(shape.experts, 1.0 / shape.experts)
    costs = {name: layout_cost(x, p, shape.top_k, intermediate=shape.expert_inter, quantized=shape.fmt.startswith("q"))
             for name, x in (("whole", ep_layout(p, n)), ("split", Layout.all_split(shape.experts, n)),
                             ("auto", layouts[0]))}
    return layouts, costs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="dbrx:q4", help="base model or shape, as plan --model (default dbrx:q4)")
    ap.add_argument("--machines", default="m2-ultra-192,m4-max-64", help="built-in Macs, comma-separated")
    ap.add_argument("--link", default="10gbe,tb5-rdma", help="built-in links, comma-separated")
    ap.add_argument("--widths", default="256,768,1536,2688,10752", help="expert intermediate sizes")
    ap.add_argument("--ranks", default="2-8", help="machine counts N, e.g. 2-8 or 2,4,8")
    ap.add_argument("--batch", default="1,8", help="decode batches (sequences per step)")
    ap.add_argument("--context", type=int, default=4096, help="KV-cache tokens per sequence (plan's default 4096)")
    ap.add_argument("--write-configs", metavar="DIR", help="write DIR/w<width>/config.json for moe-mpi plan")
    args = ap.parse_args(argv)
    machines = [find_machine(x.strip()) for x in args.machines.split(",") if x.strip()]
    links = [find_link(x.strip()) for x in args.link.split(",") if x.strip()]
    widths, ranks, batches = ints(args.widths), parse_ranks(args.ranks), ints(args.batch)

    shapes = {}
    for w in widths:
        config = width_config(args.base, w)
        shapes[w] = ModelShape.from_config(config, name=f"{args.base} w{w}")
        if args.write_configs:
            d = Path(args.write_configs) / f"w{w}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    s0 = shapes[widths[0]]
    print(f"# Where slices get thin (predicted): {args.base}, {s0.layers} layers, hidden {s0.hidden}, "
          f"{s0.experts} experts top-{s0.top_k}, {s0.fmt}; expert width I varied\n")

    layouts, costs = {}, {}
    for w in widths:
        for n in ranks:
            layouts[w, n], costs[w, n] = optimizer_rows(shapes[w], n)
    print(f"## auto's layout (balance optimizer, uniform routing)\n\nCell: optimizer cost of every expert "
          f"whole / every expert split (slice penalty 1 + c(m)/(I/N) included, c by rows {SLICE_OVERHEAD['quantized' if s0.fmt.startswith('q') else 'float']}) / auto's choice, "
          f"averaged over batches {', '.join(map(str, BATCHES))}; then auto's layout.\n")
    print("| I | " + " | ".join(f"N={n}" for n in ranks) + " |")
    print("|---|" + "---|" * len(ranks))
    for w in widths:
        cells = [f"{c['whole']:.3f} / {c['split']:.3f} / {c['auto']:.3f}: {describe(layouts[w, n][0])}"
                 for n in ranks for c in [costs[w, n]]]
        print(f"| {w} | " + " | ".join(cells) + " |")

    tok = {}  # (machine, link, batch, width, n) -> {mode: tok/s}, "fits"
    for m in machines:
        for link in links:
            for b in batches:
                for w in widths:
                    shape = shapes[w]
                    for n in ranks:
                        row, fits = {}, True
                        for mode in MODES:
                            lays = layouts[w, n] if mode == "auto" else default_layouts(shape, mode, n)
                            memory = memory_per_rank(shape, mode, n, b * args.context, lays)
                            fits &= max(memory) <= m.usable_bytes
                            row[mode] = predict(shape, mode, [m] * n, link, b, "decode", args.context, None,
                                                lays).tokens_per_s
                        tok[m.name, link.name, b, w, n] = (row, fits)
    for m in machines:
        for link in links:
            for b in batches:
                print(f"\n## {m.name} x N, {link.name}, batch {b}: decode tok/s, ep / sliced / auto\n")
                print("| I | " + " | ".join(f"N={n}" for n in ranks) + " |")
                print("|---|" + "---|" * len(ranks))
                for w in widths:
                    cells = []
                    for n in ranks:
                        row, fits = tok[m.name, link.name, b, w, n]
                        cells.append(" / ".join(f"{row[x]:.1f}" for x in MODES) + ("" if fits else " *"))
                    print(f"| {w} | " + " | ".join(cells) + " |")
    if not all(f for _, f in tok.values()):
        print("\n\\* does not fit: a mode's busiest rank needs more than 3/4 of the machine's memory")

    print("\n## Summary per width (all machines, links and batches above)\n")
    top = BATCHES[-1] * s0.top_k / s0.experts  # rows per expert at the largest batch the search prices
    print(f"| I | slice penalty N={ranks[0]}: 1 row..{top:g} rows | auto's layout | ep / sliced, min..max | auto / sliced, min..max "
          "| smallest N: ep faster than sliced | smallest N: auto faster than sliced "
          "| N where the optimizer costs whole below split |")
    print("|---|---|---|---|---|---|---|---|")
    for w in widths:
        rows = [(key[4], row) for key, (row, _) in tok.items() if key[3] == w]
        pen = [1 + float(slice_overhead(m, s0.fmt.startswith("q"))) / (w / ranks[0]) for m in (1, top)]
        kinds = sorted({describe(layouts[w, n][0]) for n in ranks})

        def first(ok):
            found = [n for n in ranks if ok(n)]
            return str(min(found)) if found else f"never (N <= {ranks[-1]})"

        ratio = {x: [r[x] / r["sliced"] for _, r in rows] for x in ("ep", "auto")}
        ep_fast = {n for n, r in rows if r["ep"] > r["sliced"]}
        auto_fast = {n for n, r in rows if r["auto"] > r["sliced"]}
        print(f"| {w} | {pen[0]:.3f}..{pen[1]:.3f} | {', '.join(kinds)} "
              f"| {min(ratio['ep']):.4f}..{max(ratio['ep']):.4f} | {min(ratio['auto']):.4f}..{max(ratio['auto']):.4f} "
              f"| {first(ep_fast.__contains__)} | {first(auto_fast.__contains__)} "
              f"| {', '.join(str(n) for n in ranks if costs[w, n]['whole'] < costs[w, n]['split']) or 'none'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
