"""Predicted step time with two-batch overlap (:mod:`moe_mpi.overlap`), from the performance model.

With ``--overlap`` a batch of ``B`` sequences runs as two cohorts of
``ceil(B/2)`` and ``floor(B/2)``. Their forward passes take turns on each
rank's compute, and their all-reduces take turns on the link (one at a time,
on the wire thread). In every layer each resource does both cohorts' work,
and each cohort waits for the other's, so a layer takes

    max(c_A + c_B, a_A + a_B)

where ``c`` is a cohort's compute in the layer and ``a`` its all-reduce on
the link, both :func:`moe_mpi.perfmodel.predict`'s terms at that cohort's
batch. Without overlap the whole batch's layer takes ``c(B) + a(B)``. The
LM head is paid once per cohort, after its last layer. So overlap pays where
``a(B)`` is large against the compute, and costs where two half batches
compute more than one whole (``c_A + c_B > c(B)``): where a step is bound by
reading weights, since an expert chosen by both cohorts is read by both.
docs/perfmodel.md, "Overlap", gives the terms and the measurement.

A prefill of one prompt has no second cohort; serving prefills several
prompts at a time, which split as a batch does.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .perfmodel import Prediction, predict

__all__ = ["SUFFIX", "predict_overlap"]

#: The mode-name suffix of an overlapped prediction (``auto+overlap``).
SUFFIX = "+overlap"


def predict_overlap(shape, mode: str, ranks: Sequence, link, tokens: int, phase: str = "decode",
                    context: int = 0, routing=None, layouts: Optional[Sequence] = None) -> Prediction:
    """:func:`moe_mpi.perfmodel.predict` of ``tokens`` rows run as two overlapped cohorts.

    With fewer than 2 rows, or one rank (nothing on a link), it is the plain
    prediction. ``comm_seconds`` is the link time left exposed.
    """
    name = mode + SUFFIX
    if tokens < 2 or len(ranks) < 2:
        plain = predict(shape, mode, ranks, link, tokens, phase, context, routing, layouts)
        return Prediction(name, plain.ranks, phase, tokens, plain.seconds, plain.comm_seconds, dict(plain.parts))
    halves = [predict(shape, mode, ranks, link, t, phase, context, routing, layouts)
              for t in (tokens - tokens // 2, tokens // 2)]
    heads = sum(p.parts["head"] for p in halves)
    layers_compute = sum(p.seconds - p.comm_seconds - p.parts["head"] for p in halves)
    wire = sum(p.comm_seconds for p in halves)
    seconds = max(layers_compute, wire) + heads
    parts = {k: sum(p.parts[k] for p in halves) for k in halves[0].parts}
    parts["comm"] = max(0.0, wire - layers_compute)  # what compute does not hide
    return Prediction(name, len(ranks), phase, tokens, seconds, parts["comm"], parts)
