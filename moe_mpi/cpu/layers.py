"""Decode-sized float32 work of the dense part in numpy (MLX's CPU backend only).

Decode multiplies one row by every weight matrix: matrix-vector products,
whose speed is memory bandwidth, and MLX's CPU matmul hands them to BLAS
``sgemm``, which packs the matrix first. :class:`NumpyLinear` sends one
float32 row through :func:`moe_mpi.cpu.gemv.matvec` on a zero-copy view of
the layer's weights instead. MLX's CPU backend also builds
``fast.rms_norm`` and ``fast.rope`` from primitive ops, each a round trip to
its stream thread; :class:`NumpyRMSNorm` and :class:`NumpyRoPE` do them in
numpy for decode-sized inputs. docs/design.md, "The CPU speed path", has
what each is worth.

The price is one sync per call (numpy needs the input's values), so only
small inputs take this path: one row for a matmul, at most
``MAX_ELEMENTS`` elements for a norm or RoPE; prefill stays lazy in MLX.

The functions :func:`rms_norm`, :func:`rope_angles` and :func:`rotate` are
the numpy formulas, shared with the numpy decode step (:mod:`moe_mpi.cpu.decode`).
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..experts import with_mixin
from . import gemv

# Largest input (elements) a norm or RoPE takes to numpy: a few decode tokens
# (batch 8 of hidden 768 is 6144); prefill stays in MLX.
MAX_ELEMENTS = 16384


def view(a: mx.array) -> np.ndarray:
    """A zero-copy numpy view of a float32 MLX array (taking it evaluates ``a``)."""
    return np.asarray(memoryview(a))


class NumpyLinear:
    """Mixin for ``nn.Linear``: one float32 row goes through :func:`moe_mpi.cpu.gemv.matvec`.

    Any other input (several rows, another dtype) runs the layer's own
    ``__call__``. Parameters and their paths do not change.
    """

    def __call__(self, x: mx.array) -> mx.array:
        y = self.numpy_product(x)
        if y is None:
            return super().__call__(x)
        b = self._numpy_views[1]
        if b is not None:
            y += b
        # Shaped in numpy: a reshape in MLX would be one more op to schedule.
        return mx.array(y)  # [..., out]

    def numpy_product(self, x: mx.array) -> Optional[np.ndarray]:
        """``x @ weight.T`` in numpy, ``[..., out]``, for one float32 row of
        float32 weights; None for any other input (the layer's own path)."""
        d = x.shape[-1]
        if x.size != d or x.dtype != mx.float32:
            return None
        views = self._views()
        if views is None:  # weights are not float32
            return None
        w = views[0]
        v = view(x).reshape(d)  # [D]: the one sync this path costs
        return gemv.matvec(w, v).reshape(*x.shape[:-1], w.shape[0])

    def _views(self):
        """Zero-copy numpy views of (weight, bias), rebuilt if they change;
        None unless both are float32."""
        weight = self["weight"]
        bias = self.get("bias")
        key = (id(weight), id(bias))
        if getattr(self, "_numpy_key", None) != key:
            views = None
            if weight.dtype == mx.float32 and (bias is None or bias.dtype == mx.float32):
                views = (view(weight), None if bias is None else view(bias))
            # Plain attributes: nn.Module would take a tuple for parameters.
            object.__setattr__(self, "_numpy_views", views)
            object.__setattr__(self, "_numpy_key", key)
        return self._numpy_views


def _small_input(x: mx.array) -> Optional[np.ndarray]:
    """``x`` as a numpy view if it is float32 and decode-sized, else None."""
    if x.dtype != mx.float32 or x.size > MAX_ELEMENTS:
        return None
    return view(x)


class NumpyRMSNorm:
    """Mixin for ``nn.RMSNorm``: a decode-sized float32 input is normalised in numpy.

    ``x * rsqrt(mean(x**2, -1) + eps) * weight``, as ``mx.fast.rms_norm``
    computes it; any other input runs the layer's own ``__call__``.
    """

    def __call__(self, x: mx.array) -> mx.array:
        weight = self["weight"]
        v = _small_input(x) if weight.dtype == mx.float32 else None
        if v is None:
            return super().__call__(x)
        return mx.array(rms_norm(v, view(weight), self.eps))  # [..., D]


def rms_norm(v: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """``v * rsqrt(mean(v**2, -1) + eps) * w`` in numpy, as ``mx.fast.rms_norm``."""
    # einsum: the sum of squares without np.mean's overhead.
    mean_sq = np.einsum("...i,...i->...", v, v)[..., None] * (1.0 / v.shape[-1])  # [..., 1]
    return v * (1.0 / np.sqrt(mean_sq + eps)) * w


class NumpyRoPE:
    """Mixin for ``nn.RoPE``: a decode-sized float32 input is rotated in numpy.

    The same rotation as ``mx.fast.rope``: positions ``offset + i`` along
    axis -2, the first ``dims`` features of the last axis rotated in pairs
    (halves, or neighbours if ``traditional``), frequencies
    ``base ** (-2j / dims)``, positions times ``scale``, angles in float32.
    An ``mx.array`` offset, or fewer than 3 dimensions, runs the layer's own
    ``__call__``.
    """

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if x.ndim < 3 or not isinstance(offset, int):
            return super().__call__(x, offset=offset)
        v = _small_input(x)  # [..., L, D]
        if v is None:
            return super().__call__(x, offset=offset)
        cos, sin = self._angles(offset, v.shape[-2])  # [L, dims/2] each
        return mx.array(rotate(v, cos, sin, self.dims, self.traditional))

    def _angles(self, offset: int, length: int):
        """:func:`rope_angles` of this layer, cached for the last (offset, length):
        decode rotates a layer's queries and keys at the same offset."""
        key = (offset, length)
        if getattr(self, "_numpy_angles_key", None) != key:
            angles = rope_angles(self.dims, self.base, self.scale, offset, length)
            # Plain attributes: nn.Module would take a tuple for parameters.
            object.__setattr__(self, "_numpy_angles", angles)
            object.__setattr__(self, "_numpy_angles_key", key)
        return self._numpy_angles


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


#: Exact mlx class -> its numpy mixin. Subclasses (quantized layers, other
#: RoPE variants such as llama3 or yarn) keep their own code.
MIXINS = {nn.Linear: NumpyLinear, nn.RMSNorm: NumpyRMSNorm, nn.RoPE: NumpyRoPE}


def use_numpy_layers(model: nn.Module, mixins: Optional[dict] = None) -> int:
    """Gives every layer of an exact class in ``mixins`` (default :data:`MIXINS`) its numpy mixin.

    A layer whose weights are not float32 keeps its own path at call time.
    A model with no float32 linear layer (a quantized one) gets no mixin at
    all: its products run in MLX's kernels, lazily, so a numpy norm or
    rotation between them would only add an evaluation (a wait on MLX's
    stream thread) per call.

    Returns:
        The number of layers changed.
    """
    mixins = MIXINS if mixins is None else mixins
    targets = [(m, mixins[type(m)]) for _, m in model.named_modules() if type(m) in mixins]
    if not any(issubclass(mixin, NumpyLinear) and m["weight"].dtype == mx.float32 for m, mixin in targets):
        return 0
    for m, mixin in targets:
        m.__class__ = with_mixin(mixin, type(m))
    return len(targets)
