"""Expert compute: one rank's experts, for the tokens routed to them.

A rank keeps only its own experts, stacked: one ``[n_local, out, in]`` tensor
per projection (``gate_proj``/``up_proj``/``down_proj`` of mlx-lm's
``SwitchGLU``, or ``fc1``/``fc2`` of ``SwitchMLP``), float or quantized.

The routing itself is not computed here. The router is replicated, so every
rank already holds the same global ``indices``; this module selects the
``(token, slot)`` pairs whose expert is local, runs the model's own switch
layer on them, and returns zeros in the slots other ranks own. The block's
router-weighted sum over slots then yields this rank's *partial* sum, and the
block's single all-reduce (:class:`moe_mpi.shard.ExpertParallelBlock`) adds
the partial sums of all ranks.
"""

from dataclasses import dataclass
from typing import Any, Tuple

import mlx.core as mx
import numpy as np

from .layout import assign_slots


@dataclass(frozen=True, eq=False)
class ExpertShard:
    """What one sharded MoE layer holds on this rank.

    One record per MoE layer, shared by the block (``block.expert_shard``,
    whose ``comm`` does the layer's one all-reduce) and its switch layer
    (``switch.expert_shard``, which uses it to pick its slots).

    The switch layer's own stacked weights hold ``experts``: whole experts,
    or, when every expert is split (``mode="sliced"``), this rank's slice of
    each. In a layout that splits some experts and keeps others whole, the
    slices of ``split_experts`` are stacked in a second switch layer, the
    child ``switch.split``.

    Attributes:
        layer: Index of the layer among the model's MoE layers.
        num_experts: Experts the router chooses from.
        experts: Global ids stacked in the switch layer's own weights, in order.
        comm: The communicator of the layer's all-reduce (``all_sum``).
        layout: The layer's :class:`moe_mpi.layout.Layout`, or None where
            every expert is here (tensor parallelism's baseline).
        rank: This rank.
        split_experts: Global ids stacked, as slices, in ``switch.split``.
    """

    layer: int
    num_experts: int
    experts: Tuple[int, ...]
    comm: Any = None
    layout: Any = None
    rank: int = 0
    split_experts: Tuple[int, ...] = ()
    is_child: bool = False  # the record of a ``switch.split`` child

    def __post_init__(self):
        object.__setattr__(self, "local_of", _lookup(self.experts, self.num_experts))  # [E]: index here, -1 elsewhere
        object.__setattr__(self, "split_local_of", _lookup(self.split_experts, self.num_experts))
        replicas = self.layout is not None and bool(self.layout.replicated)
        object.__setattr__(self, "has_replicas", replicas)

    @property
    def all_local(self) -> bool:
        """Every expert is in the switch layer's own weights (each whole, or each a slice)."""
        return len(self.experts) == self.num_experts and not self.split_experts and not self.has_replicas

    def slots(self, flat: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Which of a call's ``(token, slot)`` pairs this rank computes, and with what.

        Args:
            flat: ``[T*k]`` global expert ids (the routing, the same on every rank).

        Returns:
            ``(own_slots, own_ids, split_slots, split_ids)``: the slots computed
            with the switch layer's own weights and their index there, and the
            slots of split experts with their index in ``switch.split``.
        """
        if self.has_replicas:  # a replicated expert's slots go to one holder, or in blocks to several
            chosen = assign_slots(self.layout, flat)  # [T*k], the same on every rank
            own_slots = np.flatnonzero(chosen == self.rank)
            own_ids = self.local_of[flat[own_slots]]
        else:
            local = self.local_of[flat]  # [T*k], -1 where not in the own weights
            own_slots = np.flatnonzero(local >= 0)
            own_ids = local[own_slots]
        if not self.split_experts:
            return own_slots, own_ids, _EMPTY, _EMPTY
        split = self.split_local_of[flat]
        split_slots = np.flatnonzero(split >= 0)
        return own_slots, own_ids, split_slots, split[split_slots]


_EMPTY = np.zeros(0, dtype=np.int64)


def _lookup(experts: Tuple[int, ...], num_experts: int) -> np.ndarray:
    lookup = np.full(num_experts, -1, dtype=np.int64)
    lookup[np.asarray(experts, dtype=np.int64)] = np.arange(len(experts))
    return lookup


class LocalExperts:
    """Mixin for an mlx-lm switch layer that holds only this rank's experts.

    :func:`make_local` puts it in front of the switch layer's own class, so
    the projections keep their names and parameter paths
    (``...switch_mlp.gate_proj.weight`` now has ``n_local`` rows) and the
    layer's own ``__call__`` (sorting, ``gather_mm`` or ``gather_qmm``, the
    activation) does the compute.
    """

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """Computes this rank's experts for the slots routed to them.

        Args:
            x: Token activations, ``[..., D]``.
            indices: Global expert ids from the replicated router, ``[..., k]``,
                with the same leading shape as ``x``.

        Returns:
            ``[..., k, D]``: the expert output in every slot whose expert is
            local, zeros in every other slot.
        """
        shard = self.expert_shard
        if shard.all_local and (indices.size == indices.shape[-1] or self.lazy_graph):
            # Every expert here (mode="sliced", or auto splitting them all):
            # the layer's own call computes every slot, and no routing is read
            # back to Python. Taken for one token (each chosen expert has one
            # row) and wherever the all-reduce stays in MLX's graph too
            # (backend "mlx"): then the forward pass has no wait on the host.
            return super().__call__(x, indices)
        return self.local_slots(x, indices)

    @property
    def lazy_graph(self) -> bool:
        """Whether the layer's all-reduce stays in MLX's graph, and no warm-up needs the routing on the host."""
        comm = self.expert_shard.comm
        return bool(getattr(comm, "lazy", False)) and "warm_up" not in self.__dict__

    def local_slots(self, x: mx.array, indices: mx.array) -> mx.array:
        """The general path of :meth:`__call__`: only this rank's ``(token, slot)`` pairs are computed."""
        k, d = indices.shape[-1], x.shape[-1]
        x_flat = x.reshape(-1, d)  # [T, D]
        # Reading the routing back (numpy) is one sync per layer; it lets the
        # rank compute only its own (token, slot) pairs instead of all T*k.
        flat = np.asarray(indices.reshape(-1))  # [T*k] global ids
        own_slots, own_ids, split_slots, split_ids = self.expert_shard.slots(flat)
        out = mx.zeros((flat.size, d), dtype=x.dtype)  # [T*k, D]
        for slots, ids, unit in ((own_slots, own_ids, self), (split_slots, split_ids, self.get("split"))):
            if slots.size:
                rows = x_flat[mx.array(slots // k)]  # [M, D] token of each slot
                out[mx.array(slots)] = unit.compute(rows, ids).astype(x.dtype)
        warm = self.__dict__.get("warm_up")  # moe_mpi.warmup: idle experts kept warm (Metal)
        if warm is not None:
            out = out + warm.pad(self, flat, own_ids, x)
        return out.reshape(*indices.shape, d)  # [..., k, D]

    def compute(self, rows: mx.array, local_ids: np.ndarray) -> mx.array:
        """Runs local experts on token rows: row i through expert ``local_ids[i]``.

        The switch layer's own compute (``gather_mm`` / ``gather_qmm``), each
        row as a token with one slot.

        Args:
            rows: ``[M, D]`` activations, one per (token, slot) pair.
            local_ids: ``[M]`` local expert index of each row.

        Returns:
            ``[M, D]`` expert outputs, not weighted by router scores.
        """
        ids = mx.array(local_ids)[:, None]  # [M, 1]
        return super().__call__(rows, ids)[:, 0]


def make_local(switch, shard: ExpertShard) -> None:
    """Turns an mlx-lm switch layer into one that computes local experts only.

    The caller slices the stacked weights to ``shard.experts`` (in that
    order); this attaches the record and swaps the class in place.

    Args:
        switch: A ``SwitchGLU``/``SwitchMLP``-like module whose ``__call__``
            takes ``(x, indices)`` and returns ``[..., k, D]``.
        shard: The layer's record.
    """
    switch.expert_shard = shard
    switch.__class__ = with_mixin(LocalExperts, type(switch))


def local_switch_layers(model, children: bool = False) -> list:
    """The model's switch layers that hold this rank's experts, in layer order.

    With ``children``, also the ``split`` child of each that has one.
    """
    found = [m for _, m in model.named_modules() if isinstance(m, LocalExperts) and not m.expert_shard.is_child]
    found.sort(key=lambda m: m.expert_shard.layer)
    if children:
        found += [m["split"] for m in found if "split" in m]
    return found


_MIXED = {}


def with_mixin(mixin: type, cls: type) -> type:
    """``cls`` with ``mixin`` in front (cached), for swapping a module's class.

    The module keeps its attributes, children and parameter paths; only
    ``__call__`` (and what the mixin adds) changes.
    """
    if issubclass(cls, mixin):
        return cls
    if (mixin, cls) not in _MIXED:
        _MIXED[mixin, cls] = type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {})
    return _MIXED[mixin, cls]


def layer_order(path: str) -> tuple:
    """A sort key for module paths in model order: ``layers.2`` before ``layers.10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("."))


def base_class(module) -> type:
    """The mlx-lm class of ``module`` under the mixins :func:`with_mixin` put in front."""
    cls = type(module)
    while (cls.__bases__[0], cls.__bases__[-1]) in _MIXED and _MIXED[cls.__bases__[0], cls.__bases__[-1]] is cls:
        cls = cls.__bases__[-1]
    return cls

