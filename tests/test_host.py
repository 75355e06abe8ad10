"""moe_mpi.host: one-row float32 products of nn.Linear through numpy's sgemv."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moe_mpi.host import HostLinear, host_gemv_enabled, use_host_linears


class Net(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.proj = nn.Linear(24, 40, bias=bias)
        self.quant = nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=4)


def _net(bias=True):
    mx.random.seed(0)
    net = Net(bias)
    mx.eval(net.parameters())
    return net


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(24,), (1, 24), (1, 1, 24)])
def test_one_row_matches_mlx(bias, shape):
    net = _net(bias)
    x = mx.random.normal(shape, key=mx.random.key(1))
    want = net.proj(x)
    assert use_host_linears(net) == 1
    assert isinstance(net.proj, HostLinear)
    got = net.proj(x)
    assert got.shape == want.shape and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def test_other_inputs_keep_mlx_path(monkeypatch):
    net = _net()
    use_host_linears(net)
    calls = []
    real = HostLinear._host_view
    monkeypatch.setattr(HostLinear, "_host_view", lambda self: calls.append(1) or real(self))
    net.proj(mx.ones((1, 24)))
    assert calls == [1]  # the spy sees the host path
    # Several rows, or a non-float32 input: MLX's own path.
    for x in (mx.ones((3, 24)), mx.ones((1, 2, 24)), mx.ones((1, 24), dtype=mx.float16)):
        want = x @ net.proj.weight.T + net.proj.bias
        np.testing.assert_allclose(
            np.array(net.proj(x).astype(mx.float32)),
            np.array(want.astype(mx.float32)),
            rtol=1e-3,
        )
    assert calls == [1]


def test_weights_loaded_later_are_used():
    """The numpy views follow the parameters: new weights, or bf16 ones."""
    net = _net()
    use_host_linears(net)
    x = mx.ones((1, 24))
    net.proj(x)  # caches views of the first weights
    net.proj.weight = mx.full((40, 24), 0.5)
    np.testing.assert_allclose(np.array(net.proj(x)), np.array(12.0 + net.proj.bias)[None])
    net.proj.weight = mx.full((40, 24), 0.5, dtype=mx.bfloat16)
    net.proj.bias = net.proj.bias.astype(mx.bfloat16)
    y = net.proj(x.astype(mx.bfloat16))
    assert y.dtype == mx.bfloat16


def test_quantized_and_disabled_are_left_alone(monkeypatch):
    net = _net()
    use_host_linears(net)
    assert not isinstance(net.quant, HostLinear)
    monkeypatch.setenv("MOE_MPI_HOST_GEMV", "0")
    assert not host_gemv_enabled()
    fresh = _net()
    assert use_host_linears(fresh) == 0
    assert type(fresh.proj) is nn.Linear
