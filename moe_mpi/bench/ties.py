"""Routing near-ties in the reference run: where rounding alone may pick another expert.

A router picks each token's top-k experts with ``mx.argpartition`` on its
scores (most of mlx-lm's MoE blocks: softmax gates, sigmoid scores with a
bias, expert groups; a router that picks otherwise, such as phimoe's
argmax-based sparsemixer, is not seen). Where the k-th and the
(k+1)-th scores of a row are closer than a different summation order moves
them, a sharded run can route that token differently from single-process
mlx-lm and still be right to rounding; from there on its output differs.

:func:`watch_top_k` records, while open, the smallest such gap of every
``argpartition`` call, so that a benchmark can say, beside a mismatch,
whether the reference itself was on a knife's edge (:func:`describe`).
It evaluates each call's scores, so it is for untimed passes only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Iterator, Optional

import mlx.core as mx
import numpy as np

__all__ = ["NEAR_TIE", "TopKGaps", "describe", "watch_top_k"]

#: A gap at most this fraction of its row's largest score counts as a near-tie:
#: float32 sums taken in another order differ by a unit or two in 1e-7 of their
#: scale, and that grows through the layers after (sharded runs' logits differ
#: from mlx-lm's by about 2e-6 of their scale, at the median position of a
#: 512-token 4-bit prefill).
NEAR_TIE = 1e-6


@dataclasses.dataclass
class TopKGaps:
    """The gaps at the top-k boundary seen by :func:`watch_top_k`.

    Attributes:
        calls: ``argpartition`` calls seen.
        rows: Rows (tokens) of those calls.
        near_ties: Rows whose gap is at most :data:`NEAR_TIE` of their scale.
        smallest: The smallest relative gap seen, or None before any call.
        smallest_gap: That row's gap, in the scores' own units.
        smallest_call: The call (from 0) where it was seen.
    """

    calls: int = 0
    rows: int = 0
    near_ties: int = 0
    smallest: Optional[float] = None
    smallest_gap: Optional[float] = None
    smallest_call: Optional[int] = None

    def add(self, scores: mx.array, kth: int, axis: int) -> None:
        """Notes one call's gaps between the (kth)-th and (kth+1)-th smallest scores per row."""
        values = np.moveaxis(np.array(scores.astype(mx.float32)), axis, -1)
        values = values.reshape(-1, values.shape[-1])  # [rows, n]
        n = values.shape[-1]
        kth = kth % n if n else 0
        if n < 2 or kth + 1 >= n:
            self.calls += 1
            return
        part = np.partition(values, (kth, kth + 1), axis=-1)
        gaps = part[:, kth + 1] - part[:, kth]  # [rows], >= 0
        scale = np.maximum(np.abs(values).max(axis=-1), np.finfo(np.float32).tiny)
        relative = gaps / scale
        i = int(np.argmin(relative))
        if self.smallest is None or relative[i] < self.smallest:
            self.smallest, self.smallest_gap, self.smallest_call = float(relative[i]), float(gaps[i]), self.calls
        self.near_ties += int((relative <= NEAR_TIE).sum())
        self.rows += values.shape[0]
        self.calls += 1

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def watch_top_k() -> Iterator[TopKGaps]:
    """Records the top-k gaps of every ``mx.argpartition`` call while open."""
    gaps = TopKGaps()
    real = mx.argpartition

    def recording(a, kth, axis=-1, **kwargs):
        gaps.add(a, kth, axis)
        return real(a, kth, axis=axis, **kwargs)

    mx.argpartition = recording
    try:
        yield gaps
    finally:
        mx.argpartition = real


def describe(gaps: Optional[Dict[str, Any]]) -> Optional[str]:
    """A note for a mismatch when the reference routed through near-ties, else None."""
    if not gaps or not gaps.get("near_ties"):
        return None
    return (
        f"the reference's routing has {gaps['near_ties']} near-tie(s) in {gaps['rows']} routed rows "
        f"(smallest top-k gap {gaps['smallest_gap']:.2g}, {gaps['smallest']:.2g} of its row's scale, "
        f"in router call {gaps['smallest_call']}): rounding alone can route such a token differently"
    )
