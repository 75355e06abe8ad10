"""Decode-sized float32 work of the dense part on numpy (CPU only).

Decode multiplies one row by every weight matrix: matrix-vector products,
whose speed is memory bandwidth. MLX's CPU matmul hands them to BLAS
``sgemm``, which packs the matrix first. In the kernel probe
(``docs/results/decode-kernels-n2.txt``, 2 ranks reading at once)
:func:`moe_mpi.gemv.matvec` on a zero-copy view read a 768x768 matrix at
19-24 GB/s per rank against 11-13 for MLX's matmul (and 10-12 for numpy's
``sgemv`` on the same ``[out, in]`` memory). The expert layers get the same
treatment in :mod:`moe_mpi.experts`; this module does it for the
replicated dense part (attention projections, routers, the LM head), which
every rank reads in full at every step.

The small layers around them get the same: MLX's CPU backend builds
``fast.rms_norm`` and ``fast.rope`` from primitive ops, each a round trip
to its stream thread, and :class:`HostRMSNorm` and :class:`HostRoPE` do
them in numpy for decode-sized inputs. Evaluated one by one inside an ep
decode step, the norms took 5-6 ms and RoPE 5-5.5 ms of a step, in numpy
about 2 and 1 ms; the plain step (where MLX evaluates them lazily, with
their neighbours) was 4.1 ms faster on average over 6 alternating runs
(``docs/results/host-norms-ab-n2.txt``, ``decode-phases-norms-n2.txt``,
``examples/decode_phases.py``).

The price is one host sync per call (numpy needs the input's values), so
only small inputs take this path: one row for a matmul, at most
``HOST_MAX_ELEMENTS`` elements for a norm or RoPE; prefill stays lazy in
MLX. On a GPU (Metal) nothing changes.
"""

import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import gemv
from .experts import make_local, store_host_layout, with_mixin

# Largest input (elements) a norm or RoPE takes to numpy: a few decode tokens
# (batch 8 of hidden 768 is 6144); prefill stays in MLX.
HOST_MAX_ELEMENTS = 16384


class HostLinear:
    """Mixin for ``nn.Linear``: one float32 row goes through :func:`moe_mpi.gemv.matvec`.

    Any other input (several rows, another dtype) runs the layer's own
    ``__call__``. Parameters and their paths do not change.
    """

    def __call__(self, x: mx.array) -> mx.array:
        y = self._host_product(x)
        if y is None:
            return super().__call__(x)
        b = self._host_views[1]
        if b is not None:
            y += b
        # Shaped in numpy: a reshape in MLX would be one more op to schedule.
        return mx.array(y)  # [..., out]

    def _host_product(self, x: mx.array) -> Optional[np.ndarray]:
        """``x @ weight.T`` in numpy, ``[..., out]``, for one float32 row of
        float32 weights; None for any other input (the layer's own path)."""
        d = x.shape[-1]
        if x.size != d or x.dtype != mx.float32:
            return None
        views = self._host_view()
        if views is None:  # weights are not float32 (loaded as another dtype)
            return None
        w = views[0]
        # memoryview() evaluates x: the one sync this path costs.
        v = np.asarray(memoryview(x)).reshape(d)  # [D]
        return gemv.matvec(w, v).reshape(*x.shape[:-1], w.shape[0])  # from a view of the weights

    def _host_view(self):
        """Zero-copy numpy views of (weight, bias), rebuilt if they change;
        None unless both are float32."""
        weight = self["weight"]
        bias = self.get("bias")
        key = (id(weight), id(bias))
        if getattr(self, "_host_key", None) != key:
            views = None
            if weight.dtype == mx.float32 and (bias is None or bias.dtype == mx.float32):
                # memoryview() evaluates, and the views share MLX's memory.
                views = (
                    np.asarray(memoryview(weight)),
                    None if bias is None else np.asarray(memoryview(bias)),
                )
            # Plain attributes: nn.Module would take a tuple for parameters.
            object.__setattr__(self, "_host_views", views)
            object.__setattr__(self, "_host_key", key)
        return self._host_views


class HostShardedToAllLinear(HostLinear):
    """Mixin for mlx's ``ShardedToAllLinear`` (tensor parallel): one float32
    row through :func:`moe_mpi.gemv.matvec`, then the layer's own
    ``mx.distributed.all_sum`` and bias, as its ``__call__`` does."""

    def __call__(self, x: mx.array) -> mx.array:
        y = self._host_product(x)
        if y is None:
            return super(HostLinear, self).__call__(x)  # the layer's own call
        y = mx.distributed.all_sum(mx.array(y), group=self.group)  # [..., out]: the partials summed
        return y + self["bias"] if "bias" in self else y


def _host_input(x: mx.array) -> Optional[np.ndarray]:
    """``x`` as a numpy view if it is float32 and decode-sized, else None.

    Taking the view evaluates ``x``: the one sync of the host path.
    """
    if x.dtype != mx.float32 or x.size > HOST_MAX_ELEMENTS:
        return None
    return np.asarray(memoryview(x))


class HostRMSNorm:
    """Mixin for ``nn.RMSNorm``: a decode-sized float32 input is normalised in numpy.

    ``x * rsqrt(mean(x**2, -1) + eps) * weight``, as ``mx.fast.rms_norm``
    computes it; any other input runs the layer's own ``__call__``.
    """

    def __call__(self, x: mx.array) -> mx.array:
        weight = self["weight"]
        v = _host_input(x) if weight.dtype == mx.float32 else None
        if v is None:
            return super().__call__(x)
        return mx.array(rms_norm(v, np.asarray(memoryview(weight)), self.eps))  # [..., D]


def rms_norm(v: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """``v * rsqrt(mean(v**2, -1) + eps) * w`` in numpy, as ``mx.fast.rms_norm``."""
    # einsum: the sum of squares without np.mean's overhead (~2x faster here).
    mean_sq = np.einsum("...i,...i->...", v, v)[..., None] * (1.0 / v.shape[-1])  # [..., 1]
    return v * (1.0 / np.sqrt(mean_sq + eps)) * w


class HostRoPE:
    """Mixin for ``nn.RoPE``: a decode-sized float32 input is rotated in numpy.

    The same rotation as ``mx.fast.rope``: positions ``offset + i`` along
    axis -2, the first ``dims`` features of the last axis rotated in pairs
    (halves, or neighbours if ``traditional``), frequencies
    ``base ** (-2j / dims)``, positions times ``scale``, angles in float32. An ``mx.array``
    offset, or fewer than 3 dimensions, runs the layer's own ``__call__``.
    """

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if x.ndim < 3 or not isinstance(offset, int):
            return super().__call__(x, offset=offset)
        v = _host_input(x)  # [..., L, D]
        if v is None:
            return super().__call__(x, offset=offset)
        cos, sin = self._angles(offset, v.shape[-2])  # [L, dims/2] each
        return mx.array(rotate(v, cos, sin, self.dims, self.traditional))

    def _angles(self, offset: int, length: int):
        """:func:`rope_angles` of this layer, cached for the last (offset, length):
        decode rotates a layer's queries and keys at the same offset."""
        key = (offset, length)
        if getattr(self, "_host_angles_key", None) != key:
            angles = rope_angles(self.dims, self.base, self.scale, offset, length)
            # Plain attributes: nn.Module would take a tuple for parameters.
            object.__setattr__(self, "_host_angles", angles)
            object.__setattr__(self, "_host_angles_key", key)
        return self._host_angles


def rope_angles(dims: int, base: float, scale: float, offset: int, length: int):
    """cos and sin of RoPE's rotation angles, float32 ``[length, dims/2]``.

    Positions ``offset + i``, frequencies ``base ** (-2j / dims)``,
    positions times ``scale``, computed in float32 the way MLX's CPU
    ``fast.rope`` does, so far-off positions round alike.
    """
    f32 = np.float32
    half = dims // 2
    inv_freqs = np.exp(np.arange(0, -half, -1, dtype=f32) * f32(np.log(base) / half))
    positions = (np.arange(length, dtype=f32) + f32(offset)) * f32(scale)
    theta = positions[:, None] * inv_freqs[None]  # [L, dims/2]
    return np.cos(theta), np.sin(theta)


def rotate(v: np.ndarray, cos: np.ndarray, sin: np.ndarray, dims: int, traditional: bool) -> np.ndarray:
    """``v`` rotated as ``mx.fast.rope``: the first ``dims`` features of the
    last axis in pairs (halves, or neighbours if ``traditional``); ``cos`` and
    ``sin`` broadcast against ``v[..., :dims/2]``. Returns a new array."""
    if traditional:  # pairs (0, 1), (2, 3), ...
        first, second = slice(0, dims, 2), slice(1, dims, 2)
    else:  # pairs (j, j + dims/2)
        first, second = slice(0, dims // 2), slice(dims // 2, dims)
    x1, x2 = v[..., first], v[..., second]
    y = np.array(v)  # features past `dims` pass through
    y[..., first] = x1 * cos - x2 * sin
    y[..., second] = x1 * sin + x2 * cos
    return y


def host_gemv_enabled() -> bool:
    """Whether one-row float32 products go to numpy (CPU, and not disabled).

    ``MOE_MPI_HOST_GEMV=0`` turns the host path off, for the dense part
    (linears, norms, RoPE) and the experts alike.
    """
    return os.environ.get("MOE_MPI_HOST_GEMV", "1") == "1" and mx.default_device() == mx.cpu


HOST_KERNELS = ((nn.Linear, HostLinear), (nn.RMSNorm, HostRMSNorm), (nn.RoPE, HostRoPE))


def use_host_kernels(model: nn.Module) -> int:
    """Gives every plain ``nn.Linear``, ``nn.RMSNorm`` and ``nn.RoPE`` its host path.

    Decode-sized float32 inputs then run in numpy (:class:`HostLinear`,
    :class:`HostRMSNorm`, :class:`HostRoPE`). Only those exact classes are
    changed: quantized layers, expert layers, subclasses and other RoPE
    variants (llama3, yarn, ...) are left alone; a layer whose weights are
    not float32 keeps its own path at call time. Does nothing unless
    :func:`host_gemv_enabled`.

    Returns:
        The number of layers changed.
    """
    if not host_gemv_enabled():
        return 0
    mixins = dict(HOST_KERNELS)
    changed = 0
    for _, m in model.named_modules():
        mixin = mixins.get(type(m))
        if mixin is not None:
            m.__class__ = with_mixin(mixin, type(m))
            changed += 1
    return changed


def use_host_kernels_tp(model: nn.Module) -> int:
    """Gives mlx-lm's tensor-parallel model (after ``model.shard()``) moe_mpi's CPU decode kernels.

    For benchmarks that compare like with like (``moe-mpi bench decode
    --tp-host-kernels``): what :func:`use_host_kernels` does, plus
    :class:`HostLinear` on mlx's ``AllToShardedLinear``,
    :class:`HostShardedToAllLinear` on ``ShardedToAllLinear``, and the
    expert host path (:class:`moe_mpi.experts.LocalExperts` with every
    expert local, each holding its slice) on float32 switch layers, and
    the fused decode step (:func:`moe_mpi.fused.use_fused_decode`) on a
    float32 qwen3_moe model. The all-reduces stay mlx-lm's
    (``mx.distributed.all_sum``). Does nothing unless :func:`host_gemv_enabled`.

    Returns:
        The number of layers changed.
    """
    if not host_gemv_enabled():
        return 0
    from mlx.nn.layers.distributed import AllToShardedLinear, ShardedToAllLinear
    from mlx.utils import tree_flatten
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    changed = use_host_kernels(model)
    mixins = {AllToShardedLinear: HostLinear, ShardedToAllLinear: HostShardedToAllLinear}
    for _, m in model.named_modules():
        cls = type(m)
        if cls in mixins:
            m.__class__ = with_mixin(mixins[cls], cls)
            changed += 1
        elif cls in (SwitchGLU, SwitchMLP) and all(
            a.dtype == mx.float32 for _, a in tree_flatten(m.parameters())
        ):
            first = next(c for c in m.children().values() if isinstance(c, nn.Module) and "weight" in c)
            n = first["weight"].shape[0]  # every expert, each a slice of its intermediate dim
            make_local(m, range(n), n)
            changed += 1
    store_host_layout(model)
    from .fused import use_fused_decode  # here: moe_mpi.fused imports moe_mpi.host

    use_fused_decode(model)  # float32 qwen3_moe: decode steps in numpy, as moe_mpi's modes
    return changed
