"""Benchmarks check the output they time, against single-process mlx-lm.

Every workload returns, with each row, what the timed run produced (a
``check``: the greedy tokens of every step, the last step's logits). The
same workload run on plain mlx-lm in one process gives the reference. A
row whose tokens differ, or whose logits are further from the reference's
than the model's precision allows, is marked wrong, and its speed is kept
out of the results (:func:`mark`).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import mlx.core as mx
import numpy as np

__all__ = ["GUARD_TOKENS", "SPEED_KEYS", "compare", "guard_logits", "guard_tokens", "mark", "tolerance"]

#: The exactness guard's prompt length (tokens): one forward pass per mode, before its workload.
GUARD_TOKENS = 16

#: A row's speed figures: kept out of the results when the row is wrong.
SPEED_KEYS = ("tokens_per_s", "ms_per_token", "step_ms", "step_ms_median", "of_limit", "of_read_limit")


def guard_tokens(config: Mapping[str, Any], seed: int) -> np.ndarray:
    """The fixed ``[1, GUARD_TOKENS]`` prompt of the exactness guard."""
    rng = np.random.default_rng(seed + 7919)
    return rng.integers(0, config["vocab_size"], size=(1, GUARD_TOKENS), dtype=np.int32)


def guard_logits(model, tokens: np.ndarray) -> np.ndarray:
    """The model's ``[1, L, V]`` float32 logits of one forward pass (no cache)."""
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def tolerance(config: Mapping[str, Any]) -> float:
    """The largest logit difference, relative to the logits' scale, that rounding explains.

    Sharding changes only the order of sums: float32 activations agree to a
    few units in 1e-6 of the scale (measured on every synthetic shape), 16-bit
    ones to the 16-bit precision.
    """
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return 1e-5 if dtype == "float32" else 2e-2


def compare(check: Mapping[str, Any], reference: Mapping[str, Any], rel_tol: float) -> Dict[str, Any]:
    """How a row's output compares with the reference row's.

    Args:
        check: ``{"tokens": [steps][B] ints, "logits": [B, V] array}`` of the
            row (either may be missing).
        reference: The same from single-process mlx-lm.
        rel_tol: :func:`tolerance`.

    Returns:
        ``{"verified": bool, "mismatch": str or None, "logits_max_abs_diff",
        "logits_scale", "tokens_checked"}``.
    """
    result: Dict[str, Any] = {"mismatch": None, "logits_max_abs_diff": None, "logits_scale": None, "tokens_checked": 0}
    tokens, want = check.get("tokens"), reference.get("tokens")
    if tokens is not None and want is not None:
        got, ref = np.asarray(tokens), np.asarray(want)
        if got.shape != ref.shape:
            result["mismatch"] = f"{got.shape[0]} steps of {got.shape[1:]} tokens, the reference has {ref.shape}"
        else:
            result["tokens_checked"] = int(got.size)
            wrong = np.argwhere(got != ref)
            if wrong.size:
                step, row = (int(i) for i in wrong[0][:2])
                result["mismatch"] = (
                    f"greedy token of sequence {row} at step {step}: {int(got[step, row])}, "
                    f"mlx-lm {int(ref[step, row])} ({len(wrong)} of {got.size} tokens differ)"
                )
    logits, want = check.get("logits"), reference.get("logits")
    if logits is not None and want is not None:
        scale = float(np.max(np.abs(want)))
        diff = float(np.max(np.abs(np.asarray(logits, dtype=np.float32) - want)))
        result.update(logits_max_abs_diff=diff, logits_scale=scale)
        if result["mismatch"] is None and not diff <= rel_tol * max(scale, 1e-30):
            result["mismatch"] = f"logits differ by {diff:.3g} at scale {scale:.3g} (tolerance {rel_tol:g} of the scale)"
    result["verified"] = result["mismatch"] is None
    return result


def mark(row: Dict[str, Any], verdict: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``row`` with its verdict; a wrong row's speed figures move to ``row["unverified"]``.

    ``verdict`` None (no reference: nothing to compare) leaves ``verified`` None.
    """
    row = dict(row)
    row.pop("check", None)
    if verdict is None:
        row["verified"] = None
        return row
    row.update(verdict)
    if not verdict["verified"]:
        row["unverified"] = {k: row.pop(k) for k in SPEED_KEYS if k in row}
    return row
