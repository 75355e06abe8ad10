"""Choosing each MoE layer's layout from router statistics: placement, split, replicas.

In expert parallelism each layer's all-reduce waits for the busiest rank,
so the cost of a layer is its busiest rank's work. Given each expert's share
``p_e`` of the layer's ``(token, slot)`` pairs (from
:class:`moe_mpi.routing.RoutingStats`, or uniform), this module chooses a
:class:`moe_mpi.layout.Layout` per layer that makes that work small.

**The cost model** (docs/balance.md). A step of ``B`` tokens routes
``B·k`` slots; expert ``e`` gets ``B·k·p_e`` rows in expectation. A rank
that computes expert ``e`` whole for ``m`` rows does ``W(m)`` units of work,
the row price (:class:`moe_mpi.rowcost.RowCost`): by default ``1 + m / 16``
(reading the expert's weights once, plus its rows' arithmetic, 16 rows
costing as much as one read), or what ``moe-mpi calibrate`` measured on
the machine (``--profile``). A split expert costs each rank its share of
that (``w_r / Σw`` of the intermediate dimension) times a penalty for thin
slices, ``1 + c(m) / (I·share)`` (:data:`SLICE_OVERHEAD`: a fixed cost per
slice, in intermediate units, by the rows ``m`` and the weight format). A
replicated expert's rows go to one of its holders each step, or are shared
among them where that lowers the busiest holder's work
(:func:`moe_mpi.layout.assign_rows`), priced the same way. The busiest rank's expected work,
``E[max_r work_r / capacity_r]``, is estimated by drawing routings
(:data:`SAMPLES` steps, tokens choosing ``k`` distinct experts by ``p``) at
each batch of :data:`BATCHES`, relative to perfect balance, and averaged.

**The search**, per layer: whole experts are placed hottest first on the
rank with the least expected work per capacity (within each rank's share
of the experts: its memory); then the ``m`` hottest experts are split, for
the ``m`` (0 to E) that costs least; then, within a memory budget, the
hottest whole expert of the busiest rank is copied to the least busy rank
while that lowers the cost. ``balance`` (:data:`BALANCE_CHOICES`) limits the
search to splitting (no copies), to copying (no split), or allows both; with
both, copies are also tried on the placement with nothing split, and the
cheaper of the two results is kept.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from .layout import Layout, assign_rows
from .rowcost import DEFAULT_ROWS_PER_READ, RowCost

#: The default row price's rows per read (:meth:`moe_mpi.rowcost.RowCost.default`).
ROWS_PER_READ = DEFAULT_ROWS_PER_READ
#: Fixed cost of computing a slice, in intermediate units, by the expert's rows, per weight format:
#: ``(rows, cost)`` points, linear between them, flat outside (:func:`slice_overhead`). Measured on
#: a CPU VM where it can be (examples/slice_cost.py, docs/balance.md "The slice penalty's constant"
#: and "Narrow experts"); not measured on Metal.
#: float: the numpy decode kernel is memory-bound, a slice reads its share of the bytes (about 0
#: at 16 rows, not measurable at 1-2); at 128 rows a thin BLAS product loses efficiency (16-37).
#: quantized: MLX's quantized kernels on a CPU cost in proportion to the rows, so a thin slice
#: costs a little at 1-4 rows (9-16) and nothing at 32-128 (-2 to 3).
SLICE_OVERHEAD = {
    "float": ((16.0, 0.0), (128.0, 32.0)),
    "quantized": ((4.0, 13.0), (32.0, 2.0), (128.0, 0.0)),
}
#: Batches (tokens per step) the layout is chosen for: decode at 1, 8 and 64, and a 512-token prefill.
BATCHES = (1, 8, 64, 512)
#: Routing draws per batch when estimating a layout's cost.
SAMPLES = 64
#: What the search may do to hot experts: split them, copy them (replicas), or either.
BALANCE_CHOICES = ("split", "replicate", "both")


def slice_overhead(rows, quantized: bool = False) -> np.ndarray:
    """:data:`SLICE_OVERHEAD` at ``rows`` rows per expert (a number or array, any shape)."""
    xs, ys = zip(*SLICE_OVERHEAD["quantized" if quantized else "float"])
    return np.interp(np.asarray(rows, dtype=np.float64), xs, ys)


def draw_routing(p: np.ndarray, k: int, tokens: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """``[steps, tokens, k]`` expert ids: each token's ``k`` distinct experts, drawn by ``p``.

    Gumbel top-k: the ``k`` largest of ``log p_e + Gumbel noise`` are a draw
    without replacement in proportion to ``p``.
    """
    logits = np.log(np.maximum(p, 1e-12))
    noise = rng.gumbel(size=(steps, tokens, p.size))
    return np.argsort(-(logits + noise), axis=-1)[..., :k]


def _draws(p: np.ndarray, k: int, batches: Sequence[int], samples: int, seed: int) -> List[np.ndarray]:
    """Per batch, ``[samples, E]`` rows routed to each expert in a drawn step."""
    rng = np.random.default_rng(seed)
    out = []
    for tokens in batches:
        routes = draw_routing(p, min(k, p.size), tokens, samples, rng).reshape(samples, -1)  # [S, T*k]
        out.append(np.stack([np.bincount(r, minlength=p.size) for r in routes]))
    return out


def layout_cost(
    layout: Layout,
    p: np.ndarray,
    k: int,
    *,
    weights: Optional[Sequence[float]] = None,
    intermediate: int = 1024,
    quantized: bool = False,
    batches: Sequence[int] = BATCHES,
    samples: int = SAMPLES,
    seed: int = 0,
    draws: Optional[List[np.ndarray]] = None,
) -> float:
    """The busiest rank's expected work per capacity, relative to perfect balance, averaged over ``batches``.

    1.0 is perfect balance with no penalty; ``ep`` at batch 1 with uniform
    routing is about 1.3 on 2 ranks. See the module docstring. ``draws``
    (from :func:`_draws`) lets several layouts be costed on the same routings.
    """
    p = _normalised(p)
    draws = draws if draws is not None else _draws(p, k, batches, samples, seed)
    n = layout.num_ranks
    share = _shares(weights, n)
    split = np.zeros(layout.num_experts, dtype=bool)
    split[list(layout.split)] = True
    first = np.array([h[0] if h else 0 for h in layout.holders])
    onehot = np.zeros((layout.num_experts, n))
    onehot[np.flatnonzero(~split), first[~split]] = 1.0  # each whole expert's first holder
    price = layout.price
    ratios = []
    for rows in draws:  # [S, E]
        cost = price.work_of(rows)  # [S, E] each expert's work, done whole
        work = cost @ onehot  # [S, N]
        if layout.replicated:  # each step's replicated experts go where assign_rows sends them
            work = np.stack([_replica_work(layout, r, price) for r in rows])
        # A split expert costs each rank its share, times 1 + c / (I * share) for the slice's fixed cost c.
        sliced = cost[:, split]  # [S, Es]
        fixed = (sliced * slice_overhead(rows[:, split], quantized)).sum(axis=1, keepdims=True) / intermediate  # [S, 1]
        work += sliced.sum(axis=1, keepdims=True) * share + fixed  # [S, N]
        ideal = np.maximum(cost.sum(axis=1), 1e-12)  # [S]: the step's work, perfectly shared
        ratios.append(float(np.mean((work / share).max(axis=1) / ideal)))
    return float(np.mean(ratios))


def _replica_work(layout: Layout, rows: np.ndarray, price: RowCost) -> np.ndarray:
    """``[N]`` whole experts' work of one step with replicas, rows assigned as the model assigns them.

    ``rows``: ``[E]`` rows per expert. Split experts are not counted here.
    """
    return price.work_of(assign_rows(layout, rows)).sum(axis=0)  # [E, N] -> [N]


def _shares(weights: Optional[Sequence[float]], n: int) -> np.ndarray:
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.size != n or not (w > 0).all():
        raise ValueError(f"weights={list(w)}: need {n} positive numbers, one per rank")
    return w / w.sum()


def _capacities(num_experts: int, n: int, weights: Optional[Sequence[float]]) -> List[int]:
    """Experts each rank may hold whole: its share of the layer (its memory), at least one."""
    from .slicing import apportion

    return apportion(num_experts, list(weights) if weights is not None else [1.0] * n)


def place_whole(p: np.ndarray, experts: Sequence[int], n: int, weights=None, capacity: Optional[List[int]] = None) -> dict:
    """Hottest first, each expert to the rank with the least expected load per capacity
    that still has room; ties to the lower rank. Returns ``{expert: rank}``."""
    share = _shares(weights, n)
    room = list(capacity) if capacity is not None else [len(experts)] * n
    load = np.zeros(n)
    owners = {}
    for e in sorted(experts, key=lambda e: (-p[e], e)):
        open_ranks = [r for r in range(n) if room[r] > 0]
        r = min(open_ranks, key=lambda r: ((load[r] + p[e]) / share[r], r))
        owners[e] = r
        load[r] += p[e]
        room[r] -= 1
    return owners


def ep_layout(p: np.ndarray, n: int, weights: Optional[Sequence[float]] = None) -> Layout:
    """One owner per expert, placed by ``p`` (hottest first, least-loaded rank), each
    rank holding its share of the experts (``weights``: memory)."""
    p = _normalised(p)
    owners = place_whole(p, range(p.size), n, weights, _capacities(p.size, n, weights))
    return Layout.from_owners([owners[e] for e in range(p.size)], n)


def auto_layout(
    p: np.ndarray,
    k: int,
    n: int,
    *,
    weights: Optional[Sequence[float]] = None,
    replicas: float = 0.0,
    can_split: bool = True,
    intermediate: int = 1024,
    quantized: bool = False,
    batches: Sequence[int] = BATCHES,
    balance: str = "both",
    row_cost: Optional[RowCost] = None,
) -> Layout:
    """The layout of least :func:`layout_cost` found by the search of the module docstring.

    Args:
        p: ``[E]`` each expert's share of the layer's slots.
        k: Experts per token.
        n: Ranks.
        weights: Relative capacity (memory, speed) of each rank.
        replicas: Extra whole experts each rank may hold (memory budget).
        can_split: Whether the layer's experts can be sliced into ``n``.
        intermediate: The experts' intermediate size (thin slices cost more).
        quantized: Whether the experts' weights are quantized (the slice's
            fixed cost differs by kernel: :data:`SLICE_OVERHEAD`).
        batches: Tokens per step the layout is chosen for.
        balance: ``"split"``: hot experts may be split, never copied
            (``replicas`` is ignored); ``"replicate"``: copied within
            ``replicas``, never split (every expert whole); ``"both"``.
        row_cost: The price of rows (None: :meth:`RowCost.default`); the
            layout returned carries it, so the model shares replicated
            experts' rows by the same price the search assumed.

    Raises:
        ValueError: An unknown ``balance``, or ``"replicate"`` with fewer
            experts than ranks (a rank would hold nothing).
    """
    if balance not in BALANCE_CHOICES:
        raise ValueError(f"balance={balance!r}: expected one of {', '.join(BALANCE_CHOICES)}")
    p = _normalised(p)
    if n == 1:
        return Layout(1, ((0,),) * p.size, row_cost)
    if balance == "replicate" and p.size < n:
        raise ValueError(
            f"balance='replicate' keeps every expert whole: {p.size} experts cannot cover {n} ranks; "
            "use balance='split' or 'both'"
        )
    order = sorted(range(p.size), key=lambda e: (-p[e], e))
    capacity = _capacities(p.size, n, weights)

    draws = _draws(p, k, batches, SAMPLES, 0)

    def cost(layout: Layout) -> float:
        return layout_cost(layout, p, k, weights=weights, intermediate=intermediate, quantized=quantized, draws=draws)

    best, best_cost, whole_only = None, np.inf, None
    for m in range(p.size + 1) if can_split and balance != "replicate" else [0]:
        split, whole = set(order[:m]), order[m:]
        if whole and len(whole) < n and not split:
            continue
        owners = place_whole(p, whole, n, weights, capacity)
        layout = Layout(n, tuple(() if e in split else (owners[e],) for e in range(p.size)), row_cost)
        c = cost(layout)
        if m == 0:
            whole_only = (layout, c)
        if c < best_cost - 1e-9:
            best, best_cost = layout, c
    if best is None:  # nothing splits and E < n: no whole placement covers every rank
        raise ValueError(f"{p.size} experts that cannot be split cannot cover {n} ranks")
    if balance == "split":
        return best
    best, best_cost = _add_replicas(best, best_cost, p, n, replicas, cost)
    if balance == "both" and whole_only is not None and best.split and replicas >= 1:
        # Copying the hot experts can beat splitting them even where every whole placement
        # alone loses to the split: cost both ways, keep the cheaper.
        copied, copied_cost = _add_replicas(*whole_only, p, n, replicas, cost)
        if copied_cost < best_cost - 1e-9:
            best = copied
    return best


def _add_replicas(layout: Layout, current: float, p: np.ndarray, n: int, budget: float, cost) -> Tuple[Layout, float]:
    """Copies the busiest rank's hottest whole expert to the least busy rank with budget
    left, while that lowers the cost. Returns the layout and its cost."""
    spare = [int(budget)] * n
    while True:
        load = np.zeros(n)
        for e, holders in enumerate(layout.holders):
            for r in holders:
                load[r] += p[e] / len(holders)
        candidates = []
        for r in np.argsort(-load):
            for e in sorted(layout.whole_on(int(r)), key=lambda e: -p[e]):
                targets = [t for t in range(n) if spare[t] > 0 and t not in layout.holders[e]]
                if targets:
                    candidates.append((e, min(targets, key=lambda t: (load[t], t))))
                    break
            if candidates:
                break
        if not candidates:
            return layout, current
        e, target = candidates[0]
        holders = list(layout.holders)
        holders[e] = tuple(sorted(holders[e] + (target,)))
        trial = layout.with_holders(holders)
        c = cost(trial)
        if c >= current - 1e-9:
            return layout, current
        layout, current = trial, c
        spare[target] -= 1


def _normalised(p) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or not p.size or (p < 0).any() or not np.isfinite(p).all():
        raise ValueError("expert shares must be a non-empty list of non-negative numbers")
    total = p.sum()
    return p / total if total else np.full(p.size, 1.0 / p.size)


def expected_loads(layout: Layout, p: np.ndarray, k: int, batch: int, samples: int = 256, seed: int = 0) -> Tuple[np.ndarray, float]:
    """Each rank's mean rows per step at ``batch`` tokens, and the mean busiest-over-mean ratio.

    For ``moe-mpi info``: split experts count ``1/N`` of their rows on
    every rank, replicated ones go where :func:`assign_slots` sends them.
    """
    from .layout import rank_loads

    rng = np.random.default_rng(seed)
    routes = draw_routing(_normalised(p), k, batch, samples, rng)
    loads = np.stack([rank_loads(layout, step.reshape(-1)) for step in routes])  # [S, N]
    means = loads.mean(axis=1)
    ratio = float(np.mean(loads.max(axis=1)[means > 0] / means[means > 0]))
    return loads.mean(axis=0), ratio
