"""The expert-parallel sharding pass over a built mlx-lm model.

Every rank runs the same program on a replicated dense model (embeddings,
attention, norms, routers, LM head). For each MoE block this pass

1. keeps only the rank's experts in the block's switch layer
   (:mod:`moe_mpi.experts`), stacked, one tensor per projection;
2. splits the block's shared experts along their intermediate dimension, so
   each rank adds its slice of the shared output to its partial sum;
3. swaps the block's class for one whose ``__call__`` is the block's own
   ``__call__`` followed by exactly one all-reduce (:class:`ExpertParallelBlock`).

The block's output must be linear in the switch layer's output and in the
shared experts' outputs (true of every mlx-lm MoE block: a router-weighted sum
plus, optionally, a gated shared term). That is the partial-sum contract: the
sum over ranks of each rank's block output is the unsharded block output.

Parameter paths do not change, so mlx-lm's quantization and weight names keep
working. The pass returns a plan, ``{param path: source}``, saying which slice
of which checkpoint tensor each sharded parameter holds; :mod:`moe_mpi.loading`
reads exactly those slices from disk.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import (
    QuantizedSwitchLinear,
    SwitchGLU,
    SwitchLinear,
    SwitchMLP,
)

from . import central, cpu
from .adapters import convert_blocks
from .experts import ExpertShard, LocalExperts, make_local, with_mixin
from .placement import ExpertPlacement


@dataclass(frozen=True, eq=False)
class Take:
    """Positions ``index`` along ``axis`` of checkpoint tensor ``key``."""

    key: str
    axis: int
    index: np.ndarray


@dataclass(frozen=True, eq=False)
class StackOf:
    """Checkpoint tensors ``keys`` (one per expert) stacked on a new axis 0.

    With ``index``, each tensor contributes only positions ``index`` along
    its ``axis`` (mode="sliced": the same slice of every expert).
    """

    keys: Tuple[str, ...]
    axis: int = 0
    index: Optional[np.ndarray] = None


def per_expert_source(keys: Sequence[str], take: Take) -> StackOf:
    """Turns a :class:`Take` of a stacked ``[E, ...]`` tensor into reads of
    the per-expert tensors ``keys`` (expert e's tensor is ``keys[e]``)."""
    if take.axis == 0:  # whole experts: only the local ones
        return StackOf(tuple(keys[int(i)] for i in take.index))
    return StackOf(tuple(keys), take.axis - 1, take.index)


Source = Union[Take, StackOf]
Plan = Dict[str, Source]

SWITCH_TYPES = (SwitchGLU, SwitchMLP)
MODES = ("ep", "sliced", "central")
LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
# Names mlx-lm gives the input and output projections of a (shared) MLP.
IN_PROJ = ("gate_proj", "up_proj", "fc1", "w1", "w3", "v1")
OUT_PROJ = ("down_proj", "fc2", "w2")


class ExpertParallelBlock:
    """Mixin for an mlx-lm MoE block: the block on local experts, one all-reduce.

    The block's own ``__call__`` routes (its router is replicated, so every
    rank computes the same routing), runs the local experts and this rank's
    slice of the shared experts, and returns this rank's partial sum.
    """

    def __call__(self, x, *args, **kwargs):
        partial = super().__call__(x, *args, **kwargs)  # [..., D], this rank's share
        return self.expert_shard.comm.all_sum(partial)  # the one collective of this layer


def _make_expert_parallel(block: nn.Module, shard: ExpertShard) -> None:
    block.expert_shard = shard
    block.__class__ = with_mixin(ExpertParallelBlock, type(block))


@dataclass(frozen=True)
class ShardInfo:
    """What :func:`shard_structure` did, kept on the model as ``model.ep_info``."""

    rank: int
    size: int
    num_moe_layers: int
    placements: Tuple[ExpertPlacement, ...]
    mode: str = "ep"
    switches: Tuple[nn.Module, ...] = ()


@dataclass
class MoEBlock:
    """A MoE block found in a model: its path and the name of its switch layer."""

    path: str
    block: nn.Module
    switch_name: str

    @property
    def switch(self) -> nn.Module:
        return self.block[self.switch_name]

    @property
    def switch_path(self) -> str:
        """The switch layer's parameter path prefix, e.g. ``model.layers.0.mlp.switch_mlp``."""
        return f"{self.path}.{self.switch_name}" if self.path else self.switch_name

    @property
    def num_experts_total(self) -> int:
        """Experts the router chooses from (the switch may hold fewer)."""
        if isinstance(self.switch, LocalExperts):
            return self.switch.expert_shard.num_experts
        return self.num_experts

    @property
    def num_experts(self) -> int:
        sizes = {a.shape[0] for _, a in tree_flatten(self.switch.parameters())}
        if len(sizes) != 1:
            raise ValueError(f"{self.path}: expert tensors disagree on experts: {sizes}")
        return sizes.pop()


def find_moe_blocks(model: nn.Module) -> List[MoEBlock]:
    """Lists the MoE blocks of a model: modules with a switch-layer child."""
    blocks = []
    for path, module in model.named_modules():
        for name, child in module.children().items():
            if isinstance(child, SWITCH_TYPES):
                blocks.append(MoEBlock(path, module, name))
    return sorted(blocks, key=lambda b: b.path)


def resolve_placement(
    placement: Union[ExpertPlacement, str, None],
    num_experts: int,
    num_ranks: int,
    weights: Optional[Sequence[float]] = None,
) -> ExpertPlacement:
    """Turns a placement argument into an :class:`ExpertPlacement`.

    Args:
        placement: An ``ExpertPlacement``; ``"contiguous"``, ``"round-robin"``
            or a JSON file path; or ``None`` for contiguous blocks.
        num_experts: Experts the router chooses from.
        num_ranks: Ranks to place them on.
        weights: Optional relative share per rank, e.g. ``[2, 1, 1]``.
    """
    if isinstance(placement, ExpertPlacement):
        if (placement.num_experts, placement.num_ranks) != (num_experts, num_ranks):
            raise ValueError(
                f"placement is for num_experts={placement.num_experts}, "
                f"num_ranks={placement.num_ranks}; the model has "
                f"num_experts={num_experts} and the run has num_ranks={num_ranks}"
            )
        return placement
    return ExpertPlacement.create(
        num_experts, num_ranks, strategy=placement or "contiguous", weights=weights
    )


def take(a: mx.array, axis: int, index: np.ndarray) -> mx.array:
    """``a`` at positions ``index`` along ``axis``: a slice when they are consecutive."""
    if index.size and np.all(np.diff(index) == 1):
        sl = (slice(None),) * axis + (slice(int(index[0]), int(index[-1]) + 1),)
        return a[sl]
    return mx.take(a, mx.array(index), axis=axis)


def _shard_switch(moe: MoEBlock, shard: ExpertShard) -> Plan:
    """Keeps the rank's experts in the switch layer; returns their sources."""
    local = np.asarray(shard.experts, dtype=np.int64)
    prefix = moe.switch_path
    plan, sliced = {}, []
    for name, a in tree_flatten(moe.switch.parameters()):
        plan[f"{prefix}.{name}"] = Take(f"{prefix}.{name}", 0, local)
        sliced.append((name, take(a, 0, local)))
    moe.switch.update(tree_unflatten(sliced))
    make_local(moe.switch, shard)
    # Adapters for models that store experts one module each (dbrx) say where
    # expert e's tensors are; otherwise the checkpoint holds stacked tensors.
    return _adapter_sources(moe, plan)


def _adapter_sources(moe: MoEBlock, plan: Plan) -> Plan:
    """Where an adapter says expert e's tensors are (dbrx), reads those."""
    templates = getattr(moe.block, "expert_keys", None)
    if not templates:
        return plan
    block_prefix = f"{moe.path}." if moe.path else ""
    out = {}
    for key, take in plan.items():
        proj, leaf = key.rsplit(".", 2)[-2:]
        keys = [f"{block_prefix}{templates[proj].format(e=e)}.{leaf}" for e in range(moe.num_experts_total)]
        out[key] = per_expert_source(keys, take)
    return out


def _is_quantized(m: nn.Module) -> bool:
    return isinstance(m, (nn.QuantizedLinear, QuantizedSwitchLinear))


def _linear_dims(m: nn.Module) -> Optional[Tuple[int, int]]:
    """(in_dims, out_dims) of a float or quantized (switch) linear, else None."""
    if not isinstance(m, LINEAR_TYPES):
        return None
    w = m.weight  # [(E,) out, in] (in packed when quantized)
    return (w.shape[-1] * 32 // m.bits if _is_quantized(m) else w.shape[-1]), w.shape[-2]


def _split_bounds(mlp: nn.Module, rank: int, size: int) -> Optional[Tuple[int, int]]:
    """This rank's [start, stop) of an MLP's intermediate dimension.

    Works for a shared MLP and for a stacked switch layer alike. Returns None
    where the module is not in-projections / elementwise / out-projection, or
    cannot be cut into ``size`` non-empty slices that respect the
    quantization groups.
    """
    children = {n: c for n, c in mlp.children().items() if tree_flatten(c.parameters())}
    outs = [n for n in children if n in OUT_PROJ]
    ins = [n for n in children if n in IN_PROJ]
    if len(outs) != 1 or not ins or len(ins) + 1 != len(children):
        return None
    dims = {n: _linear_dims(children[n]) for n in children}
    if any(d is None for d in dims.values()):
        return None
    out = children[outs[0]]
    inter = dims[outs[0]][0]
    if any(dims[n][1] != inter for n in ins) or "bias" in out:
        return None
    unit = 1
    if _is_quantized(out):
        # A slice of the packed input axis must hold whole groups and words.
        unit = out.group_size
        if (unit * out.bits) % 32:
            return None
    if inter % unit or inter // unit < size:
        return None
    chunks = np.array_split(np.arange(inter // unit), size)[rank]
    return int(chunks[0]) * unit, (int(chunks[-1]) + 1) * unit


def _shard_intermediate(prefix: str, mlp: nn.Module, rank: int, size: int) -> Optional[Plan]:
    """Keeps this rank's slice of an MLP's intermediate dimension.

    For a shared MLP (``[out, in]`` weights) or a stacked switch layer
    (``[E, out, in]``: every expert keeps the same slice). Returns None if the
    module cannot be split.
    """
    bounds = _split_bounds(mlp, rank, size)
    if bounds is None:
        return None
    start, stop = bounds
    plan, sliced = {}, []
    for pname, a in tree_flatten(mlp.parameters()):
        proj, leaf = pname.split(".", 1)
        lin = mlp[proj]
        lead = lin.weight.ndim - 2  # 1 for stacked experts
        if proj in IN_PROJ:  # rows of the intermediate dimension
            axis, lo, hi = lead, start, stop
        elif leaf == "weight" and _is_quantized(lin):
            axis, lo, hi = lead + 1, start * lin.bits // 32, stop * lin.bits // 32
        elif _is_quantized(lin):  # scales, biases: one per group
            axis, lo, hi = lead + 1, start // lin.group_size, stop // lin.group_size
        else:
            axis, lo, hi = lead + 1, start, stop
        index = np.arange(lo, hi)
        plan[f"{prefix}.{pname}"] = Take(f"{prefix}.{pname}", axis, index)
        sliced.append((pname, take(a, axis, index)))
    mlp.update(tree_unflatten(sliced))
    return plan


class NoOutput(nn.Module):
    """Stands in for a shared MLP on ranks that do not compute it."""

    def __call__(self, x: mx.array) -> mx.array:
        return mx.zeros_like(x)


def shared_children(block: nn.Module) -> List[str]:
    """Names of a block's shared-expert MLPs (``shared_expert(s)``, ``shared_mlp``)."""
    return [
        n
        for n, c in block.children().items()
        if n.startswith("shared") and not n.endswith("gate") and isinstance(c, nn.Module)
    ]


def shard_structure(
    model: nn.Module,
    comm,
    placement: Union[ExpertPlacement, str, None] = None,
    weights: Optional[Sequence[float]] = None,
    mode: str = "ep",
) -> Plan:
    """Rewrites a model in place into this rank's shard.

    Arrays are sliced lazily: on a model with real weights the caller
    evaluates them (:func:`shard_experts`); :func:`moe_mpi.loading.load`
    instead overwrites them with slices read from disk.

    Args:
        model: An mlx-lm model with MoE blocks.
        comm: The communicator (``rank``, ``size``, ``all_sum``, ...).
        placement: See :func:`resolve_placement`.
        weights: Optional relative share of experts per rank.
        mode: ``"ep"``, expert parallel: each rank owns whole experts;
            replicated dense part; one all-reduce per MoE layer.
            ``"sliced"``: each rank holds a slice of every expert's
            intermediate dimension (like the shared experts); perfectly
            balanced; still one all-reduce per MoE layer.
            ``"central"``: rank 0 runs the dense part and routes; the
            experts' owners serve it (:mod:`moe_mpi.central`).

    Returns:
        The plan: for each sharded parameter path, where its values come from.

    Raises:
        ValueError: The model has no MoE block, or the placement cannot work.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    convert_blocks(model)
    blocks = find_moe_blocks(model)
    if not blocks:
        model_type = getattr(getattr(model, "args", None), "model_type", type(model).__name__)
        raise ValueError(
            f"model_type={model_type!r} has no MoE block (no SwitchGLU/SwitchMLP "
            "layer): moe_mpi shards Mixture-of-Experts models only"
        )
    for moe in blocks:
        if isinstance(moe.switch, LocalExperts):
            raise ValueError(f"{moe.path} is already sharded")
    rank, size = comm.rank, comm.size
    plan: Plan = {}
    placements = {}
    for layer, moe in enumerate(blocks):
        n = moe.num_experts
        if mode == "sliced":
            # Every rank holds every expert, a slice of its intermediate dim.
            switch_plan = _shard_intermediate(moe.switch_path, moe.switch, rank, size)
            if switch_plan is None:
                raise ValueError(
                    f"{moe.path}: mode='sliced' needs expert layers with in/out "
                    f"projections, no output bias, and an intermediate size that "
                    f"splits into num_ranks={size} whole quantization groups"
                )
            plan.update(_adapter_sources(moe, switch_plan))
            shard = ExpertShard(layer, n, tuple(range(n)), comm)
            make_local(moe.switch, shard)
        else:
            if n not in placements:
                placements[n] = resolve_placement(placement, n, size, weights)
            shard = ExpertShard(layer, n, placements[n].local_experts(rank), comm, placements[n])
            plan.update(_shard_switch(moe, shard))
        if mode == "central":
            # The dense part, shared experts included, runs on rank 0 alone.
            central.make_central(moe.switch)
            continue
        for name in shared_children(moe.block):
            shared_plan = _shard_intermediate(f"{moe.path}.{name}" if moe.path else name, moe.block[name], rank, size)
            if shared_plan is not None:
                plan.update(shared_plan)
            else:
                # Not splittable: the rank with the fewest experts computes it.
                owner = int(np.argmin(placements[n].counts)) if mode != "sliced" else 0
                if rank != owner:
                    setattr(moe.block, name, NoOutput())
        _make_expert_parallel(moe.block, shard)
    switches = tuple(moe.switch for moe in blocks)
    # A dataclass, not a tuple: nn.Module would take a tuple for parameters.
    model.ep_info = ShardInfo(rank, size, len(blocks), tuple(placements.values()), mode, switches)
    return plan


def expert_parameters(model: nn.Module) -> set:
    """Paths of the parameters that belong to (this rank's) experts."""
    return {
        f"{moe.switch_path}.{name}"
        for moe in find_moe_blocks(model)
        for name, _ in tree_flatten(moe.switch.parameters())
    }


def drop_dense(model: nn.Module) -> None:
    """Central-mode workers: frees every parameter that is not an expert's."""
    keep = expert_parameters(model)
    empty = [(k, mx.zeros((0,), a.dtype)) for k, a in tree_flatten(model.parameters()) if k not in keep]
    model.update(tree_unflatten(empty))


def shard_experts(
    model: nn.Module,
    comm=None,
    placement: Union[ExpertPlacement, str, None] = None,
    weights: Optional[Sequence[float]] = None,
    mode: str = "ep",
) -> nn.Module:
    """Shards an already built (and loaded) mlx-lm MoE model across ranks.

    Each rank keeps its own experts and its slice of the shared experts, and
    every MoE block ends in one all-reduce. The model stays an mlx-lm model:
    ``mlx_lm.generate`` and prompt caches work with it unchanged.

    Args:
        model: An mlx-lm model with MoE blocks. It is changed in place.
        comm: A :class:`moe_mpi.Communicator`; ``Communicator()`` if None.
        placement: See :func:`resolve_placement`.
        weights: Optional relative share of experts per rank.
        mode: ``"ep"`` (default) or ``"central"``; see :func:`shard_structure`.

    Returns:
        The same model, sharded.
    """
    if comm is None:
        from .comm import Communicator

        comm = Communicator()
    shard_structure(model, comm, placement, weights, mode)
    if mode == "central" and comm.rank != 0:
        drop_dense(model)  # workers hold only their experts
    mx.eval(model.parameters())
    cpu.accelerate(model)  # MLX's Linux CPU backend only; nothing on Metal
    return model
