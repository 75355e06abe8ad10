"""The performance model against the paper: DBRX on 2, 3 and 4 M2 Ultras over 10 GbE.

The paper (decentralised expert parallelism over gRPC, code at
MBZUAI-Research-Office/research_muchi) reports 6.1 tok/s on 2 nodes and 7.0
on 4, with 23%, 29% and 33% of the time in communication on 2, 3 and 4
nodes. These figures are second-hand (a summary of the paper, not its
text). Its expert placement, from the repository's configs: 2 nodes hold 8
experts each; 3 nodes: one holds experts 0-7 and two share 8-15; 4 nodes:
two groups of 8 experts, each group on 2 nodes; a token's experts within a
group go round-robin to the group's nodes. Every layer each node sends its
experts' outputs to every other node (an all-gather).

This script prints, per N: the model's prediction of the paper's scheme
(mode ``allgather`` with the paper's placement), at the roofline (every
byte at 800 GB/s) and with a bandwidth efficiency and a per-message
latency fitted to the paper's 2-node figures (then 3 and 4 nodes are
predictions); and moe_mpi's one-all-reduce modes on the same Macs over
10 GbE and over Thunderbolt 5 (TCP and RDMA)::

    python examples/perfmodel_paper.py [--markdown]

No MPI; a few seconds.
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_mpi.perfmodel import ModelShape, PerfModelError, predict, route_counts  # noqa: E402
from moe_mpi.plan import KNOWN_MODELS  # noqa: E402
from moe_mpi.profiles import LINKS, MACHINES, Link  # noqa: E402

PAPER = {2: (6.1, 0.23), 3: (None, 0.29), 4: (7.0, 0.33)}  # tok/s, communication share (second-hand)

# Expert groups per node count: (experts, nodes sharing them round-robin).
GROUPS = {
    2: [(range(0, 8), 1), (range(8, 16), 1)],
    3: [(range(0, 8), 1), (range(8, 16), 2)],
    4: [(range(0, 8), 2), (range(8, 16), 2)],
}


def paper_busiest(n: int, samples: int = 20000) -> float:
    """Expected experts on the paper's busiest node per token and layer (top-4 of 16)."""
    counts = route_counts(16, 4, 1, samples=samples) > 0  # [S, 16]
    busiest = np.zeros(samples)
    for experts, members in GROUPS[n]:
        in_group = counts[:, list(experts)].sum(axis=1)
        busiest = np.maximum(busiest, np.ceil(in_group / members))
    return float(busiest.mean())


def paper_imbalance(shape, n: int):
    """Per-layer busiest-node load over the mean node's (what predict's ``imbalance`` takes)."""
    mean = shape.top_k / n
    return [paper_busiest(n) / mean] * shape.moe_layers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    shape = ModelShape.from_config(KNOWN_MODELS["dbrx"], name="dbrx")
    ultra = MACHINES["m2-ultra-192"]
    gbe = LINKS["10gbe"]

    # Fit to the paper's 2-node figures: efficiency from the non-communication
    # time, the per-message latency from the communication time.
    tok_s, share = PAPER[2]
    step = 1 / tok_s
    roof = predict(shape, "allgather", [ultra] * 2, gbe, 1, imbalance=paper_imbalance(shape, 2))
    compute_roof = roof.seconds - roof.comm_seconds
    efficiency = compute_roof / (step * (1 - share))
    per_layer_comm = step * share / shape.moe_layers
    transfer = roof.comm_seconds / shape.moe_layers - gbe.latency
    fitted_link = Link("10gbe-grpc (fitted)", per_layer_comm - transfer, gbe.bandwidth,
                       source="latency fitted to the paper's 2-node communication time")
    fitted = ultra.with_efficiency(min(1.0, efficiency))

    rows = []
    for n in (2, 3, 4):
        imb = paper_imbalance(shape, n)
        r = predict(shape, "allgather", [ultra] * n, gbe, 1, imbalance=imb)
        f = predict(shape, "allgather", [fitted] * n, fitted_link, 1, imbalance=imb)
        ours = {}
        for name, mode, link in (("ep 10gbe", "ep", "10gbe"), ("sliced 10gbe", "sliced", "10gbe"),
                                 ("ep tb5-tcp", "ep", "tb5-tcp"), ("ep tb5-rdma", "ep", "tb5-rdma"),
                                 ("sliced tb5-rdma", "sliced", "tb5-rdma"), ("mlx-lm-tp 10gbe", "mlx-lm-tp", "10gbe"),
                                 ("mlx-lm-tp tb5-rdma", "mlx-lm-tp", "tb5-rdma")):
            try:
                ours[name] = predict(shape, mode, [fitted] * n, LINKS[link], 1)
            except PerfModelError:  # tensor parallel on 3: 8 KV heads do not split
                ours[name] = None
        rows.append((n, r, f, ours, paper_busiest(n)))

    print(f"# DBRX (132B, 16 experts top-4, bf16) on M2 Ultra (800 GB/s); paper figures second-hand")
    print(f"# fitted to the paper's 2 nodes: bandwidth efficiency {efficiency:.2f}, per-message latency "
          f"{fitted_link.latency * 1e3:.2f} ms (the 10 GbE table figure: {gbe.latency * 1e3:.2f} ms)")
    head = ["N", "busiest experts", "paper tok/s", "paper comm", "roofline tok/s", "roofline comm",
            "fitted tok/s", "fitted comm"] + [f"{k} tok/s (comm)" for k in rows[0][3]]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    else:
        print(" | ".join(head))
    for n, r, f, ours, busiest in rows:
        tok, share = PAPER[n]
        cells = [str(n), f"{busiest:.2f}", "-" if tok is None else f"{tok:.1f}", f"{100 * share:.0f}%",
                 f"{r.tokens_per_s:.1f}", f"{100 * r.comm_share:.0f}%", f"{f.tokens_per_s:.1f}", f"{100 * f.comm_share:.0f}%"]
        cells += ["cannot run" if p is None else f"{p.tokens_per_s:.1f} ({100 * p.comm_share:.0f}%)" for p in ours.values()]
        print(("| " + " | ".join(cells) + " |") if args.markdown else " | ".join(cells))
    print("# moe_mpi columns use the fitted efficiency and the table's links (one all-reduce per MoE layer; "
          "tensor parallel two per layer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
