"""The figures of ``GET /status``: per rank, and what they add up to.

Every rank reports its own (:meth:`moe_mpi.serve.engine.Engine.figures`):
requests and tokens it stepped, time in its experts, time and count of its
all-reduces, its control broadcasts, peak memory. They reach rank 0 in one
allgather, at the step after a client asked: a status query costs one
collective, and none is spent while nobody asks.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import mlx.core as mx

from ..experts import local_switch_layers, with_mixin

__all__ = [
    "CountedCalls", "ExpertTimer", "ForwardCounter", "TimedExperts", "count_forward_passes", "rank_figures",
    "summarize", "time_experts",
]


class ExpertTimer:
    """Seconds and calls of a rank's expert computations."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0


class TimedExperts:
    """Mixin for a local switch layer: times its computation (``/status``).

    The inputs are evaluated first, so that the time is the experts' own and
    not the attention's still pending in the lazy graph; the output is
    evaluated before the clock stops. Both would be evaluated a moment later
    anyway, by the routing read or the layer's all-reduce.
    """

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        mx.eval(x, indices)
        start = time.perf_counter()
        out = super().__call__(x, indices)  # [..., k, D]
        mx.eval(out)
        timer = self.expert_timer
        timer.seconds += time.perf_counter() - start
        timer.calls += 1
        return out


def time_experts(model) -> ExpertTimer:
    """Puts :class:`TimedExperts` in front of every local switch layer of ``model``.

    Returns:
        The timer they all add to.
    """
    timer = ExpertTimer()
    for switch in local_switch_layers(model):
        switch.expert_timer = timer
        switch.__class__ = with_mixin(TimedExperts, type(switch))
    return timer


class ForwardCounter:
    """Forward passes of the whole model (every rank counts its own)."""

    def __init__(self):
        self.calls = 0


class CountedCalls:
    """Mixin for the model: counts its forward passes, so that ``/status``
    can set the all-reduces against them, counted independently."""

    def __call__(self, *args, **kwargs):
        self.forward_counter.calls += 1
        return super().__call__(*args, **kwargs)


def count_forward_passes(model) -> ForwardCounter:
    """Puts :class:`CountedCalls` in front of the model's class; returns its counter."""
    model.forward_counter = ForwardCounter()
    model.__class__ = with_mixin(CountedCalls, type(model))
    return model.forward_counter


def rank_figures(model) -> Dict[str, Any]:
    """This rank's forward passes, routing guard repairs and MLX memory in use, for :meth:`Engine.figures`."""
    counter = getattr(model, "forward_counter", None)
    guard = getattr(model, "routing_guard", None)
    return {
        "active_memory_bytes": mx.get_active_memory(),
        "forward_passes": counter.calls if counter is not None else None,
        "routing_repairs": guard.repairs if guard is not None else None,
        # (layer, ranks that differed from rank 0, tokens) of the first repair
        "first_routing_repair": list(guard.events[0]) if guard is not None and guard.events else None,
    }


def _per_token(count: float, tokens: int) -> Optional[float]:
    return count / tokens if tokens else None


def _rank_row(f: Dict[str, Any]) -> Dict[str, Any]:
    control = f["control"]
    steps = f["steps"]
    return {
        "rank": f["rank"],
        "host": f["host"],
        "pid": f["pid"],
        "requests": f["requests"],
        "failed": f["failed"],
        "prompt_tokens": f["prompt_tokens"],
        "generated_tokens": f["generated_tokens"],
        "steps": steps,
        "decode_steps": f["decode_steps"],
        "expert_seconds": f["expert_seconds"],
        "all_reduce_seconds": f["all_reduce_seconds"],
        "all_reduces": f["all_reduces"],
        "all_reduces_skipped": f["all_reduces_skipped"],
        "all_reduces_overlapped": f["all_reduces_overlapped"],
        "cohorts": f["cohorts"],
        "all_reduces_per_token": _per_token(f["all_reduces"], f["generated_tokens"]),
        # Counted on their own: a forward pass over the batch does one
        # all-reduce per MoE layer (and split attention), plus one per layer
        # the guard redid, less the skipped ones of prompt chunks.
        "forward_passes": f["forward_passes"],
        "all_reduces_per_forward_pass": _per_token(f["all_reduces"], f["forward_passes"] or 0),
        "routing_repairs": f["routing_repairs"],
        "logit_gathers": f["logit_gathers"],
        "logit_gathers_skipped": f["logit_gathers_skipped"],
        "control_broadcasts": control["broadcasts"],
        "control_bytes": control["bytes"],
        "control_seconds": control["seconds"],
        "control_broadcasts_per_step": _per_token(control["broadcasts"], steps),
        "other_collectives": f["other_collectives"],
        "peak_memory_bytes": f["peak_memory_bytes"],
        "active_memory_bytes": f["active_memory_bytes"],
        "max_rss_bytes": f["max_rss_bytes"],
    }


def _first_repair(event) -> Optional[Dict[str, Any]]:
    if event is None:
        return None
    layer, ranks, tokens = event
    return {"layer": layer, "ranks": ranks, "tokens": tokens}


def summarize(figures: List[Dict[str, Any]], model: Dict[str, Any]) -> Dict[str, Any]:
    """The ``/status`` document from every rank's figures.

    Args:
        figures: One dict per rank, in rank order.
        model: What is served (id, mode, MoE layers, ranks).

    Returns:
        A JSON-serialisable dict: ``model``, ``requests`` (rank 0's count
        of requests and tokens), ``control`` (broadcasts per step, the
        promise of at most one), ``routing`` (the routing guard's repairs)
        and ``ranks`` (one row per rank).
    """
    first = figures[0]
    steps = first["steps"]
    return {
        "object": "moe_mpi.status",
        "model": model,
        "uptime_seconds": first["uptime_seconds"],
        "requests": {
            "total": first["requests"],
            "active": first["active"],
            "waiting": first["waiting"],
            "finished": first["finished"],
            "cancelled": first["cancelled"],
            # Ended because the model's logits for them were not finite (moe_mpi/finite.py).
            "failed": first["failed"],
            "prompt_tokens": first["prompt_tokens"],
            "cached_prompt_tokens": first["cached_prompt_tokens"],
            "generated_tokens": first["generated_tokens"],
        },
        "control": {
            # One broadcast per step, plus one each time the server wakes
            # from idle (a request or a status query arriving): never per layer.
            "broadcasts": first["control"]["broadcasts"],
            "steps": steps,
            "decode_steps": first["decode_steps"],
            "broadcasts_per_step": _per_token(first["control"]["broadcasts"], steps),
            "bytes_per_broadcast": _per_token(first["control"]["bytes"], first["control"]["broadcasts"]),
            "status_allgathers": first["status_allgathers"],
        },
        # Continuous batching, unless mlx-lm cannot batch the model's caches
        # (moe_mpi/batching.py): then one sequence at a time (per cohort).
        "batching": {
            "continuous": not model["unbatchable_caches"],
            "unbatchable_caches": model["unbatchable_caches"],
        },
        # The guard's verdicts are the same on every rank: rank 0's figures.
        "routing": {
            "guard": model.get("routing_guard"),
            "repairs": first["routing_repairs"],
            "first_repair": _first_repair(first["first_routing_repair"]),
        },
        "ranks": [_rank_row(f) for f in figures],
    }
