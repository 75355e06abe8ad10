"""Routing statistics of a benchmark run: which experts the router chose, and the load per rank.

In expert parallelism each MoE layer's all-reduce waits for the busiest
rank, so the busiest rank's routed ``(token, slot)`` pairs over the mean
rank's is the imbalance a step pays for (1.0 is balanced).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence

import mlx.nn as nn
import numpy as np

from ..shard import find_moe_blocks

__all__ = ["imbalance_for", "owners_of", "record_routing", "routing_imbalance"]

def _recording_class(cls: type, calls: List[np.ndarray], num_experts: int) -> type:
    """``cls`` whose calls count their routed (token, slot) pairs per expert into ``calls``."""

    class Recording(cls):
        def __call__(self, x, indices, *args, **kwargs):
            # [..., k] global expert ids -> one count per expert. Only used in
            # untimed warm-up: it reads the routing back to numpy.
            calls.append(np.bincount(np.asarray(indices).reshape(-1), minlength=num_experts))
            return super().__call__(x, indices, *args, **kwargs)

    return Recording


def _recording_route(block, calls: List[np.ndarray]):
    """``block.route`` of a numpy decode step's MoE block, counting its pairs per expert into ``calls``."""
    route, num_experts = type(block).route, block.switch.expert_shard.num_experts

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
    calls: List[np.ndarray] = []
    switches = []
    if model is not None:
        for moe in find_moe_blocks(model):
            switch = moe.switch
            switches.append((switch, type(switch)))
            switch.__class__ = _recording_class(type(switch), calls, moe.num_experts_total)
    # The numpy decode step (moe_mpi.cpu.decode) routes without calling the
    # switch layer: record its routing where it is computed.
    path = getattr(model, "cpu_path", None) if model is not None else None
    step = path.decode_step if path is not None else None
    blocks = [layer.mlp for layer in step.layers if hasattr(layer.mlp, "route")] if step else []
    for block in blocks:
        block.route = _recording_route(block, calls)
    try:
        yield calls
    finally:
        for switch, cls in switches:
            switch.__class__ = cls
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


def imbalance_for(mode: str, model, calls, size: int):
    """``(imbalance, method)`` of mode ``mode``, from a routing sample on rank 0."""
    if mode == "mlx-lm-tp":
        return {
            "per_layer": 1.0
        }, "1.00 by construction (every rank holds a slice of every expert)"
    return routing_imbalance(calls, owners_of(model), size), "routing proxy"
