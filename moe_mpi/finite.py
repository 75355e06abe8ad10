"""Tokens drawn from logits that are not numbers: a broken model, said so instead of printed.

A checkpoint whose weights hold NaN or infinite values (a bad conversion, a
corrupt file that still parses) or a computation that overflows (float16
activations) gives non-finite logits, and mlx-lm's samplers still draw a
token from them: the run printed garbage and exited 0.

The check is per drawn token, on that token's log-probability alone. mlx-lm
hands the sampler ``logprobs = logits - logsumexp(logits)``. One NaN or
``+inf`` logit anywhere in a row makes the row's log-sum-exp NaN or
``+inf``, so every log-probability of the row, the drawn token's included,
is NaN or ``-inf``; so does a row of nothing but ``-inf``. A finite row
never gives the drawn token ``-inf``: the samplers draw only tokens of
positive probability, and greedy takes the largest. So "the drawn token's
log-probability is finite" is the whole row's verdict, at O(1).

It reads that one number from the array mlx-lm has already evaluated (its
generation loops evaluate the log-probabilities with the token), through
the buffer protocol: no MLX operation is queued, so nothing waits for the
next step that mlx-lm computes meanwhile (``mx.async_eval``), and decode is
not slowed. A check at load instead (one pass over every weight) would cost
a read of the whole shard and miss overflow; this one catches both, but
only once a bad value reaches the logits: a NaN in an expert that is never
chosen goes unnoticed, as it changes no output.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

__all__ = ["drawn_is_finite", "non_finite_message"]

#: Per float dtype: the unsigned integer of its width and its exponent
#: bits; all exponent bits set is infinity or NaN.
_EXPONENT = {
    mx.float32: (np.uint32, 0x7F800000),
    mx.bfloat16: (np.uint16, 0x7F80),
    mx.float16: (np.uint16, 0x7C00),
}


def drawn_is_finite(logprobs: mx.array, token: int) -> bool:
    """Whether the drawn ``token``'s log-probability in ``logprobs`` (one row, ``[V]``) is finite.

    ``logprobs`` must be evaluated already (as mlx-lm's responses are).
    """
    token = int(token)
    if not 0 <= token < logprobs.size:  # a draw from a NaN row may land anywhere
        return False
    kind = _EXPONENT.get(logprobs.dtype)
    view = memoryview(logprobs)
    if kind is None or not view.c_contiguous:
        return math.isfinite(logprobs.reshape(-1)[token].item())  # rare: an MLX op, and a wait
    uint, exponent = kind
    bits = np.frombuffer(view.cast("B"), dtype=uint, count=1, offset=token * np.dtype(uint).itemsize)[0]
    return int(bits) & exponent != exponent


def non_finite_message(token_number: int) -> str:
    """The error for generated token ``token_number`` (1-based) drawn from non-finite logits."""
    return (
        f"the model's logits are not finite (NaN or infinity) at generated token {token_number}: its "
        "weights hold NaN or infinite values, or its arithmetic overflowed (float16?); the text would be garbage"
    )
