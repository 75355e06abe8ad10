"""Routing in a benchmark run: which experts the router chose, and the load per rank.

In expert parallelism each MoE layer's all-reduce waits for the busiest
rank, so the busiest rank's routed ``(token, slot)`` pairs over the mean
rank's is the imbalance a step pays for (1.0 is balanced). A split
expert's rows count on every rank in proportion to its slice; replicated
ones where the model sends them (:func:`moe_mpi.layout.rank_loads`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .. import routing
from ..layout import Layout, rank_loads

__all__ = ["imbalance_for", "layouts_of", "record_routing", "routing_imbalance"]

Call = Tuple[int, np.ndarray]  # (MoE layer, [T*k] global expert ids)


@contextlib.contextmanager
def record_routing(model) -> Iterator[List[Call]]:
    """Yields a list that receives ``(layer, flat ids)`` for every MoE layer call
    while open (:func:`moe_mpi.routing.record_routing`); empty for ``model`` None."""
    calls: List[Call] = []
    with routing.record_routing(model, lambda layer, inds: calls.append((layer, np.asarray(inds).reshape(-1)))):
        yield calls


def routing_imbalance(calls: Sequence[Call], layouts: Optional[Sequence[Layout]], size: int):
    """Busiest rank's load over the mean rank's, from recorded calls.

    Args:
        calls: ``(layer, flat ids)`` per MoE layer call (:func:`record_routing`).
        layouts: Each layer's layout, or None (nothing to measure).
        size: Number of ranks.

    Returns:
        A dict: ``per_layer`` is the mean over calls of the busiest rank's
        rows over the mean rank's; ``layers`` the same per MoE layer;
        ``total`` over all calls summed; ``pairs_per_rank`` the totals.
        None when there is nothing to measure.
    """
    if not calls or layouts is None or size < 2:
        return None
    per_call = np.stack([rank_loads(layouts[layer], flat) for layer, flat in calls])  # [C, N]
    means = per_call.mean(axis=1)
    ok = means > 0
    ratios = np.full(len(calls), np.nan)
    ratios[ok] = per_call[ok].max(axis=1) / means[ok]
    layer_ids = np.array([layer for layer, _ in calls])
    layers = [float(np.nanmean(ratios[layer_ids == i])) for i in range(len(layouts)) if (layer_ids == i).any()]
    totals = per_call.sum(axis=0)
    return {
        "per_layer": float(np.nanmean(ratios)),
        "layers": layers,
        "total": float(totals.max() / totals.mean()) if totals.mean() > 0 else None,
        "pairs_per_rank": [round(float(t), 3) for t in totals],
        "calls": len(calls),
    }


def layouts_of(model) -> Optional[Tuple[Layout, ...]]:
    """Each MoE layer's layout from ``model.ep_info`` (moe_mpi modes), else None."""
    info = getattr(model, "ep_info", None)
    return info.layouts if info is not None and info.layouts else None


def imbalance_for(mode: str, model, calls, size: int):
    """``(imbalance, method)`` of mode ``mode``, from a routing sample on rank 0."""
    if mode == "mlx-lm-tp":
        return {"per_layer": 1.0}, "1.00 by construction (every rank holds a slice of every expert)"
    return routing_imbalance(calls, layouts_of(model), size), "routing proxy"
