"""Where one MoE layer's experts live: whole on one rank, copied to several, or split across all.

:class:`moe_mpi.placement.ExpertPlacement` gives every expert one owner.
A :class:`Layout` generalises it, per layer:

* an expert held **whole by one rank**: that rank computes every
  ``(token, slot)`` routed to it;
* held **whole by several ranks** (replicas): each slot is computed by one
  of them, chosen by :func:`assign_slots` from the routing alone, which
  every rank has (the router is replicated), so every rank agrees without a
  message; an expert's rows may be shared among its holders when that
  evens out the ranks' work, priced by the layout's
  :class:`moe_mpi.rowcost.RowCost`;
* **split**: every rank holds a slice of the expert's intermediate
  dimension and computes its slice for every slot routed to it.

Each slot is computed exactly once, or as slices that sum to it, so the
layer's one all-reduce still gives the exact sum. ``mode="ep"`` is a layout
with one holder per expert, ``mode="sliced"`` one with every expert split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .rowcost import RowCost

#: A slot whose expert is split: every rank computes its slice.
SPLIT = -1
_DEFAULT_PRICE = RowCost.default()


@dataclass(frozen=True)
class Layout:
    """One MoE layer's experts across ``num_ranks`` ranks.

    Args:
        num_ranks: Ranks of the run.
        holders: Per expert, the ranks holding it whole (ascending); an empty
            tuple means the expert is split across every rank.
        row_cost: The price of rows that :func:`assign_slots` shares a
            replicated expert's rows by (None: :meth:`RowCost.default`). It is
            part of the layout so that every rank uses the same one.

    Raises:
        ValueError: A rank out of range, a rank named twice for one expert,
            or a rank that would hold nothing at all.
    """

    num_ranks: int
    holders: Tuple[Tuple[int, ...], ...]
    row_cost: Optional[RowCost] = None
    _whole: Tuple[Tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.num_ranks < 1:
            raise ValueError(f"num_ranks={self.num_ranks} must be at least 1")
        holders = tuple(tuple(sorted(int(r) for r in h)) for h in self.holders)
        if not holders:
            raise ValueError("a layout needs at least one expert")
        whole: List[List[int]] = [[] for _ in range(self.num_ranks)]
        for e, ranks in enumerate(holders):
            if len(set(ranks)) != len(ranks):
                raise ValueError(f"expert {e} names a rank twice: {ranks}")
            for r in ranks:
                if not 0 <= r < self.num_ranks:
                    raise ValueError(f"expert {e} is held by rank {r}, out of range for num_ranks={self.num_ranks}")
                whole[r].append(e)
        if not any(not h for h in holders):  # nothing split: every rank must hold something
            idle = [r for r, experts in enumerate(whole) if not experts]
            if idle:
                raise ValueError(
                    f"rank {idle[0]} holds no expert (num_experts={len(holders)}, num_ranks={self.num_ranks})"
                )
        object.__setattr__(self, "holders", holders)
        if self.row_cost is not None and self.row_cost.is_default:
            object.__setattr__(self, "row_cost", None)  # one spelling of the default, for equality
        object.__setattr__(self, "_whole", tuple(tuple(w) for w in whole))

    # -------------------------------------------------------- constructors

    @classmethod
    def from_owners(cls, owners: Sequence[int], num_ranks: int) -> "Layout":
        """One holder per expert (``mode="ep"``): ``owners[e]`` holds expert ``e``."""
        return cls(num_ranks, tuple((int(r),) for r in owners))

    def with_holders(self, holders) -> "Layout":
        """The same ranks and row price, other holders."""
        return Layout(self.num_ranks, tuple(holders), self.row_cost)

    @property
    def price(self) -> RowCost:
        """The row price in force: :attr:`row_cost`, or the default."""
        return self.row_cost if self.row_cost is not None else _DEFAULT_PRICE

    @classmethod
    def all_split(cls, num_experts: int, num_ranks: int) -> "Layout":
        """Every expert split across every rank (``mode="sliced"``)."""
        return cls(num_ranks, ((),) * num_experts)

    # ----------------------------------------------------------- queries

    @property
    def num_experts(self) -> int:
        return len(self.holders)

    @property
    def split(self) -> Tuple[int, ...]:
        """The experts split across every rank, ascending."""
        return tuple(e for e, h in enumerate(self.holders) if not h)

    @property
    def replicated(self) -> Tuple[int, ...]:
        """The experts held whole by more than one rank."""
        return tuple(e for e, h in enumerate(self.holders) if len(h) > 1)

    def whole_on(self, rank: int) -> Tuple[int, ...]:
        """The experts ``rank`` holds whole, ascending (its stacked weights, in this order)."""
        return self._whole[rank]

    def owners(self) -> Optional[Tuple[int, ...]]:
        """Each expert's one holder, if every expert has exactly one; else None."""
        if all(len(h) == 1 for h in self.holders):
            return tuple(h[0] for h in self.holders)
        return None

    def describe(self) -> str:
        """One line: experts whole per rank, replicas and split experts."""
        counts = "/".join(str(len(self.whole_on(r))) for r in range(self.num_ranks))
        return f"whole per rank {counts}, replicated {len(self.replicated)}, split {len(self.split)}"

    # ------------------------------------------------------- persistence

    def to_dict(self) -> Dict[str, Any]:
        """``{"holders": [...]}``, and ``"row_cost"`` when it is not the default."""
        data: Dict[str, Any] = {"holders": [list(h) for h in self.holders]}
        if self.row_cost is not None:
            data["row_cost"] = self.row_cost.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], num_ranks: int) -> "Layout":
        try:
            holders = tuple(tuple(int(r) for r in h) for h in data["holders"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"a layout needs 'holders', a list of rank lists per expert: {e}") from None
        row_cost = RowCost.from_dict(data["row_cost"]) if data.get("row_cost") is not None else None
        return cls(num_ranks, holders, row_cost)


def assign_rows(layout: Layout, rows: np.ndarray) -> np.ndarray:
    """``[E, N]``: how many of each expert's rows each rank computes whole, from the routing alone.

    Every rank calls this with the same routing and gets the same answer.
    Split experts get no rows here (every rank computes its slice of all of
    them); a one-holder expert's rows all go to its holder. A replicated
    expert's rows go where they lower the work of its busiest holder:

    * replicated experts are taken in order of falling rows (then expert
      id), after every one-holder expert's work is counted;
    * for each, two ways are priced with the layout's row price ``W`` (a
      rank's work is the sum of ``W(rows)`` over the experts it computes):
      all rows to the holder whose work so far is least (ties to the lower
      rank), or the rows shared among the holders so that the largest
      resulting work among them is least (water-filling: each holder takes
      rows while its work stays under a common level); the sharing is kept
      only if its largest work is lower. Each holder that takes rows reads
      the expert's weights, which ``W`` prices (``W(a) + W(b) >= W(a + b)``
      on a machine where reading dominates), so rows stay together unless
      sharing them pays.

    Args:
        layout: The layer's layout.
        rows: ``[E]`` rows (``(token, slot)`` pairs) routed to each expert.

    Returns:
        ``[E, N]`` int64 rows per expert and rank; each whole expert's row sums to its rows.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    n = layout.num_ranks
    out = np.zeros((layout.num_experts, n), dtype=np.int64)  # [E, N]
    single = np.array([len(h) == 1 for h in layout.holders])
    first = np.array([h[0] if h else 0 for h in layout.holders], dtype=np.int64)
    out[np.flatnonzero(single), first[single]] = rows[single]
    replicated = [e for e in layout.replicated if rows[e]]
    if not replicated:
        return out
    price = layout.price
    work = price.work_of(out).sum(axis=0)  # [N] work of the one-holder experts
    for e in sorted(replicated, key=lambda e: (-rows[e], e)):
        holders = np.asarray(layout.holders[e], dtype=np.int64)
        counts = _share(price, int(rows[e]), work[holders])  # [H]
        out[e, holders] = counts
        work[holders] += price.work_of(counts)
    return out


def _share(price: RowCost, m: int, work: np.ndarray) -> np.ndarray:
    """``[H]`` rows for each of ``H`` holders with work so far ``work``: all to the
    least loaded, or water-filled if that lowers the largest work among them."""
    whole = np.zeros(work.size, dtype=np.int64)
    whole[int(np.argmin(work))] = m  # argmin: the first of equals, the lower rank
    whole_max = float(np.max(work + price.work_of(whole)))
    levels = price.work_of(np.arange(m + 1))  # [m+1] non-decreasing, 0 at 0 rows
    # Candidate levels: a holder's work after some number of rows. For each, the rows every
    # holder can take without passing it; the least level at which they cover m is the best max.
    candidates = np.unique((work[:, None] + levels[None, :]).reshape(-1))  # [C]
    fits = np.searchsorted(levels, candidates[:, None] - work[None, :], side="right") - 1  # [C, H]
    fits = np.clip(fits, 0, m)
    best = int(np.argmax(fits.sum(axis=1) >= m))  # the sum is m * H >= m at the top level
    shared = fits[best].copy()
    for h in range(work.size - 1, -1, -1):  # give back the excess, last holders first
        back = min(int(shared.sum()) - m, int(shared[h]))
        shared[h] -= back
    shared_max = float(np.max(work + price.work_of(shared)))
    return shared if shared_max < whole_max * (1.0 - 1e-12) else whole


def assign_slots(layout: Layout, flat: np.ndarray) -> np.ndarray:
    """The rank that computes each ``(token, slot)``, from the routing alone.

    Every rank calls this with the same routing and gets the same answer.

    * A split expert's slots are :data:`SPLIT`: every rank computes its slice.
    * A one-holder expert's slots go to its holder.
    * A replicated expert's rows are counted out to its holders by
      :func:`assign_rows` (all to one, or shared to even out the work),
      and its slots, in routing order, go in contiguous blocks: the first
      holder's count to the lowest holding rank, and so on.

    Each slot gets exactly one rank (or :data:`SPLIT`), so the layer's
    all-reduce still sums every slot once.

    Args:
        layout: The layer's layout.
        flat: ``[T*k]`` global expert ids.

    Returns:
        ``[T*k]`` int64: computing rank per slot, or :data:`SPLIT`.
    """
    flat = np.asarray(flat, dtype=np.int64).reshape(-1)
    first = np.array([h[0] if h else SPLIT for h in layout.holders], dtype=np.int64)
    ranks = first[flat]  # [T*k]
    if not layout.replicated or not flat.size:
        return ranks
    counts = assign_rows(layout, np.bincount(flat, minlength=layout.num_experts))  # [E, N]
    for e in layout.replicated:
        slots = np.flatnonzero(flat == e)
        if slots.size:
            ranks[slots] = np.repeat(np.arange(layout.num_ranks), counts[e])
    return ranks


def rank_loads(layout: Layout, flat: np.ndarray, weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """``[N]`` rows each rank computes for one call's routing ``flat``.

    A split expert's rows count on every rank in proportion to its slice
    (``weights``, equal when None); replicated ones where :func:`assign_slots`
    sends them.
    """
    owner = assign_slots(layout, flat)
    loads = np.bincount(owner[owner >= 0], minlength=layout.num_ranks).astype(np.float64)
    shares = np.ones(layout.num_ranks) if weights is None else np.asarray(weights, dtype=np.float64)
    return loads + np.count_nonzero(owner == SPLIT) * shares / shares.sum()


def layouts_to_json(layouts: Sequence[Layout], path: Optional[str] = None, note: str = "") -> str:
    """A per-layer layouts file (``moe-mpi balance`` writes it, ``--layouts`` reads it)."""
    data = {
        "format": "moe_mpi.layouts",
        "version": 1,
        "num_ranks": layouts[0].num_ranks,
        "note": note,
        "layers": [layout.to_dict() for layout in layouts],
    }
    text = json.dumps(data, indent=1)
    if path is not None:
        with open(path, "w") as f:
            f.write(text + "\n")
    return text


def layouts_from_json(path: str, num_ranks: int, num_experts: Sequence[int]) -> List[Layout]:
    """Reads a layouts file, checking it fits the run.

    Raises:
        ValueError: Not a layouts file, or made for other ranks, layers or experts.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != "moe_mpi.layouts":
        raise ValueError(f"{path}: not a moe_mpi layouts file (no \"format\": \"moe_mpi.layouts\")")
    if data.get("version") != 1:
        raise ValueError(f"{path}: layouts format version {data.get('version')!r}; this moe_mpi reads version 1")
    if data.get("num_ranks") != num_ranks:
        raise ValueError(f"{path}: made for num_ranks={data.get('num_ranks')}, the run has num_ranks={num_ranks}")
    layers = data.get("layers") or []
    if len(layers) != len(num_experts):
        raise ValueError(f"{path}: {len(layers)} layers, the model has {len(num_experts)} MoE layers")
    layouts = [Layout.from_dict(layer, num_ranks) for layer in layers]
    for i, (layout, n) in enumerate(zip(layouts, num_experts)):
        if layout.num_experts != n:
            raise ValueError(f"{path}: layer {i} has num_experts={layout.num_experts}, the model {n}")
    return layouts
