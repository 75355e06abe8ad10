"""One-row float32 matmuls of the dense part on numpy's BLAS (CPU only).

Decode multiplies one row by every weight matrix: matrix-vector products,
whose speed is memory bandwidth. MLX's CPU matmul hands them to BLAS
``sgemm``, which packs the matrix first. In the kernel probe
(``docs/results/decode-kernels-n2.txt``, 2 ranks reading at once) numpy's
``sgemv`` on a zero-copy view read a 2688x768 matrix at 13 GB/s against 7-8
for MLX's matmul; for 768x768 the two were on par (11-14 GB/s). The
expert layers get the same treatment in :mod:`moe_mpi.experts`; this module
does it for the replicated dense part (attention projections, routers, the
LM head), which every rank reads in full at every step.

The price is one host sync per call (numpy needs the input's values), so
only one-row inputs take this path; prefill and batches stay lazy in MLX.
On a GPU (Metal) nothing changes.
"""

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .experts import with_mixin


class HostLinear:
    """Mixin for ``nn.Linear``: one float32 row goes through numpy's ``sgemv``.

    Any other input (several rows, another dtype) runs the layer's own
    ``__call__``. Parameters and their paths do not change.
    """

    def __call__(self, x: mx.array) -> mx.array:
        d = x.shape[-1]
        if x.size != d or x.dtype != mx.float32:
            return super().__call__(x)
        views = self._host_view()
        if views is None:  # weights are not float32 (loaded as another dtype)
            return super().__call__(x)
        w, b = views
        # memoryview() evaluates x: the one sync this path costs.
        v = np.asarray(memoryview(x)).reshape(d)  # [D]
        y = w @ v  # [out]: BLAS sgemv on a view of the weights
        if b is not None:
            y += b
        return mx.array(y).reshape(*x.shape[:-1], w.shape[0])  # [..., out]

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


def host_gemv_enabled() -> bool:
    """Whether one-row float32 products go to numpy (CPU, and not disabled).

    ``MOE_MPI_HOST_GEMV=0`` turns the host path off, for the dense part and
    the experts alike.
    """
    return os.environ.get("MOE_MPI_HOST_GEMV", "1") == "1" and mx.default_device() == mx.cpu


def use_host_linears(model: nn.Module) -> int:
    """Routes the one-row float32 products of every plain ``nn.Linear`` to numpy.

    Quantized layers, expert layers and subclasses of ``nn.Linear`` are left
    alone; a layer whose weights are not float32 keeps its own path at call
    time. Does nothing unless :func:`host_gemv_enabled`.

    Returns:
        The number of layers changed.
    """
    if not host_gemv_enabled():
        return 0
    changed = 0
    for _, m in model.named_modules():
        if type(m) is nn.Linear:
            m.__class__ = with_mixin(HostLinear, nn.Linear)
            changed += 1
    return changed
