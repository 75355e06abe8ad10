"""Expert compute: one rank's experts, for the tokens routed to them.

A rank keeps only its own experts, stacked: one ``[n_local, out, in]`` tensor
per projection (``gate_proj``/``up_proj``/``down_proj`` of mlx-lm's
``SwitchGLU``, or ``fc1``/``fc2`` of ``SwitchMLP``), float or quantized.

The routing itself is not computed here. The router is replicated, so every
rank already holds the same global ``indices``; this module selects the
``(token, slot)`` pairs whose expert is local, runs the model's own switch
layer on them, and returns zeros in the slots other ranks own. The block's
router-weighted sum over slots then yields this rank's *partial* sum, and the
block's single all-reduce (see :mod:`moe_mpi.shard`) adds the partial sums of
all ranks.
"""

import os
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import SwiGLU, SwitchGLU, SwitchMLP

from . import gemv


class LocalExperts:
    """Mixin for an mlx-lm switch layer that holds only this rank's experts.

    :func:`make_local` puts it in front of the switch layer's own class, so
    the projections keep their names and parameter paths
    (``...switch_mlp.gate_proj.weight`` now has ``n_local`` rows) and the
    layer's own ``__call__`` (sorting, ``gather_mm`` or ``gather_qmm``, the
    activation) does the compute.
    """

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """Computes this rank's experts for the slots routed to them.

        Args:
            x: Token activations, ``[..., D]``.
            indices: Global expert ids from the replicated router, ``[..., k]``,
                with the same leading shape as ``x``.

        Returns:
            ``[..., k, D]``: the expert output in every slot whose expert is
            local, zeros in every other slot.
        """
        k = indices.shape[-1]
        d = x.shape[-1]
        host = self._host_path(x)
        if self.ep_all_local and indices.size == k and not host and self._gather_ok(x):
            # One token, every expert here (mode="sliced"): each chosen expert
            # has one row, gather_mm's best case, and no routing needs to be
            # read to the host; the layer's own call stays lazy.
            return super().__call__(x, indices)
        x_flat = x.reshape(-1, d)  # [T, D]
        # Reading the routing to the host is one sync per layer; it lets the
        # rank compute only its own (token, slot) pairs instead of all T*k.
        flat = np.asarray(indices.reshape(-1))  # [T*k] global ids
        if flat.size == k and host:
            # Decode, one token: all on the host, no MLX op but the result.
            return self._one_token_host(x_flat, flat).reshape(*indices.shape, d)
        local = self.ep_local_of[flat]  # [T*k], -1 where another rank owns it
        slots = np.flatnonzero(local >= 0)  # [M]
        out = mx.zeros((flat.size, d), dtype=x.dtype)  # [T*k, D]
        if slots.size:
            rows = x_flat[mx.array(slots // k)]  # [M, D] token of each local slot
            out[mx.array(slots)] = self.compute(rows, local[slots]).astype(x.dtype)
        return out.reshape(*indices.shape, d)  # [..., k, D]

    def compute(self, rows: mx.array, local_ids: np.ndarray) -> mx.array:
        """Runs local experts on token rows: row i through expert ``local_ids[i]``.

        Args:
            rows: ``[M, D]`` activations, one per (token, slot) pair.
            local_ids: ``[M]`` local expert index of each row.

        Returns:
            ``[M, D]`` expert outputs, not weighted by router scores.
        """
        if self.ep_kernel == "gather":
            return self._gather(rows, local_ids)
        # "dense": rows grouped by expert, one matmul per expert and projection:
        # on the CPU these run on BLAS, which gather_mm does not use. Experts
        # with few rows (decode) are matrix-vector products: float ones with
        # up to `host_max_rows` rows go to the host (moe_mpi.gemv), all of
        # an expert's rows in one pass; otherwise those with fewer than
        # `dense_min_rows` rows go through one gather_mm (gather_qmm) call together.
        order = np.argsort(local_ids, kind="stable")  # [M]
        ids = local_ids[order]
        starts = np.flatnonzero(np.diff(ids, prepend=-1))
        ends = np.append(starts[1:], ids.size)
        host = self._host_path(rows)
        if host:
            # Float experts with a few rows: matrix-vector products on the
            # host (moe_mpi.gemv), the expert's weights read from memory once.
            # Measured far faster than MLX's BLAS matmul on 2-4 rows, whose
            # sgemm packs the weights first (docs/benchmarks.md).
            small = (ends - starts) <= self.ep_host_max_rows
        elif self._gather_ok(rows):
            small = (ends - starts) < self.ep_dense_min_rows
        else:  # e.g. bfloat16 on the CPU: one matmul per expert instead
            small = np.zeros(ends.size, dtype=bool)
        parts, perm = [], []
        if small.any():
            rows_small = np.concatenate([order[s:e] for s, e in zip(starts[small], ends[small])])
            one_row = self._gemv_host if host else self._gather
            parts.append(one_row(rows[mx.array(rows_small)], local_ids[rows_small]))
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

    def _gather_ok(self, x: mx.array) -> bool:
        """Whether gather_mm/gather_qmm take ``x``: MLX's CPU gather_mm takes
        float32 only (gather_qmm any float)."""
        return x.dtype == mx.float32 or self.ep_quantized or mx.default_device() != mx.cpu

    def _host_path(self, x: mx.array) -> bool:
        """Whether ``x`` and the loaded weights can take the host path (moe_mpi.gemv):
        the layer allows it and both are float32 (numpy has no bfloat16)."""
        return self.ep_host_gemv and x.dtype == mx.float32 and self._host_weights() is not None

    def _one_token_host(self, x: mx.array, flat: np.ndarray) -> mx.array:
        """One token's ``k`` slots on the host: ``[1, D]`` in, ``[k, D]`` out.

        The token's experts are distinct, so each is one matrix-vector
        product per projection (:meth:`_gemv_host`); slots of other ranks'
        experts stay zero. Building the output in numpy spares the gather,
        zeros and scatter ops, each a scheduler round trip on MLX's CPU
        stream, that the general path needs.
        """
        local = self.ep_local_of[flat]  # [k], -1 where another rank owns it
        out = np.zeros((flat.size, x.shape[-1]), dtype=np.float32)  # [k, D]
        slots = np.flatnonzero(local >= 0)
        if slots.size:
            # memoryview() evaluates x, already computed with the routing.
            row = np.asarray(memoryview(x)).reshape(-1)  # [D]
            out[slots] = self._gemv_rows(np.broadcast_to(row, (slots.size, row.size)), local[slots])
        return mx.array(out)

    def _gemv_host(self, rows: mx.array, local_ids: np.ndarray) -> mx.array:
        """One row per expert: matrix-vector products with numpy's BLAS."""
        return mx.array(self._gemv_rows(np.asarray(rows), local_ids))

    def _gemv_rows(self, x: np.ndarray, local_ids: np.ndarray) -> np.ndarray:
        """Rows through their experts, matrix-vector products on the host.

        Decode reads each chosen expert's weights once for a row or a few,
        so its speed is memory bandwidth. :func:`moe_mpi.gemv.matvec` reads
        zero-copy views of the stacked weights, with the compiled loop (one
        pass for all of an expert's rows) or numpy's BLAS ``sgemv``; both
        read them much faster than ``gather_mm`` or MLX's ``sgemm`` path
        (docs/benchmarks.md).

        Args:
            x: ``[M, D]`` rows, those of one expert next to each other.
            local_ids: ``[M]`` local expert of each row.
        """
        w = self._host_weights()

        def mv(proj: str, e: int, v: np.ndarray) -> np.ndarray:
            y = gemv.matvec(w[proj][e], v)  # [m, out], from a view of expert e's weights
            return y + w[f"{proj}.bias"][e] if f"{proj}.bias" in w else y

        cuts = np.flatnonzero(np.diff(local_ids)) + 1  # where the expert changes
        out = []
        for s, t in zip([0, *cuts.tolist()], [*cuts.tolist(), local_ids.size]):
            e, v = int(local_ids[s]), x[s:t]  # expert e's rows, [m, D]
            if "gate_proj" in w:  # SwitchGLU
                h = self._host_activation(mv("up_proj", e, v), mv("gate_proj", e, v))
                out.append(mv("down_proj", e, h))
            else:  # SwitchMLP
                h = np.asarray(self.activation(mx.array(mv("fc1", e, v))))
                out.append(mv("fc2", e, h))
        return np.concatenate(out)  # [M, D]

    def _host_activation(self, up: np.ndarray, gate: np.ndarray) -> np.ndarray:
        if type(self.activation) is SwiGLU:  # silu(gate) * up, as mlx-lm's swiglu
            return gate / (1.0 + np.exp(-gate)) * up
        return np.asarray(self.activation(mx.array(up), mx.array(gate)))

    def _host_weights(self):
        """Zero-copy numpy views of the (evaluated) stacked weights, cached;
        None unless every parameter is float32 (the checkpoint decides:
        ``make_local`` runs before the weights are loaded)."""
        # Cheaper than flattening the parameters: this runs on every call.
        key = tuple(id(a) for name in self.ep_projections for a in self[name].values())
        if getattr(self, "_ep_host_key", None) != key:
            params = tree_flatten(self.parameters())
            views = None
            if all(a.dtype == mx.float32 for _, a in params):
                views = {}
                for name, a in params:
                    proj, leaf = name.rsplit(".", 1)
                    mx.eval(a)
                    views[proj if leaf == "weight" else name] = np.asarray(memoryview(a))
            # Plain attributes: nn.Module would take a dict or tuple for parameters.
            object.__setattr__(self, "_ep_host", views)
            object.__setattr__(self, "_ep_host_key", key)
        return self._ep_host

    def _gather(self, rows: mx.array, local_ids: np.ndarray) -> mx.array:
        """The switch layer's own compute (gather_mm / gather_qmm) on rows."""
        ids = mx.array(local_ids)[:, None]  # [M, 1]: one "slot" per row
        return super().__call__(rows, ids)[:, 0]

    def _expert(self, e: int, x: mx.array) -> mx.array:
        """One expert on ``[m, D]`` rows, as the switch layer computes it."""
        if "gate_proj" in self:  # SwitchGLU
            up = _expert_linear(self.up_proj, e, x)
            gate = _expert_linear(self.gate_proj, e, x)
            return _expert_linear(self.down_proj, e, self.activation(up, gate))
        return _expert_linear(self.fc2, e, self.activation(_expert_linear(self.fc1, e, x)))


def _expert_linear(lin, e: int, x: mx.array) -> mx.array:
    """``x`` through expert ``e`` of a (quantized) switch linear: ``x @ W[e].T``.

    Every per-expert tensor is taken with :func:`_expert_of`, so no weight
    is copied.
    """
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

    On MLX 0.32.4's CPU backend ``x @ w[e].T`` (and ``quantized_matmul`` on
    ``w[e]``) copied the expert on every call, and a prefill keeps one copy
    per expert and projection alive until it is evaluated; the same
    products on ``mx.take(w, e, axis=0)`` allocate only their output
    (``tests/test_host.py::test_expert_matmuls_do_not_copy_weights``: the
    peak grows by ~0.3 MB of activations, by 12.9 MB with ``w[e]``).
    """
    return mx.take(a, e, axis=0)


def _transposed_expert(w: mx.array, e: int) -> mx.array:
    """``w[e].T`` (``[in, out]``) as a view MLX's matmul reads without a copy.

    On the CPU MLX copies a transposed slice unless its memory is row-major:
    ``w[e].T`` for weights in the checkpoint's layout, ``swapaxes(w)[e]``
    for weights stored by :func:`to_host_layout` (a one-off timing, one
    process, one BLAS thread: 1.4 ms against 12-14 ms for a 4-row product
    with an 8.3 MB expert); both through :func:`_expert_of`.
    """
    # Only float32 weights are ever stored so (and MLX exports no bf16 buffer).
    if w.dtype == mx.float32 and memoryview(w).strides[1] == w.itemsize:  # [in, out] in memory
        return _expert_of(mx.swapaxes(w, 1, 2), e)
    return _expert_of(w, e).T


def default_kernel(switch) -> str:
    """``"dense"`` (per-expert matmuls) or ``"gather"`` (the layer's own call).

    Dense is for the CPU, where ``gather_mm`` does not use BLAS; on a GPU
    (Metal) ``gather_mm``/``gather_qmm`` are the fast path. Only plain
    ``SwitchGLU``/``SwitchMLP`` layers get the dense kernel: a subclass may
    compute differently. ``MOE_MPI_EXPERT_KERNEL`` overrides the choice.
    """
    forced = os.environ.get("MOE_MPI_EXPERT_KERNEL")
    if forced in ("dense", "gather"):
        return forced
    plain = type(switch) in (SwitchGLU, SwitchMLP)  # called before the class swap
    projections = [c for c in switch.children().values() if isinstance(c, nn.Module)]
    global_scale = any(getattr(p, "global_scale", None) is not None for p in projections)
    on_cpu = mx.default_device() == mx.cpu
    return "dense" if plain and on_cpu and not global_scale else "gather"


_MIXED = {}


def make_local(switch, local_experts: Sequence[int], num_experts: int) -> None:
    """Turns an mlx-lm switch layer into one that computes local experts only.

    The caller slices the stacked weights to ``local_experts`` (in that order);
    this sets the global-to-local lookup and swaps the class in place.

    Args:
        switch: A ``SwitchGLU``/``SwitchMLP``-like module whose ``__call__``
            takes ``(x, indices)`` and returns ``[..., k, D]``.
        local_experts: Global ids of this rank's experts, ascending.
        num_experts: Number of experts the router chooses from.
    """
    lookup = np.full(num_experts, -1, dtype=np.int64)
    lookup[np.asarray(local_experts, dtype=np.int64)] = np.arange(len(local_experts))
    # A numpy attribute, not an mx.array: it must not become a parameter.
    switch.ep_local_of = lookup
    switch.ep_experts = tuple(int(e) for e in local_experts)
    switch.ep_all_local = len(switch.ep_experts) == num_experts
    switch.ep_kernel = default_kernel(switch)
    projections = {n: c for n, c in switch.children().items() if isinstance(c, nn.Module) and "weight" in c}
    switch.ep_projections = tuple(projections)
    switch.ep_quantized = any("scales" in c for c in projections.values())
    switch.ep_dense_min_rows = int(os.environ.get("MOE_MPI_DENSE_MIN_ROWS", "2"))
    switch.ep_host_max_rows = int(os.environ.get("MOE_MPI_HOST_MAX_ROWS", "4"))
    # Few-row experts on the host (moe_mpi.gemv): float weights on the CPU only.
    floats = all(a.dtype == mx.float32 for _, a in tree_flatten(switch.parameters()))
    from .host import host_gemv_enabled  # here: moe_mpi.host imports this module

    switch.ep_host_gemv = host_gemv_enabled() and floats and switch.ep_kernel == "dense"
    switch.__class__ = with_mixin(LocalExperts, type(switch))


def host_layout_paths(model: nn.Module) -> set:
    """Parameter paths of the stacked float expert weights to store ``[in, out]``.

    Only for numpy's BLAS: on the benchmark machine OpenBLAS read a
    2688x768 expert matrix for a matrix-vector product at 20-22 GB/s from
    ``[in, out]`` memory (``sgemv`` "N") against 13 GB/s from ``[out, in]``
    (``sgemv`` "T"), 2 ranks reading at once
    (docs/results/decode-kernels-n2.txt). The compiled loop
    (:mod:`moe_mpi.gemv`) reads MLX's own ``[out, in]`` layout fastest, so
    with it nothing is listed. Otherwise the layers with the host path on
    (``ep_host_gemv``) are; these are stored by :func:`to_host_layout`.
    MLX's matmuls read either layout without a copy, so prefill does not
    change.
    """
    if gemv.compiled() is not None:
        return set()
    paths = set()
    for name, m in model.named_modules():
        if isinstance(m, LocalExperts) and m.ep_host_gemv:
            for leaf, a in tree_flatten(m.parameters()):
                if leaf.endswith(".weight") and a.ndim == 3:
                    paths.add(f"{name}.{leaf}" if name else leaf)
    return paths


def store_host_layout(model: nn.Module) -> None:
    """Stores the weights :func:`host_layout_paths` lists in the host layout, in place."""
    paths = host_layout_paths(model)
    if paths:
        params = dict(tree_flatten(model.parameters()))
        model.update(tree_unflatten([(p, to_host_layout(params[p])) for p in paths]))


def to_host_layout(w: mx.array) -> mx.array:
    """``[n, out, in]`` float32 weights with each expert's matrix stored transposed.

    Shape, values and parameter path are unchanged: the result is a
    transposed view of a contiguous ``[n, in, out]`` array, so
    ``np.asarray(memoryview(w))[e] @ x`` runs BLAS ``sgemv`` "N". Any other
    dtype is returned as it is: only float32 takes the host path, and the
    dtype is known only once the checkpoint's tensor is read.
    """
    if w.dtype != mx.float32:
        return w
    return mx.swapaxes(mx.contiguous(mx.swapaxes(w, 1, 2)), 1, 2)


def with_mixin(mixin: type, cls: type) -> type:
    """``cls`` with ``mixin`` in front (cached), for swapping a module's class.

    The module keeps its attributes, children and parameter paths; only
    ``__call__`` (and what the mixin adds) changes.
    """
    if issubclass(cls, mixin):
        return cls
    if (mixin, cls) not in _MIXED:
        _MIXED[mixin, cls] = type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {})
    return _MIXED[mixin, cls]
