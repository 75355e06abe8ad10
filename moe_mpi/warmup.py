"""Warm experts (Metal): idle ranks compute throw-away experts so their memory stays wired.

On a Mac, memory that the GPU has not touched for a while can be paged out
of the GPU's wired set, and the next step that needs it waits. In expert
parallelism a rank whose experts were not chosen sits idle until the
busiest rank finishes, so the paper's code pads each rank's step with its
least-recently-used idle experts, up to the busiest rank's count: the pad
costs nothing on the step's critical path and keeps every expert warm.
This module does the same, and sets MLX's wired limit to the rank's model
size at load. It is an option (``load(..., warm_experts=True)``,
``--warm-experts``), off on the CPU, and costs nothing when off.

The pad runs each chosen expert on a row of zeros and adds zero times its
output to the layer's output, so that MLX evaluates it: the output is
unchanged, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import numpy as np

from .layout import assign_slots


@dataclass
class WarmUp:
    """One switch layer's least-recently-used record (``switch.warm_up``).

    Attributes:
        last_used: ``[n_local]`` the step each local expert was last computed (-1: never).
        step: Steps seen.
        pads: Experts computed as pads so far (for the status of a run).
    """

    num_local: int
    last_used: np.ndarray = field(init=False)
    step: int = 0
    pads: int = 0

    def __post_init__(self):
        self.last_used = np.full(self.num_local, -1, dtype=np.int64)

    def choose(self, used: Sequence[int], count: int) -> np.ndarray:
        """Marks ``used`` local experts as used this step and returns up to ``count``
        idle ones, least recently used first (ties to the lower index)."""
        self.step += 1
        used = np.unique(np.asarray(used, dtype=np.int64))
        self.last_used[used] = self.step
        idle = np.setdiff1d(np.arange(self.num_local), used)
        chosen = idle[np.argsort(self.last_used[idle], kind="stable")][: max(count, 0)]
        self.last_used[chosen] = self.step
        self.pads += chosen.size
        return chosen

    def pad(self, switch, flat: np.ndarray, own_ids: np.ndarray, x: mx.array) -> mx.array:
        """Zero, made to depend on this step's warm-up experts: add it to the layer's output.

        Args:
            switch: The local switch layer this record belongs to.
            flat: ``[T*k]`` the call's routing.
            own_ids: Local ids of the experts this rank computes whole this call.
            x: The layer's input (for its dtype and width).
        """
        counts = experts_per_rank(switch.expert_shard.layout, flat)
        chosen = self.choose(own_ids, int(counts.max()) - np.unique(own_ids).size)
        if not chosen.size:
            return mx.zeros((), dtype=x.dtype)
        rows = mx.zeros((chosen.size, x.shape[-1]), dtype=x.dtype)  # [P, D]
        return (switch.compute(rows, chosen) * 0).sum().astype(x.dtype)


def experts_per_rank(layout, flat: np.ndarray) -> np.ndarray:
    """``[N]`` distinct whole experts each rank computes for one call's routing."""
    owner = assign_slots(layout, flat)
    counts = np.zeros(layout.num_ranks, dtype=np.int64)
    for r in range(layout.num_ranks):
        counts[r] = np.unique(flat[owner == r]).size
    return counts


def use_warm_experts(model, force: bool = False) -> int:
    """Gives every local switch layer of a loaded model a :class:`WarmUp`, and on
    Metal sets MLX's wired limit to what the model holds. Only on Metal unless ``force``.

    Returns:
        The number of switch layers warmed.
    """
    from .experts import local_switch_layers

    if not force and mx.default_device() == mx.cpu:
        return 0
    if mx.default_device() != mx.cpu and hasattr(mx, "set_wired_limit"):
        mx.set_wired_limit(int(mx.get_active_memory()))
    layers = [s for s in local_switch_layers(model) if s.expert_shard.layout is not None]
    for switch in layers:
        switch.warm_up = WarmUp(len(switch.expert_shard.experts))
    return len(layers)


__all__ = ["WarmUp", "experts_per_rank", "use_warm_experts"]
