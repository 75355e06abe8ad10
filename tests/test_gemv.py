"""moe_mpi.cpu.gemv: the compiled matrix-vector loop and its numpy fallback."""

import platform
import shutil
import sys

import numpy as np
import pytest

from moe_mpi.cpu import gemv

_gemv = gemv._gemv
needs_loop = pytest.mark.skipif(_gemv is None, reason="moe_mpi.cpu._gemv not built")


@pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64" and shutil.which("cc")),
    reason="the build is checked where CI runs: Linux x86-64 with a C compiler",
)
def test_compiled_loop_is_built_and_used():
    # setup.py builds it with optional=True: a failed build would only show here.
    assert _gemv is not None
    assert gemv.compiled() in ("avx512f", "avx2")
    assert gemv.describe().startswith("moe_mpi.cpu._gemv (")


@pytest.fixture(params=["avx512f", "avx2", "plain"])
def isa(request):
    if _gemv is None:
        pytest.skip("moe_mpi.cpu._gemv not built")
    before = _gemv.isa()
    try:
        _gemv.use(request.param)
    except ValueError:
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    _gemv.use(before)


# k: below, at and past the loops' 16/32-float steps, and the real shapes.
@pytest.mark.parametrize("n, k", [(1, 1), (5, 7), (3, 16), (9, 33), (40, 100), (2688, 768), (768, 2688)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
def test_loop_matches_numpy(isa, n, k, m):
    rng = np.random.default_rng(n * 1000 + k + m)
    w = rng.standard_normal((n, k), dtype=np.float32)
    x = rng.standard_normal((m, k), dtype=np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    got = gemv.matvec(w, x)
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    np.testing.assert_allclose(gemv.matvec(w, x[0]), want[0], rtol=1e-4, atol=1e-4 * np.sqrt(k))


@needs_loop
def test_loop_reads_views_and_checks_sizes():
    rng = np.random.default_rng(0)
    stacked = rng.standard_normal((3, 20, 12), dtype=np.float32)  # [E, out, in]
    x = rng.standard_normal((2, 12), dtype=np.float32)
    np.testing.assert_allclose(gemv.matvec(stacked[1], x), x @ stacked[1].T, rtol=1e-5, atol=1e-5)
    # A strided x is copied; a transposed w ([in, out] memory) goes to numpy.
    xs = rng.standard_normal((2, 24), dtype=np.float32)[:, ::2]
    np.testing.assert_allclose(gemv.matvec(stacked[0], xs), xs @ stacked[0].T, rtol=1e-5, atol=1e-5)
    wt = np.ascontiguousarray(stacked[2].T).T
    np.testing.assert_allclose(gemv.matvec(wt, x), x @ stacked[2].T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x has 11 features, w \\[20, 12\\] takes k=12"):
        gemv.matvec(stacked[0], x[:, :11])
    y = np.empty((2, 20), np.float32)
    with pytest.raises(ValueError, match="too small for n=20 k=12 m=3"):
        _gemv.gemv(stacked[0], x, y, 20, 12, 3)
    with pytest.raises(ValueError, match="no sse9 loop"):
        _gemv.use("sse9")


def test_numpy_fallback(monkeypatch):
    monkeypatch.setattr(gemv, "_KERNEL", None)
    assert gemv.compiled() is None and gemv.describe().startswith("numpy BLAS sgemv")
    rng = np.random.default_rng(1)
    w = rng.standard_normal((30, 17), dtype=np.float32)
    x = rng.standard_normal((3, 17), dtype=np.float32)
    np.testing.assert_allclose(gemv.matvec(w, x), x @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gemv.matvec(w, x[1]), w @ x[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 1000, 100_003])
def test_read_sums_every_element_once(n, monkeypatch):
    """gemv.read (the read-only memory probe) returns the sum, so each element is read, once."""
    a = np.random.default_rng(n).standard_normal(n, dtype=np.float32) + 1.0  # sum ~ n, not ~ 0
    tol = dict(rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gemv.read(a), a.sum(dtype=np.float64), **tol)
    np.testing.assert_allclose(gemv.read(a.reshape(-1, 1)), a.sum(dtype=np.float64), **tol)  # any shape
    monkeypatch.setattr(gemv, "_gemv", None)  # not built: numpy's sum
    np.testing.assert_allclose(gemv.read(a), a.sum(dtype=np.float64), **tol)


def test_read_takes_contiguous_float32_only():
    with pytest.raises(ValueError, match="C-contiguous float32"):
        gemv.read(np.ones(8, dtype=np.float64))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        gemv.read(np.ones((4, 4), dtype=np.float32)[:, ::2])
