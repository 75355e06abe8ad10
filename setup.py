"""Build of the optional C kernel (moe_mpi/cpu/_gemv.c); the rest is in pyproject.toml.

``optional=True``: without a C compiler the package still installs, and
moe_mpi uses numpy's BLAS for decode instead (``moe-mpi info`` says which).
"""
import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3"]
setup(ext_modules=[Extension("moe_mpi.cpu._gemv", ["moe_mpi/cpu/_gemv.c"], extra_compile_args=flags, optional=True)])
