"""``moe-mpi plan``: will another Mac help? Predicted speed and memory per mode and machine count.

No MPI and no weights: it reads a model's ``config.json`` (a local
directory, a Hugging Face id already in the local cache, or a known model
name) and predicts, with :mod:`moe_mpi.perfmodel`, for each mode and for 1
to N machines::

    moe-mpi plan --model dbrx --machines m2-ultra-192:4 --link 10gbe,tb5-rdma
    moe-mpi plan --model ./my-model --profile cluster.json --batch 8 --json -

Per row: the memory the busiest rank holds (weights and KV cache) against
what the machine can give the model; predicted decode and prefill tokens/s;
the share of decode time on the link; the cost per million tokens when
machine prices are given. Then the best mode and N per link. Built-in
machines and links: :mod:`moe_mpi.profiles`; how each figure is sourced and
each term computed: ``docs/perfmodel.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .argtypes import add_balance_arguments, positive_float, positive_int
from .runner import add_debug_argument, fail, parse_args

__all__ = ["KNOWN_MODELS", "main", "model_config", "plan_rows", "setup_arg_parser"]

DEFAULT_MODES = ("ep", "sliced", "auto", "auto+heads", "central", "mlx-lm-tp")
HOURS_PER_YEAR = 365 * 24


def _qwen3(name, hidden, layers, heads, kv, experts, top_k, inter, vocab, dtype="bfloat16"):
    return {"_name_or_path": name, "model_type": "qwen3_moe", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 128, "num_experts": experts,
            "num_experts_per_tok": top_k, "moe_intermediate_size": inter, "vocab_size": vocab, "torch_dtype": dtype}


#: Configs of public models by short name (the fields the model reads),
#: from each model's published config.json.
KNOWN_MODELS: Dict[str, dict] = {
    "dbrx": {"_name_or_path": "databricks/dbrx-instruct", "model_type": "dbrx", "d_model": 6144, "n_layers": 40,
             "n_heads": 48, "vocab_size": 100352, "torch_dtype": "bfloat16",
             "attn_config": {"kv_n_heads": 8},
             "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4}},
    "mixtral-8x7b": {"_name_or_path": "mistralai/Mixtral-8x7B-v0.1", "model_type": "mixtral", "hidden_size": 4096,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 14336,
                     "vocab_size": 32000, "torch_dtype": "bfloat16"},
    "mixtral-8x22b": {"_name_or_path": "mistralai/Mixtral-8x22B-v0.1", "model_type": "mixtral", "hidden_size": 6144,
                      "num_hidden_layers": 56, "num_attention_heads": 48, "num_key_value_heads": 8,
                      "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 16384,
                      "vocab_size": 32000, "torch_dtype": "bfloat16"},
    "qwen3-30b-a3b": _qwen3("Qwen/Qwen3-30B-A3B", 2048, 48, 32, 4, 128, 8, 768, 151936),
    "qwen3-235b-a22b": _qwen3("Qwen/Qwen3-235B-A22B", 4096, 94, 64, 4, 128, 8, 1536, 151936),
}


def model_config(name: str):
    """The config dict of ``--model``: a directory, a cached hub id, a known
    model (``dbrx``, optionally ``:q4``/``:q8`` for mlx-lm's quantization) or a
    synthetic shape (``dbrx-like``).

    Returns:
        ``(config, directory)``; the directory is None for known models.

    Raises:
        ModelNotFoundError: None of these.
    """
    from .bench.shapes import SYNTHETIC, synthetic_config
    from .errors import ModelNotFoundError
    from .loading import read_config, resolve_model_path

    base, _, quant = name.partition(":")
    if base in KNOWN_MODELS or base in SYNTHETIC:
        config = dict(KNOWN_MODELS[base]) if base in KNOWN_MODELS else synthetic_config(base)
        if quant:
            if quant not in ("q4", "q8"):
                raise ModelNotFoundError(f"--model {name!r}: the suffix after ':' must be q4 or q8, got {quant!r}")
            config["quantization"] = {"bits": int(quant[1:]), "group_size": 64}
        return config, None
    try:
        path = resolve_model_path(name, download=False)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{e}; or give a known model: {', '.join(KNOWN_MODELS)}, or a synthetic shape: "
                                 f"{', '.join(SYNTHETIC)}") from None
    return read_config(path), path


def exact_weights(path, ranks: int) -> Optional[List[float]]:
    """Each rank's weight bytes in ``ep`` from :func:`moe_mpi.memory.plan_memory`
    (the real sharding pass on the checkpoint's headers), or None without safetensors."""
    from .memory import plan_memory

    if path is None or not any(Path(path).glob("*.safetensors")):
        return None
    plan = plan_memory(path, ranks)
    return [float(r.weight_bytes) for r in plan.ranks]


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-mpi plan",
        description="Predict decode and prefill tokens/s, memory per rank and communication share of an "
        "MoE model for each mode on 1 to N machines. No MPI needed.",
    )
    parser.add_argument("--model", required=True, help="model directory, cached Hugging Face id, or known name "
                        "(dbrx, mixtral-8x7b, ... ; add :q4 for 4-bit)")
    parser.add_argument("--machines", help="NAME:COUNT[,NAME:COUNT] (e.g. m2-ultra-192:4; 'profile' = --profile's)")
    parser.add_argument("--link", help="link name(s), comma-separated: 10gbe, tb4-tcp, tb5-tcp, tb5-rdma, "
                        "or 'profile' (default with --profile: the profile's)")
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences decoded together (default 1)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=512, help="prefill length (default 512)")
    parser.add_argument("--context", type=positive_int, default=4096,
                        help="KV-cache tokens per sequence, for memory and decode attention (default 4096)")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"modes (default {','.join(DEFAULT_MODES)})")
    parser.add_argument("--efficiency", type=float, default=None,
                        help="share of spec bandwidth built-in machines reach, in (0, 1] (default 1: the roofline)")
    parser.add_argument("--price", default=None, help="machine prices, NAME=USD[,NAME=USD] (for cost per Mtok)")
    parser.add_argument("--years", type=positive_float, default=3.0, help="years to spread a machine's price over (default 3)")
    parser.add_argument("--stats", metavar="FILE", help="routing statistics (`moe-mpi profile`): experts drawn by "
                        "their measured frequencies, and mode auto's layouts chosen from them (default: uniform)")
    # mode auto's --balance, --replicas and --profile, as for a run; the profile is also the machines'
    add_balance_arguments(parser, profile_help="a `moe-mpi calibrate` profile: its machine and link (see "
                          "--machines, --link), and mode auto's measured price of rows")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write rows as JSON (to stdout with no FILE)")
    parser.add_argument("--plot", metavar="FILE.png", help="tokens/s against N per mode and link")
    add_debug_argument(parser)
    return parser


def _prices(text: Optional[str]) -> Dict[str, float]:
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        try:
            price = float(value)
        except ValueError:
            price = -1.0
        if not sep or price <= 0:
            raise ValueError(f"--price {item!r}: expected NAME=USD with a positive price, e.g. m2-ultra-192=6599")
        out[name.strip()] = price
    return out


def _row_cost(path: Optional[str], shape):
    """Mode auto's row price from ``--profile`` and a header line; the default price if the
    profile predates the expert tables (it still gives the machines)."""
    from .rowcost import WEIGHT_FORMATS, read_row_cost

    if not path:
        return None, None
    fmt = shape.fmt if shape.fmt in WEIGHT_FORMATS else ("float32" if shape.fmt.startswith(("float", "bfloat")) else "q4")
    try:
        cost = read_row_cost(path, fmt)
    except ValueError as e:
        return None, f"# mode auto: default row price ({e})"
    return cost, f"# mode auto: {cost.describe()}"


def _routing(path: Optional[str], shape, model_dir=None):
    """The routing of ``--stats``: a ``moe-mpi profile`` statistics file, checked against the model.

    Against its shape; and, for a checkpoint directory, against its routers'
    weights, as a run checks them (statistics of another model of this shape
    are refused). A known model or shape has no weights to check against.
    """
    from .perfmodel import Routing
    from .routing import RoutingStats

    if not path:
        return None
    stats = RoutingStats.load(path)
    stats.check_fits([shape.experts] * shape.moe_layers, where=f"--stats {path}")
    if model_dir is not None and any(Path(model_dir).glob("*.safetensors")):
        from .memory import plan_memory

        plan_memory(model_dir, 1, stats=stats)  # the loader's check; reads the routers, no other weight
    return Routing.from_counts(stats.counts, shape.experts)


def plan_rows(shape, machines, links, modes, batch, prompt, context, routing=None, prices=None, years=3.0,
              exact=None, replicas=0.0, balance="both", row_cost=None) -> List[dict]:
    """One row per (link, mode, N): memory, fit, decode/prefill predictions, cost.

    ``row_cost``: mode auto's price of rows (:class:`moe_mpi.rowcost.RowCost`; None: the default).

    ``exact``: ``N -> ep weight bytes per rank`` from the checkpoint
    (:func:`exact_weights`), used for the whole-expert modes in place of the
    byte model's count.
    """
    from .overlap_model import SUFFIX, predict_overlap
    from .perfmodel import PerfModelError, default_layouts, memory_per_rank, predict

    rows = []
    for link in links:
        for mode in modes:
            for n in range(1, len(machines) + 1):
                ranks = machines[:n]
                name = "single" if (n == 1 and mode == "single") else mode
                base = name.removesuffix(SUFFIX)
                try:
                    layouts = default_layouts(shape, base, n, routing, replicas, balance, row_cost)
                    memory = memory_per_rank(shape, base, n, batch * context, layouts)
                    if exact and exact.get(n) and base in ("ep", "allgather"):
                        kv = batch * context * shape.kv_bytes_per_token
                        memory = [w + kv for w in exact[n]]
                    if base != name:  # two cohorts of the batch; one prompt's prefill has no second cohort
                        decode = predict_overlap(shape, base, ranks, link, batch, "decode", context, routing, layouts)
                    else:
                        decode = predict(shape, name, ranks, link, batch, "decode", context, routing, layouts)
                    prefill = predict(shape, base, ranks, link, prompt, "prefill", 0, routing, layouts)
                except PerfModelError as e:
                    rows.append(dict(link=link.name, mode=name, ranks=n, skipped=str(e)))
                    continue
                usable = min(m.usable_bytes for m in ranks)
                row = dict(
                    link=link.name, mode=name, ranks=n, machines=[m.name for m in ranks],
                    memory_bytes=max(memory), usable_bytes=usable, fits=max(memory) <= usable,
                    decode_tokens_per_s=decode.tokens_per_s, decode_comm_share=decode.comm_share,
                    prefill_tokens_per_s=prefill.tokens_per_s, prefill_comm_share=prefill.comm_share,
                    decode=decode.to_dict(), prefill=prefill.to_dict(),
                )
                if prices and all(m.name in prices for m in ranks):
                    per_hour = sum(prices[m.name] for m in ranks) / (years * HOURS_PER_YEAR)
                    row["usd_per_million_tokens"] = per_hour / (decode.tokens_per_s * 3600) * 1e6
                rows.append(row)
    return rows


def best(rows: Sequence[dict], link: str) -> Optional[dict]:
    """The fitting row of ``link`` with the most decode tokens/s."""
    fit = [r for r in rows if r["link"] == link and r.get("fits")]
    return max(fit, key=lambda r: r["decode_tokens_per_s"]) if fit else None


def _gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def render(rows: Sequence[dict], shape, header: List[str]) -> List[str]:
    lines = list(header)
    links = list(dict.fromkeys(r["link"] for r in rows))
    cost = any("usd_per_million_tokens" in r for r in rows)
    for link in links:
        lines.append(f"# link {link}")
        head = f"{'mode':>10} {'N':>2} {'GiB/rank':>9} {'usable':>7} {'fits':>4} {'decode tok/s':>12} {'comm':>5} {'prefill tok/s':>13} {'comm':>5}"
        lines.append(head + (f" {'$/Mtok':>8}" if cost else ""))
        for r in (r for r in rows if r["link"] == link):
            if "skipped" in r:
                lines.append(f"{r['mode']:>10} {r['ranks']:>2}  cannot run: {r['skipped']}")
                continue
            line = (f"{r['mode']:>10} {r['ranks']:>2} {_gib(r['memory_bytes']):>9} {_gib(r['usable_bytes']):>7} "
                    f"{'yes' if r['fits'] else 'NO':>4} {r['decode_tokens_per_s']:>12.1f} {100 * r['decode_comm_share']:>4.0f}% "
                    f"{r['prefill_tokens_per_s']:>13.1f} {100 * r['prefill_comm_share']:>4.0f}%")
            if cost:
                usd = r.get("usd_per_million_tokens")
                line += f" {usd:>8.2f}" if usd is not None else f" {'-':>8}"
            lines.append(line)
        top = best(rows, link)
        lines.append(f"# best on {link}: " + (f"{top['mode']} on {top['ranks']} machine(s), "
                                              f"{top['decode_tokens_per_s']:.1f} decode tok/s" if top else "no mode fits"))
        lines += _helps(rows, link)
    return lines


def _helps(rows: Sequence[dict], link: str) -> List[str]:
    """Per mode: does the last machine help (decode tok/s at N against N-1)?"""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows if r["link"] == link):
        ok = [r for r in rows if r["link"] == link and r["mode"] == mode and r.get("fits")]
        if len(ok) >= 2:
            a, b = ok[-2], ok[-1]
            change = b["decode_tokens_per_s"] / a["decode_tokens_per_s"] - 1
            out.append(f"#   {mode}: {a['ranks']} -> {b['ranks']} machines: decode {100 * change:+.0f}%")
    return out


def plot(rows: Sequence[dict], filename: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, phase in zip(axes, ("decode", "prefill")):
        for link in dict.fromkeys(r["link"] for r in rows):
            for mode in dict.fromkeys(r["mode"] for r in rows):
                pts = [(r["ranks"], r[f"{phase}_tokens_per_s"], r["fits"]) for r in rows
                       if r["link"] == link and r["mode"] == mode and "skipped" not in r]
                if not pts:
                    continue
                (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{mode}, {link}")
                bad = [p for p in pts if not p[2]]
                if bad:
                    ax.plot([p[0] for p in bad], [p[1] for p in bad], "x", color=line.get_color(), markersize=10)
        ax.set_xlabel("machines (N)")
        ax.set_ylabel(f"{phase} tokens/s (predicted)")
        ax.set_title(f"{phase}; x = does not fit")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(filename, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(setup_arg_parser(), argv)
    try:
        return _run(args)
    except Exception as e:  # one clear line for bad input; --debug shows the traceback
        from .errors import is_user_error

        if args.debug or not is_user_error(e):
            raise
        fail(e)


def _run(args) -> int:
    from .perfmodel import ModelShape
    from .profiles import describe_machines, find_link, parse_machines, read_profile

    from .results import check_writable

    check_writable(None if args.json == "-" else args.json, "--json")
    check_writable(args.plot, "--plot")
    profile_machine = profile_link = None
    if args.profile:
        profile_machine, profile_link, meta = read_profile(args.profile)
    if args.efficiency is not None and not 0 < args.efficiency <= 1:
        raise ValueError(f"--efficiency must be in (0, 1], got {args.efficiency}")
    machines_text = args.machines or (f"profile:{meta.get('ranks', 1)}" if args.profile else None)
    if not machines_text:
        raise ValueError("give --machines NAME:COUNT (e.g. m2-ultra-192:4) or --profile FILE")
    machines = parse_machines(machines_text, profile_machine)
    if args.efficiency is not None:
        machines = [m if m.kernels else m.with_efficiency(args.efficiency) for m in machines]
    link_text = args.link or ("profile" if args.profile else None)
    if not link_text:
        raise ValueError("give --link NAME (10gbe, tb4-tcp, tb5-tcp, tb5-rdma) or --profile FILE")
    links = [find_link(name.strip(), profile_link) for name in link_text.split(",") if name.strip()]
    if not links:
        raise ValueError(f"--link {link_text!r} names no link (10gbe, tb4-tcp, tb5-tcp, tb5-rdma)")
    config, path = model_config(args.model)
    shape = ModelShape.from_config(config, name=args.model)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise ValueError(f"--modes {args.modes!r} names no mode (ep, sliced, auto, auto+heads, central, mlx-lm-tp)")
    from .overlap_model import SUFFIX
    from .perfmodel import get_mode

    for m in modes:
        base = m.removesuffix(SUFFIX)
        if base != m and base.removesuffix("+heads") not in ("ep", "sliced", "auto"):
            raise ValueError(f"--modes {m}: overlap is moe-mpi serve's, for modes ep, sliced and auto (+heads)")
        get_mode(base)
    prices = _prices(args.price)
    routing = _routing(args.stats, shape, path)
    exact = {n: exact_weights(path, n) for n in range(1, len(machines) + 1)} if path is not None else None
    row_cost, row_note = _row_cost(args.profile, shape)
    rows = plan_rows(shape, machines, links, modes, args.batch, args.prompt_tokens, args.context, routing, prices,
                     args.years, exact, args.replicas, args.balance, row_cost)
    header = [
        f"# moe-mpi plan: {shape.name}: {shape.layers} layers ({shape.moe_layers} MoE), {shape.experts} experts top-{shape.top_k}, "
        f"{shape.fmt} ({shape.weight_bits:g} bits/weight), {shape.weight_bytes / 2**30:.1f} GiB of weights",
        f"# machines: {describe_machines(machines)}; batch {args.batch}, prefill {args.prompt_tokens} tokens, "
        f"KV cache {args.context} tokens per sequence",
        "# memory = weights + KV cache of the busiest rank" + (" (ep: weights from the checkpoint's sharding plan)" if exact and exact.get(1) else "")
        + "; comm = share of the time on the link (predicted)",
    ]
    if profile_machine is not None and profile_machine.ranks_per_host > 1:
        header.append(f"# the profile was measured with {profile_machine.ranks_per_host} ranks sharing one host's "
                      "cores and memory: every row uses those per-rank rates (pessimistic for fewer ranks; "
                      "where the ranks outnumbered the cores, fewer ranks get more of a core)")
    if row_note and "auto" in modes:
        header.append(row_note)
    if args.json:
        payload = {"model": shape.name, "shape": shape.__dict__, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
                   "context": args.context, "rows": rows}
        text = json.dumps(payload, indent=1, default=_jsonable)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.json != "-":
        print("\n".join(render(rows, shape, header)))
    if args.plot:
        plot(rows, args.plot, f"{shape.name}, {describe_machines(machines)}, batch {args.batch} (predicted)")
    return 0


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
