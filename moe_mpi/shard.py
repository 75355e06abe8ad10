"""The one all-reduce per MoE layer (ExpertParallelBlock) and the sharding pass that puts it there.

Every rank runs the same program on a replicated dense model (embeddings,
attention, norms, routers, LM head). For each MoE block this pass

1. keeps only the rank's experts in the block's switch layer
   (:mod:`moe_mpi.experts`), stacked, one tensor per projection;
2. splits the block's shared experts along their intermediate dimension, so
   each rank adds its slice of the shared output to its partial sum;
3. swaps the block's class for one whose ``__call__`` is the block's own
   ``__call__`` followed by exactly one all-reduce (:class:`ExpertParallelBlock`).

The block's output must be linear in the switch layer's output and in the
shared experts' outputs (true of most mlx-lm MoE blocks: a router-weighted sum
plus, optionally, a gated shared term). That is the partial-sum contract: the
sum over ranks of each rank's block output is the unsharded block output.
:mod:`moe_mpi.contract` checks it before splitting: it refuses a block that
breaks it, and finds blocks that add a term needing no expert, which one rank
then keeps (:meth:`ExpertParallelBlock.partial_sum`).

Parameter paths do not change, so mlx-lm's quantization and weight names keep
working. The pass returns a plan, ``{param path: source}``, saying which slice
of which checkpoint tensor each sharded parameter holds; :mod:`moe_mpi.loading`
reads exactly those slices from disk.
"""

import sys
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from . import central, cpu
from .balance import auto_layout, ep_layout
from .adapters import convert_blocks
from .attention import ATTENTION_CHOICES, split_attention
from .contract import check_partial_sums, silenced
from .digest import array_digest
from .experts import ExpertShard, LocalExperts, layer_order, make_local, with_mixin
from .layout import Layout, layouts_from_json
from .placement import ExpertPlacement
from .rowcost import RowCost, read_row_cost
from .runner import PROG
from .slicing import (
    Plan, is_quantized, keep_rows, keep_slice, per_expert_source, slice_bounds, slice_unit, split_child,
)
from .unread import Skippable
from .vocab import LM_HEAD_CHOICES, split_lm_head

SWITCH_TYPES = (SwitchGLU, SwitchMLP)
MODES = ("ep", "sliced", "central", "auto")


class ExpertParallelBlock(Skippable):
    """Mixin for an mlx-lm MoE block: the block on local experts, one all-reduce.

    The block's own ``__call__`` routes (its router is replicated, so every
    rank computes the same routing), runs the local experts and this rank's
    slice of the shared experts, and returns this rank's partial sum.
    In a prompt chunk whose logits nobody reads, the last block is skipped
    (:mod:`moe_mpi.unread`).
    """

    skip_kind = "moe"

    def __call__(self, x, *args, **kwargs):
        if self.output_unread is not None:
            return self.unread(x)  # nothing downstream of it is read: no experts, no all-reduce
        partial = self.partial_sum(x, *args, **kwargs)  # [..., D], this rank's share
        guard = self.__dict__.get("routing_guard")  # moe_mpi.guard: the same all-reduce, checked
        if guard is not None:
            return guard.block_all_sum(self, x, partial, args, kwargs)
        return self.expert_shard.comm.all_sum(partial)  # the one collective of this layer

    def partial_sum(self, x, *args, **kwargs):
        """This rank's share of the block's output: the mlx-lm block on local experts."""
        partial = super().__call__(x, *args, **kwargs)
        experts = self.__dict__.get("expert_free_elsewhere")
        if experts:
            # The block adds a term that needs no expert (longcat_flash's identity
            # experts): another rank keeps it, this one takes it off again.
            with silenced(self, experts):
                partial = partial - super().__call__(x, *args, **kwargs)
        return partial


def _make_expert_parallel(block: nn.Module, shard: ExpertShard) -> None:
    block.expert_shard = shard
    block.__class__ = with_mixin(ExpertParallelBlock, type(block))


@dataclass(frozen=True)
class ShardInfo:
    """What :func:`shard_structure` did, kept on the model as ``model.ep_info``.

    Attributes:
        layouts: Each MoE layer's :class:`moe_mpi.layout.Layout`.
        placements: The expert placements of ``ep`` and ``central`` (one
            per distinct expert count), else empty.
        attention: ``"replicated"`` or ``"split"`` (:mod:`moe_mpi.attention`).
        attention_layers: Attention modules split by heads, each ending in an all-reduce.
        attention_kept: With the split, why each kind of attention kept whole was kept.
        lm_head: ``"replicated"`` or ``"split"`` (:mod:`moe_mpi.vocab`).
        lm_head_path: With the split, the head's module path.
    """

    rank: int
    size: int
    num_moe_layers: int
    placements: Tuple[ExpertPlacement, ...]
    mode: str = "ep"
    switches: Tuple[nn.Module, ...] = ()
    layouts: Tuple[Layout, ...] = ()
    attention: str = "replicated"
    attention_layers: int = 0
    attention_kept: Tuple[str, ...] = ()
    lm_head: str = "replicated"
    lm_head_path: str = ""

    @property
    def all_reduces_per_call(self) -> int:
        """All-reduces of one forward call: one per MoE layer, and one per split attention."""
        return self.num_moe_layers + self.attention_layers

    def experts_per_rank(self) -> List[str]:
        """Per rank, the experts it holds whole per layer (a range if layers differ), and how many are split."""
        lines = []
        for r in range(self.size):
            whole = sorted({len(lay.whole_on(r)) for lay in self.layouts})
            split = sorted({len(lay.split) for lay in self.layouts})
            text = "/".join(map(str, whole)) if len(whole) <= 2 else f"{whole[0]}-{whole[-1]}"
            if split != [0]:
                text += f" whole + slices of {'/'.join(map(str, split))}"
            lines.append(text)
        return lines


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
    """Lists the MoE blocks of a model (modules with a switch-layer child), in layer order."""
    blocks = []
    for path, module in model.named_modules():
        if isinstance(module, SWITCH_TYPES):  # a switch layer's own `split` child is not a block
            continue
        for name, child in module.children().items():
            if isinstance(child, SWITCH_TYPES):
                blocks.append(MoEBlock(path, module, name))
    return sorted(blocks, key=lambda b: layer_order(b.path))


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


def _shard_switch(moe: MoEBlock, shard: ExpertShard, weights: Optional[Sequence[float]], mode: str) -> Plan:
    """Cuts the switch layer to this rank's part of ``shard.layout``; returns the sources.

    Every expert split: the switch layer keeps this rank's slice of each.
    Otherwise it keeps the experts this rank holds whole, and a child
    ``switch.split`` holds its slice of each split expert.
    """
    switch, layout, prefix = moe.switch, shard.layout, moe.switch_path
    size, rank = layout.num_ranks, shard.rank
    bounds = None
    if layout.split:
        bounds = slice_bounds(switch, rank, size, weights)
        if bounds is None:
            raise ValueError(
                f"{moe.path}: mode={mode!r} needs expert layers with in/out projections, no output bias, "
                f"and an intermediate size that splits into num_ranks={size} whole quantization groups, "
                "to split experts"
            )
    if len(layout.split) == layout.num_experts:
        plan = keep_slice(prefix, switch, bounds)
        make_local(switch, shard)
        return _adapter_sources(moe, plan)
    plan, child = {}, None
    if layout.split:  # before the switch layer loses the experts the child reads
        child, plan = split_child(prefix, switch, layout.split, bounds)
    plan.update(keep_rows(prefix, switch, shard.experts))
    make_local(switch, shard)
    if child is not None:
        switch.split = child
        make_local(child, ExpertShard(shard.layer, shard.num_experts, layout.split, shard.comm, rank=rank, is_child=True))
    return _adapter_sources(moe, plan)


def _adapter_sources(moe: MoEBlock, plan: Plan) -> Plan:
    """Where an adapter says expert e's tensors are (dbrx), reads those."""
    templates = getattr(moe.block, "expert_keys", None)
    if not templates:
        return plan
    block_prefix = f"{moe.path}." if moe.path else ""
    out = {}
    for key, source in plan.items():
        proj, leaf = key.rsplit(".", 2)[-2:]
        keys = [f"{block_prefix}{templates[proj].format(e=e)}.{leaf}" for e in range(moe.num_experts_total)]
        out[key] = per_expert_source(keys, source)
    return out


class NoOutput(nn.Module):
    """Stands in for a shared MLP on ranks that do not compute it."""

    def __call__(self, x: mx.array) -> mx.array:
        return mx.zeros_like(x)


def shared_children(block: nn.Module) -> List[str]:
    """Names of a block's shared-expert MLPs: its children, besides the switch layer, that are
    named ``share*`` (``shared_expert(s)``, ``shared_mlp``, step3p5's ``share_expert``) or
    shaped like an MLP (in-projections, one out-projection), except a ``*gate``
    (qwen2_moe's ``shared_expert_gate`` scales the shared output; it is not an expert).

    :func:`moe_mpi.contract.check_partial_sums` checks that each is called on
    the block's input and only added to its output.
    """
    return [
        n
        for n, c in block.children().items()
        if isinstance(c, nn.Module) and not isinstance(c, SWITCH_TYPES) and not n.endswith("gate")
        and (n.startswith("share") or slice_unit(c) is not None)
    ]


def shard_structure(
    model: nn.Module,
    comm,
    placement: Union[ExpertPlacement, str, None] = None,
    weights: Optional[Sequence[float]] = None,
    mode: str = "ep",
    layouts: Union[Sequence[Layout], str, None] = None,
    stats=None,
    replicas: float = 0.0,
    balance: str = "both",
    profile=None,
    check_contract: bool = True,
    attention: str = "replicated",
    lm_head: str = "replicated",
) -> Plan:
    """Rewrites a model in place into this rank's shard.

    Arrays are sliced lazily: on a model with real weights the caller
    evaluates them (:func:`shard_experts`); :func:`moe_mpi.loading.load`
    instead overwrites them with slices read from disk.

    Args:
        model: An mlx-lm model with MoE blocks.
        comm: The communicator (``rank``, ``size``, ``all_sum``, ...).
        placement: See :func:`resolve_placement` (``ep``, ``central``).
        weights: Optional relative share of experts per rank (and of each
            split expert's slices).
        mode: ``"ep"``, expert parallel: each rank owns whole experts;
            replicated dense part; one all-reduce per MoE layer.
            ``"sliced"``: each rank holds a slice of every expert's
            intermediate dimension (like the shared experts); perfectly
            balanced; still one all-reduce per MoE layer.
            ``"auto"``: per layer, hot experts split or replicated and the
            rest placed to even out the expected load, from ``stats``
            (:mod:`moe_mpi.balance`); still one all-reduce per layer.
            ``"central"``: rank 0 runs the dense part and routes; the
            experts' owners serve it (:mod:`moe_mpi.central`).
        layouts: Each MoE layer's :class:`moe_mpi.layout.Layout`, or a
            layouts file (``moe-mpi balance`` writes one), for ``ep``,
            ``auto`` or ``central``; overrides ``placement`` and ``stats``.
        stats: Router statistics (:class:`moe_mpi.routing.RoutingStats`):
            ``ep`` places each layer's experts by them, ``auto`` balances by
            them (uniform routing without).
        replicas: ``auto``: extra expert copies each rank may hold (memory
            budget, in experts per layer).
        balance: ``auto``: what may happen to hot experts: ``"split"``,
            ``"replicate"`` (copies within ``replicas``) or ``"both"``
            (:data:`moe_mpi.balance.BALANCE_CHOICES`).
        profile: ``auto``: the price of rows, from a ``moe-mpi calibrate``
            profile (its file, its JSON object, or a
            :class:`moe_mpi.rowcost.RowCost`); the table of the model's
            weight format (``q4`` if quantized, else ``float32``) is used.
            None: the default price. The layouts carry it.
        check_contract: Check each kind of MoE block against the partial-sum
            contract (:mod:`moe_mpi.contract`) when it is to be split; False
            for a memory plan, which never runs the model.
        attention: ``"replicated"`` (every rank computes every head) or
            ``"split"``: each rank its share of the key/value heads, in
            proportion to ``weights``, and the attention ends in its own
            all-reduce (:mod:`moe_mpi.attention`); not with ``central``.
        lm_head: ``"replicated"`` (every rank computes every logit) or
            ``"split"``: each rank its share of the vocabulary rows, in
            proportion to ``weights``, joined by one all-gather per forward
            call (:mod:`moe_mpi.vocab`); not with ``central``.

    Returns:
        The plan: for each sharded parameter path, where its values come from.

    Raises:
        ValueError: The model has no MoE block, a block breaks the partial-sum
            contract (:func:`moe_mpi.contract.check_partial_sums`), or the
            placement cannot work.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention={attention!r}: expected one of {ATTENTION_CHOICES}")
    if attention == "split" and mode == "central":
        raise ValueError("attention='split' needs every rank to run the dense part; mode='central' runs it on rank 0")
    if lm_head not in LM_HEAD_CHOICES:
        raise ValueError(f"lm_head={lm_head!r}: expected one of {LM_HEAD_CHOICES}")
    if lm_head == "split" and mode == "central":
        raise ValueError("lm_head='split' needs every rank to run the dense part; mode='central' runs it on rank 0")
    convert_blocks(model)
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ValueError(
            f"model_type={_model_type(model)!r} has no MoE block (no SwitchGLU/SwitchMLP "
            "layer): moe_mpi shards Mixture-of-Experts models only"
        )
    for moe in blocks:
        if isinstance(moe.switch, LocalExperts):
            raise ValueError(f"{moe.path} is already sharded")
    rank, size = comm.rank, comm.size
    expert_free = [False] * len(blocks)  # per block: adds a term that needs no expert
    if check_contract and size > 1 and mode != "central":  # central: rank 0 runs every block whole
        expert_free = check_partial_sums(_model_type(model), blocks, shared_children, size)
    placements = {}
    if layouts is None and stats is None and mode in ("ep", "central"):
        for moe in blocks:
            n = moe.num_experts
            if n not in placements:
                placements[n] = resolve_placement(placement, n, size, weights)
    row_cost = row_cost_for(profile, blocks) if mode == "auto" and layouts is None else None
    layouts = _layouts(blocks, mode, size, placements, weights, layouts, stats, replicas, balance, row_cost)
    plan: Plan = {}
    for layer, (moe, layout) in enumerate(zip(blocks, layouts)):
        n = moe.num_experts
        all_split = len(layout.split) == n
        experts = tuple(range(n)) if all_split else layout.whole_on(rank)
        shard = ExpertShard(layer, n, experts, comm, layout, rank, () if all_split else layout.split)
        plan.update(_shard_switch(moe, shard, weights, mode))
        if mode == "central":
            # The dense part, shared experts included, runs on rank 0 alone.
            central.make_central(moe.switch)
            continue
        shared_names = shared_children(moe.block)
        for name in shared_names:
            shared = moe.block[name]
            bounds = slice_bounds(shared, rank, size, weights)
            if bounds is not None:
                plan.update(keep_slice(f"{moe.path}.{name}" if moe.path else name, shared, bounds))
            elif rank != min(range(size), key=lambda r: (len(layout.whole_on(r)), r)):
                # Not splittable: the rank with the fewest whole experts computes it.
                setattr(moe.block, name, NoOutput())
        _make_expert_parallel(moe.block, shard)
        # The term without experts is added once, by the rank with the most whole
        # experts, which so has no extra call of the block to make.
        if expert_free[layer] and rank != max(range(size), key=lambda r: (len(layout.whole_on(r)), -r)):
            # A plain attribute: nn.Module would take a tuple for parameters.
            object.__setattr__(moe.block, "expert_free_elsewhere", (moe.switch_name, *shared_names))
    attention_layers, attention_kept = 0, ()
    if attention == "split":
        heads, attention_layers, attention_kept = split_attention(model, comm, _model_type(model), weights)
        plan.update(heads)
    head_path = ""
    if lm_head == "split":
        rows, head_path = split_lm_head(model, comm, _model_type(model), weights)
        plan.update(rows)
    switches = tuple(moe.switch for moe in blocks)
    # A dataclass, not a tuple: nn.Module would take a tuple for parameters.
    model.ep_info = ShardInfo(
        rank, size, len(blocks), tuple(placements.values()), mode, switches, tuple(layouts), attention, attention_layers,
        attention_kept, lm_head, head_path,
    )
    return plan


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "args", None), "model_type", type(model).__name__)


def weight_format(blocks) -> str:
    """``"q4"`` if the experts are quantized (the calibrate table for any bits), else ``"float32"``."""
    quantized = any(is_quantized(m) for moe in blocks for _, m in moe.switch.named_modules())
    return "q4" if quantized else "float32"


def row_cost_for(profile, blocks) -> Optional[RowCost]:
    """The :class:`RowCost` of ``profile`` (file, JSON object, RowCost or None) for these experts."""
    if profile is None or isinstance(profile, RowCost):
        return profile
    if isinstance(profile, Mapping):
        return RowCost.from_profile(profile, weight_format(blocks))
    return read_row_cost(profile, weight_format(blocks))


def _layouts(blocks, mode, size, placements, weights, layouts, stats, replicas, balance, row_cost=None) -> List[Layout]:
    """Each MoE layer's layout, from the arguments of :func:`shard_structure`."""
    counts = [moe.num_experts for moe in blocks]
    if layouts is not None:
        if mode == "sliced":
            raise ValueError("layouts are for mode='ep', 'auto' or 'central'; mode='sliced' splits every expert")
        if isinstance(layouts, (str, bytes)) or hasattr(layouts, "__fspath__"):
            layouts = layouts_from_json(str(layouts), size, counts)
        layouts = list(layouts)
        if len(layouts) != len(blocks):
            raise ValueError(f"{len(layouts)} layouts for {len(blocks)} MoE layers")
        for i, (layout, n) in enumerate(zip(layouts, counts)):
            if (layout.num_experts, layout.num_ranks) != (n, size):
                raise ValueError(
                    f"layout of MoE layer {i} is for num_experts={layout.num_experts}, num_ranks="
                    f"{layout.num_ranks}; the layer has num_experts={n} and the run num_ranks={size}"
                )
            if mode == "central" and layout.owners() is None:
                raise ValueError(f"mode='central' needs one owner per expert; layout of MoE layer {i}: {layout.describe()}")
        return layouts
    if mode == "sliced":
        return [Layout.all_split(n, size) for n in counts]
    if stats is not None:
        if hasattr(stats, "check_fits"):
            stats.check_fits(counts)
        freqs = [stats.frequencies(i) for i in range(len(blocks))]
    else:
        freqs = [np.full(n, 1.0 / n) for n in counts]
    if mode == "auto":
        splittable = [slice_bounds(moe.switch, 0, size, weights) is not None for moe in blocks]
        top_k = [_top_k(moe, stats, i) for i, moe in enumerate(blocks)]
        # The experts' width: thin slices cost more per row (the penalty in balance.py).
        widths = [(slice_unit(moe.switch) or (1, 1))[0] for moe in blocks]
        return [
            auto_layout(
                f, k, size, weights=weights, replicas=replicas, can_split=can, intermediate=width,
                quantized=weight_format([moe]) == "q4", balance=balance, row_cost=row_cost,
            )
            for f, k, can, width, moe in zip(freqs, top_k, splittable, widths, blocks)
        ]
    if stats is not None:  # ep: each layer placed by its own statistics
        return [ep_layout(f, size, weights=weights) for f in freqs]
    return [Layout.from_owners(placements[n].owners, size) for n in counts]


def _top_k(moe: MoEBlock, stats, layer: int) -> int:
    """Experts per token of a block: from the statistics, else the block's own attributes."""
    k = stats.top_k[layer] if stats is not None and getattr(stats, "top_k", None) else None
    if k:
        return int(k)
    for name in ("top_k", "num_experts_per_tok", "n_activated_experts", "moe_top_k"):
        value = getattr(moe.block, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2


def expert_parameters(model: nn.Module) -> set:
    """Paths of the parameters that belong to (this rank's) experts."""
    return {
        f"{moe.switch_path}.{name}"
        for moe in find_moe_blocks(model)
        for name, _ in tree_flatten(moe.switch.parameters())
    }


def router_parameters(model: nn.Module) -> List[str]:
    """Paths of what each MoE block holds besides its experts and shared experts: its router.

    That is the gate's weights (quantized or not) and whatever else the
    block scores experts with (DeepSeek's score correction bias, qwen2_moe's
    shared-expert gate). Where the block holds nothing else, its router is
    beside it, a sibling named ``*router*`` or ``*gate`` (gemma4_text's
    decoder layer, deepseek_v41's MoE). Every rank holds them whole, in
    every mode, and sharding does not change their paths.
    """
    modules = None
    paths = []
    for moe in find_moe_blocks(model):
        skip = {moe.switch_name, *shared_children(moe.block)}
        own = {name: value for name, value in moe.block.parameters().items() if name not in skip}
        prefix = moe.path
        if not own and moe.path:
            modules = modules if modules is not None else dict(model.named_modules())
            prefix = moe.path.rpartition(".")[0]
            parent = modules.get(prefix)
            children = parent.children().items() if parent is not None else ()
            own = {n: c.parameters() for n, c in children
                   if isinstance(c, nn.Module) and ("router" in n or n.endswith("gate"))}
        paths += [f"{prefix}.{p}" if prefix else p for p, _ in tree_flatten(own)]
    return paths


def model_identity(model: nn.Module, arrays: Optional[Mapping[str, mx.array]] = None) -> Dict[str, str]:
    """What router statistics record of the model they come from, to be told from another of its shape.

    ``{"routers": digest}``: SHA-256 (16 hex digits) of the routers'
    (:func:`router_parameters`) names, dtypes, shapes and bytes; empty for a
    model without any. The routers alone decide the routing given the
    hidden state, and they are few: a digest of them reads little.

    Args:
        model: The model (sharded or not).
        arrays: Where the values are: default the model's loaded
            parameters; :func:`moe_mpi.loading.plan_load` passes the
            checkpoint's tensors before they are read (lazy: only these are).
    """
    arrays = dict(tree_flatten(model.parameters())) if arrays is None else arrays
    paths = [p for p in router_parameters(model) if p in arrays]
    return {"routers": array_digest((p, arrays[p]) for p in paths)} if paths else {}


def check_stats_model(stats, model: nn.Module, arrays: Optional[Mapping[str, mx.array]], rank: int) -> None:
    """Refuses router statistics recorded on another model (:meth:`moe_mpi.routing.RoutingStats.check_model`).

    A file of another model of the same shape would otherwise place or
    balance this one by that model's routing, silently. Every rank raises
    the same ``ValueError`` on a mismatch; rank 0 warns, on stderr, of a
    file that cannot tell (no identity: checked by shape only).
    """
    if stats is None or not hasattr(stats, "check_model"):
        return
    warning = stats.check_model(model_identity(model, arrays))
    if warning is not None and rank == 0:
        print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True)


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
    layouts: Union[Sequence[Layout], str, None] = None,
    stats=None,
    replicas: float = 0.0,
    balance: str = "both",
    profile=None,
    attention: str = "replicated",
    lm_head: str = "replicated",
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
        mode: ``"ep"`` (default), ``"sliced"``, ``"auto"`` or ``"central"``;
            see :func:`shard_structure`, as for ``layouts``, ``stats``, ``replicas``,
            ``balance``, ``profile``, ``attention`` and ``lm_head``.

    Returns:
        The same model, sharded.
    """
    if comm is None:
        from .comm import Communicator

        comm = Communicator()
    shard_structure(model, comm, placement, weights, mode, layouts, stats, replicas, balance, profile,
                    attention=attention, lm_head=lm_head)
    if layouts is None:  # layouts override the statistics
        check_stats_model(stats, model, dict(tree_flatten(model.parameters())), comm.rank)
    if mode == "central" and comm.rank != 0:
        drop_dense(model)  # workers hold only their experts
    mx.eval(model.parameters())
    cpu.accelerate(model)  # MLX's Linux CPU backend only; nothing on Metal
    return model
