"""Models and run modes shared by ``moe-mpi bench decode | prefill | layer``.

Two things live here:

* **Synthetic models** (:data:`SYNTHETIC`): random-weight ``qwen3_moe``
  checkpoints shaped like real MoE models, scaled down to run on a laptop.
  ``qwen3_moe`` because mlx-lm has a tensor-parallel ``Model.shard()`` for it,
  so every mode can run on the same weights. Each is written once to a cache
  directory (rank 0 writes, the others wait) by
  :func:`moe_mpi.synthetic.write_checkpoint`.
* **Modes** (:data:`MODES`): how one model is run across the ranks. A mode
  builds a :class:`Built` model on every rank, whose :meth:`Built.run` calls a
  function with the model on the ranks that drive it. ``ep`` and ``central``
  are :func:`moe_mpi.load` modes; any other mode name of
  :data:`moe_mpi.shard.MODES` works too (``load(..., mode=NAME)``, every rank
  running the model), and a mode that needs its own driver is registered in
  one line::

      MODES["etp"] = MoeMpiMode("etp")

  ``mlx-lm-tp`` is mlx-lm's own tensor parallelism (``model.shard(group)``)
  and ``single`` is plain mlx-lm in one process.

:func:`run_modes` is the loop every benchmark shares: build a mode, check its
logits against plain mlx-lm, run the benchmark's workload, record memory, free
the model, next mode.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..argtypes import positive_int
from ..errors import UserError
from ..runner import collective_phase
from . import report

__all__ = [
    "Built",
    "Context",
    "MODES",
    "MlxLmTensorParallel",
    "MoeMpiMode",
    "SYNTHETIC",
    "SingleProcess",
    "add_common_arguments",
    "ensure_synthetic",
    "get_mode",
    "mode_names",
    "quiet_barrier",
    "record_routing",
    "run_modes",
    "synthetic_config",
    "timed_run",
]

# --------------------------------------------------------------- synthetic

#: Architecture of every synthetic model (mlx-lm has ``shard()`` for it).
SYNTHETIC_ARCH = "qwen3_moe"
SYNTHETIC_SEED = 0
# Bump when the way a checkpoint is written changes, so old caches are not used.
_CACHE_VERSION = 1

#: Synthetic shape name -> overrides of ``tiny_config("qwen3_moe")``.
#: Vocabularies are kept at 8192: a real 100k-150k vocabulary would make the
#: (replicated) LM head, not the experts, dominate decode on these small
#: shapes. KV heads are chosen so mlx-lm's tensor parallelism can split them.
SYNTHETIC: Dict[str, Dict[str, Any]] = {
    # Seconds-long end-to-end runs for tests.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        intermediate_size=64,
        vocab_size=512,
    ),
    # The project's performance baseline: DBRX's expert layout (16 experts,
    # top-4, FFN/hidden = 3.5) at hidden 768; 3.2 GB of float32 weights.
    "dbrx-like": dict(
        hidden_size=768,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=6,  # splits over 2, 3 or 6 ranks
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=2688,
        intermediate_size=2688,
        vocab_size=8192,
    ),
    # Qwen3-30B-A3B's routing (128 small experts, top-8); 1.6 GB.
    "qwen3-moe-like": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=256,
        intermediate_size=256,
        vocab_size=8192,
    ),
    # Mixtral's routing (8 big experts, top-2, FFN/hidden = 3.5); 1.4 GB.
    "mixtral-like": dict(
        hidden_size=1024,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=3584,
        intermediate_size=3584,
        vocab_size=8192,
    ),
}


def synthetic_config(name: str) -> Dict[str, Any]:
    """The full ``config.json`` dict of synthetic shape ``name``.

    Raises:
        UserError: Unknown name.
    """
    from ..synthetic import tiny_config

    if name not in SYNTHETIC:
        raise UserError(
            f"--synthetic {name!r}: unknown shape; choose from {', '.join(SYNTHETIC)}"
        )
    config = tiny_config(SYNTHETIC_ARCH, **SYNTHETIC[name])
    config["max_position_embeddings"] = 4096
    return config


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/moe_mpi/synthetic`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "moe_mpi" / "synthetic"


def synthetic_dir(name: str, cache_dir: Optional[str] = None) -> Path:
    """Where shape ``name`` is cached: ``<cache>/<name>-<hash of its config>``.

    The hash covers the config, seed and writer version, so changing a shape
    never reuses a stale checkpoint.
    """
    config = synthetic_config(name)
    key = json.dumps(
        {"config": config, "seed": SYNTHETIC_SEED, "version": _CACHE_VERSION},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return base / f"{name}-{digest}"


def _write_synthetic(name: str, path: Path) -> None:
    """Writes shape ``name`` to ``path`` atomically (temp dir, then rename)."""
    from ..synthetic import write_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the cache from other users
    try:
        write_checkpoint(tmp, synthetic_config(name), seed=SYNTHETIC_SEED)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def quiet_barrier(ctl, idle: bool = True) -> None:
    """A barrier in which waiting ranks sleep instead of spinning in MPI.

    On a shared host a rank spinning in ``MPI_Barrier`` takes a core from the
    rank doing the work. Every rank must call this (a blocking barrier would
    not match the ``Ibarrier``); ``idle=False`` ranks wait without sleeping.
    """
    if ctl.size == 1:
        return
    request = ctl.comm.Ibarrier()
    if not idle:
        request.Wait()
        return
    while not request.Test():
        time.sleep(0.002)


def ensure_synthetic(name: str, ctl, cache_dir: Optional[str], debug: bool) -> Path:
    """The cached checkpoint of shape ``name``; rank 0 writes it if missing.

    Collective. Every rank must see rank 0's cache directory (one host, or
    a shared file system); on several hosts without one, pass ``--model``
    with a checkpoint present on every host instead.
    """
    path = synthetic_dir(name, cache_dir)
    with collective_phase(ctl, debug=debug, name_ranks=False):
        try:
            if ctl.rank == 0 and not (path / "config.json").exists():
                _write_synthetic(name, path)
        finally:
            # Every rank reaches this, even when rank 0's write failed, so
            # nobody is stranded; the others sleep through a long write.
            quiet_barrier(ctl, idle=ctl.rank != 0)
    with collective_phase(ctl, debug=debug):
        if not (path / "config.json").exists():
            raise UserError(
                f"synthetic model {path} is not visible on this rank: "
                "--cache-dir must be on a file system every host shares"
            )
    return path


# ------------------------------------------------------------------- modes


@dataclasses.dataclass
class Context:
    """What a mode needs to build and run a model.

    Attributes:
        comm: The counted :class:`moe_mpi.Communicator`, used by the model
            only, so its counters are the model's communication.
        ctl: A second Communicator for the benchmark's own control traffic
            (barriers, gathers), kept out of ``comm``'s counters.
        path: Checkpoint directory.
        config: Its ``config.json``.
        group: MLX's MPI group (``mx.distributed``), or None.
        args: Parsed command line.
        rss_floor_bytes: The mode's peak RSS before a workload's own probe
            reset it (:func:`exclude_from_peak_rss`); 0 if none did.
    """

    comm: Any
    ctl: Any
    path: Path
    config: Dict[str, Any]
    group: Any
    args: argparse.Namespace
    rss_floor_bytes: int = 0

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size


@dataclasses.dataclass
class Built:
    """One mode's model on this rank.

    Attributes:
        name: Mode name.
        model: The model, or None on ranks that only wait (``single``).
        run_fn: ``run_fn(fn)``: calls ``fn(model)`` where this mode drives
            the model; collective.
        drivers: Ranks on which ``fn`` runs (the others serve or wait).
        counted: ``"measured"`` (the Communicator counters see every message)
            or ``"code"`` (mlx-lm calls ``mx.distributed`` directly: counts
            come from reading its code).
        skipped: Why the mode cannot run (then ``model`` is None everywhere).
        notes: Remarks for the header.
    """

    name: str
    model: Optional[nn.Module]
    run_fn: Callable[[Callable[[nn.Module], Any]], Any]
    drivers: Sequence[int]
    counted: str = "measured"
    skipped: Optional[str] = None
    notes: List[str] = dataclasses.field(default_factory=list)

    def run(self, fn: Callable[[nn.Module], Any]) -> Any:
        """Collective: ``fn(model)`` on the driving ranks; its result there, else None."""
        return self.run_fn(fn)

    def drives(self, rank: int) -> bool:
        return rank in self.drivers


class MoeMpiMode:
    """A :func:`moe_mpi.load` mode: ``load(path, comm=comm, mode=NAME)``.

    Args:
        mode: The ``mode=`` passed through to :func:`moe_mpi.load`.
        drive: ``drive(model, fn)`` for modes in which rank 0 drives and the
            others serve (``central``: :func:`moe_mpi.central.drive`); None
            when every rank runs the model (SPMD).
        description: One line for the header.
    """

    kind = "moe_mpi"

    def __init__(
        self, mode: str, drive: Optional[Callable] = None, description: str = ""
    ):
        self.mode = mode
        self.drive = drive
        self.description = description or f"moe_mpi.load(mode={mode!r})"

    def build(self, ctx: Context) -> Built:
        from .. import load

        model, _ = load(ctx.path, comm=ctx.comm, mode=self.mode)
        if self.drive is None:
            return Built(self.mode, model, lambda fn: fn(model), range(ctx.size))
        drive = self.drive
        return Built(self.mode, model, lambda fn: drive(model, fn), [0])


class MlxLmTensorParallel:
    """mlx-lm's tensor parallelism: ``load_model`` then ``model.shard(group)``.

    Every rank holds a slice of every attention head group and of every
    expert's intermediate dimension; mlx-lm sums with ``mx.distributed.all_sum``
    twice per layer (attention ``o_proj`` and the MoE block).
    """

    kind = "mlx-lm-tp"
    description = "mlx_lm load_model + model.shard(group) (tensor parallel)"

    def unsupported(self, ctx: Context) -> Optional[str]:
        """Why this model cannot be split over this many ranks, else None."""
        from mlx_lm.utils import _get_classes

        model_class, _ = _get_classes(ctx.config)
        if not hasattr(model_class, "shard"):
            return f"mlx-lm's {ctx.config.get('model_type')} model has no shard()"
        if ctx.group is None:
            return "MLX's MPI backend is not available (mx.distributed group missing)"
        if ctx.group.size() != ctx.size:
            return f"MLX group size {ctx.group.size()} != MPI size {ctx.size}"
        # shard() divides these by the group size without checking.
        for key in (
            "num_attention_heads",
            "num_key_value_heads",
            "moe_intermediate_size",
        ):
            value = ctx.config.get(key)
            if isinstance(value, int) and value % ctx.size:
                return f"{key}={value} is not divisible by {ctx.size} ranks"
        return None

    def build(self, ctx: Context) -> Built:
        from mlx_lm.utils import load_model

        # Lazy: each rank reads only the slices shard() keeps (plus transient
        # whole tensors while slicing), not the whole model first.
        model, _ = load_model(ctx.path, lazy=True)
        model.shard(ctx.group)
        tp_host_kernels = getattr(ctx.args, "tp_host_kernels", False)
        if tp_host_kernels:
            from ..host import use_host_kernels_tp

            use_host_kernels_tp(model)
        mx.eval(model.parameters())
        if tp_host_kernels:
            from ..pages import use_huge_pages

            use_huge_pages(model)  # as moe_mpi's own loading does
        return Built(
            "mlx-lm-tp", model, lambda fn: fn(model), range(ctx.size), counted="code"
        )


class SingleProcess:
    """Plain mlx-lm in one process: rank 0 runs it, the others sleep."""

    kind = "single"
    description = "plain mlx_lm on rank 0 alone (other ranks sleep in a barrier)"

    def build(self, ctx: Context) -> Built:
        from mlx_lm.utils import load_model

        model = load_model(ctx.path)[0] if ctx.rank == 0 else None

        def run(fn):
            result = fn(model) if ctx.rank == 0 else None
            quiet_barrier(ctx.ctl, idle=ctx.rank != 0)
            return result

        return Built("single", model, run, [0], counted="none")


def _central_drive(model, fn):
    from ..central import drive

    return drive(model, fn)


#: Mode name -> builder. Add a moe_mpi mode in one line (see the module doc).
MODES: Dict[str, Any] = {
    "ep": MoeMpiMode(
        "ep", description="moe_mpi expert parallel: one all-reduce per MoE layer"
    ),
    "central": MoeMpiMode(
        "central",
        drive=_central_drive,
        description="moe_mpi central router: rank 0 scatters tokens, gathers outputs",
    ),
    "mlx-lm-tp": MlxLmTensorParallel(),
    "single": SingleProcess(),
}


def mode_names() -> List[str]:
    """Every runnable mode: the registry plus any other ``moe_mpi.shard.MODES``."""
    from ..shard import MODES as LOAD_MODES

    names = [n for n in MODES if n not in ("mlx-lm-tp", "single")]
    names += [n for n in LOAD_MODES if n not in MODES]
    return names + ["mlx-lm-tp", "single"]


def mode_description(name: str, args: argparse.Namespace) -> str:
    """The header line of mode ``name``, with the options that change it."""
    text = get_mode(name).description
    if name == "mlx-lm-tp" and getattr(args, "tp_host_kernels", False):
        text += " + moe_mpi's CPU decode kernels (--tp-host-kernels)"
    return text


def get_mode(name: str):
    """The builder of mode ``name`` (unregistered load modes run SPMD)."""
    if name in MODES:
        return MODES[name]
    if name in mode_names():
        return MoeMpiMode(name)
    raise KeyError(name)


def _modes_arg(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = mode_names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(known)}"
        )
    return list(dict.fromkeys(names))


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, modes and output options shared by decode, prefill and layer."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model", metavar="PATH", help="local mlx-lm MoE model directory"
    )
    source.add_argument(
        "--synthetic",
        metavar="NAME",
        choices=list(SYNTHETIC),
        help=f"random-weight qwen3_moe model of a named shape: {', '.join(SYNTHETIC)} "
        "(default: dbrx-like)",
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=f"where synthetic models are written once (default: {default_cache_dir()})",
    )
    parser.add_argument(
        "--modes",
        type=_modes_arg,
        default=None,
        help=f"comma-separated modes, run one after another on the same model "
        f"(default: all: {','.join(mode_names())})",
    )
    parser.add_argument(
        "--backend",
        choices=("mpi4py", "mlx"),
        default="mpi4py",
        help="data path of moe_mpi's all-reduce (Communicator backend; default mpi4py)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the token ids")
    parser.add_argument(
        "--tp-host-kernels",
        action="store_true",
        help="give the mlx-lm-tp baseline moe_mpi's CPU decode kernels (one-row products, "
        "norms, RoPE, experts, and the fused decode step with mlx-lm's own all-reduces; "
        "moe_mpi.host.use_host_kernels_tp), so that it runs with the same fast paths as "
        "moe_mpi's modes",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="run the whole sequence of modes this many times in the job and report, "
        "per mode, the round with the median tok/s (a slow spell of a shared machine "
        "then cannot fall on one mode only; default 1)",
    )
    parser.add_argument(
        "--json", metavar="FILE", help="write machine info, command and rows as JSON"
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="bar chart of the results (needs matplotlib)"
    )


# ------------------------------------------------------------- measurement


def delta(after: Dict[str, Dict[str, float]], before: Dict[str, Dict[str, float]]):
    """Counter difference of two :meth:`Communicator.snapshot` results."""
    return {
        kind: {f: after[kind][f] - before.get(kind, {}).get(f, 0) for f in after[kind]}
        for kind in after
    }


@contextlib.contextmanager
def exclude_from_peak_rss(ctx: Context) -> Iterator[None]:
    """The memory a benchmark's own probe allocates (the STREAM arrays) does
    not count in the mode's peak RSS: the peak so far is kept in
    ``ctx.rss_floor_bytes`` and VmHWM is reset after the probe frees it."""
    peak = report.memory_info()["peak_rss_bytes"] or 0
    ctx.rss_floor_bytes = max(ctx.rss_floor_bytes, peak)
    try:
        yield
    finally:
        report.reset_peak_rss()


def timed_run(ctx: Context, built: Built, fn: Callable[[nn.Module], Any]):
    """Runs ``fn`` in ``built`` with the counters reset; per-rank wall time.

    Every rank: barrier, reset the model's counters, barrier, run, stop the
    clock. The ranks that only serve (``central`` workers) or wait
    (``single``) are timed over the same window, so their communication share
    is over the same step time.

    Returns:
        ``(result, wall_seconds, counters)``: ``fn``'s result on driving
        ranks (None elsewhere), this rank's wall time, and its counter
        snapshot for the run.
    """
    quiet_barrier(ctx.ctl, idle=False)
    ctx.comm.reset_stats()
    quiet_barrier(ctx.ctl, idle=False)
    start = time.perf_counter()
    result = built.run(fn)
    wall = time.perf_counter() - start
    return result, wall, ctx.comm.snapshot()


class _RecordRouting:
    """Mixin for a switch layer: counts routed (token, slot) pairs per expert."""

    def __call__(self, x, indices, *args, **kwargs):
        # [..., k] global expert ids -> one count per expert. Only used in
        # untimed warm-up: it reads the routing to the host.
        flat = np.asarray(indices).reshape(-1)
        self.bench_routing.append(np.bincount(flat, minlength=self.bench_num_experts))
        return super().__call__(x, indices, *args, **kwargs)


def _recording_route(block, calls: List[np.ndarray]):
    """``block.route`` of a fused MoE block, counting its pairs per expert into ``calls``."""
    route, num_experts = type(block).route, len(block.switch.ep_local_of)

    def recording(h):
        inds, scores = route(block, h)
        calls.append(np.bincount(inds.reshape(-1), minlength=num_experts))
        return inds, scores

    return recording


@contextlib.contextmanager
def record_routing(model: Optional[nn.Module]) -> Iterator[List[np.ndarray]]:
    """Records, per switch-layer call, how many pairs went to each expert.

    Yields a list that receives one ``[num_experts]`` count array per call
    (every MoE layer of every forward pass) while the context is open. A no-op
    (empty list) for models without MoE blocks on this rank.
    """
    from ..experts import with_mixin
    from ..shard import find_moe_blocks

    calls: List[np.ndarray] = []
    switches = []
    if model is not None:
        for moe in find_moe_blocks(model):
            switch = moe.switch
            num = getattr(switch, "ep_local_of", None)
            switch.bench_num_experts = len(num) if num is not None else moe.num_experts
            switch.bench_routing = calls
            switches.append((switch, type(switch)))
            switch.__class__ = with_mixin(_RecordRouting, type(switch))
    # The fused decode step (moe_mpi.fused) routes without calling the
    # switch layer: record its routing where it is computed.
    fused = getattr(model, "ep_fused_step", None) if model is not None else None
    blocks = [layer.mlp for layer in fused.layers if hasattr(layer.mlp, "route")] if fused else []
    for block in blocks:
        block.route = _recording_route(block, calls)
    try:
        yield calls
    finally:
        for switch, cls in switches:
            switch.__class__ = cls
            del switch.bench_routing, switch.bench_num_experts
        for block in blocks:
            del block.route  # the class's own again


def routing_imbalance(
    calls: Sequence[np.ndarray], owners: Optional[Sequence[int]], size: int
):
    """Load-imbalance proxy from routing: pairs per rank per MoE layer call.

    Args:
        calls: Per switch call, routed pairs per expert (:func:`record_routing`).
        owners: Owning rank of each expert (the placement), or None.
        size: Number of ranks.

    Returns:
        A dict: ``per_layer`` is the mean over calls of the busiest rank's
        pairs over the mean rank's (each layer's all-reduce waits for the
        busiest rank: 1.0 is balanced, ``size`` is all on one rank);
        ``total`` the same over all calls summed; ``pairs_per_rank`` the
        totals. None when there is nothing to measure.
    """
    if not calls or owners is None or size < 2:
        return None
    owners = np.asarray(owners)
    per_rank = np.stack([np.bincount(owners, weights=c, minlength=size) for c in calls])
    means = per_rank.mean(axis=1)
    ok = means > 0
    totals = per_rank.sum(axis=0)
    return {
        "per_layer": float(np.mean(per_rank[ok].max(axis=1) / means[ok])),
        "total": float(totals.max() / totals.mean()) if totals.mean() > 0 else None,
        "pairs_per_rank": [int(t) for t in totals],
        "calls": len(calls),
    }


def owners_of(model: Optional[nn.Module]) -> Optional[List[int]]:
    """Owner rank of each expert from ``model.ep_info`` (moe_mpi modes), else None."""
    info = getattr(model, "ep_info", None)
    if info is None or not info.placements:
        return None
    return [int(r) for r in info.placements[0].owners]


# -------------------------------------------------------------- exactness

#: The exactness guard's prompt length (tokens).
GUARD_TOKENS = 16


def guard_tokens(config: Dict[str, Any], seed: int) -> np.ndarray:
    """The fixed ``[1, GUARD_TOKENS]`` prompt of the exactness guard."""
    rng = np.random.default_rng(seed + 7919)
    return rng.integers(0, config["vocab_size"], size=(1, GUARD_TOKENS), dtype=np.int32)


def _logits(model: nn.Module, tokens: np.ndarray) -> np.ndarray:
    logits = model(mx.array(tokens))  # [1, L, V]
    return np.array(logits.astype(mx.float32))


def _release() -> None:
    """Returns freed arrays' memory: call after dropping the last reference."""
    gc.collect()
    mx.clear_cache()


# -------------------------------------------------------------------- loop


def run_modes(
    ctx: Context,
    names: Sequence[str],
    workload: Callable[[Context, Built], List[Dict[str, Any]]],
    emit: Callable[[str], None],
) -> Dict[str, Dict[str, Any]]:
    """Builds each mode in turn, checks its logits, runs ``workload``.

    Collective. For each mode: free the previous model, reset the peak memory
    counters, build (timed), compute the guard prompt's logits and compare
    them with plain mlx-lm's on rank 0, run ``workload(ctx, built)`` (which
    returns result rows, meaningful on rank 0), then gather each rank's peak
    memory.

    Returns:
        On rank 0, mode name -> ``{"status", "reason", "rows", "logits_max_abs_diff",
        "memory", "load_seconds", "description", "notes", "drivers",
        "counted"}``; on other ranks the same keys with rows possibly empty.
    """
    debug = ctx.args.debug
    tokens = guard_tokens(ctx.config, ctx.args.seed)
    # Plain mlx-lm's logits are the reference. If `single` runs, its own
    # logits are; otherwise a separate pass on rank 0 computes them first.
    order = sorted(names, key=lambda n: n != "single")
    reference: Optional[np.ndarray] = None
    if "single" not in names:
        with collective_phase(ctx.ctl, debug=debug):
            try:
                if ctx.rank == 0:
                    from mlx_lm.utils import load_model

                    model = load_model(ctx.path)[0]
                    reference = _logits(model, tokens)
                    del model
                    _release()
            finally:
                quiet_barrier(ctx.ctl, idle=ctx.rank != 0)
    results: Dict[str, Dict[str, Any]] = {}
    for name in order:
        builder = get_mode(name)
        entry: Dict[str, Any] = {
            "status": "ok",
            "description": mode_description(name, ctx.args),
            "reason": None,
            "rows": [],
            "notes": [],
        }
        results[name] = entry
        reason = None
        with collective_phase(ctx.ctl, debug=debug):
            check = getattr(builder, "unsupported", None)
            reason = check(ctx) if check else None
        reasons = ctx.ctl.allgather(reason)
        reason = next((r for r in reasons if r), None)
        if reason:
            entry.update(status="skipped", reason=reason)
            emit(f"# mode {name}: skipped: {reason}")
            continue
        _release()
        mx.reset_peak_memory()
        report.reset_peak_rss()
        ctx.rss_floor_bytes = 0
        start = time.perf_counter()
        built = None
        with collective_phase(ctx.ctl, debug=debug):
            built = builder.build(ctx)
        load_seconds = ctx.ctl.allreduce_max(time.perf_counter() - start)
        # What the mode keeps resident, as opposed to its peak while loading.
        entry["model_bytes"] = ctx.ctl.allgather(int(mx.get_active_memory()))
        fused = getattr(built.model, "ep_fused_step", None) is not None
        entry["fused_decode"] = fused
        step = "moe_mpi's fused step (moe_mpi.fused)" if fused else "the model's own code"
        emit(f"# mode {name}: built in {load_seconds:.1f} s; decode steps: {step}; running")
        logits = built.run(lambda m: _logits(m, tokens))
        diff = None
        if ctx.rank == 0:
            if name == "single":
                reference = logits  # runs first: the other modes' reference
            if reference is not None and logits is not None:
                diff = float(np.max(np.abs(logits - reference)))
                entry["logits_scale"] = float(np.max(np.abs(reference)))
                entry["logits_max_rel_diff"] = diff / max(entry["logits_scale"], 1e-30)
                entry["argmax_agrees"] = bool(
                    np.array_equal(logits.argmax(-1), reference.argmax(-1))
                )
        entry["logits_max_abs_diff"] = diff
        entry["drivers"] = list(built.drivers)
        entry["counted"] = built.counted
        entry["notes"] = list(built.notes)
        entry["load_seconds"] = load_seconds
        entry["rows"] = workload(ctx, built)
        entry["memory"] = ctx.ctl.allgather(report.memory_info(ctx.rss_floor_bytes))
        # Drop every reference (the run closure holds the model too) before
        # the next mode allocates its own.
        built.model = built.run_fn = None
        del built
        _release()
    return {name: results[name] for name in names}


# ----------------------------------------------------------------- harness

_ACTIVATION_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def tp_code_counts(config: Dict[str, Any], tokens_per_step: int) -> Dict[str, float]:
    """mlx-lm tensor parallelism's all-reduces per forward pass, from its code.

    ``Model.shard()`` makes every layer end its attention in a sharded-to-all
    ``o_proj`` and its MLP/MoE block in one ``mx.distributed.all_sum``: two
    all-reduces of ``[tokens, hidden]`` activations per layer.
    """
    layers = config["num_hidden_layers"]
    itemsize = _ACTIVATION_BYTES.get(config.get("torch_dtype", "float32"), 4)
    calls = 2 * layers
    return {
        "calls_per_step": calls,
        "bytes_per_step": calls * tokens_per_step * config["hidden_size"] * itemsize,
    }


def imbalance_for(built: Built, model, calls, size: int):
    """``(imbalance, method)`` of a mode, from a routing sample on rank 0."""
    if built.name == "mlx-lm-tp":
        return {
            "per_layer": 1.0
        }, "1.00 by construction (every rank holds a slice of every expert)"
    return routing_imbalance(calls, owners_of(model), size), "routing proxy"


def describe_model(config: Dict[str, Any], synthetic: Optional[str], path: Path) -> str:
    """One line: what model the benchmark ran."""
    # Generic names first, then the architectures' own (dbrx nests its MoE keys).
    flat = dict(config, **(config.get("ffn_config") or {}))

    def get(*keys):
        return next((flat[k] for k in keys if flat.get(k) is not None), "?")

    what = (
        f"{config.get('model_type')}, hidden {get('hidden_size', 'd_model')}, "
        f"{get('num_hidden_layers', 'n_layers')} layers, "
        f"{get('num_experts', 'num_local_experts', 'n_routed_experts', 'moe_num_experts')} "
        f"experts top-{get('num_experts_per_tok', 'moe_top_k')}, expert FFN "
        f"{get('moe_intermediate_size', 'ffn_hidden_size', 'intermediate_size')}, "
        f"vocab {get('vocab_size')}, {config.get('torch_dtype', '?')}"
    )
    if config.get("quantization"):
        what += f", {config['quantization'].get('bits')}-bit"
    name = f"synthetic {synthetic}" if synthetic else "model"
    return f"model: {name} ({what}) at {path}"


def _resolve_path(args: argparse.Namespace, ctl) -> tuple:
    """``(path, synthetic name or None)``; collective."""
    if args.model:
        from ..loading import resolve_model_path

        path = None
        with collective_phase(ctl, debug=args.debug):
            path = resolve_model_path(args.model)
        return path, None
    name = args.synthetic or "dbrx-like"
    return ensure_synthetic(name, ctl, args.cache_dir, args.debug), name


def run_benchmark(
    args: argparse.Namespace,
    *,
    benchmark: str,
    title: str,
    workload: Callable[[Context, Built], List[Dict[str, Any]]],
    method_lines: Sequence[str],
    render: Callable[[List[Dict[str, Any]]], List[str]],
    plot: Callable[[List[Dict[str, Any]], str, str], None],
    config_record: Dict[str, Any],
) -> int:
    """The main of a model benchmark: set up, run every mode, report on rank 0.

    Args:
        args: Parsed options (:func:`add_common_arguments` plus the bench's).
        benchmark: ``"decode"``, ``"prefill"`` or ``"layer"``.
        title: First header line.
        workload: ``workload(ctx, built)`` -> rows (on rank 0), per mode.
        method_lines: Header lines saying how it is measured.
        render: Rows -> table lines (rank 0).
        plot: ``plot(rows, filename, title)`` for ``--plot``.
        config_record: The bench's parameters, for the JSON.

    Returns:
        The exit status.
    """
    from mlx_lm.utils import load_config

    from ..comm import Communicator, mlx_group
    from ..runner import abort_on_error
    from .machine import header_lines, machine_info

    comm = Communicator(backend=args.backend)
    # Control traffic on a duplicate communicator, outside the model's counters.
    ctl = Communicator(comm.comm.Dup())

    def emit(line: str) -> None:
        if comm.rank == 0:
            print(line, flush=True)

    with abort_on_error(comm, debug=args.debug):
        with collective_phase(ctl, debug=args.debug):
            if comm.rank == 0:
                report.check_plot_available(args.plot)
                report.check_output_dirs(args.json, args.plot)
        path, synthetic = _resolve_path(args, ctl)
        config = None
        with collective_phase(ctl, debug=args.debug):
            config = load_config(Path(path))
        info = machine_info(ctl)
        blas = ctl.allgather(report.blas_info())
        ranks_per_host = {n["hostname"]: len(n["ranks"]) for n in info["nodes"]}
        group = mlx_group()
        ctx = Context(comm, ctl, Path(path), config, group, args)
        modes = args.modes or mode_names()
        model_line = describe_model(config, synthetic, path)
        version = report.code_version() if comm.rank == 0 else {}
        extra = [model_line]
        if version:
            modified = version["modified"]
            extra.append(
                f"moe_mpi: git {version['commit'][:12]}"
                + (f" + modified {', '.join(modified)}" if modified else " (clean)")
            )
        extra += [f"mode {n}: {mode_description(n, args)}" for n in modes]
        extra += report.blas_lines(blas, ranks_per_host)
        extra += list(method_lines)
        for line in header_lines(info, title, extra):
            emit(line)
        if comm.size == 1:
            emit("# NOTE: 1 rank: ep/central/mlx-lm-tp degenerate to one process")
        rounds = []
        for number in range(args.rounds):
            if args.rounds > 1:
                emit(f"# round {number + 1} of {args.rounds}")
            results = run_modes(ctx, modes, workload, emit)
            rows = report.attach_mode_info(results)
            for row in rows:
                row["round"] = number + 1
            rounds.append(rows)
        rows = report.median_rounds(rounds)
        if args.rounds > 1:
            for line in report.round_lines(rounds):
                emit(line)
        for line in render(rows):
            emit(line)
        for name, entry in results.items():
            if entry["status"] == "ok":
                diff = entry.get("logits_max_abs_diff")
                emit(
                    f"# {name}: built in {entry['load_seconds']:.1f} s; logits max |diff| vs "
                    f"mlx-lm {'n/a' if diff is None else f'{diff:.2e}'} (logit scale "
                    f"{entry.get('logits_scale', float('nan')):.1f}, argmax "
                    f"{'agrees' if entry.get('argmax_agrees') else 'DIFFERS'})"
                )
        with collective_phase(ctl, debug=args.debug):
            if comm.rank == 0:
                payload = {
                    "benchmark": benchmark,
                    "command": info["command"],
                    "launcher": info.get("launcher"),
                    "machine": info,
                    "blas": blas,
                    "warnings": report.blas_warnings(blas, ranks_per_host),
                    "world_size": comm.size,
                    "code_version": version,
                    "model": {
                        "path": str(path),
                        "synthetic": synthetic,
                        "config": config,
                        "description": model_line,
                    },
                    "config": dict(
                        config_record,
                        modes=modes,
                        backend=args.backend,
                        seed=args.seed,
                        rounds=args.rounds,
                    ),
                    "method": list(method_lines),
                    "modes": {
                        n: {k: v for k, v in e.items() if k != "rows"}
                        for n, e in results.items()
                    },
                    "rows": rows,
                    "rounds": rounds,
                }
                if args.json:
                    report.write_results(args.json, payload)
                if args.plot:
                    name = synthetic or Path(path).name
                    title = f"{name}, {comm.size} ranks ({info.get('cpu')})"
                    plot(rows, args.plot, title)
    return 0
