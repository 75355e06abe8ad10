"""Tests for moe_mpi.placement (single process, no MPI, no MLX)."""

import json
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_mpi.placement import ExpertPlacement

MAX_EXPERTS = 300


@st.composite
def sizes(draw, max_experts=MAX_EXPERTS):
    """(num_experts, num_ranks) with 1 <= num_ranks <= num_experts."""
    num_experts = draw(st.integers(1, max_experts))
    num_ranks = draw(st.integers(1, min(num_experts, 64)))
    return num_experts, num_ranks


@st.composite
def arbitrary_owners(draw):
    """A valid, arbitrarily shuffled owners list and its number of ranks."""
    num_experts, num_ranks = draw(sizes(max_experts=80))
    rest = draw(
        st.lists(
            st.integers(0, num_ranks - 1),
            min_size=num_experts - num_ranks,
            max_size=num_experts - num_ranks,
        )
    )
    owners = draw(st.permutations(list(range(num_ranks)) + rest))
    return owners, num_ranks


@st.composite
def feasible_weights(draw):
    """(num_experts, weights) with every rank's share at least one expert."""
    num_ranks = draw(st.integers(1, 16))
    weights = draw(
        st.lists(
            st.one_of(
                # Bounded ratio keeps the smallest feasible num_experts small.
                st.integers(1, 20),
                st.floats(1.0, 20.0, allow_nan=False, allow_infinity=False),
            ),
            min_size=num_ranks,
            max_size=num_ranks,
        )
    )
    total = sum(weights)
    # Smallest num_experts giving every rank a share >= 1.
    low = max(num_ranks, math.ceil(total / min(weights)))
    num_experts = draw(st.integers(low, max(low, MAX_EXPERTS)))
    return num_experts, weights


def check_invariants(p, num_experts, num_ranks):
    assert p.num_experts == num_experts
    assert p.num_ranks == num_ranks
    assert len(p.owners) == num_experts
    assert isinstance(p.owners, tuple)
    assert all(0 <= r < num_ranks for r in p.owners)
    seen = []
    for rank in range(num_ranks):
        local = p.local_experts(rank)
        assert isinstance(local, tuple)
        assert list(local) == sorted(local)
        assert len(local) >= 1
        for i, e in enumerate(local):
            assert p.owner(e) == rank
            assert p.local_index(e) == i
        seen.extend(local)
    # Disjoint and covering: every expert exactly once.
    assert sorted(seen) == list(range(num_experts))
    assert len(seen) == len(set(seen))
    assert p.counts == tuple(len(p.local_experts(r)) for r in range(num_ranks))
    assert sum(p.counts) == num_experts
    # Round-trips.
    assert ExpertPlacement(p.owners, num_ranks) == p
    assert ExpertPlacement.from_map(p.owners, num_experts, num_ranks) == p
    assert ExpertPlacement.from_json(p.to_json(), num_experts, num_ranks) == p
    assert ExpertPlacement.from_json(json.loads(p.to_json()), num_experts, num_ranks) == p
    assert ExpertPlacement.from_json({"owners": list(p.owners)}, num_experts, num_ranks) == p
    table = p.table().splitlines()
    assert len(table) == num_ranks + 1


# ----------------------------------------------------------------------
# Property tests
# ----------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(sizes())
def test_contiguous(args):
    num_experts, num_ranks = args
    p = ExpertPlacement.contiguous(num_experts, num_ranks)
    check_invariants(p, num_experts, num_ranks)
    assert max(p.counts) - min(p.counts) <= 1
    extra = num_experts % num_ranks
    base = num_experts // num_ranks
    assert p.counts == tuple(base + (r < extra) for r in range(num_ranks))
    # Blocks: owners are non-decreasing.
    assert list(p.owners) == sorted(p.owners)
    assert p == ExpertPlacement.contiguous(num_experts, num_ranks)


@settings(max_examples=100, deadline=None)
@given(sizes())
def test_round_robin(args):
    num_experts, num_ranks = args
    p = ExpertPlacement.round_robin(num_experts, num_ranks)
    check_invariants(p, num_experts, num_ranks)
    assert max(p.counts) - min(p.counts) <= 1
    assert all(p.owner(e) == e % num_ranks for e in range(num_experts))
    assert p == ExpertPlacement.round_robin(num_experts, num_ranks)


@settings(max_examples=100, deadline=None)
@given(feasible_weights())
def test_weighted(args):
    num_experts, weights = args
    p = ExpertPlacement.weighted(num_experts, weights)
    check_invariants(p, num_experts, len(weights))
    total = sum(weights)
    for count, w in zip(p.counts, weights):
        assert abs(count - num_experts * w / total) < 1 + 1e-9
    assert sum(p.counts) == num_experts
    assert list(p.owners) == sorted(p.owners)
    assert p == ExpertPlacement.weighted(num_experts, list(weights))
    assert p == ExpertPlacement.create(num_experts, len(weights), weights=weights)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, MAX_EXPERTS),
    st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=16),
)
def test_weighted_succeeds_iff_every_rank_gets_an_expert(num_experts, weights):
    total = sum(weights)
    shares = [num_experts * w / total for w in weights]
    try:
        p = ExpertPlacement.weighted(num_experts, weights)
    except ValueError as e:
        msg = str(e)
        assert str(num_experts) in msg
        # Hamilton gives floor(share) or more, so it can only fail on share < 1.
        assert num_experts < len(weights) or min(shares) < 1
        assert "no experts" in msg or "less than num_ranks" in msg
    else:
        check_invariants(p, num_experts, len(weights))
        assert min(p.counts) >= 1


@settings(max_examples=100, deadline=None)
@given(sizes(), st.integers(1, 5))
def test_equal_weights_match_contiguous(args, w):
    num_experts, num_ranks = args
    assert ExpertPlacement.weighted(
        num_experts, [w] * num_ranks
    ) == ExpertPlacement.contiguous(num_experts, num_ranks)


@settings(max_examples=100, deadline=None)
@given(arbitrary_owners())
def test_arbitrary_maps(args):
    owners, num_ranks = args
    num_experts = len(owners)
    p = ExpertPlacement.from_map(owners, num_experts, num_ranks)
    check_invariants(p, num_experts, num_ranks)
    assert list(p.owners) == owners
    per_rank = {r: list(p.local_experts(r)) for r in range(num_ranks)}
    # {rank: [experts]}, with int and JSON-style string keys.
    assert ExpertPlacement.from_map(per_rank, num_experts, num_ranks) == p
    str_keys = {str(r): v[::-1] for r, v in per_rank.items()}
    assert ExpertPlacement.from_map(str_keys, num_experts, num_ranks) == p
    # {expert: rank}, with int and string keys.
    by_expert = {e: r for e, r in enumerate(owners)}
    assert ExpertPlacement.from_map(by_expert, num_experts, num_ranks) == p
    by_expert_str = {str(e): r for e, r in reversed(list(enumerate(owners)))}
    assert ExpertPlacement.from_map(by_expert_str, num_experts, num_ranks) == p
    # JSON through json.dumps (string keys).
    obj = json.loads(json.dumps({"experts_per_rank": per_rank}))
    assert ExpertPlacement.from_json(obj, num_experts, num_ranks) == p
    # Hashable and equal placements hash equal.
    assert hash(p) == hash(ExpertPlacement(tuple(owners), num_ranks))


@settings(max_examples=100, deadline=None)
@given(sizes(max_experts=64), st.sampled_from(["contiguous", "round-robin"]))
def test_json_file_round_trip(tmp_path_factory, args, strategy):
    num_experts, num_ranks = args
    p = ExpertPlacement.create(num_experts, num_ranks, strategy)
    path = tmp_path_factory.mktemp("placement") / "placement.json"
    text = p.to_json(path)
    assert path.read_text() == text
    assert ExpertPlacement.from_json(path, num_experts, num_ranks) == p
    assert ExpertPlacement.from_json(str(path), num_experts, num_ranks) == p
    assert ExpertPlacement.create(num_experts, num_ranks, str(path)) == p
    assert ExpertPlacement.create(num_experts, num_ranks, path) == p


# ----------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------


def test_contiguous_example():
    p = ExpertPlacement.contiguous(10, 4)
    assert p.owners == (0, 0, 0, 1, 1, 1, 2, 2, 3, 3)
    assert p.counts == (3, 3, 2, 2)
    assert p.local_experts(2) == (6, 7)


def test_round_robin_example():
    p = ExpertPlacement.round_robin(10, 4)
    assert p.local_experts(0) == (0, 4, 8)
    assert p.local_experts(3) == (3, 7)
    assert p.counts == (3, 3, 2, 2)
    assert p.local_index(8) == 2


@pytest.mark.parametrize(
    "num_experts, weights, counts",
    [
        (8, [2, 1, 1], (4, 2, 2)),
        (10, [2, 1, 1], (5, 3, 2)),  # remainders tie: lower rank wins
        (7, [2, 1, 1], (3, 2, 2)),
        (128, [0.5, 0.25, 0.25], (64, 32, 32)),
        (60, [3, 2, 1], (30, 20, 10)),
        (4, [1], (4,)),
        (10, [1, 1, 1, 1], (3, 3, 2, 2)),
        # Hamilton: quotas 5.6, 2.8, 1.6 -> floors 5, 2, 1, leftover 2 to
        # the largest remainders (0.8 rank 1, 0.6 rank 0/2 -> rank 0).
        (10, [14, 7, 4], (6, 3, 1)),
    ],
)
def test_weighted_examples(num_experts, weights, counts):
    p = ExpertPlacement.weighted(num_experts, weights)
    assert p.counts == counts
    assert list(p.owners) == sorted(p.owners)


def test_weighted_accepts_numpy():
    np = pytest.importorskip("numpy")
    p = ExpertPlacement.weighted(8, np.array([2.0, 1.0, 1.0], dtype=np.float32))
    assert p.counts == (4, 2, 2)
    q = ExpertPlacement.from_map(np.array([0, 0, 1, 1]), 4, 2)
    assert q == ExpertPlacement.contiguous(4, 2)


def test_table():
    p = ExpertPlacement.from_map({0: [0, 1, 2, 3, 8], 1: [4, 5, 6, 7, 9]}, 10, 2)
    assert p.table() == (
        "10 experts on 2 ranks\n"
        "  rank 0: 5 experts: 0-3, 8\n"
        "  rank 1: 5 experts: 4-7, 9"
    )
    q = ExpertPlacement.round_robin(3, 3)
    assert "rank 2: 1 expert: 2" in q.table()


def test_to_json_format():
    p = ExpertPlacement.contiguous(8, 3)
    assert json.loads(p.to_json()) == {
        "experts_per_rank": [[0, 1, 2], [3, 4, 5], [6, 7]]
    }


def test_from_json_optional_sizes():
    obj = {"num_experts": 4, "num_ranks": 2, "owners": [0, 1, 0, 1]}
    assert ExpertPlacement.from_json(obj, 4, 2) == ExpertPlacement.round_robin(4, 2)
    with pytest.raises(ValueError, match=r"num_experts=8.*num_experts=4"):
        ExpertPlacement.from_json({"num_experts": 8, "owners": [0, 1, 0, 1]}, 4, 2)


def test_create():
    assert ExpertPlacement.create(8, 2) == ExpertPlacement.contiguous(8, 2)
    assert ExpertPlacement.create(8, 2, "round-robin") == ExpertPlacement.round_robin(8, 2)
    assert ExpertPlacement.create(8, 2, "round_robin") == ExpertPlacement.round_robin(8, 2)
    assert ExpertPlacement.create(8, 2, weights=[3, 1]).counts == (6, 2)


def test_equality():
    assert ExpertPlacement.contiguous(4, 2) == ExpertPlacement([0, 0, 1, 1], 2)
    assert ExpertPlacement.contiguous(4, 2) != ExpertPlacement.round_robin(4, 2)
    assert ExpertPlacement.contiguous(2, 2) == ExpertPlacement.round_robin(2, 2)
    assert ExpertPlacement.contiguous(4, 2) != (0, 0, 1, 1)


# ----------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ExpertPlacement.contiguous(4, 5),
        lambda: ExpertPlacement.round_robin(4, 5),
        lambda: ExpertPlacement.weighted(4, [1, 1, 1, 1, 1]),
        lambda: ExpertPlacement.from_map([0, 1, 2, 3], 4, 5),
        lambda: ExpertPlacement.create(4, 5),
        lambda: ExpertPlacement.from_json({"owners": [0, 1, 2, 3]}, 4, 5),
    ],
)
def test_more_ranks_than_experts(make):
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value).endswith(
        "num_experts=4 is less than num_ranks=5: every rank must own at least one expert"
    )


@pytest.mark.parametrize(
    "num_experts, num_ranks, match",
    [
        (0, 1, "num_experts=0 must be at least 1"),
        (-3, 1, "num_experts=-3 must be at least 1"),
        (4, 0, "num_ranks=0 must be at least 1"),
        (4, -1, "num_ranks=-1 must be at least 1"),
        (4.0, 2, "num_experts must be an integer"),
        (4, True, "num_ranks must be an integer"),
    ],
)
def test_bad_sizes(num_experts, num_ranks, match):
    for make in (ExpertPlacement.contiguous, ExpertPlacement.round_robin):
        with pytest.raises(ValueError, match=match):
            make(num_experts, num_ranks)


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"expert 2 has owner rank 3.*num_ranks=2"):
        ExpertPlacement([0, 1, 3], 2)
    with pytest.raises(ValueError, match=r"expert 0 has owner rank -1"):
        ExpertPlacement([-1, 1, 0], 2)
    with pytest.raises(
        ValueError,
        match=r"rank 1 owns no experts \(num_experts=3, num_ranks=3\)",
    ):
        ExpertPlacement([0, 2, 2], 3)
    with pytest.raises(ValueError, match="num_experts=0 must be at least 1"):
        ExpertPlacement([], 1)
    with pytest.raises(ValueError, match="owner of expert 1 must be an integer"):
        ExpertPlacement([0, 1.5], 2)


def test_weights_length_mismatch():
    with pytest.raises(ValueError, match=r"got 2 weights for num_ranks=3"):
        ExpertPlacement.create(8, 3, weights=[2, 1])


def test_weights_need_contiguous():
    with pytest.raises(ValueError, match="weights can only be used with strategy='contiguous'"):
        ExpertPlacement.create(8, 2, "round-robin", weights=[1, 1])


@pytest.mark.parametrize(
    "weights, bad",
    [
        ([2, 0, 1], r"weights\[1\]=0 must be a positive finite number"),
        ([2, 1, -1], r"weights\[2\]=-1 must be a positive finite number"),
        ([-0.5, 1], r"weights\[0\]=-0.5 must be a positive finite number"),
        ([1, float("nan")], r"weights\[1\]=nan must be a positive finite number"),
        ([float("inf"), 1], r"weights\[0\]=inf must be a positive finite number"),
        ([1, "2"], r"weights\[1\]='2' must be a positive finite number"),
        ([True, 1], r"weights\[0\]=True must be a positive finite number"),
    ],
)
def test_bad_weights(weights, bad):
    with pytest.raises(ValueError, match=bad):
        ExpertPlacement.weighted(8, weights)
    with pytest.raises(ValueError, match=bad):
        ExpertPlacement.create(8, len(weights), weights=weights)


def test_empty_weights():
    with pytest.raises(ValueError, match="weights is empty"):
        ExpertPlacement.weighted(8, [])


def test_weight_too_small():
    with pytest.raises(ValueError) as e:
        ExpertPlacement.weighted(8, [10, 10, 0.1])
    msg = str(e.value)
    assert "rank 2 no experts" in msg
    assert "num_experts=8" in msg
    assert "0.0398" in msg  # its share: 8 * 0.1 / 20.1
    assert "weight 0.1" in msg


def test_duplicate_expert_in_map():
    with pytest.raises(ValueError, match=r"expert 2 is placed more than once \(on ranks 0 and 1\)"):
        ExpertPlacement.from_map({0: [0, 1, 2], 1: [2, 3]}, 4, 2)
    with pytest.raises(ValueError, match=r"expert 1 is placed more than once \(on rank 0 twice\)"):
        ExpertPlacement.from_map({"0": [0, 1, 1], "1": [2, 3]}, 4, 2)
    # Same expert under an int and a string key.
    with pytest.raises(ValueError, match=r"expert 0 is placed more than once"):
        ExpertPlacement.from_map({0: 0, "0": 1, 1: 1, 2: 1}, 3, 2)
    with pytest.raises(ValueError, match=r"rank 0 appears more than once"):
        ExpertPlacement.from_map({0: [0], "0": [1], 1: [2]}, 3, 2)


def test_missing_expert_in_map():
    with pytest.raises(
        ValueError, match=r"experts 4-5, 7 are not placed on any rank \(num_experts=8\)"
    ):
        ExpertPlacement.from_map({0: [0, 1, 6], 1: [2, 3]}, 8, 2)
    with pytest.raises(ValueError, match=r"expert 2 is not placed on any rank \(num_experts=4\)"):
        ExpertPlacement.from_map({0: 0, 1: 1, 3: 1}, 4, 2)
    with pytest.raises(
        ValueError, match=r"owners lists 3 experts but num_experts=4: experts 3 have no owner"
    ):
        ExpertPlacement.from_map([0, 1, 0], 4, 2)


def test_unknown_expert_in_map():
    with pytest.raises(
        ValueError, match=r"expert 9 is out of range for num_experts=4 \(valid experts are 0..3\)"
    ):
        ExpertPlacement.from_map({0: [0, 1], 1: [2, 3, 9]}, 4, 2)
    with pytest.raises(ValueError, match=r"owners lists 5 experts but num_experts=4"):
        ExpertPlacement.from_map([0, 1, 0, 1, 1], 4, 2)
    with pytest.raises(ValueError, match=r"rank 2 is out of range for num_ranks=2"):
        ExpertPlacement.from_map({0: [0, 1], 2: [2, 3]}, 4, 2)
    with pytest.raises(ValueError, match=r"rank key 'a' is not an integer"):
        ExpertPlacement.from_map({"a": [0, 1], 1: [2, 3]}, 4, 2)


def test_rank_without_experts_in_map():
    with pytest.raises(ValueError, match=r"rank 1 owns no experts \(num_experts=4, num_ranks=3\)"):
        ExpertPlacement.from_map({0: [0, 1], 1: [], 2: [2, 3]}, 4, 3)
    with pytest.raises(ValueError, match=r"rank 2 owns no experts"):
        ExpertPlacement.from_map({0: [0, 1], 1: [2, 3]}, 4, 3)


def test_mixed_map_values():
    with pytest.raises(ValueError, match="all lists of experts"):
        ExpertPlacement.from_map({0: [0, 1], 1: 2}, 3, 2)


def test_invalid_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"experts_per_rank": [[0, 1], [2, 3]')
    with pytest.raises(ValueError) as e:
        ExpertPlacement.from_json(path, 4, 2)
    assert str(path) in str(e.value)
    assert "invalid JSON" in str(e.value)
    # create() with the path also reports it.
    with pytest.raises(ValueError, match="invalid JSON"):
        ExpertPlacement.create(4, 2, str(path))


@pytest.mark.parametrize(
    "content, problem",
    [
        ("[[0, 1], [2, 3]]", "expected a JSON object with key 'experts_per_rank' or 'owners'"),
        ("{}", "expected exactly one of the keys 'experts_per_rank' and 'owners'"),
        (
            '{"owners": [0, 0, 1, 1], "experts_per_rank": [[0, 1], [2, 3]]}',
            "expected exactly one of the keys",
        ),
        ('{"owner": [0, 0, 1, 1]}', "unknown keys \\['owner'\\]"),
        ('{"experts_per_rank": [[0, 1], [2, 3], []]}', "lists 3 ranks but num_ranks=2"),
        ('{"experts_per_rank": [[0, 1], [1, 2, 3]]}', "expert 1 is placed more than once"),
        ('{"experts_per_rank": [[0, 1], [3]]}', "expert 2 is not placed on any rank"),
        ('{"experts_per_rank": [0, 1]}', "one list of experts per rank"),
        ('{"owners": [0, 0, 1]}', "owners lists 3 experts but num_experts=4"),
        ('{"owners": [0, 0, 1, 2]}', "expert 3 has owner rank 2, which is out of range"),
        ('{"owners": [0, 0, 1, 1.5]}', "owner of expert 3 must be an integer"),
        ('{"owners": "0011"}', "'owners' must be a list"),
    ],
)
def test_invalid_json_placement(tmp_path, content, problem):
    path = tmp_path / "placement.json"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        ExpertPlacement.from_json(path, 4, 2)
    msg = str(e.value)
    assert msg.startswith(f"placement file {str(path)!r}: ")
    assert re.search(problem, msg), msg


def test_missing_json_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="file not found") as e:
        ExpertPlacement.create(4, 2, str(path))
    assert str(path) in str(e.value)


def test_unknown_strategy():
    with pytest.raises(ValueError, match=r"unknown placement strategy 'random'"):
        ExpertPlacement.create(4, 2, "random")


def test_query_errors():
    p = ExpertPlacement.contiguous(4, 2)
    with pytest.raises(ValueError, match=r"rank 2 is out of range for num_ranks=2"):
        p.local_experts(2)
    with pytest.raises(ValueError, match=r"expert 4 is out of range for num_experts=4"):
        p.owner(4)
    with pytest.raises(ValueError, match=r"expert -1 is out of range"):
        p.local_index(-1)
