"""Where one MoE layer's experts live: whole on one rank, copied to several, or split across all.

:class:`moe_mpi.placement.ExpertPlacement` gives every expert one owner.
A :class:`Layout` generalises it, per layer:

* an expert held **whole by one rank**: that rank computes every
  ``(token, slot)`` routed to it;
* held **whole by several ranks** (replicas): each slot is computed by one
  of them, chosen by :func:`assign_slots` from the routing alone, which
  every rank has (the router is replicated), so every rank agrees without a
  message;
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

#: A slot whose expert is split: every rank computes its slice.
SPLIT = -1


@dataclass(frozen=True)
class Layout:
    """One MoE layer's experts across ``num_ranks`` ranks.

    Args:
        num_ranks: Ranks of the run.
        holders: Per expert, the ranks holding it whole (ascending); an empty
            tuple means the expert is split across every rank.

    Raises:
        ValueError: A rank out of range, a rank named twice for one expert,
            or a rank that would hold nothing at all.
    """

    num_ranks: int
    holders: Tuple[Tuple[int, ...], ...]
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
        object.__setattr__(self, "_whole", tuple(tuple(w) for w in whole))

    # -------------------------------------------------------- constructors

    @classmethod
    def from_owners(cls, owners: Sequence[int], num_ranks: int) -> "Layout":
        """One holder per expert (``mode="ep"``): ``owners[e]`` holds expert ``e``."""
        return cls(num_ranks, tuple((int(r),) for r in owners))

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
        return {"holders": [list(h) for h in self.holders]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], num_ranks: int) -> "Layout":
        try:
            holders = tuple(tuple(int(r) for r in h) for h in data["holders"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"a layout needs 'holders', a list of rank lists per expert: {e}") from None
        return cls(num_ranks, holders)


def assign_slots(layout: Layout, flat: np.ndarray, rows_per_read: float = 16.0) -> np.ndarray:
    """The rank that computes each ``(token, slot)``, from the routing alone.

    Every rank calls this with the same routing and gets the same answer.

    * A split expert's slots are :data:`SPLIT`: every rank computes its slice.
    * A one-holder expert's slots go to its holder.
    * A replicated expert's slots go, all of them, to one of its holders:
      replicated experts are taken in order of falling slot count (then
      expert id), each to the holder whose work so far is least (ties to the
      lower rank). A rank's work is the experts it reads plus its rows over
      ``rows_per_read`` (the rows whose compute costs as much as reading the
      expert's weights once): a few rows cost about one read, many rows
      their compute. Keeping an expert's rows on one holder reads its
      weights once.

    Args:
        layout: The layer's layout.
        flat: ``[T*k]`` global expert ids.
        rows_per_read: See above.

    Returns:
        ``[T*k]`` int64: computing rank per slot, or :data:`SPLIT`.
    """
    flat = np.asarray(flat, dtype=np.int64).reshape(-1)
    first = np.array([h[0] if h else SPLIT for h in layout.holders], dtype=np.int64)
    ranks = first[flat]  # [T*k]
    replicated = layout.replicated
    if not replicated or not flat.size:
        return ranks
    rows = np.bincount(flat, minlength=layout.num_experts)  # slots per expert
    work = np.zeros(layout.num_ranks)
    single = [e for e in np.flatnonzero(rows) if len(layout.holders[e]) == 1]
    for e in single:
        work[first[e]] += 1.0 + rows[e] / rows_per_read
    for e in sorted((e for e in replicated if rows[e]), key=lambda e: (-rows[e], e)):
        holders = layout.holders[e]
        chosen = min(holders, key=lambda r: (work[r], r))
        work[chosen] += 1.0 + rows[e] / rows_per_read
        ranks[flat == e] = chosen
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
