"""Which MLX dtypes MPI can sum as they are, and how MLX exports them.

The mpi4py data path of :meth:`moe_mpi.comm.Communicator.all_sum` hands MPI
the buffer of an MLX array: it needs the numpy dtype MPI reduces that buffer
as, and the buffer-protocol format MLX exports it with.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

__all__ = ["buffer_format", "native_float16", "summable_dtypes"]

# MLX dtypes that numpy and MPI can reduce as they are (float16 is added by
# summable_dtypes when the MPI library has a float16 type with MPI_SUM).
_NATIVE_DTYPES = {
    mx_dtype: np.dtype(np_dtype)
    for mx_dtype, np_dtype in (
        (mx.float32, np.float32),
        (mx.int8, np.int8),
        (mx.uint8, np.uint8),
        (mx.int16, np.int16),
        (mx.uint16, np.uint16),
        (mx.int32, np.int32),
        (mx.uint32, np.uint32),
        (mx.int64, np.int64),
        (mx.uint64, np.uint64),
        (mx.complex64, np.complex64),
        (getattr(mx, "float64", None), np.float64),  # CPU-only in MLX
    )
    if mx_dtype is not None
}


_FORMATS: dict = {}


def buffer_format(dtype) -> str:
    """The buffer-protocol format MLX exports ``dtype`` with (cached)."""
    if dtype not in _FORMATS:
        _FORMATS[dtype] = memoryview(mx.zeros((1,), dtype=dtype)).format
    return _FORMATS[dtype]


def summable_dtypes(MPI) -> dict:
    """MLX dtype -> numpy dtype, for every dtype MPI_SUM reduces as it is.

    A new dict each call (the caller may keep it); float16 is in it when
    :func:`native_float16` says this MPI library sums it.
    """
    dtypes = dict(_NATIVE_DTYPES)
    if native_float16(MPI):
        dtypes[mx.float16] = np.dtype(np.float16)
    return dtypes


def native_float16(MPI) -> bool:
    """Whether MPI_SUM works on numpy float16 buffers with this MPI library.

    Open MPI 5 maps numpy float16 to MPI_SHORT_FLOAT and sums it natively;
    libraries without a half-precision type make the mpi4py path upcast.
    """
    from mpi4py.util import dtlib

    try:
        datatype = dtlib.from_numpy_dtype(np.float16)  # a Dup: free it
    except (KeyError, ValueError, TypeError, MPI.Exception):
        return False
    try:
        return datatype != MPI.DATATYPE_NULL
    finally:
        if datatype != MPI.DATATYPE_NULL:
            datatype.Free()
