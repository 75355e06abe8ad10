"""``moe-mpi info``: what each rank will hold, before anything is launched.

Reads only ``config.json`` and the safetensors headers: no tensor data, no
MPI, no ``mpirun``, no download. For example::

    moe-mpi info --model mlx-community/Qwen3-30B-A3B-4bit --np 2
    moe-mpi info --model ./my-model --np 3 --weights 2,1,1 --context 8192 --json

The weights shown are exactly what :func:`moe_mpi.load` holds on each rank;
the KV cache and activations are estimates, and the output says what they
include. How they are computed: :mod:`moe_mpi.memory`.
"""

import argparse
import json
from typing import Optional, Sequence

import numpy as np

from .argtypes import SPMD_MODES, add_attention_argument, add_balance_arguments, float_list, positive_int
from .balance import expected_loads
from .errors import UserError
from .layout import Layout, layouts_to_json
from .placement import ExpertPlacement
from .routing import RoutingStats
from .memory import DEFAULT_CONTEXT, DEFAULT_PREFILL_STEP, MemoryPlan, human_bytes, plan_memory
from .results import check_writable
from .runner import fail, parse_args

# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def format_plan(plan: MemoryPlan) -> str:
    """The human-readable report."""
    lines = [f"Model: {plan.model_path}"]
    arch = f" ({plan.architecture})" if plan.architecture else ""
    lines.append(f"  type          {plan.model_type}{arch}")
    lines.append(f"  layers        {plan.num_layers}, of which {plan.num_moe_layers} MoE")
    experts = " / ".join(str(e) for e in sorted(set(plan.num_experts)))
    top_k = f", top-{plan.top_k} routing" if plan.top_k else ""
    lines.append(f"  experts       {experts} per MoE layer{top_k}")
    q = plan.quantization
    if q:
        text = f"{q.get('bits')}-bit, group size {q.get('group_size')} ({q.get('mode')})"
        if q.get("per_layer_overrides"):
            text += f", {q['per_layer_overrides']} per-layer overrides"
    else:
        text = "none"
    lines.append(f"  quantization  {text}")
    by_dtype = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(plan.checkpoint_dtypes.items(), key=lambda kv: -kv[1]))
    files = f"{plan.checkpoint_files} file{'s' if plan.checkpoint_files != 1 else ''}"
    lines.append(f"  checkpoint    {human_bytes(plan.checkpoint_bytes)} in {files} ({by_dtype})")
    lines.append("")
    lines.append(f"Placement ({plan.placement_strategy}):")
    for p in plan.placements:
        lines.extend("  " + line for line in p.table().splitlines())
    if not plan.placements:
        kinds = sorted({layout.describe() for layout in plan.layouts})
        lines.extend(f"  {len([l for l in plan.layouts if l.describe() == k])} MoE layers: {k}" for k in kinds)
        prices = {layout.price.describe() for layout in plan.layouts if layout.replicated or layout.row_cost}
        lines.extend(f"  {p}" for p in sorted(prices))
    lines.append("")

    lines.append(
        f"Memory per rank (weights: exactly what load() holds; KV cache at "
        f"{plan.context} tokens and activations: estimates):"
    )
    header = ["rank", "whole exp", "replicated", "expert wts", "shared exp", "weights", "KV cache", "activations", "peak"]
    rows = [
        [
            str(r.rank),
            str(r.num_experts),
            human_bytes(r.replicated_bytes),
            human_bytes(r.expert_bytes),
            human_bytes(r.shared_expert_bytes),
            human_bytes(r.weight_bytes),
            human_bytes(r.kv_cache_bytes),
            human_bytes(r.activation_bytes),
            human_bytes(r.peak_bytes),
        ]
        for r in plan.ranks
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(x.rjust(w) for x, w in zip(row, widths)))
    total = sum(r.weight_bytes for r in plan.ranks)
    single = plan.ranks[0].replicated_bytes if plan.ranks else 0
    lines.append("")
    heads = "attention split by heads" in plan.placement_strategy
    lines.append(
        f"  All ranks together hold {human_bytes(total)} of weights; the replicated part "
        f"({human_bytes(single)}) is on every rank, the experts are split."
        if not heads else
        f"  All ranks together hold {human_bytes(total)} of weights; the dense part ({human_bytes(single)} on "
        "rank 0) is on every rank, its attention split by heads; the experts are split."
    )
    if any(r.shared_expert_bytes for r in plan.ranks):
        lines.append("  Shared experts: each rank holds a slice of their hidden dimension where it can be split.")
    lines.append(f"  KV cache: {plan.kv_description}" + ("; each rank holds its heads' share." if heads else "."))
    lines.append(f"  Activations: {plan.activation_description}.")
    lines.append(
        "  Peak = weights + the larger of (KV cache + activations) and the load-time "
        "read buffer (largest single sharded tensor read)."
    )
    return "\n".join(lines)


def expected_balance(plan: MemoryPlan, stats, batch: int) -> list:
    """Per MoE layer: the busiest rank's expected rows over the mean rank's at ``batch`` tokens per
    step, for plain ``ep`` (contiguous placement) and for the plan's layout, and the latter's rows per rank."""
    rows = []
    n = plan.num_ranks
    for i, layout in enumerate(plan.layouts):
        e = layout.num_experts
        p = stats.frequencies(i) if stats is not None else np.full(e, 1.0 / e)
        k = (stats.top_k[i] if stats is not None and stats.top_k[i] else None) or plan.top_k or 2
        plain = Layout.from_owners(ExpertPlacement.contiguous(e, n).owners, n)
        _, before = expected_loads(plain, p, k, batch)
        loads, after = expected_loads(layout, p, k, batch)
        rows.append({"layer": i, "plain_ep": before, "chosen": after, "rows_per_rank": [float(x) for x in loads]})
    return rows


def format_balance(rows: list, batch: int, measured: bool) -> str:
    """The expected-load table."""
    source = "the router statistics" if measured else "uniform routing (no --stats)"
    lines = ["", f"Expected load at {batch} tokens per step, from {source}: busiest rank / mean rank"]
    lines.append("  layer  plain ep  this layout  rows per rank")
    for r in rows:
        per_rank = "/".join(f"{x:.1f}" for x in r["rows_per_rank"])
        lines.append(f"  {r['layer']:>5}  {r['plain_ep']:8.2f}  {r['chosen']:11.2f}  {per_rank}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def setup_arg_parser() -> argparse.ArgumentParser:
    """The ``moe-mpi info`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="moe-mpi info",
        description=(
            "Show how an MoE model would be split across ranks and how much memory each "
            "rank needs. Reads config.json and safetensors headers only; no mpirun needed."
        ),
    )
    parser.add_argument("--model", required=True, help="Local model directory (or a cached Hugging Face repo).")
    ranks = parser.add_mutually_exclusive_group()
    ranks.add_argument("--np", type=int, default=None, help="Number of ranks (default: 2).")
    ranks.add_argument("--hostfile", help="Take the number of ranks from a hostfile's total slots.")
    parser.add_argument(
        "--placement",
        default="contiguous",
        help="Expert placement: contiguous (default), round-robin, or a placement JSON file.",
    )
    parser.add_argument("--weights", type=float_list, default=None, help="Relative expert share per rank, e.g. 2,1,1.")
    parser.add_argument("--mode", choices=SPMD_MODES, default="ep", help="ep (default), sliced or auto, as for generate.")
    parser.add_argument(
        "--stats", metavar="FILE", default=None,
        help="Router statistics (moe-mpi profile): ep and auto place by them, and the expected load per "
        "rank and layer is shown before (plain ep) and after.",
    )
    parser.add_argument("--layouts", metavar="FILE", default=None, help="Per-layer layouts file, as for generate.")
    add_balance_arguments(parser)
    add_attention_argument(parser)
    parser.add_argument(
        "--batch", type=positive_int, default=8,
        help="Tokens per step the expected load is shown for (default: 8).",
    )
    parser.add_argument("--write-layouts", metavar="FILE", default=None, help="Write the layouts chosen, for --layouts.")
    parser.add_argument(
        "--context", type=int, default=DEFAULT_CONTEXT, help=f"Context length for the KV-cache estimate (default: {DEFAULT_CONTEXT})."
    )
    parser.add_argument(
        "--prefill-step",
        type=int,
        default=DEFAULT_PREFILL_STEP,
        help=f"Prompt tokens per forward pass (mlx-lm's prefill step, default: {DEFAULT_PREFILL_STEP}).",
    )
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Runs ``moe-mpi info``."""
    args = parse_args(setup_arg_parser(), argv)
    num_ranks = args.np
    if args.hostfile:
        from .hostfile import HostfileError, read

        try:
            num_ranks = read(args.hostfile).total_slots
        except (HostfileError, OSError) as e:
            fail(e)
    if num_ranks is None:
        num_ranks = 2
    try:
        check_writable(args.write_layouts, "--write-layouts")
        stats = RoutingStats.load(args.stats) if args.stats else None
        plan = plan_memory(
            args.model,
            num_ranks,
            placement=args.placement,
            weights=args.weights,
            context=args.context,
            prefill_step=args.prefill_step,
            mode=args.mode,
            stats=stats,
            layouts=args.layouts,
            replicas=args.replicas,
            balance=args.balance,
            profile=args.profile,
            attention=args.attention, lm_head=args.lm_head,
        )
        if args.write_layouts:
            layouts_to_json(list(plan.layouts), args.write_layouts, note=f"moe-mpi info {plan.placement_strategy}")
    except (ValueError, OSError, UserError) as e:
        # ValueError covers PlanningError, CheckpointError and placement errors;
        # OSError covers ModelNotFoundError and unreadable files.
        fail(e)
    except KeyError as e:  # a config.json without a key the model class needs
        fail(f"config.json is missing {e}")
    balance_rows = expected_balance(plan, stats, args.batch)
    if args.json:
        print(json.dumps(dict(plan.to_dict(), expected_load=balance_rows), indent=2))
    else:
        print(format_plan(plan))
        print(format_balance(balance_rows, args.batch, stats is not None))


if __name__ == "__main__":
    main()
