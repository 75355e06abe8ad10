"""The price of rows (moe_mpi/rowcost.py) and how a replicated expert's rows are shared (assign_rows).

* :class:`RowCost`: the default is the old ``1 + m/16`` exactly; a profile's
  table is interpolated and extrapolated as documented; bad profiles fail
  with a message that names what is missing.
* :func:`assign_slots`: every slot once, deterministic, shared among holders
  where that lowers the busiest holder's work, on hand-checked cases.
* Without a profile and without copies the optimizer's layouts are the ones
  it chose before the row price existed (the literals below were computed
  with that code, commit 4590d33).
* ``load(mode="auto", profile=...)`` carries the price in every layout, the
  table of the model's weight format; the partial sums still add up.
"""

import json

import numpy as np
import pytest

from moe_mpi import balance
from moe_mpi.layout import SPLIT, Layout, assign_rows, assign_slots, layouts_from_json, layouts_to_json
from moe_mpi.rowcost import RowCost, read_row_cost

#: Seconds per weight byte of the kind moe-mpi calibrate writes: float32 rows cost less than
#: in proportion (5.8x at 16 rows), 4-bit ones in proportion (arithmetic-bound).
FLOAT_TABLE = {"rows": [1, 2, 4, 8, 16, 64], "seconds_per_byte": [4e-11, 5e-11, 8e-11, 1.8e-10, 2.3e-10, 5.4e-10]}
Q4_TABLE = {"rows": [1, 2, 4, 8, 16], "seconds_per_byte": [1e-9, 2e-9, 4e-9, 8e-9, 1.6e-8]}


def profile(**tables) -> dict:
    kernels = {f"{fmt}/expert": t for fmt, t in tables.items()}
    return {"version": 1, "machine": {"name": "test", "kernels": kernels}, "link": {}}


PROFILE = profile(float32=FLOAT_TABLE, q4=Q4_TABLE)
LINEAR = RowCost((1.0, 2.0), (1.0, 2.0), "linear")  # every row a full read (4-bit on a CPU)


# ---------------------------------------------------------------- RowCost


def test_default_is_the_old_formula_exactly():
    m = np.arange(0, 5000)
    old = np.where(m > 0, 1.0 + m / 16.0, 0.0)
    d = RowCost.default()
    assert np.array_equal(d.work_of(m), old)  # bit for bit: ties break as they always did
    np.testing.assert_allclose(d.cost(m), old / (1 + 1 / 16), rtol=1e-15)
    assert d.cost(0) == 0 and d.cost(1) == 1
    assert d.is_default and RowCost.from_dict(d.to_dict()) == d
    assert balance.ROWS_PER_READ == 16


def test_profile_table_interpolated_and_extrapolated():
    t = {"rows": [1, 2, 4], "seconds_per_byte": [1e-10, 1.5e-10, 3e-10]}
    c = RowCost.from_profile(profile(float32=t), "float32")
    m = np.array([[0, 0.5, 1, 2], [3, 4, 8, 100]])  # any shape
    want = np.array([[0, 0.5, 1, 1.5], [2.25, 3, 6, 3 + 96 * 0.75]])  # beyond 4: the last slope, 0.75
    np.testing.assert_allclose(c.cost(m), want)
    assert c.cost(m).shape == (2, 4)
    assert c.source == "calibrate float32/expert"  # no path: ranks on other hosts must agree
    # A dip is noise: more rows never cost less.
    dip = RowCost.from_profile(profile(q4={"rows": [1, 2, 4], "seconds_per_byte": [1e-9, 3e-9, 2e-9]}), "q4")
    np.testing.assert_allclose(dip.cost([1, 2, 3, 4, 6]), [1, 3, 3, 3, 3])


def test_measured_tables_price_rows_as_measured():
    f = RowCost.from_profile(PROFILE, "float32")
    q = RowCost.from_profile(PROFILE, "q4")
    assert f.cost(16) == pytest.approx(5.75) and q.cost(16) == pytest.approx(16)
    assert q.cost(40) == pytest.approx(40)  # linear tail: each row a full read
    assert "/ 5.75 /" in f.describe()


@pytest.mark.parametrize(
    "data, fmt, message",
    [
        ({"machine": {"kernels": {"float32/expert": FLOAT_TABLE}}}, "q4", "no machine.kernels['q4/expert'] table"),
        ({"version": 1}, "float32", "no machine.kernels['float32/expert'] table"),
        ([1, 2], "float32", "no machine.kernels['float32/expert'] table"),
        (profile(float32={"rows": [2, 4], "seconds_per_byte": [1, 2]}), "float32", "must start at 1 row, got rows [2.0, 4.0]"),
        (profile(float32={"rows": [1, 2], "seconds_per_byte": [1e-9, -1e-9]}), "float32", "work must be positive"),
        (profile(float32={"rows": [1, 1], "seconds_per_byte": [1e-9, 1e-9]}), "float32", "must rise from 1"),
        (profile(float32={"rows": [1, 2], "seconds_per_byte": [1e-9]}), "float32", "2 row counts but 1 work"),
        (profile(float32={"rows": [1], "seconds_per_byte": ["x"]}), "float32", "not two lists of numbers"),
        (PROFILE, "bfloat16", "weight format 'bfloat16': expected one of float32, q4"),
    ],
)
def test_bad_profiles_name_what_is_missing(data, fmt, message):
    with pytest.raises(ValueError) as e:
        RowCost.from_profile(data, fmt, where="p.json")
    assert message in str(e.value)


def test_profile_files(tmp_path):
    good = tmp_path / "calib.json"
    good.write_text(json.dumps(PROFILE))
    assert read_row_cost(good, "q4") == RowCost.from_profile(PROFILE, "q4")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"--profile .*bad.json: not JSON"):
        read_row_cost(tmp_path / "bad.json", "float32")
    with pytest.raises(ValueError, match=r"--profile .*missing.json: cannot read it"):
        read_row_cost(tmp_path / "missing.json", "float32")


def test_layout_carries_the_price(tmp_path):
    price = RowCost.from_profile(PROFILE, "float32")
    layout = Layout(2, ((0, 1), (0,), (1,)), price)
    assert "row_cost" in layout.to_dict() and Layout.from_dict(layout.to_dict(), 2) == layout
    plain = Layout(2, ((0, 1), (0,), (1,)), RowCost.default())
    assert plain == Layout(2, ((0, 1), (0,), (1,))) and "row_cost" not in plain.to_dict()  # absent = default
    assert layout != plain
    layouts_to_json([layout, plain], str(tmp_path / "l.json"))
    assert layouts_from_json(str(tmp_path / "l.json"), 2, [3, 3]) == [layout, plain]
    assert layout.with_holders(((0,), (0,), (1,))).row_cost == price


# ---------------------------------------------------------- assign_slots


def _check_once(layout: Layout, flat: np.ndarray) -> np.ndarray:
    """Every slot computed exactly once, by a holder of its expert (or as slices), the same each call."""
    ranks = assign_slots(layout, flat)
    assert ranks.shape == flat.shape and np.array_equal(ranks, assign_slots(layout, flat.copy()))
    for slot, (e, r) in enumerate(zip(flat, ranks)):
        assert (r == SPLIT) if not layout.holders[e] else (r in layout.holders[e]), (slot, e, r)
    counts = assign_rows(layout, np.bincount(flat, minlength=layout.num_experts))
    for e in range(layout.num_experts):
        got = np.bincount(ranks[flat == e][ranks[flat == e] >= 0], minlength=layout.num_ranks)
        assert np.array_equal(got, counts[e]), (e, got, counts[e])
    return ranks


def test_rows_shared_among_holders_hand_checked():
    # Expert 0 on both ranks with 8 rows; expert 1 (3 rows) on rank 0, expert 2 (1 row) on rank 1.
    # Every row a full read: work so far 3 / 1. All 8 to rank 1 would make 9; shared, the level
    # L with (L - 3) + (L - 1) = 8 is 6: rank 0 takes 3 rows, rank 1 takes 5, both at 6.
    layout = Layout(2, ((0, 1), (0,), (1,)), LINEAR)
    flat = np.array([0, 1, 0, 0, 2, 1, 0, 0, 1, 0, 0, 0])
    ranks = _check_once(layout, flat)
    e0 = ranks[flat == 0]
    assert e0.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]  # contiguous blocks, lower rank first
    assert ranks[flat == 1].tolist() == [0, 0, 0] and ranks[flat == 2].tolist() == [1]
    # The old rule (all to the least loaded holder) would have given rank 1 all eight.


def test_rows_stay_together_when_sharing_does_not_pay():
    layout = Layout(2, ((0, 1), (0,), (1,)), RowCost((1.0, 2.0), (1.0, 1.01)))  # reads dominate
    # Rank 1 is busy with expert 2 (20 rows, work 1.19): sharing expert 0's 2 rows cannot lower it.
    flat = np.array([0, 0] + [2] * 20)
    assert _check_once(layout, flat)[:2].tolist() == [0, 0]
    # One row cannot be shared: to the lower of two idle holders.
    assert _check_once(layout, np.array([0])).tolist() == [0]
    # Two idle holders and 2 rows: one each is 1.0 against 1.01 for both on one.
    assert _check_once(layout, np.array([0, 0])).tolist() == [0, 1]


def test_three_holders_and_hot_experts_in_order_of_rows():
    layout = Layout(3, ((0, 1, 2), (0, 1, 2), (0,), (1,), (2,), ()), LINEAR)
    # Expert 0: 9 rows, expert 1: 3 rows, experts 2-4: 0 / 2 / 4 rows, expert 5 split.
    flat = np.array([0] * 9 + [1] * 3 + [3] * 2 + [4] * 4 + [5] * 5)
    rng = np.random.default_rng(0)
    flat = flat[rng.permutation(flat.size)]
    ranks = _check_once(layout, flat)
    rows = assign_rows(layout, np.bincount(flat, minlength=6))
    # Work before copies 0 / 2 / 4. Expert 0 (9 rows) first: level 5 -> 5 / 3 / 1 rows.
    assert rows[0].tolist() == [5, 3, 1]
    # Then expert 1 (3 rows) on 5 / 5 / 5: one each.
    assert rows[1].tolist() == [1, 1, 1]
    assert (ranks[flat == 5] == SPLIT).all() and rows[5].sum() == 0
    work = LINEAR.work_of(rows).sum(axis=0)
    assert work.tolist() == [6, 6, 6]


def test_many_random_routings_every_slot_once():
    rng = np.random.default_rng(1)
    for n in (2, 3, 4):
        for price in (RowCost.default(), LINEAR, RowCost.from_profile(PROFILE, "float32")):
            holders = [tuple(sorted(rng.choice(n, size=rng.integers(1, n + 1), replace=False))) for _ in range(10)]
            holders[0] = ()
            holders[1:1 + n] = [(r,) for r in range(n)]
            layout = Layout(n, tuple(holders), price)
            for tokens in (1, 7, 64):
                flat = balance.draw_routing(rng.dirichlet(np.ones(10)), 3, tokens, 1, rng).reshape(-1)
                _check_once(layout, flat)


# ------------------------------------------------------------- the optimizer

#: Layouts chosen without a profile (the default row price); with no copies allowed, nothing here
#: depends on how a copy's rows are shared, so they must not change by accident. They were first
#: pinned before the row price existed; the slice's fixed cost by rows (balance.SLICE_OVERHEAD)
#: then made 256-wide float32 experts split where 2 and 3 ranks had kept them whole.
P_HOT = [0.4, 0.3, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03]
P_SKEW16 = [0.016, 0.0544, 0.2454, 0.0194, 0.0261, 0.024, 0.012, 0.1297, 0.0105, 0.2119, 0.052, 0.0063,
            0.0245, 0.0178, 0.0286, 0.1215]
BEFORE = {
    ('hot', 2, 256, 'both', 0): ((), (), (), (), (), (), (), ()),
    ('hot', 2, 256, 'replicate', 0): ((0,), (1,), (1,), (0,), (1,), (0,), (1,), (0,)),
    ('hot', 2, 256, 'split', 4): ((), (), (), (), (), (), (), ()),
    ('hot', 2, 2688, 'both', 0): ((), (), (), (), (), (), (), ()),
    ('hot', 2, 2688, 'replicate', 0): ((0,), (1,), (1,), (0,), (1,), (0,), (1,), (0,)),
    ('hot', 2, 2688, 'split', 4): ((), (), (), (), (), (), (), ()),
    ('hot', 3, 256, 'both', 0): ((), (), (), (), (), (), (), ()),
    ('hot', 3, 256, 'replicate', 0): ((0,), (1,), (2,), (2,), (1,), (1,), (0,), (0,)),
    ('hot', 3, 256, 'split', 4): ((), (), (), (), (), (), (), ()),
    ('hot', 3, 2688, 'both', 0): ((), (), (), (), (), (), (), ()),
    ('hot', 3, 2688, 'replicate', 0): ((0,), (1,), (2,), (2,), (1,), (1,), (0,), (0,)),
    ('hot', 3, 2688, 'split', 4): ((), (), (), (), (), (), (), ()),
}


@pytest.mark.parametrize("key", list(BEFORE))
def test_default_layouts_unchanged(key):
    _, n, inter, choice, replicas = key
    layout = balance.auto_layout(np.array(P_HOT), 2, n, replicas=replicas, intermediate=inter, balance=choice)
    assert layout.holders == BEFORE[key] and layout.row_cost is None


def test_default_layouts_unchanged_skewed():
    got = {
        (n, inter, choice): balance.auto_layout(np.array(P_SKEW16), 4, n, replicas=rep, intermediate=inter,
                                                balance=choice).holders
        for n in (2, 3) for inter in (256, 2688) for choice, rep in (("both", 0), ("replicate", 0), ("split", 4))
    }
    assert got == SKEW16_BEFORE


#: The same for the skewed 16-expert shares (a layer of docs/results/balance/stats-dbrx-skewed.json).
SKEW16_BEFORE = {
    (2, 256, 'both'): ((), (), (), (), (), (), (), (), (), (), (), (), (), (), (), ()),
    (2, 256, 'replicate'): ((0,), (1,), (0,), (1,), (0,), (0,), (0,), (1,), (1,), (1,), (0,), (0,), (1,), (1,), (1,), (0,)),
    (2, 256, 'split'): ((), (), (), (), (), (), (), (), (), (), (), (), (), (), (), ()),
    (2, 2688, 'both'): ((), (), (), (), (), (), (), (), (), (), (), (), (), (), (), ()),
    (2, 2688, 'replicate'): ((0,), (1,), (0,), (1,), (0,), (0,), (0,), (1,), (1,), (1,), (0,), (0,), (1,), (1,), (1,), (0,)),
    (2, 2688, 'split'): ((), (), (), (), (), (), (), (), (), (), (), (), (), (), (), ()),
    (3, 256, 'both'): ((), (), (), (), (), (), (), (), (), (), (), (), (), (), (), ()),
    (3, 256, 'replicate'): ((1,), (1,), (0,), (0,), (1,), (1,), (0,), (2,), (0,), (1,), (0,), (0,), (2,), (2,), (2,), (2,)),
    (3, 256, 'split'): ((), (), (), (), (), (), (), (), (), (), (), (), (), (), (), ()),
    (3, 2688, 'both'): ((), (), (), (), (), (), (), (), (), (), (), (), (), (), (), ()),
    (3, 2688, 'replicate'): ((1,), (1,), (0,), (0,), (1,), (1,), (0,), (2,), (0,), (1,), (0,), (0,), (2,), (2,), (2,), (2,)),
    (3, 2688, 'split'): ((), (), (), (), (), (), (), (), (), (), (), (), (), (), (), ()),
}


def test_profile_layouts_carry_the_price_and_cost_no_more():
    price = RowCost.from_profile(PROFILE, "float32")
    p = np.array(P_HOT)
    for n in (2, 3):
        chosen = {b: balance.auto_layout(p, 2, n, replicas=2, intermediate=1024, balance=b, row_cost=price)
                  for b in balance.BALANCE_CHOICES}
        assert all(layout.row_cost == price for layout in chosen.values())
        cost = {b: balance.layout_cost(layout, p, 2, intermediate=1024) for b, layout in chosen.items()}
        assert cost["both"] <= min(cost["split"], cost["replicate"]) + 1e-9, cost


def test_layout_cost_prices_rows_by_the_layouts_price():
    """The same copies cost less when rows are cheap than when each row is a full read, against the ideal."""
    p = np.array(P_HOT)
    holders = ((0, 1), (0, 1), (1,), (0,), (1,), (0,), (1,), (0,))
    cheap = balance.layout_cost(Layout(2, holders), p, 2, batches=(64,))
    linear = balance.layout_cost(Layout(2, holders, LINEAR), p, 2, batches=(64,))
    assert cheap != linear and min(cheap, linear) >= 1.0


# ------------------------------------------------------------- the slice's fixed cost

def test_slice_overhead_by_rows_and_format():
    """The table's points, linear between, flat outside; the two formats differ."""
    for fmt, quantized in (("float", False), ("quantized", True)):
        points = balance.SLICE_OVERHEAD[fmt]
        for rows, cost in points:
            assert balance.slice_overhead(rows, quantized) == pytest.approx(cost)
        (r0, c0), (r1, c1) = points[0], points[1]
        assert balance.slice_overhead((r0 + r1) / 2, quantized) == pytest.approx((c0 + c1) / 2)
        assert balance.slice_overhead(0.5, quantized) == pytest.approx(c0)
        assert balance.slice_overhead(10_000, quantized) == pytest.approx(points[-1][1])
    assert balance.slice_overhead(1, False) != balance.slice_overhead(1, True)


@pytest.mark.parametrize("quantized", [False, True])
def test_every_expert_split_costs_its_fixed_cost_by_hand(quantized):
    """All split, uniform routing, batch 1 (one row per chosen expert), 2 equal ranks: each rank's
    work is half the step's plus c(1)/I of it, so the cost is 1 + 2 c(1) / I exactly."""
    e, k, inter = 128, 8, 256
    p = np.full(e, 1.0 / e)
    got = balance.layout_cost(Layout.all_split(e, 2), p, k, intermediate=inter, quantized=quantized, batches=(1,))
    assert got == pytest.approx(1.0 + 2.0 * float(balance.slice_overhead(1, quantized)) / inter)


@pytest.mark.parametrize("quantized", [False, True])
def test_narrow_experts_are_split_when_slices_cost_little(quantized):
    """The qwen3-moe-like shape (128 experts of width 256, top-8) on 2 ranks: whole experts leave
    the busiest rank 1.27x the mean at batch 1, a slice costs at most ~10% there, so auto splits;
    experts 64 wide (slices of 32) are kept whole, since a 512-token prefill prices them at 2x."""
    p = np.full(128, 1.0 / 128)
    narrow = balance.auto_layout(p, 8, 2, intermediate=256, quantized=quantized)
    assert len(narrow.split) == 128, narrow.describe()
    whole = balance.layout_cost(balance.ep_layout(p, 2), p, 8, intermediate=256, quantized=quantized)
    split = balance.layout_cost(narrow, p, 8, intermediate=256, quantized=quantized)
    assert split < whole, (split, whole)
    tiny = balance.auto_layout(np.full(8, 1.0 / 8), 2, 2, intermediate=64)
    assert not tiny.split, tiny.describe()
