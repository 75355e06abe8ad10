"""Expert compute: one rank's experts, for the tokens routed to them.

A rank keeps only its own experts, stacked: one ``[n_local, out, in]`` tensor
per projection (``gate_proj``/``up_proj``/``down_proj`` of mlx-lm's
``SwitchGLU``, or ``fc1``/``fc2`` of ``SwitchMLP``), float or quantized.

The routing itself is not computed here. The router is replicated, so every
rank already holds the same global ``indices``; this module selects the
``(token, slot)`` pairs whose expert is local, runs the model's own switch
layer on them, and returns zeros in the slots other ranks own. The block's
router-weighted sum over slots then yields this rank's *partial* sum, and the
block's single all-reduce (see :mod:`moe_mpi.shard`) adds the partial sums of
all ranks.
"""

from typing import Sequence

import mlx.core as mx
import numpy as np


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
        k = indices.shape[-1]
        d = x.shape[-1]
        x_flat = x.reshape(-1, d)  # [T, D]
        # Reading the routing to the host is one sync per layer; it lets the
        # rank compute only its own (token, slot) pairs instead of all T*k.
        flat = np.asarray(indices.reshape(-1))  # [T*k] global ids
        local = self.ep_local_of[flat]  # [T*k], -1 where another rank owns it
        slots = np.flatnonzero(local >= 0)  # [M]
        out = mx.zeros((flat.size, d), dtype=x.dtype)  # [T*k, D]
        if slots.size:
            rows = x_flat[mx.array(slots // k)]  # [M, D] token of each local slot
            out[mx.array(slots)] = self.compute(rows, local[slots]).astype(x.dtype)
        return out.reshape(*indices.shape, d)  # [..., k, D]

    def compute(self, rows: mx.array, local_ids: np.ndarray) -> mx.array:
        """Runs local experts on token rows: row i through expert ``local_ids[i]``.

        Args:
            rows: ``[M, D]`` activations, one per (token, slot) pair.
            local_ids: ``[M]`` local expert index of each row.

        Returns:
            ``[M, D]`` expert outputs, not weighted by router scores.
        """
        ids = mx.array(local_ids)[:, None]  # [M, 1]: one "slot" per row
        return super().__call__(rows, ids)[:, 0]  # the switch layer's own compute


_MIXED = {}


def make_local(switch, local_experts: Sequence[int], num_experts: int) -> None:
    """Turns an mlx-lm switch layer into one that computes local experts only.

    The caller slices the stacked weights to ``local_experts`` (in that order);
    this sets the global-to-local lookup and swaps the class in place.

    Args:
        switch: A ``SwitchGLU``/``SwitchMLP``-like module whose ``__call__``
            takes ``(x, indices)`` and returns ``[..., k, D]``.
        local_experts: Global ids of this rank's experts, ascending.
        num_experts: Number of experts the router chooses from.
    """
    lookup = np.full(num_experts, -1, dtype=np.int64)
    lookup[np.asarray(local_experts, dtype=np.int64)] = np.arange(len(local_experts))
    # A numpy attribute, not an mx.array: it must not become a parameter.
    switch.ep_local_of = lookup
    switch.ep_experts = tuple(int(e) for e in local_experts)
    switch.__class__ = with_mixin(LocalExperts, type(switch))


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
