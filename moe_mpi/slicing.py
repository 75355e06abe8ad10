"""Cutting a switch layer or an MLP into this rank's part, and the plan of where each part comes from.

Two cuts, both of which keep the partial-sum contract (docs/design.md):

* **whole experts**: a stacked switch layer keeps rows ``experts`` of every
  ``[E, out, in]`` tensor (:func:`keep_rows`);
* **a slice of the intermediate dimension**: an MLP's in-projections keep
  rows ``[a, b)``, its out-projection the same columns, so the slice's
  output is its share of the MLP's (:func:`keep_slice`); for a stacked
  switch layer, the same slice of every expert. :func:`split_child` makes a
  second switch layer holding slices of some experts only.

Each returns a plan, ``{param path: source}``: which positions of which
checkpoint tensor the parameter holds. :mod:`moe_mpi.loading` reads exactly
those from disk.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear


@dataclass(frozen=True, eq=False)
class Take:
    """Positions ``index`` along ``axis`` of checkpoint tensor ``key``."""

    key: str
    axis: int
    index: np.ndarray


@dataclass(frozen=True, eq=False)
class TakeSplit:
    """Rows ``experts`` (axis 0) of stacked tensor ``key``, then positions ``index`` along ``axis``."""

    key: str
    experts: np.ndarray
    axis: int
    index: np.ndarray


@dataclass(frozen=True, eq=False)
class StackOf:
    """Checkpoint tensors ``keys`` (one per expert) stacked on a new axis 0.

    With ``index``, each tensor contributes only positions ``index`` along
    its ``axis`` (a slice of every expert's intermediate dimension).
    """

    keys: Tuple[str, ...]
    axis: int = 0
    index: Optional[np.ndarray] = None


Source = Union[Take, TakeSplit, StackOf]
Plan = Dict[str, Source]

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
# Names mlx-lm gives the input and output projections of a (shared) MLP.
IN_PROJ = ("gate_proj", "up_proj", "fc1", "w1", "w3", "v1")
OUT_PROJ = ("down_proj", "fc2", "w2")


def per_expert_source(keys: Sequence[str], source: Source) -> StackOf:
    """The same positions as ``source`` (of a stacked ``[E, ...]`` tensor), read
    from per-expert tensors instead (expert e's tensor is ``keys[e]``)."""
    if isinstance(source, TakeSplit):
        return StackOf(tuple(keys[int(e)] for e in source.experts), source.axis - 1, source.index)
    if source.axis == 0:  # whole experts: only the local ones
        return StackOf(tuple(keys[int(i)] for i in source.index))
    return StackOf(tuple(keys), source.axis - 1, source.index)


def take(a: mx.array, axis: int, index: np.ndarray) -> mx.array:
    """``a`` at positions ``index`` along ``axis``: a slice when they are consecutive.

    Raises:
        ValueError: A position is not on ``axis`` (``mx.take`` would not say:
            it reads whatever is there).
    """
    if index.size and (index.min() < 0 or index.max() >= a.shape[axis]):
        raise ValueError(
            f"positions {int(index.min())}..{int(index.max())} on axis {axis} of a tensor of shape "
            f"{list(a.shape)}: the checkpoint does not match config.json"
        )
    if index.size and np.all(np.diff(index) == 1):
        sl = (slice(None),) * axis + (slice(int(index[0]), int(index[-1]) + 1),)
        return a[sl]
    return mx.take(a, mx.array(index), axis=axis)


def keep_rows(prefix: str, module: nn.Module, rows: Sequence[int]) -> Plan:
    """Keeps ``rows`` (axis 0) of every parameter of ``module`` (lazily); returns their sources.

    Used for a stacked switch layer's experts, a linear layer's output rows
    (attention heads, the LM head's vocabulary rows): every parameter there,
    weight, scales, biases and bias, has one row per expert or output.
    """
    local = np.asarray(rows, dtype=np.int64)
    plan, kept = {}, []
    for name, a in tree_flatten(module.parameters()):
        plan[f"{prefix}.{name}"] = Take(f"{prefix}.{name}", 0, local)
        kept.append((name, take(a, 0, local)))
    module.update(tree_unflatten(kept))
    return plan


def is_quantized(m: nn.Module) -> bool:
    return isinstance(m, (nn.QuantizedLinear, QuantizedSwitchLinear))


def linear_dims(m: nn.Module) -> Optional[Tuple[int, int]]:
    """(in_dims, out_dims) of a float or quantized (switch) linear, else None."""
    if not isinstance(m, LINEAR_TYPES):
        return None
    w = m.weight  # [(E,) out, in] (in packed when quantized)
    return (w.shape[-1] * 32 // m.bits if is_quantized(m) else w.shape[-1]), w.shape[-2]


def slice_unit(mlp: nn.Module) -> Optional[Tuple[int, int]]:
    """``(intermediate size, unit)`` of an MLP or stacked switch layer, or None.

    A slice must be a whole number of units: 1, or the quantization group of
    the out-projection (a slice of its packed input axis holds whole groups
    and words). None where the module is not in-projections / elementwise /
    out-projection without an output bias.
    """
    children = {n: c for n, c in mlp.children().items() if tree_flatten(c.parameters())}
    outs = [n for n in children if n in OUT_PROJ]
    ins = [n for n in children if n in IN_PROJ]
    if len(outs) != 1 or not ins or len(ins) + 1 != len(children):
        return None
    dims = {n: linear_dims(children[n]) for n in children}
    if any(d is None for d in dims.values()):
        return None
    out = children[outs[0]]
    inter = dims[outs[0]][0]
    if any(dims[n][1] != inter for n in ins) or "bias" in out:
        return None
    unit = 1
    if is_quantized(out):
        unit = out.group_size
        if (unit * out.bits) % 32:
            return None
    if inter % unit:
        return None
    return inter, unit


def slice_bounds(mlp: nn.Module, rank: int, size: int, weights: Optional[Sequence[float]] = None) -> Optional[Tuple[int, int]]:
    """This rank's ``[start, stop)`` of an MLP's intermediate dimension.

    The units are shared out in proportion to ``weights`` (equal when None)
    by the largest-remainder method, every rank at least one. None where the
    module cannot be cut so (see :func:`slice_unit`), or has fewer units than ranks.
    """
    found = slice_unit(mlp)
    if found is None:
        return None
    inter, unit = found
    units = inter // unit
    if units < size:
        return None
    counts = apportion(units, weights if weights is not None else [1.0] * size)
    start = sum(counts[:rank])
    return start * unit, (start + counts[rank]) * unit


def apportion(total: int, weights: Sequence[float]) -> list:
    """``total`` units shared in proportion to ``weights``, every share at least 1
    (largest remainder; ties to the lower index)."""
    n = len(weights)
    w = np.asarray(weights, dtype=np.float64)
    if n > total or not (w > 0).all():
        raise ValueError(f"cannot share {total} units among {n} weights {list(weights)}: each needs one")
    exact = 1 + (total - n) * w / w.sum()  # one each, the rest by weight
    counts = np.floor(exact).astype(int)
    rest = total - int(counts.sum())
    order = sorted(range(n), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    return counts.tolist()


def keep_slice(prefix: str, mlp: nn.Module, bounds: Tuple[int, int]) -> Plan:
    """Keeps ``[start, stop)`` of an MLP's intermediate dimension (lazily); returns the sources.

    For a shared MLP (``[out, in]`` weights) or a stacked switch layer
    (``[E, out, in]``: every expert keeps the same slice).
    """
    start, stop = bounds
    plan, kept = {}, []
    for pname, a in tree_flatten(mlp.parameters()):
        proj, leaf = pname.split(".", 1)
        lin = mlp[proj]
        lead = lin.weight.ndim - 2  # 1 for stacked experts
        if proj in IN_PROJ:  # rows of the intermediate dimension
            axis, lo, hi = lead, start, stop
        elif leaf == "weight" and is_quantized(lin):
            axis, lo, hi = lead + 1, start * lin.bits // 32, stop * lin.bits // 32
        elif is_quantized(lin):  # scales, biases: one per group
            axis, lo, hi = lead + 1, start // lin.group_size, stop // lin.group_size
        else:
            axis, lo, hi = lead + 1, start, stop
        index = np.arange(lo, hi)
        plan[f"{prefix}.{pname}"] = Take(f"{prefix}.{pname}", axis, index)
        kept.append((pname, take(a, axis, index)))
    mlp.update(tree_unflatten(kept))
    return plan


def clone_structure(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure whose arrays are the same (not copied)
    and whose child modules are copies too."""
    new = copy.copy(module)
    for name, child in module.children().items():
        if isinstance(child, nn.Module):
            new[name] = clone_structure(child)
    return new


def split_child(prefix: str, switch: nn.Module, experts: Sequence[int], bounds: Tuple[int, int]) -> Tuple[nn.Module, Plan]:
    """A second switch layer with slices ``bounds`` of experts ``experts`` of ``switch``.

    ``switch`` still holds every expert. The child has the same class and
    projections; its parameters read rows ``experts`` of the switch layer's
    checkpoint tensors and then their slice (:class:`TakeSplit`).

    Returns:
        ``(child, plan)``, the plan keyed by the child's paths under ``prefix``
        (the switch layer's path) + ``.split``.
    """
    child = clone_structure(switch)
    keep_rows(prefix, child, experts)  # the rows, lazily
    sliced = keep_slice(f"{prefix}.split", child, bounds)
    rows = np.asarray(experts, dtype=np.int64)
    plan = {
        path: TakeSplit(f"{prefix}.{path[len(prefix) + len('.split.'):]}", rows, src.axis, src.index)
        for path, src in sliced.items()
    }
    return child, plan
