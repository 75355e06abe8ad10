"""Message-size sweeps within a time budget, for ``moe-mpi calibrate``.

Calibrate times each link measurement (ping-pong, the all-reduce per data
path, the central router's exchange) over a ladder of message sizes, each
fitted to ``latency + bytes / bandwidth``. On a fast link the whole ladder
costs a few seconds; over 10 Mbit/s one 2 MiB all-reduce takes 2-3 s, and
the call counts that give stable medians of microsecond calls took the
calibration to 12 minutes. A :class:`SizeSweep` therefore times the sizes
smallest first and prices each one from what it has already measured:

* A size is begun only if its warm-up call and :data:`MIN_CALLS` timed calls
  fit in what is left of the budget, priced along the line through the two
  sizes before (plus the barrier and gap measured around each call). The
  two smallest sizes are always timed: the fit needs two points.
* Its first call, timed, prices its warm-ups; the warm-ups, timed, price its
  calls. What is left after the size's fewest calls goes first to the fewest
  calls of as many larger sizes as it covers (priced along the line through
  this size and the one before, with a margin); if the next size would fit
  only without the margin, this size keeps to its fewest calls so that one
  can be tried; else the rest is shared evenly among this size and every
  larger one. A size gets at least :data:`MIN_CALLS` calls and at most the
  planned count. On a fast link that is the planned count and the sweep is
  what it was without a budget. A size whose :data:`MIN_CALLS` calls would
  overrun what is left, priced by its own first call, is dropped after it.

Every rank must take the same decisions, or the ranks would call different
collectives and hang. So every time a decision uses is made common first
(``agree``: the slowest rank's figure, from an allgather), and the rest is
arithmetic on those agreed figures, the same on every rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

__all__ = ["MIN_CALLS", "SizeSweep", "SweepBudgets", "run_sweep", "slowest_of"]

#: Fewest timed calls a size gets: a median of three still ignores one call
#: the scheduler stalled; a large message over a slow link rarely has more.
MIN_CALLS = 3

#: Of a size's calls, at most one in this many is spent warming up (beyond
#: the first call, which prices the rest), so a size cut to a few calls is
#: not spent mostly on warm-ups.
WARMUP_SHARE = 5

#: Larger sizes are set aside this much more than the line through the last
#: two predicts (over 10 Mbit/s, 1 MiB all-reduces took 0.8-1.7 times the
#: line through 64 and 256 KiB, and 2 MiB 1.7-2.5 times 1 MiB).
RESERVE_MARGIN = 1.5

#: ``agree``: values from this rank -> the same values on every rank.
Agree = Callable[[Sequence[float]], List[float]]


def slowest_of(allgather: Callable[[Any], list]) -> Agree:
    """An ``agree`` from an allgather: each value becomes the largest any rank has."""
    return lambda values: [max(v) for v in zip(*allgather([float(x) for x in values]))]


@dataclass
class SizeSweep:
    """The sizes of one link measurement, timed smallest first within ``budget`` seconds.

    Attributes:
        sizes: Message sizes in bytes, ascending (the fit's units).
        budget: Seconds this sweep may take, warm-ups and barriers included.
        planned: Timed calls a size gets when time is no object (``planned(nbytes)``).
        warmup: Untimed calls a size gets when time is no object (1 or more).
        measured, calls, warmups: Per size timed so far: its bytes, timed
            calls, untimed calls.
        seconds: Per size timed, its agreed wall time, warm-ups included.
        per_call: Per size timed, its agreed typical call (the slowest
            rank's median), which prices the next size.
        spent: Agreed seconds so far, a size dropped after its warm-up included.
        stopped: ``None`` when every size was timed, ``"budget"`` when the
            sweep stopped before the largest; ``reason`` says why in numbers.
    """

    sizes: Tuple[int, ...]
    budget: float
    planned: Callable[[int], int]
    warmup: int = 5
    measured: List[int] = field(default_factory=list)
    calls: List[int] = field(default_factory=list)
    warmups: List[int] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    per_call: List[float] = field(default_factory=list)
    spent: float = 0.0
    stopped: Optional[str] = None
    reason: str = ""

    def __post_init__(self):
        self.sizes = tuple(int(s) for s in self.sizes)
        if len(self.sizes) < 2 or list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 1:
            raise ValueError(f"a size sweep needs 2+ distinct ascending sizes >= 1 byte, got {list(self.sizes)}")
        if not self.budget >= 0:
            raise ValueError(f"a size sweep's budget must be >= 0 seconds, got {self.budget}")
        if self.warmup < 1:
            raise ValueError(f"a size sweep needs at least 1 warm-up call (it prices the size), got {self.warmup}")

    @property
    def left(self) -> float:
        """Agreed seconds left of the budget (0 once it is spent)."""
        return max(self.budget - self.spent, 0.0)

    def predict(self, nbytes: int) -> float:
        """Seconds one call of ``nbytes`` costs, barrier and gap included, from the
        last two sizes timed: the call along the line through their medians
        (``latency + bytes / bandwidth``, the model being fitted), plus the last
        size's cost per call beyond the call itself (the barrier and gap, which
        do not grow with the size)."""
        (s0, s1), (c0, c1) = self.measured[-2:], self.per_call[-2:]
        per_byte = max((c1 - c0) / (s1 - s0), 0.0)
        around = max(self.seconds[-1] / (self.calls[-1] + self.warmups[-1]) - c1, 0.0)
        return around + c1 + per_byte * (nbytes - s1)

    def admit(self, index: int) -> bool:
        """Whether to begin ``sizes[index]``: always the two smallest, then only if a
        warm-up and :data:`MIN_CALLS` calls, as :meth:`predict` prices them, fit
        in what is left (a size dearer than that is dropped after its first call)."""
        if index < 2:
            return True
        nbytes = self.sizes[index]
        need = (1 + MIN_CALLS) * self.predict(nbytes)
        if need <= self.left:
            return True
        self._stop(f"{nbytes} B predicted at {need:.3g} s for 1 warm-up + {MIN_CALLS} calls, "
                   f"{self.left:.3g} s of {self.budget:.3g} s left")
        return False

    def warmups_for(self, index: int, first: float) -> Optional[int]:
        """More warm-up calls for ``sizes[index]``, whose first call took ``first``
        agreed seconds; ``None`` to drop the size (its fewest calls would overrun).

        At most one in :data:`WARMUP_SHARE` of the calls an even share of what
        is left would pay for at ``first`` (a first call may also pay for
        setting up the connection, so it prices only the warm-ups).
        """
        first = max(first, 1e-9)
        left = max(self.left - first, 0.0)
        if index >= 2 and MIN_CALLS * first > left:
            self._stop(f"{self.sizes[index]} B took {first:.3g} s for its first call, {MIN_CALLS} more "
                       f"would overrun the {left:.3g} s of {self.budget:.3g} s left")
            return None
        share = left / (len(self.sizes) - index)
        return min(self.warmup - 1, int(share // first) // WARMUP_SHARE)

    def calls_for(self, index: int, used: float, price: float, call: Optional[float] = None) -> int:
        """Timed calls for ``sizes[index]``, which has used ``used`` agreed seconds
        on warm-ups; ``price``: agreed seconds per call, barrier and gap included;
        ``call``: the agreed median call alone, if its warm-ups measured one.

        What is left after this size's fewest calls goes first to the fewest
        calls of as many larger sizes as it covers, priced along the line
        through the previous size's median and this one's, times
        :data:`RESERVE_MARGIN`. If the first it does not cover would fit at
        its price without the margin, this size gets only its fewest calls and
        that size everything else: the margin is a guess, and a size tried
        with too little left is dropped after its first call. Otherwise the
        rest is shared evenly among this size and every larger one, those
        left out too, whose shares are then left for the next sweep. The smallest
        size, with no line yet, gets an even share of what is left: a ratio
        of sizes would price 256 KiB from 8 B's latency thousands of times
        too dear.
        """
        price = max(price, 1e-9)
        left = max(self.left - used, 0.0)
        if index == 0 or call is None:
            affordable = int(left / (len(self.sizes) - index) // price)
        else:
            nbytes, prev_bytes, prev_call = self.sizes[index], self.measured[-1], self.per_call[-1]
            per_byte = max((call - prev_call) / (nbytes - prev_bytes), 0.0)
            around = max(price - call, 0.0)  # barrier and gap: the same for every size
            rest = left - MIN_CALLS * price
            reserve = 0.0
            for larger in self.sizes[index + 1:]:
                line = call + per_byte * (larger - nbytes)
                need = (1 + MIN_CALLS) * (around + RESERVE_MARGIN * line)
                if reserve + need > rest:
                    if reserve + (1 + MIN_CALLS) * (around + line) <= rest:
                        return MIN_CALLS  # everything else for that size's try
                    break
                reserve += need
            affordable = MIN_CALLS + int(max(rest - reserve, 0.0) / (len(self.sizes) - index) // price)
        return min(self.planned(self.sizes[index]), max(MIN_CALLS, affordable))

    def spend(self, seconds: float) -> None:
        """Counts agreed ``seconds`` against the budget (a dropped size's warm-up)."""
        self.spent += seconds

    def record(self, nbytes: int, warmups: int, calls: int, seconds: float, per_call: float) -> None:
        """One size timed: ``warmups`` untimed calls (the first included) and ``calls``
        timed ones in ``seconds`` (agreed, all included); ``per_call`` its agreed median."""
        self.measured.append(nbytes)
        self.warmups.append(warmups)
        self.calls.append(calls)
        self.seconds.append(seconds)
        self.per_call.append(per_call)
        self.spent += seconds

    def _stop(self, why: str) -> None:
        self.stopped = "budget"
        self.reason = why

    def meta(self) -> dict:
        """What the profile records of this sweep (docs/perfmodel.md)."""
        return {
            "planned_sizes": list(self.sizes), "sizes": list(self.measured), "calls": list(self.calls),
            "warmups": list(self.warmups), "budget_s": self.budget, "seconds": self.spent,
            "stopped": self.stopped, "reason": self.reason,
        }


def run_sweep(
    sweep: SizeSweep,
    agree: Agree,
    run: Callable[[int, int], Tuple[Any, float]],
    clock: Callable[[], float] = time.perf_counter,
) -> list:
    """Times ``sweep``'s sizes smallest first; collective (every rank calls it).

    Args:
        sweep: The sizes, budget and planned counts; filled in as sizes are timed.
        agree: Makes this rank's figures common to every rank (:func:`slowest_of`).
        run: ``run(nbytes, count)`` makes ``count`` calls of ``nbytes`` (each
            after the barrier and gap it needs) and returns ``(result, typical
            call seconds)``; the result of the timed calls is kept.
        clock: Seconds, for the budget.

    Returns:
        ``run``'s result of the timed calls, per size timed (``sweep.measured``).
    """
    results = []
    for index, nbytes in enumerate(sweep.sizes):
        if not sweep.admit(index):
            break
        start = clock()
        run(nbytes, 1)
        (used,) = agree([clock() - start])
        warm = sweep.warmups_for(index, used)
        if warm is None:
            sweep.spend(used)
            break
        price, call = used, None
        if warm:
            start = clock()
            _, typical = run(nbytes, warm)
            seconds, call = agree([clock() - start, typical])
            used += seconds
            price = seconds / warm
        calls = sweep.calls_for(index, used, price, call)
        start = clock()
        result, typical = run(nbytes, calls)
        seconds, per_call = agree([clock() - start, typical])
        sweep.record(nbytes, 1 + warm, calls, used + seconds, per_call)
        results.append(result)
    return results


class SweepBudgets:
    """Seconds for each of several sweeps, handed out as each begins.

    ``budgets[name]`` is what is left of ``total`` (``total`` less
    ``elapsed()``) times ``name``'s weight over the weights of the sweeps not
    yet begun, so a sweep that finishes early leaves its time to the rest.
    ``elapsed`` must give every rank the same figure (the slowest rank's
    clock), and every rank must ask for the same names in the same order.

    Attributes:
        link_budget: What was left of ``total`` when the first sweep began.
    """

    def __init__(self, total: float, weights: dict, elapsed: Callable[[], float]):
        if not total >= 0:
            raise ValueError(f"a time budget must be >= 0 seconds, got {total}")
        bad = {k: w for k, w in weights.items() if not w > 0}
        if bad:
            raise ValueError(f"sweep weights must be > 0, got {bad}")
        self.total = total
        self.weights = dict(weights)
        self.elapsed = elapsed
        self.given: dict = {}
        self.link_budget: Optional[float] = None

    def __getitem__(self, name: str) -> float:
        if name not in self.weights or name in self.given:
            raise KeyError(f"sweep {name!r}: not one of {sorted(self.weights)} or asked for twice")
        left = max(self.total - self.elapsed(), 0.0)
        if self.link_budget is None:
            self.link_budget = left
        pending = sum(w for n, w in self.weights.items() if n not in self.given)
        self.given[name] = left * self.weights[name] / pending
        return self.given[name]
