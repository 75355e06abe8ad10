"""Reading parts of safetensors checkpoints: only the bytes a rank keeps.

``mx.load`` is lazy, but evaluating a slice of a loaded tensor reads the whole
tensor first. A rank that holds 1/N of the experts must never hold all of
them, so expert tensors are read here, row block by row block, straight from
the file into a buffer the size of the slice.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .errors import CheckpointError

# safetensors dtype -> mlx dtype
MX_DTYPES = {
    "F64": mx.float64,
    "F32": mx.float32,
    "F16": mx.float16,
    "BF16": mx.bfloat16,
    "I64": mx.int64,
    "I32": mx.int32,
    "I16": mx.int16,
    "I8": mx.int8,
    "U64": mx.uint64,
    "U32": mx.uint32,
    "U16": mx.uint16,
    "U8": mx.uint8,
    "BOOL": mx.bool_,
}
# safetensors dtype -> (numpy dtype to read as, mlx dtype to view as or None)
_DTYPES = {
    "F64": (np.float64, None),
    "F32": (np.float32, None),
    "F16": (np.float16, None),
    "BF16": (np.uint16, mx.bfloat16),  # numpy has no bfloat16: read the bits
    "I64": (np.int64, None),
    "I32": (np.int32, None),
    "I16": (np.int16, None),
    "I8": (np.int8, None),
    "U64": (np.uint64, None),
    "U32": (np.uint32, None),
    "U16": (np.uint16, None),
    "U8": (np.uint8, None),
    "BOOL": (np.bool_, None),
}


def dtype_name(dtype: mx.Dtype) -> str:
    """The short name of an MLX dtype: ``mx.float32`` -> ``"float32"``.

    ``str(mx.float32)`` is ``"mlx.core.float32"``; messages and JSON want
    the name alone.
    """
    return str(dtype).rsplit(".", 1)[-1]


CHUNK = 64 << 20  # bytes read at a time when slicing an inner axis


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte offset."""

    file: Path
    dtype: str
    shape: tuple
    offset: int
    nbytes: int


def read_header(path: Path) -> Dict[str, TensorInfo]:
    """Parses one safetensors file's header and checks it against the file size.

    Raises:
        CheckpointError: The file is truncated or its header is not valid.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(
                f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    infos = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            info = TensorInfo(path, meta["dtype"], tuple(int(d) for d in meta["shape"]), 8 + n + begin, end - begin)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for {key!r}") from None
        _check_entry(path, key, info, begin)
        if info.offset + info.nbytes > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {key!r} ends at byte "
                f"{info.offset + info.nbytes}, the file has {size} bytes"
            )
        infos[key] = info
    return infos


def _check_entry(path: Path, key: str, info: TensorInfo, begin: int) -> None:
    """A header entry's byte range must hold exactly its shape's elements.

    Raises:
        CheckpointError: Negative offsets or dimensions, or a byte count
            that does not match the shape (rows would then be read from the
            wrong bytes: silently wrong weights).
    """
    if begin < 0 or info.nbytes < 0 or any(d < 0 for d in info.shape):
        raise CheckpointError(f"{path}: corrupt header entry for {key!r} (negative offset or dimension)")
    if info.dtype not in _DTYPES:
        return  # reported if and when the tensor is read
    expected = int(np.prod(info.shape, dtype=np.int64)) * np.dtype(_DTYPES[info.dtype][0]).itemsize
    if expected != info.nbytes:
        raise CheckpointError(
            f"{path}: corrupt header entry for {key!r}: shape {list(info.shape)} of {info.dtype} "
            f"needs {expected} bytes, its data_offsets give {info.nbytes}"
        )


def check_index(info: TensorInfo, key: str, axis: int, index) -> None:
    """Raises a :class:`CheckpointError` unless every position of ``index`` exists on ``axis`` of the tensor.

    A checkpoint whose tensor is smaller than the model's config says (e.g.
    fewer experts) would otherwise be read past its end, from the bytes of
    the next tensor.
    """
    index = np.asarray(index, dtype=np.int64)
    size = info.shape[axis] if axis < len(info.shape) else 0
    if index.size and (index.min() < 0 or index.max() >= size):
        raise CheckpointError(
            f"{info.file}: tensor {key!r} has shape {list(info.shape)}, so no position {int(index.max())} "
            f"on axis {axis}: the checkpoint does not match config.json (e.g. fewer experts or a smaller "
            "intermediate size than the config says)"
        )


class CheckpointIndex:
    """All tensors of a checkpoint directory (``model*.safetensors``)."""

    def __init__(self, files: Iterable[Path]):
        self.files: List[Path] = sorted(Path(f) for f in files)
        self.tensors: Dict[str, TensorInfo] = {}
        for f in self.files:
            self.tensors.update(read_header(f))

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self):
        return self.tensors.keys()

    def read(self, key: str) -> mx.array:
        """Reads a whole tensor."""
        info = self.tensors[key]
        return self.read_rows(key, np.arange(info.shape[0]) if info.shape else None)

    def read_rows(self, key: str, rows: Sequence[int]) -> mx.array:
        """Reads rows ``rows`` (positions on axis 0) of a tensor, in that order.

        Each run of consecutive rows is one read; nothing else is read.
        """
        return self._to_mx(key, self._rows_host(key, rows))

    def _rows_host(self, key: str, rows: Optional[Sequence[int]]) -> np.ndarray:
        """Rows of a tensor as a numpy array (bfloat16 as its uint16 bits)."""
        info = self.tensors[key]
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"{info.file}: tensor {key!r} has unsupported dtype {info.dtype}")
        np_dtype = _DTYPES[info.dtype][0]
        if rows is None:  # a scalar
            out = np.empty((), dtype=np_dtype)
            self._read_into(info.file, info.offset, out)
        else:
            rows = np.asarray(rows, dtype=np.int64)
            check_index(info, key, 0, rows)
            row_shape = info.shape[1:]
            row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
            out = np.empty((rows.size, *row_shape), dtype=np_dtype)
            with open(info.file, "rb") as f:
                # Split rows into runs of consecutive positions.
                breaks = np.flatnonzero(np.diff(rows) != 1) + 1
                for run in np.split(np.arange(rows.size), breaks):
                    if not run.size:
                        continue
                    f.seek(info.offset + int(rows[run[0]]) * row_bytes)
                    view = out[run[0] : run[-1] + 1]
                    if f.readinto(memoryview(view).cast("B")) != view.nbytes:
                        raise CheckpointError(f"{info.file}: short read of {key!r}")
        return out

    def _to_mx(self, key: str, out: np.ndarray) -> mx.array:
        mx_view = _DTYPES[self.tensors[key].dtype][1]
        a = mx.array(out)
        return a.view(mx_view) if mx_view is not None else a

    @staticmethod
    def _read_into(file: Path, offset: int, out: np.ndarray) -> None:
        with open(file, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(out.reshape(1)).cast("B")) != out.nbytes:
                raise CheckpointError(f"{file}: short read at byte {offset}")

    def read_take(self, key: str, axis: int, index: np.ndarray) -> mx.array:
        """Reads positions ``index`` along ``axis`` of a tensor.

        Axis 0 (experts, or rows of an input projection) reads only those
        rows. Another axis with a contiguous range (a slice of the
        intermediate dimension) streams the tensor in blocks of at most
        ``CHUNK`` bytes and keeps only the slice, so memory never holds more
        than the slice plus one block.
        """
        index = np.asarray(index, dtype=np.int64)
        if axis == 0:
            return self.read_rows(key, index)
        info = self.tensors[key]
        check_index(info, key, axis, index)
        if index.size == 0 or np.any(np.diff(index) != 1):
            return mx.take(self.read(key), mx.array(index), axis=axis)
        outer = int(np.prod(info.shape[:1]))  # blocks along axis 0
        step = max(1, CHUNK // max(1, info.nbytes // max(1, outer)))
        sl = (slice(None),) * axis + (slice(int(index[0]), int(index[-1]) + 1),)
        shape = list(info.shape)
        shape[axis] = index.size
        out = np.empty(shape, dtype=_DTYPES[info.dtype][0])
        for o in range(0, outer, step):
            block = self._rows_host(key, np.arange(o, min(o + step, outer)))
            out[o : o + block.shape[0]] = block[sl]  # the block is freed next round
        return self._to_mx(key, out)

    def read_stack(self, keys: Sequence[str]) -> mx.array:
        """Reads whole tensors and stacks them on a new axis 0."""
        return mx.stack([self.read(k) for k in keys])


class ShapeOnlyIndex:
    """Stands in for a :class:`CheckpointIndex` where only shapes matter.

    Its reads return lazy zeros of the shape and dtype a real read would
    give; nothing is read or allocated (``moe-mpi info`` plans memory so).
    """

    def __init__(self, index: CheckpointIndex):
        self.index = index

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def _zeros(self, key: str, shape) -> mx.array:
        info = self.index.tensors[key]
        if info.dtype not in MX_DTYPES:
            raise CheckpointError(f"{info.file}: tensor {key!r} has unsupported dtype {info.dtype}")
        return mx.zeros(tuple(shape), dtype=MX_DTYPES[info.dtype])

    def read_take(self, key: str, axis: int, index: np.ndarray) -> mx.array:
        check_index(self.index.tensors[key], key, axis, index)
        shape = list(self.index.tensors[key].shape)
        shape[axis] = len(index)
        return self._zeros(key, shape)

    def read_stack(self, keys: Sequence[str]) -> mx.array:
        return self._zeros(keys[0], (len(keys), *self.index.tensors[keys[0]].shape))
