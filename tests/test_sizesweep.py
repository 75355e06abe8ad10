"""``moe_mpi.sizesweep``: calibrate's message-size sweeps within a time budget.

No MPI here: a link is a cost per call on a fake clock, and the ranks of a
job are threads whose ``agree`` is an allgather through a barrier.
"""

from __future__ import annotations

import random
import threading

import pytest

from moe_mpi.sizesweep import MIN_CALLS, SizeSweep, SweepBudgets, run_sweep, slowest_of

SIZES = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20)
# Medians per all-reduce over 2 fake hosts at 10 Mbit/s (docs/results/perfmodel/
# n2-decode-f32-10mbit/calib-after.json, mpi4py-numpy): 2 MiB costs 2.5x 1 MiB.
SLOW = dict(zip(SIZES, (35e-6, 2.4e-3, 12.8e-3, 54.7e-3, 0.244, 1.19, 3.0)))
FAST = {n: 20e-6 + n / 1e9 for n in SIZES}
GAP = 2.2e-3  # barrier + NETWORK_GAP around each call


def planned(nbytes: int) -> int:
    return max(10, min(200, int(2e7 // nbytes)))


def simulate(costs, budget, around=GAP, setup=0.0, planned=planned, warmup=5):
    """One rank alone: ``(sweep, results)`` with a clock that only the calls move;
    the sweep's very first call also pays ``setup`` (a connection opened)."""
    now = [0.0]
    calls = [0]

    def run(nbytes, count):
        if calls[0] == 0:
            now[0] += setup
        calls[0] += count
        now[0] += count * (costs[nbytes] + around)
        return ("timed", nbytes, count), costs[nbytes]

    sweep = SizeSweep(tuple(costs), budget, planned, warmup=warmup)
    results = run_sweep(sweep, lambda values: list(values), run, clock=lambda: now[0])
    return sweep, results


def test_a_fast_link_gets_every_size_at_the_planned_calls():
    sweep, results = simulate(FAST, 6.0, around=5e-6)
    assert sweep.measured == list(SIZES) and sweep.stopped is None and sweep.reason == ""
    assert sweep.calls == [planned(n) for n in SIZES]
    assert sweep.warmups == [5] * len(SIZES)  # the first call and 4 more, as before the budget
    assert results == [("timed", n, planned(n)) for n in SIZES]
    assert sweep.spent < 1.0


def test_a_first_call_that_opens_the_connection_cuts_no_calls():
    """Ping-pong over veth (calibrate, 2 fake hosts): 8 B to 256 KiB in
    microseconds, but the first call waits 5 ms for TCP. Priced by that call
    scaled to 256 KiB, 8 B got 555 calls of its 2000."""
    costs = {8: 18e-6, 1 << 10: 19e-6, 16 << 10: 22e-6, 64 << 10: 97e-6, 256 << 10: 150e-6}
    pingpong_calls = lambda nbytes: 2000 if nbytes <= 16 << 10 else 200  # noqa: E731
    sweep, _ = simulate(costs, 3.5, around=0.0, setup=5e-3, planned=pingpong_calls, warmup=20)
    assert sweep.calls == [2000, 2000, 2000, 200, 200] and sweep.warmups == [20] * 5
    assert sweep.stopped is None and sweep.spent < 0.5


@pytest.mark.parametrize("budget", [3.0, 6.0, 9.0, 12.0])
def test_a_slow_link_stops_growing_within_the_budget(budget):
    sweep, results = simulate(SLOW, budget)
    assert sweep.stopped == "budget"
    assert 2 <= len(sweep.measured) < len(SIZES) and sweep.measured == list(SIZES[: len(sweep.measured)])
    assert len(results) == len(sweep.measured) and min(sweep.calls) >= MIN_CALLS
    # The first call of a size priced from the one before may cost more than
    # predicted (2 MiB here: 2.5x 1 MiB); at most that call overruns.
    assert sweep.spent <= budget + SLOW[SIZES[len(sweep.measured)]] + GAP
    assert f"of {budget:.3g} s left" in sweep.reason
    meta = sweep.meta()
    assert meta["sizes"] == sweep.measured and meta["planned_sizes"] == list(SIZES)
    assert meta["stopped"] == "budget" and meta["budget_s"] == budget
    # Six seconds reach 256 KiB, nine 1 MiB (a size kept at its price
    # without the margin, rather than spending its time on 256 KiB's calls).
    if budget >= 6:
        assert sweep.measured[-1] >= 256 << 10
    if budget >= 9:
        assert sweep.measured[-1] >= 1 << 20


def test_the_two_smallest_sizes_are_timed_even_without_a_budget():
    sweep, _ = simulate(SLOW, 0.0)
    assert sweep.measured == list(SIZES[:2]) and sweep.calls == [MIN_CALLS, MIN_CALLS]
    assert sweep.warmups == [1, 1] and sweep.stopped == "budget"
    assert sweep.reason.startswith(f"{SIZES[2]} B predicted")


def test_a_size_dearer_than_predicted_is_dropped_after_its_first_call():
    # 64 KiB costs 50x 16 KiB (a link that falls over), not the 4x its price assumes.
    costs = dict(SLOW)
    costs[64 << 10] = 50 * costs[16 << 10]
    sweep, _ = simulate(costs, 2.0)
    assert sweep.measured == list(SIZES[:3]) and sweep.stopped == "budget"
    assert sweep.reason.startswith(f"{64 << 10} B took")
    assert sweep.spent == pytest.approx(sum(sweep.seconds) + costs[64 << 10] + GAP)


def test_ranks_with_different_clocks_take_the_same_decisions():
    """The essential property: ranks whose own timings differ still time the same
    sizes with the same calls, so none waits in a collective the others skip."""
    ranks, budget = 3, 5.0
    barrier = threading.Barrier(ranks, timeout=10)
    slots = [None] * ranks
    out = [None] * ranks

    def allgather(rank):
        def gather(value):
            slots[rank] = value
            barrier.wait()
            values = list(slots)
            barrier.wait()  # nobody overwrites a slot before all have read it
            return values
        return gather

    def rank_main(rank):
        rng = random.Random(rank)
        now = [0.0]

        def run(nbytes, count):
            # Each rank sees its own noise: the slowest must set everyone's pace.
            now[0] += count * (SLOW[nbytes] + GAP) * rng.uniform(0.8, 1.6)
            return None, SLOW[nbytes] * rng.uniform(0.9, 1.3)

        sweep = SizeSweep(SIZES, budget, planned)
        run_sweep(sweep, slowest_of(allgather(rank)), run, clock=lambda: now[0])
        out[rank] = sweep.meta()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(m is not None for m in out), out
    assert out[0]["stopped"] == "budget" and out[0]["sizes"] != list(SIZES)
    assert all(m == out[0] for m in out[1:]), out


def test_sweep_arguments_are_checked_with_the_numbers():
    with pytest.raises(ValueError, match=r"ascending sizes >= 1 byte, got \[4, 2\]"):
        SizeSweep((4, 2), 1.0, planned)
    with pytest.raises(ValueError, match=r"2\+ distinct"):
        SizeSweep((4,), 1.0, planned)
    with pytest.raises(ValueError, match="budget must be >= 0 seconds, got -1"):
        SizeSweep((1, 2), -1.0, planned)
    with pytest.raises(ValueError, match="at least 1 warm-up call .*got 0"):
        SizeSweep((1, 2), 1.0, planned, warmup=0)


def test_budgets_share_what_is_left_by_weight():
    clock = [10.0]
    budgets = SweepBudgets(50.0, {"pingpong": 1.0, "a": 2.0, "b": 2.0, "exchange": 1.0}, lambda: clock[0])
    assert budgets["pingpong"] == pytest.approx(40.0 / 6)
    assert budgets.link_budget == pytest.approx(40.0)
    clock[0] = 12.0  # the ping-pong finished early: its time goes to the rest
    assert budgets["a"] == pytest.approx(38.0 * 2 / 5)
    clock[0] = 60.0  # overran: the rest still get their two smallest sizes, with 0 s
    assert budgets["b"] == 0.0 and budgets["exchange"] == 0.0
    with pytest.raises(KeyError, match="asked for twice"):
        budgets["a"]
    with pytest.raises(ValueError, match="must be >= 0 seconds, got -5"):
        SweepBudgets(-5, {"a": 1.0}, lambda: 0.0)
    with pytest.raises(ValueError, match=r"weights must be > 0, got \{'a': 0\}"):
        SweepBudgets(5, {"a": 0}, lambda: 0.0)
