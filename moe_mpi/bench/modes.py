"""How one model is run across the ranks in ``moe-mpi bench decode | prefill | layer``.

A mode builds a :class:`Built` model on every rank, whose :meth:`Built.run`
calls a function with the model on the ranks that drive it. ``ep``,
``sliced`` and ``central`` are :func:`moe_mpi.load` modes (any other mode
name of :data:`moe_mpi.shard.MODES` works too: ``load(..., mode=NAME)``,
every rank running the model), and a mode that needs its own driver is
registered in one line::

    MODES["etp"] = MoeMpiMode("etp")

``mlx-lm-tp`` is mlx-lm's own tensor parallelism (``model.shard(group)``)
and ``single`` is plain mlx-lm in one process, the reference every other
mode's output is checked against.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..balance import BALANCE_CHOICES
from ..barrier import quiet_barrier

__all__ = ["Built", "Context", "MODES", "default_modes", "get_mode", "mode_description", "mode_names", "modes_arg", "tp_code_counts"]

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
            reset it (:func:`moe_mpi.bench.harness.exclude_from_peak_rss`);
            0 if none did.
        reference_run: The workload runs on single-process mlx-lm only for
            its outputs (the reference): it may skip its probes.
        reference: Those outputs once computed (rank 0's; ``{}`` on the
            others). Every round runs the same seeded workload, so later
            rounds check against them instead of recomputing.
    """

    comm: Any
    ctl: Any
    path: Path
    config: Dict[str, Any]
    group: Any
    args: argparse.Namespace
    rss_floor_bytes: int = 0
    reference_run: bool = False
    reference: Optional[Dict[str, Any]] = None

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
        guard: Install the routing guard (:func:`moe_mpi.guard.guard_routing`).
        name: The mode's name in the results (default ``mode``).
        balance: ``auto``: what hot experts may become (``load(balance=...)``);
            None: the command's ``--balance``.
        attention: ``load(attention=...)``: ``"split"`` for the ``+heads`` modes.
        lm_head: ``load(lm_head=...)``: ``"split"`` for the ``+vocab`` modes.
    """

    kind = "moe_mpi"

    def __init__(
        self, mode: str, drive: Optional[Callable] = None, description: str = "", guard: bool = False,
        name: Optional[str] = None, balance: Optional[str] = None, attention: str = "replicated",
        lm_head: str = "replicated",
    ):
        self.mode = mode
        self.drive = drive
        self.description = description or f"moe_mpi.load(mode={mode!r})"
        self.guard = guard
        self.name = name or mode
        self.balance = balance
        self.attention = attention
        self.lm_head = lm_head

    def build(self, ctx: Context) -> Built:
        from .. import load

        # Only auto balances by --stats: ep stays plain ep, the baseline it is measured against.
        options = {}
        if self.mode == "auto":
            options = dict(
                stats=getattr(ctx.args, "stats", None), replicas=getattr(ctx.args, "replicas", 0.0),
                balance=self.balance or getattr(ctx.args, "balance", "both"),
                profile=getattr(ctx.args, "profile", None),
            )
        model, _ = load(ctx.path, comm=ctx.comm, mode=self.mode, progress=False, attention=self.attention,
                        lm_head=self.lm_head, **options)
        if self.guard:
            from ..guard import guard_routing

            guard_routing(model)
        if self.drive is None:
            return Built(self.name, model, lambda fn: fn(model), range(ctx.size))
        drive = self.drive
        return Built(self.name, model, lambda fn: drive(model, fn), [0])


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
        from ..loading import model_classes

        model_class, _ = model_classes(ctx.config)
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
        mx.eval(model.parameters())
        if getattr(ctx.args, "tp_cpu_path", False):
            from ..comm import Communicator
            from ..cpu.tensor_parallel import accelerate_tensor_parallel

            accelerate_tensor_parallel(model, Communicator(backend="mlx", group=ctx.group))
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
    "ep-guarded": MoeMpiMode(
        "ep", guard=True, name="ep-guarded",
        description="ep with the routing guard: a routing check carried in each MoE layer's all-reduce",
    ),
    "auto": MoeMpiMode(
        "auto", description="moe_mpi auto: per layer, experts split, replicated or placed from --stats (uniform "
        "without); --balance says which"
    ),
    # auto with each --balance choice, to compare them in one job (the same rounds, the same machine state).
    **{
        f"auto-{choice}": MoeMpiMode(
            "auto", name=f"auto-{choice}", balance=choice,
            description="moe_mpi auto: " + {
                "split": "hot experts split across every rank, never copied",
                "replicate": "hot experts copied whole within --replicas, never split",
                "both": "hot experts split or copied, whichever the cost model prefers",
            }[choice],
        )
        for choice in BALANCE_CHOICES
    },
    # Each with the attention split by heads too: a second all-reduce per layer (moe_mpi.attention).
    **{
        f"{mode}+heads": MoeMpiMode(
            mode, name=f"{mode}+heads", attention="split",
            description=f"moe_mpi {mode} with the attention split by heads: two all-reduces per layer",
        )
        for mode in ("ep", "sliced", "auto")
    },
    # And with the LM head split by vocabulary rows: one all-gather per step (moe_mpi.vocab).
    **{
        f"{mode}{heads}+vocab": MoeMpiMode(
            mode, name=f"{mode}{heads}+vocab", attention="split" if heads else "replicated", lm_head="split",
            description=f"moe_mpi {mode}{' with the attention split by heads,' if heads else ''} with the LM head "
            "split by vocabulary rows: one all-gather of the logits per step",
        )
        for mode in ("ep", "sliced", "auto") for heads in ("", "+heads")
    },
    "central": MoeMpiMode(
        "central",
        drive=_central_drive,
        description="moe_mpi central router: rank 0 scatters tokens, gathers outputs",
    ),
    "mlx-lm-tp": MlxLmTensorParallel(),
    "single": SingleProcess(),
}


#: Modes run only when named in ``--modes``, not by default.
OPT_IN = (
    ("ep-guarded",) + tuple(f"auto-{choice}" for choice in BALANCE_CHOICES) + ("ep+heads", "sliced+heads", "auto+heads")
    + tuple(f"{mode}{heads}+vocab" for mode in ("ep", "sliced", "auto") for heads in ("", "+heads"))
)


def default_modes() -> List[str]:
    """The modes a benchmark runs without ``--modes``."""
    return [n for n in mode_names() if n not in OPT_IN]


def mode_names() -> List[str]:
    """Every runnable mode: the registry plus any other ``moe_mpi.shard.MODES``."""
    from ..shard import MODES as LOAD_MODES

    names = [n for n in MODES if n not in ("mlx-lm-tp", "single")]
    names += [n for n in LOAD_MODES if n not in MODES]
    return names + ["mlx-lm-tp", "single"]


def mode_description(name: str, args: argparse.Namespace) -> str:
    """The header line of mode ``name``, with the options that change it."""
    text = get_mode(name).description
    if name == "mlx-lm-tp" and getattr(args, "tp_cpu_path", False):
        text += " + moe_mpi's CPU speed path (--tp-cpu-path)"
    mode = get_mode(name)
    if getattr(mode, "mode", None) == "auto":
        balance = mode.balance or getattr(args, "balance", "both")
        text += f" [balance {balance}, replicas {getattr(args, 'replicas', 0.0):g}]"
    return text


def get_mode(name: str):
    """The builder of mode ``name`` (unregistered load modes run SPMD)."""
    if name in MODES:
        return MODES[name]
    if name in mode_names():
        return MoeMpiMode(name)
    raise KeyError(name)


def modes_arg(text: str) -> List[str]:
    """``"ep,sliced"`` -> ``["ep", "sliced"]``, known modes only, for argparse."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = mode_names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(known)}"
        )
    return list(dict.fromkeys(names))


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
