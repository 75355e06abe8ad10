"""moe_mpi.bench.ties: the reference's routing near-ties, seen through mx.argpartition."""

import mlx.core as mx
import numpy as np

from moe_mpi import synthetic
from moe_mpi.bench import ties


def test_gap_at_the_top_k_boundary_per_row():
    scores = mx.array([[0.50, 0.30, 0.20, 0.0], [0.40, 0.25, 0.25 + 1e-7, 0.1]])
    with ties.watch_top_k() as gaps:
        inds = mx.argpartition(-scores, kth=1, axis=-1)[..., :2]  # top-2, as mlx-lm routes
    assert sorted(np.array(inds[0]).tolist()) == [0, 1]  # the call itself is unchanged
    assert gaps.calls == 1 and gaps.rows == 2 and gaps.near_ties == 1
    assert gaps.smallest_gap == np.float32(-0.25) - np.float32(-0.25 - 1e-7)
    assert gaps.smallest < ties.NEAR_TIE and gaps.smallest_call == 0
    assert mx.argpartition is not None and "recording" not in mx.argpartition.__name__  # restored


def test_no_tie_no_note():
    with ties.watch_top_k() as gaps:
        mx.argpartition(mx.array([[3.0, 1.0, 2.0]]), kth=0)
    assert gaps.near_ties == 0 and gaps.smallest_gap == 1.0 and abs(gaps.smallest - 1 / 3) < 1e-7
    assert ties.describe(gaps.to_dict()) is None and ties.describe(None) is None


def test_an_mlx_lm_model_routes_through_the_watch(tmp_path):
    """Every MoE layer of a real mlx-lm model is seen once per forward pass; a forced tie is named."""
    model, config = synthetic.build_model(synthetic.tiny_config("qwen3_moe"), seed=0)
    tokens = mx.array([[1, 2, 3, 4]])
    with ties.watch_top_k() as gaps:
        mx.eval(model(tokens))
    layers = config["num_hidden_layers"]
    assert gaps.calls == layers and gaps.rows == layers * 4
    gaps.near_ties, gaps.smallest, gaps.smallest_gap = 1, 2e-7, 1e-8
    note = ties.describe(gaps.to_dict())
    assert "1 near-tie(s)" in note and f"in {layers * 4} routed rows" in note
