"""``moe-mpi bench roofline``: the memory-bandwidth limit of decode, per mode.

Decode at small batch is bound by reading weights: every step each rank
reads the dense weights it holds and the expert weights routed to it. The
limit on tokens/s is the bytes the *slowest* rank must read per token over
the memory bandwidth each rank gets while all ranks read at once (a
STREAM-like triad run on every rank together, in this job). For context it
also measures a read-only pass (:func:`stream_read`), decode's own access
pattern, and prints each measured figure against the limit at that
bandwidth too ("of read").

Bytes per step, per rank, for a model of float weights:

* dense: attention, norms, routers and the LM head (the embedding table
  contributes B rows, nothing in comparison); mlx-lm's tensor parallel
  splits attention (and the dense MLPs) over the ranks, the other modes
  replicate it;
* experts: ``expert_bytes`` per distinct expert a rank must read this step.
  Routing is taken as uniform (a random-weight model is close to it):
  ``single`` reads every distinct chosen expert; ``sliced`` and mlx-lm's
  tensor parallel read 1/N of each; ``ep`` reads whole experts, and the
  slowest rank (most distinct local experts chosen) sets the pace; that
  imbalance is the price of whole-expert placement at batch 1; ``auto``
  reads what its per-layer layouts put on each rank (the whole experts it
  computes, 1/N of each split one): here the layouts ``moe_mpi.load``
  chooses without router statistics (:func:`mode_layouts`), in ``moe-mpi
  bench decode`` those of the model it ran (``--stats``, ``--replicas``).

Run under mpirun with the same ranks as the decode benchmark; pass its JSON
(``--decode-json``) to print measured tokens/s beside the limit.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..argtypes import int_list, positive_int
from ..errors import UserError
from ..perfmodel import ModelShape, PerfModelError, bytes_per_step, default_layouts, expected_experts
from ..results import check_writable, save_text
from ..runner import abort_on_error, add_debug_argument, collective_phase, parse_args
from .modes import default_modes, get_mode, modes_arg

STREAM_MB = 256  # triad arrays per rank, far beyond any cache


def stream_triad(comm, mbytes: int = STREAM_MB, repeats: int = 5) -> float:
    """GB/s of a STREAM triad ``a = b + s*c`` on this rank, all ranks at once.

    numpy runs it as two passes (``a = s*c``, then ``a += b``), so it counts
    the 5 arrays those passes move per element where STREAM's fused loop
    counts 3; best of ``repeats``.
    """
    n = mbytes * (1 << 20) // 4 // 3
    a, b, c = (np.full(n, v, dtype=np.float32) for v in (0.0, 1.0, 2.0))

    def triad():
        np.multiply(c, 3.0, out=a)
        np.add(a, b, out=a)

    # multiply+add is two passes (5 arrays of traffic); STREAM counts 3 for triad.
    return 5 * n * 4 / _best_seconds(comm, triad, repeats) / 1e9


def stream_read(comm, mbytes: int = STREAM_MB, repeats: int = 5) -> float:
    """GB/s of a read-only pass over ``mbytes`` on this rank, all ranks at once.

    Decode only reads weights, so this is the access pattern the limit is
    about; the triad also writes. Three ways of reading the array once, the
    fastest counts: :func:`moe_mpi.cpu.gemv.read` (a bare sequential read, the
    fastest loop found here), BLAS ``sdot`` of the array with itself, and
    :func:`moe_mpi.cpu.gemv.matvec` of it as a ``[rows, 4096]`` matrix (the
    decode kernel: four streams for one row of ``x``, see ``_gemv.c``); best
    of ``repeats`` each.
    """
    from ..cpu import gemv

    a = np.ones(mbytes * (1 << 20) // 4 // 4096 * 4096, dtype=np.float32)
    w, x = a.reshape(-1, 4096), np.ones(4096, dtype=np.float32)
    seconds = min(
        _best_seconds(comm, lambda: gemv.read(a), repeats),
        _best_seconds(comm, lambda: np.dot(a, a), repeats),
        _best_seconds(comm, lambda: gemv.matvec(w, x), repeats),
    )
    return a.nbytes / seconds / 1e9


def probe_alone(comm, probe, mbytes: int = STREAM_MB) -> float:
    """Rank 0's GB/s from ``probe`` (:func:`stream_triad`, :func:`stream_read`)
    while the other ranks wait (single process)."""
    result = probe(_Self(), mbytes) if comm.rank == 0 else 0.0
    comm.barrier()
    return comm.bcast(result)


def _best_seconds(comm, fn, repeats: int) -> float:
    """The fastest of ``repeats`` runs of ``fn``, each started at a barrier
    so that all ranks read memory at the same time."""
    best = float("inf")
    for _ in range(repeats):
        comm.barrier()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_bytes(config: Dict, itemsize: int = 4) -> Dict[str, float]:
    """Weight bytes of a qwen3_moe/mixtral-style float config, by part
    (:meth:`moe_mpi.perfmodel.ModelShape.parts`, the one byte model)."""
    dtype = {size: name for name, size in ITEMSIZE.items()}[itemsize]
    return ModelShape.from_config(dict(config, torch_dtype=dtype)).parts()


def limit_parts(config: Dict) -> Optional[Dict[str, float]]:
    """:func:`model_bytes` of a config this model covers, else None.

    Covered: float weights (``torch_dtype`` float32, bfloat16 or float16, not
    quantized) of a qwen3_moe/mixtral-style config (``hidden_size``,
    ``num_experts``/``num_local_experts``, ``num_experts_per_tok``, ...).
    Other layouts (DeepSeek's MLA, quantized experts) would need their own
    byte count, and get no limit rather than a wrong one.
    """
    itemsize = ITEMSIZE.get(config.get("torch_dtype", "float32"))
    if itemsize is None or "quantization" in config or "kv_lora_rank" in config:
        return None
    try:
        return model_bytes(config, itemsize)
    except (KeyError, TypeError, PerfModelError):
        return None


def mode_layouts(config: Dict, mode: str, size: int):
    """The per-layer layouts of an ``auto`` mode (``auto``, ``auto-split``, ...) on ``size`` ranks, as
    :func:`moe_mpi.load` chooses them without statistics; None for other modes (their bytes need none)."""
    builder = get_mode(mode)
    if getattr(builder, "mode", None) != "auto":
        return None
    return default_layouts(ModelShape.from_config(config), "auto", size, balance=builder.balance or "both")


def decode_limit(step_bytes: float, batch: int, gbs: float) -> float:
    """Tokens/s of ``batch``-token steps that read ``step_bytes``
    (:func:`bytes_per_step`) at ``gbs`` GB/s per rank."""
    return gbs * 1e9 / step_bytes * batch


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-mpi bench roofline", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="PATH", help="local model directory (its config.json)")
    source.add_argument("--synthetic", default="dbrx-like", help="synthetic shape name (default: dbrx-like)")
    parser.add_argument("--batch", type=int_list, default=[1, 8], help="comma-separated batch sizes (default: 1,8)")
    parser.add_argument("--modes", type=modes_arg, default=default_modes(),
                        help=f"comma-separated modes of moe-mpi bench decode (default: {','.join(default_modes())})")
    parser.add_argument("--decode-json", metavar="FILE", help="`moe-mpi bench decode --json` output to compare with")
    parser.add_argument("--json", metavar="FILE", help="write the limits as JSON")
    parser.add_argument("--stream-mb", type=positive_int, default=STREAM_MB, help=f"probe arrays per rank, MB (default: {STREAM_MB})")
    add_debug_argument(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    from ..comm import Communicator

    args = parse_args(setup_arg_parser(), argv)
    comm = Communicator()
    with abort_on_error(comm, debug=args.debug):
        parts = layouts = measured = None
        # Bad input (a model directory, a decode JSON, an output file) on any
        # rank: one message, every rank exits.
        with collective_phase(comm, debug=args.debug):
            if comm.rank == 0:
                check_writable(args.json, "--json")
            config, parts = _parts(args)
            # Here, so that a shape auto cannot place is one error line too.
            layouts = {mode: mode_layouts(config, mode, comm.size) for mode in args.modes}
            measured = _measured(args.decode_json)
        _run(comm, args, parts, layouts, measured)


def _measured(path: Optional[str]) -> Dict[tuple, float]:
    """``(mode, batch) -> tokens/s`` of a ``moe-mpi bench decode --json`` file (empty without one)."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--decode-json {path}: not JSON ({e})") from None
    try:
        rows = data["rows"]
        return {(row["mode"], row["batch"]): row["tokens_per_s"] for row in rows}
    except (KeyError, TypeError):
        raise UserError(
            f"--decode-json {path}: not a `moe-mpi bench decode --json` file "
            '(expected {"rows": [{"mode", "batch", "tokens_per_s"}, ...]})'
        ) from None


def _parts(args: argparse.Namespace) -> Tuple[Dict, Dict[str, float]]:
    """``--model``'s or ``--synthetic``'s config and its byte model."""
    if args.model:
        from ..loading import read_config, resolve_model_path

        config = read_config(resolve_model_path(args.model, download=False))
    else:
        from .shapes import synthetic_config

        config = synthetic_config(args.synthetic)
    parts = limit_parts(config)
    if parts is None:
        raise UserError(
            "bench roofline covers float (float32/bfloat16/float16) qwen3_moe/mixtral-style "
            f"configs; this one is {config.get('model_type')} {config.get('torch_dtype')}"
            + (" quantized" if "quantization" in config else "")
        )
    return config, parts


def _run(comm, args: argparse.Namespace, parts: Dict[str, float], layouts: Dict[str, Optional[list]],
         measured: Dict[tuple, float]) -> None:
    # Bandwidth with every rank reading (what ep/sliced/tp/central get), and
    # with rank 0 alone (what a single process gets).
    together = comm.allgather(stream_triad(comm, args.stream_mb))
    comm.barrier()
    alone = stream_triad_alone(comm, args.stream_mb)
    # Context, not the limit: decode's own access pattern, read-only.
    read = comm.allgather(stream_read(comm, args.stream_mb))
    rows, notes = [], []
    for mode in args.modes:
        bandwidth = alone if mode == "single" else min(together)
        if layouts[mode] is not None:
            split = sorted({len(x.split) for x in layouts[mode]})
            notes.append(f"# {mode}: its layouts at uniform routing, {'/'.join(map(str, split))} of "
                         f"{parts['num_experts']} experts split per layer")
        for batch in args.batch:
            step = bytes_per_step(parts, mode, comm.size, batch, layouts[mode])
            limit = decode_limit(step, batch, bandwidth)
            read_limit = decode_limit(step, batch, min(read)) if mode != "single" else None
            got = measured.get((mode, batch))
            rows.append(dict(mode=mode, batch=batch, bytes_per_step=step, bandwidth_gbs=bandwidth,
                             limit_tokens_per_s=limit, measured_tokens_per_s=got,
                             fraction=(got / limit if got else None),
                             read_limit_tokens_per_s=read_limit,
                             read_fraction=(got / read_limit if got and read_limit else None)))
    if comm.rank == 0:
        print(f"# STREAM triad per rank, all {comm.size} ranks at once: "
              + ", ".join(f"{g:.1f}" for g in together) + f" GB/s; rank 0 alone: {alone:.1f} GB/s")
        print(f"# read-only (gemv.read, sdot or gemv.matvec, the fastest) per rank, all {comm.size} ranks at once: "
              + ", ".join(f"{g:.1f}" for g in read) + " GB/s (context: 'of read' = measured / the limit at that bandwidth)")
        print(f"# model: {parts['layers']} layers, {parts['num_experts']} experts top-{parts['top_k']}, "
              f"expert {parts['expert'] / 1e6:.1f} MB, attention/layer {parts['attention_per_layer'] / 1e6:.1f} MB, "
              f"LM head {parts['lm_head'] / 1e6:.1f} MB")
        for note in notes:
            print(note)
        print(f"{'mode':>10} {'B':>3} {'MB/step':>9} {'GB/s':>6} {'limit tok/s':>12} {'measured':>9} {'of limit':>9}"
              f" {'of read':>8}")
        def percent(fraction):
            return f"{100 * fraction:.0f}%" if fraction else "-"

        for r in rows:
            got = f"{r['measured_tokens_per_s']:.1f}" if r["measured_tokens_per_s"] else "-"
            frac, read_frac = percent(r["fraction"]), percent(r["read_fraction"])
            print(f"{r['mode']:>10} {r['batch']:>3} {r['bytes_per_step'] / 1e6:>9.0f} {r['bandwidth_gbs']:>6.1f} "
                  f"{r['limit_tokens_per_s']:>12.1f} {got:>9} {frac:>9} {read_frac:>8}")
        if args.json:
            save_text(args.json, json.dumps({"stream_together_gbs": together, "stream_alone_gbs": alone,
                                             "read_together_gbs": read, "parts": parts, "rows": rows}, indent=1),
                      "--json")


def stream_triad_alone(comm, mbytes: int = STREAM_MB) -> float:
    """Rank 0's triad bandwidth while the other ranks wait (single process)."""
    return probe_alone(comm, stream_triad, mbytes)


class _Self:
    """A one-rank stand-in for :func:`stream_triad`'s barrier."""

    def barrier(self) -> None:
        pass
