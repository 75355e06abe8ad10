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


@dataclass(frozen=True, eq=False)
class ExpertShard:
    """What one sharded MoE layer holds on this rank.

    One record per MoE layer, shared by the block (``block.expert_shard``,
    whose ``comm`` does the layer's one all-reduce) and its switch layer
    (``switch.expert_shard``, which uses ``local_of`` to pick its slots).

    Attributes:
        layer: Index of the layer among the model's MoE layers.
        num_experts: Experts the router chooses from.
        experts: Global ids of the experts stacked here, in stacking order.
        comm: The communicator of the layer's all-reduce (``all_sum``).
        placement: Which rank owns which expert; None where every rank
            holds a slice of every expert (``mode="sliced"``).
    """

    layer: int
    num_experts: int
    experts: Tuple[int, ...]
    comm: Any = None
    placement: Any = None

    def __post_init__(self):
        lookup = np.full(self.num_experts, -1, dtype=np.int64)
        lookup[np.asarray(self.experts, dtype=np.int64)] = np.arange(len(self.experts))
        object.__setattr__(self, "local_of", lookup)  # [num_experts]: local index, -1 elsewhere

    @property
    def all_local(self) -> bool:
        """Every expert is here (each whole, or each a slice)."""
        return len(self.experts) == self.num_experts


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
        if self.expert_shard.all_local and indices.size == indices.shape[-1]:
            # One token, every expert here (mode="sliced"): each chosen expert
            # has one row, and no routing needs to be read back to Python; the
            # layer's own call stays lazy.
            return super().__call__(x, indices)
        return self.local_slots(x, indices)

    def local_slots(self, x: mx.array, indices: mx.array) -> mx.array:
        """The general path of :meth:`__call__`: only the local ``(token, slot)`` pairs are computed."""
        k, d = indices.shape[-1], x.shape[-1]
        x_flat = x.reshape(-1, d)  # [T, D]
        # Reading the routing back (numpy) is one sync per layer; it lets the
        # rank compute only its own (token, slot) pairs instead of all T*k.
        flat = np.asarray(indices.reshape(-1))  # [T*k] global ids
        local = self.expert_shard.local_of[flat]  # [T*k], -1 where another rank owns it
        slots = np.flatnonzero(local >= 0)  # [M]
        out = mx.zeros((flat.size, d), dtype=x.dtype)  # [T*k, D]
        if slots.size:
            rows = x_flat[mx.array(slots // k)]  # [M, D] token of each local slot
            out[mx.array(slots)] = self.compute(rows, local[slots]).astype(x.dtype)
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


def local_switch_layers(model) -> list:
    """The model's switch layers that hold this rank's experts, in layer order."""
    found = [m for _, m in model.named_modules() if isinstance(m, LocalExperts)]
    return sorted(found, key=lambda m: m.expert_shard.layer)


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


def base_class(module) -> type:
    """The mlx-lm class of ``module`` under the mixins :func:`with_mixin` put in front."""
    cls = type(module)
    while (cls.__bases__[0], cls.__bases__[-1]) in _MIXED and _MIXED[cls.__bases__[0], cls.__bases__[-1]] is cls:
        cls = cls.__bases__[-1]
    return cls

