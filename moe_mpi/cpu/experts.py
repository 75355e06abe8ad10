"""Expert kernels for MLX's CPU backend.

:class:`moe_mpi.experts.LocalExperts` computes a rank's experts with the
switch layer's own ``gather_mm`` / ``gather_qmm``: the fast path on Metal.
On the CPU, MLX's ``gather_mm`` does not use BLAS and takes float32 only,
so :func:`use_cpu_experts` puts a mixin in front of each local switch layer
that computes

* float experts with many rows as one BLAS matmul per expert and
  projection, on views of the stacked weights (no copies);
* float32 experts with a few rows (decode) as matrix-vector products in
  numpy (:func:`moe_mpi.cpu.gemv.matvec`), all of an expert's rows in one
  pass over its weights; one token's whole layer stays in numpy;
* the rest through one ``gather_mm`` call, and quantized experts through
  the layer's own ``gather_qmm``.

The choices are one small record per layer, ``switch.cpu_kernels``.
"""

from dataclasses import dataclass
from typing import Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import SwiGLU, SwitchGLU, SwitchMLP

from ..experts import base_class, local_switch_layers, with_mixin
from . import gemv, switches
from .layers import view


@dataclass(frozen=True)
class ExpertKernels:
    """How one local switch layer computes on the CPU (``switch.cpu_kernels``).

    Attributes:
        kernel: ``"dense"`` (one matmul per expert) or ``"gather"`` (the
            layer's own ``gather_mm``).
        dense_min_rows: With ``"dense"``, experts with fewer rows go through
            one ``gather_mm`` call together.
        numpy_max_rows: Float32 experts with at most this many rows run in
            numpy; 0 turns that off.
        projections: Names of the layer's projections (``gate_proj``, ...).
        quantized: Whether the projections are quantized.
    """

    kernel: str
    dense_min_rows: int
    numpy_max_rows: int
    projections: Tuple[str, ...]
    quantized: bool


def choose_kernels(switch) -> ExpertKernels:
    """The kernels for a loaded switch layer, from its weights and the switches.

    Dense is for plain ``SwitchGLU``/``SwitchMLP`` layers only (a subclass
    may compute differently) without a global scale; ``MOE_MPI_EXPERT_KERNEL``
    overrides the choice.
    """
    projections = {n: c for n, c in switch.children().items() if isinstance(c, nn.Module) and "weight" in c}
    global_scale = any(getattr(p, "global_scale", None) is not None for p in projections.values())
    quantized = any("scales" in c for c in projections.values())
    kernel = switches.get("MOE_MPI_EXPERT_KERNEL")
    if kernel not in ("dense", "gather"):
        # Quantized experts stay on gather_qmm: MLX's CPU quantized kernels cost the
        # same per row either way, so one call per expert only adds launches
        # (examples/expert_kernels.py).
        plain = base_class(switch) in (SwitchGLU, SwitchMLP)
        kernel = "dense" if plain and not global_scale and not quantized else "gather"
    floats = all(a.dtype == mx.float32 for _, a in tree_flatten(switch.parameters()))
    numpy_rows = switches.numpy_kernels() and floats and kernel == "dense"
    return ExpertKernels(
        kernel=kernel,
        dense_min_rows=int(switches.get("MOE_MPI_DENSE_MIN_ROWS")),
        numpy_max_rows=int(switches.get("MOE_MPI_NUMPY_MAX_ROWS")) if numpy_rows else 0,
        projections=tuple(projections),
        quantized=quantized,
    )


class CpuCompute:
    """Mixin for a local switch layer: :meth:`compute` with the CPU kernels."""

    def compute(self, rows: mx.array, local_ids: np.ndarray) -> mx.array:
        """Runs local experts on token rows: row i through expert ``local_ids[i]``.

        Rows are grouped by expert. Experts with at most ``numpy_max_rows``
        rows run in numpy; otherwise those with fewer than ``dense_min_rows``
        go through one ``gather_mm`` call together, and the rest as one
        matmul per expert and projection.

        Args:
            rows: ``[M, D]`` activations, one per (token, slot) pair.
            local_ids: ``[M]`` local expert index of each row.

        Returns:
            ``[M, D]`` expert outputs, not weighted by router scores.
        """
        kernels = self.cpu_kernels
        if kernels.kernel == "gather":
            return super().compute(rows, local_ids)
        order = np.argsort(local_ids, kind="stable")  # [M]
        ids = local_ids[order]
        starts = np.flatnonzero(np.diff(ids, prepend=-1))
        ends = np.append(starts[1:], ids.size)
        numpy_rows = self.takes_numpy(rows)
        if numpy_rows:
            small = (ends - starts) <= kernels.numpy_max_rows
        elif self.gather_ok(rows):
            small = (ends - starts) < kernels.dense_min_rows
        else:  # e.g. bfloat16 on the CPU: one matmul per expert instead
            small = np.zeros(ends.size, dtype=bool)
        parts, perm = [], []
        if small.any():
            rows_small = np.concatenate([order[s:e] for s, e in zip(starts[small], ends[small])])
            picked = rows[mx.array(rows_small)]
            if numpy_rows:
                parts.append(mx.array(self.numpy_rows(view(picked), local_ids[rows_small])))
            else:
                parts.append(super().compute(picked, local_ids[rows_small]))
            perm.append(rows_small)
        for s, e in zip(starts[~small].tolist(), ends[~small].tolist()):
            parts.append(self._expert(int(ids[s]), rows[mx.array(order[s:e])]))  # [m_e, D]
            perm.append(order[s:e])
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts)  # [M, D] in `perm` order
        perm = np.concatenate(perm)
        if np.all(perm == np.arange(perm.size)):
            return y
        inverse = np.empty_like(perm)
        inverse[perm] = np.arange(perm.size)
        return y[mx.array(inverse)]

    def gather_ok(self, x: mx.array) -> bool:
        """Whether ``gather_mm``/``gather_qmm`` take ``x``: MLX's CPU ``gather_mm``
        takes float32 only (``gather_qmm`` any float)."""
        return x.dtype == mx.float32 or self.cpu_kernels.quantized

    def takes_numpy(self, x: mx.array) -> bool:
        """Whether rows ``x`` and the loaded weights can run in numpy (both float32)."""
        return self.cpu_kernels.numpy_max_rows > 0 and x.dtype == mx.float32 and self.weight_views() is not None

    def numpy_rows(self, x: np.ndarray, local_ids: np.ndarray) -> np.ndarray:
        """Rows through their experts, as matrix-vector products in numpy.

        Decode reads each chosen expert's weights once for a row or a few,
        so its speed is memory bandwidth: :func:`moe_mpi.cpu.gemv.matvec`
        reads zero-copy views of the stacked weights.

        Args:
            x: ``[M, D]`` float32 rows, those of one expert next to each other.
            local_ids: ``[M]`` local expert of each row.

        Returns:
            ``[M, D]`` float32.
        """
        w = self.weight_views()

        def mv(proj: str, e: int, v: np.ndarray) -> np.ndarray:
            y = gemv.matvec(w[proj][e], v)  # [m, out], from a view of expert e's weights
            return y + w[f"{proj}.bias"][e] if f"{proj}.bias" in w else y

        cuts = np.flatnonzero(np.diff(local_ids)) + 1  # where the expert changes
        out = []
        for s, t in zip([0, *cuts.tolist()], [*cuts.tolist(), local_ids.size]):
            e, v = int(local_ids[s]), x[s:t]  # expert e's rows, [m, D]
            if "gate_proj" in w:  # SwitchGLU
                h = self._activation(mv("up_proj", e, v), mv("gate_proj", e, v))
                out.append(mv("down_proj", e, h))
            else:  # SwitchMLP
                h = np.asarray(self.activation(mx.array(mv("fc1", e, v))))
                out.append(mv("fc2", e, h))
        return np.concatenate(out)  # [M, D]

    def _activation(self, up: np.ndarray, gate: np.ndarray) -> np.ndarray:
        if type(self.activation) is SwiGLU:  # silu(gate) * up, as mlx-lm's swiglu
            return gate / (1.0 + np.exp(-gate)) * up
        return np.asarray(self.activation(mx.array(up), mx.array(gate)))

    def weight_views(self):
        """Zero-copy numpy views of the stacked weights, cached; None unless
        every parameter is float32."""
        # Cheaper than flattening the parameters: this runs on every call.
        key = tuple(id(a) for name in self.cpu_kernels.projections for a in self[name].values())
        if getattr(self, "_numpy_key", None) != key:
            params = [
                (f"{name}.{leaf}", a) for name in self.cpu_kernels.projections for leaf, a in tree_flatten(self[name].parameters())
            ]
            views = None
            if all(a.dtype == mx.float32 for _, a in params):
                views = {}
                for name, a in params:
                    proj, leaf = name.rsplit(".", 1)
                    views[proj if leaf == "weight" else name] = view(a)
            # Plain attributes: nn.Module would take a dict for parameters.
            object.__setattr__(self, "_numpy_views", views)
            object.__setattr__(self, "_numpy_key", key)
        return self._numpy_views

    def _expert(self, e: int, x: mx.array) -> mx.array:
        """One expert on ``[m, D]`` rows, as the switch layer computes it."""
        if "gate_proj" in self:  # SwitchGLU
            up = _expert_linear(self.up_proj, e, x)
            gate = _expert_linear(self.gate_proj, e, x)
            return _expert_linear(self.down_proj, e, self.activation(up, gate))
        return _expert_linear(self.fc2, e, self.activation(_expert_linear(self.fc1, e, x)))


class CpuExperts(CpuCompute):
    """Mixin for a local switch layer of an ``ep`` or ``sliced`` shard: one
    token's whole layer in numpy, and no ``gather_mm`` call it cannot take."""

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        child = self.get("split")
        if indices.size == indices.shape[-1] and self.takes_numpy(x) and (child is None or child.takes_numpy(x)):
            return self._one_token(x, indices)
        if not self.gather_ok(x):  # the shortcut of LocalExperts would call gather_mm
            return self.local_slots(x, indices)
        return super().__call__(x, indices)

    def _one_token(self, x: mx.array, indices: mx.array) -> mx.array:
        """One token's ``k`` slots in numpy: ``[..., D]`` in, ``[..., k, D]`` out.

        The token's experts are distinct, so each is one matrix-vector
        product per projection; slots this rank does not compute stay zero.
        Building the output in numpy spares the gather, zeros and scatter
        ops of the general path, each a round trip to MLX's CPU stream.
        """
        d = x.shape[-1]
        flat = np.asarray(indices.reshape(-1))  # [k]
        out = np.zeros((flat.size, d), dtype=np.float32)  # [k, D]
        row = view(x).reshape(-1)  # [D]
        own_slots, own_ids, split_slots, split_ids = self.expert_shard.slots(flat)
        for slots, ids, unit in ((own_slots, own_ids, self), (split_slots, split_ids, self.get("split"))):
            if slots.size:
                out[slots] = unit.numpy_rows(np.broadcast_to(row, (slots.size, d)), ids)
        return mx.array(out).reshape(*indices.shape, d)


def _expert_linear(lin, e: int, x: mx.array) -> mx.array:
    """``x`` through expert ``e`` of a (quantized) switch linear: ``x @ W[e].T``."""
    if "scales" in lin:
        biases = _expert_of(lin["biases"], e) if lin.get("biases") is not None else None
        y = mx.quantized_matmul(
            x, _expert_of(lin["weight"], e), _expert_of(lin["scales"], e), biases, transpose=True,
            group_size=lin.group_size, bits=lin.bits, mode=lin.mode,
        )
    else:
        y = x @ _transposed_expert(lin["weight"], e)
    if "bias" in lin:
        y = y + _expert_of(lin["bias"], e)
    return y


def _expert_of(a: mx.array, e: int) -> mx.array:
    """``a[e]`` of a stacked ``[n, ...]`` tensor, as MLX's CPU matmuls read it without a copy.

    MLX's CPU matmul (and ``quantized_matmul``) copies a ``w[e]`` slice on
    every call, and a prefill keeps one copy per expert and projection alive
    until it is evaluated; on ``mx.take(w, e, axis=0)`` they allocate only
    their output (``tests/test_cpu_kernels.py::test_expert_matmuls_do_not_copy_weights``).
    """
    return mx.take(a, e, axis=0)


def _transposed_expert(w: mx.array, e: int) -> mx.array:
    """``w[e].T`` (``[in, out]``) as a view MLX's matmul reads without a copy.

    On the CPU MLX copies a transposed slice unless its memory is row-major:
    ``w[e].T`` for weights in the checkpoint's layout, ``swapaxes(w)[e]``
    for weights stored transposed (:func:`store_transposed`).
    """
    if w.dtype == mx.float32 and memoryview(w).strides[1] == w.itemsize:  # [in, out] in memory
        return _expert_of(mx.swapaxes(w, 1, 2), e)
    return _expert_of(w, e).T


def transposed(w: mx.array) -> mx.array:
    """``[n, out, in]`` float32 weights with each expert's matrix stored transposed.

    Shape, values and parameter path are unchanged: the result is a
    transposed view of a contiguous ``[n, in, out]`` array, so
    ``view(w)[e] @ x`` runs BLAS ``sgemv`` "N", which reads faster than
    "T". Other dtypes are returned as they are (only float32 runs in numpy).
    """
    if w.dtype != mx.float32:
        return w
    return mx.swapaxes(mx.contiguous(mx.swapaxes(w, 1, 2)), 1, 2)


def transposed_paths(model: nn.Module) -> list:
    """Parameter paths of the stacked expert weights to store transposed.

    Only without the compiled loop: numpy's BLAS ``sgemv`` reads
    ``[in, out]`` memory faster, while the loop reads MLX's own
    ``[out, in]`` fastest. MLX's matmuls read either layout without a copy.
    """
    if gemv.compiled() is not None:
        return []
    paths = []
    for name, m in model.named_modules():
        if isinstance(m, CpuCompute) and m.cpu_kernels.numpy_max_rows:
            paths += [f"{name}.{leaf}" if name else leaf for leaf, a in tree_flatten(m.parameters())
                      if leaf.endswith(".weight") and a.ndim == 3]
    return paths


def store_transposed(model: nn.Module) -> int:
    """Stores the weights :func:`transposed_paths` lists transposed, one at a
    time (the peak grows by one tensor). Returns how many."""
    paths = transposed_paths(model)
    params = dict(tree_flatten(model.parameters()))
    for p in paths:
        w = transposed(params[p])
        mx.eval(w)
        model.update(tree_unflatten([(p, w)]))
    return len(paths)


def use_cpu_experts(model: nn.Module, full: bool = True) -> int:
    """Gives every local switch layer of a loaded model the CPU expert kernels.

    Args:
        model: A sharded model, its weights loaded.
        full: :class:`CpuExperts` (the one-token path too); False gives
            :class:`CpuCompute` only, for switch layers whose ``__call__``
            is someone else's (the central router's).

    Returns:
        The number of switch layers changed.
    """
    layers = local_switch_layers(model, children=True)
    for switch in layers:
        switch.cpu_kernels = choose_kernels(switch)
        top = full and not switch.expert_shard.is_child  # a child is only computed through
        switch.__class__ = with_mixin(CpuExperts if top else CpuCompute, type(switch))
    store_transposed(model)
    return len(layers)
