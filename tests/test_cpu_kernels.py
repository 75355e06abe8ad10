"""moe_mpi.cpu: numpy kernels for decode-sized float32 work, and the CPU expert kernels."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moe_mpi.cpu.layers import MAX_ELEMENTS, NumpyLinear, NumpyRMSNorm, NumpyRoPE, use_numpy_layers
from moe_mpi.cpu.switches import numpy_kernels


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
    assert use_numpy_layers(net) == 1
    assert isinstance(net.proj, NumpyLinear)
    got = net.proj(x)
    assert got.shape == want.shape and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def test_other_inputs_keep_mlx_path(monkeypatch):
    net = _net()
    use_numpy_layers(net)
    calls = []
    real = NumpyLinear._views
    monkeypatch.setattr(NumpyLinear, "_views", lambda self: calls.append(1) or real(self))
    net.proj(mx.ones((1, 24)))
    assert calls == [1]  # the spy sees the numpy path
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
    use_numpy_layers(net)
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
    use_numpy_layers(net)
    assert not isinstance(net.quant, NumpyLinear)
    for switch in ("MOE_MPI_NUMPY_KERNELS", "MOE_MPI_CPU"):
        monkeypatch.setenv(switch, "0")
        assert not numpy_kernels()
        model, _, _ = _sharded_tiny(monkeypatch, "0" if switch == "MOE_MPI_NUMPY_KERNELS" else "1")
        assert model.cpu_path.numpy_layers == 0 and model.cpu_path.decode_step is None
        assert type(model.layers[0].self_attn.q_proj) is nn.Linear
        monkeypatch.delenv(switch)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)  # norms and RoPE get numpy kernels beside float32 products only
        self.norm = nn.RMSNorm(64, eps=1e-5)
        self.rope = nn.RoPE(48, traditional=False, base=10000)
        self.rope_trad = nn.RoPE(64, traditional=True, base=1e6, scale=0.5)
        self.scaled = nn.RoPE(32)


class Llama3RoPE(nn.RoPE):  # a subclass computes differently: left alone
    pass


def test_norm_and_rope_kernels_are_swapped():
    block = Block()
    block.sub = Llama3RoPE(16)
    mx.eval(block.parameters())
    assert use_numpy_layers(block) == 5
    assert isinstance(block.norm, NumpyRMSNorm) and isinstance(block.rope_trad, NumpyRoPE)
    assert type(block.sub) is Llama3RoPE


def test_quantized_products_leave_norm_and_rope_to_mlx():
    """With every product in MLX's quantized kernels, a numpy norm would only add an evaluation."""
    block = Block()
    block.proj = nn.QuantizedLinear(64, 64, group_size=32)
    mx.eval(block.parameters())
    assert use_numpy_layers(block) == 0
    assert type(block.norm) is nn.RMSNorm and type(block.rope) is nn.RoPE


@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 4, 1, 64), (8, 1, 64)])
def test_rms_norm_matches_mlx(shape):
    block = Block()
    block.norm.weight = mx.random.normal((64,), key=mx.random.key(3))
    mx.eval(block.parameters())
    x = mx.random.normal(shape, key=mx.random.key(4)) * 3
    want = np.array(block.norm(x))
    use_numpy_layers(block)
    got = block.norm(x)
    assert got.shape == x.shape and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["rope", "rope_trad", "scaled"])
@pytest.mark.parametrize(
    "shape,offset,atol",
    # At position 1000 a float32 angle is only good to ~6e-5 rad (one ulp),
    # and MLX's sin/cos round it differently from numpy's.
    [((1, 4, 1, 64), 0, 2e-5), ((1, 4, 1, 64), 37, 2e-5), ((2, 4, 3, 64), 1000, 5e-4)],
)
def test_rope_matches_mlx(name, shape, offset, atol):
    """Half-split and traditional pairs, partial dims, scale, offsets, L > 1."""
    block = Block()
    x = mx.random.normal(shape, key=mx.random.key(5))
    want = np.array(block[name](x, offset=offset))
    use_numpy_layers(block)
    got = block[name](x, offset=offset)
    assert isinstance(block[name], NumpyRoPE)
    assert got.shape == x.shape and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=atol)
    # A strided view, as attention passes it (transposed heads): same values.
    strided = mx.contiguous(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(np.array(block[name](strided, offset=offset)), want, rtol=1e-5, atol=atol)


def test_norm_and_rope_leave_large_or_other_inputs_to_mlx(monkeypatch):
    block = Block()
    mx.eval(block.parameters())
    use_numpy_layers(block)
    seen = []
    real = np.asarray
    monkeypatch.setattr(np, "asarray", lambda a, *k, **kw: seen.append(1) or real(a, *k, **kw))
    big = mx.ones((1, MAX_ELEMENTS // 64 + 1, 64))  # prefill-sized
    half = mx.ones((1, 4, 1, 64), dtype=mx.float16)
    block.norm(big), block.rope(big), block.norm(half), block.rope(half)
    block.rope(mx.ones((1, 4, 1, 64)), offset=mx.array(3))  # an array offset
    assert seen == []
    block.rope(mx.ones((1, 4, 1, 64)), offset=3)
    assert seen  # the spy sees the numpy path


class _Rank0Of2:
    rank, size = 0, 2

    def all_sum(self, x):
        return x


def _sharded_tiny(monkeypatch, numpy: str):
    from moe_mpi import shard_experts
    from moe_mpi.synthetic import build_model, tiny_config

    monkeypatch.setenv("MOE_MPI_NUMPY_KERNELS", numpy)
    model, _ = build_model(tiny_config("qwen3_moe"), seed=3)
    mx.eval(model.parameters())
    switch = model.layers[0].mlp.switch_mlp
    full = np.array(switch.gate_proj.weight)  # [E, out, in]
    shard_experts(model, _Rank0Of2())
    return model, switch, full


@pytest.mark.skipif(not numpy_kernels(), reason="numpy kernels are CPU only")
def test_expert_weights_are_stored_for_sgemv_n(monkeypatch):
    """Without the compiled loop, numpy-path experts keep shape and values,
    in [in, out] memory for numpy's sgemv "N"."""
    from moe_mpi.cpu import gemv
    from moe_mpi.cpu.experts import transposed_paths

    monkeypatch.setattr(gemv, "_KERNEL", None)
    model, switch, full = _sharded_tiny(monkeypatch, "1")
    paths = transposed_paths(model)
    assert "model.layers.0.mlp.switch_mlp.gate_proj.weight" in paths and len(paths) == 3 * len(model.layers)
    w = switch.gate_proj.weight
    n = full.shape[0] // 2  # rank 0 of 2, contiguous placement
    assert w.shape == (n, *full.shape[1:])
    np.testing.assert_array_equal(np.array(w), full[:n])
    view = switch.weight_views()["gate_proj"]
    assert view.strides[1] == view.itemsize  # each expert's matrix column-major
    x = mx.random.normal((1, 1, full.shape[2]), key=mx.random.key(2))
    ids = mx.array([[[0, 1]]])
    want = (x @ mx.array(full[:2]).swapaxes(1, 2)).reshape(2, -1)  # gate rows of experts 0, 1
    got = np.stack([view[e] @ np.array(x).reshape(-1) for e in (0, 1)])
    np.testing.assert_allclose(got, np.array(want), rtol=1e-5, atol=1e-5)
    assert switch(x, ids).shape == (1, 1, 2, full.shape[2])


@pytest.mark.skipif(not numpy_kernels(), reason="numpy kernels are CPU only")
def test_compiled_loop_keeps_mlx_layout(monkeypatch):
    """With the compiled loop, expert weights stay [out, in] (the layout it
    reads fastest), and the numpy path reads them there."""
    from moe_mpi.cpu import gemv
    from moe_mpi.cpu.experts import transposed_paths

    if gemv.compiled() is None:
        pytest.skip("moe_mpi.cpu._gemv not built")
    model, switch, full = _sharded_tiny(monkeypatch, "1")
    assert transposed_paths(model) == []
    view = switch.weight_views()["gate_proj"]
    assert view.flags["C_CONTIGUOUS"]
    calls = []
    real = gemv._KERNEL
    monkeypatch.setattr(gemv, "_KERNEL", type("Spy", (), {
        "isa": staticmethod(real.isa),
        "gemv": staticmethod(lambda *a: calls.append(a[5]) or real.gemv(*a)),
    }))
    d = full.shape[2]
    x = mx.random.normal((1, 1, d), key=mx.random.key(2))
    got = np.array(switch(x, mx.array([[[0, 1]]])))  # [1, 1, 2, D]
    assert calls == [1] * 6  # 2 experts x 3 projections, one row each
    for slot, e in enumerate((0, 1)):
        w = {n: np.array(getattr(switch, n).weight[e]) for n in ("gate_proj", "up_proj", "down_proj")}
        v = np.array(x).reshape(-1)
        g, u = w["gate_proj"] @ v, w["up_proj"] @ v
        want = (g / (1 + np.exp(-g)) * u) @ w["down_proj"].T
        np.testing.assert_allclose(got[0, 0, slot], want, rtol=1e-4, atol=1e-5)


def test_without_numpy_path_the_layout_is_unchanged(monkeypatch):
    from moe_mpi.cpu.experts import transposed_paths

    model, switch, _ = _sharded_tiny(monkeypatch, "0")
    assert transposed_paths(model) == []
    assert np.asarray(memoryview(switch.gate_proj.weight)).flags["C_CONTIGUOUS"]


def test_stored_layout_gives_the_same_expert_outputs(monkeypatch):
    """Many rows per expert (MLX matmuls on the stored layout) and one row
    per expert (numpy sgemv) agree with the checkpoint's layout."""
    _, on, _ = _sharded_tiny(monkeypatch, "1")
    _, off, _ = _sharded_tiny(monkeypatch, "0")
    d = on.gate_proj.weight.shape[2]
    n = on.gate_proj.weight.shape[0]
    # Expert 0 with 3 rows and expert 1 with 2 (the numpy path takes up to 4
    # rows of an expert in one pass), then random routings.
    cases = [mx.array([[[0, 1], [0, 2], [1, 0]]])]
    cases += [mx.random.randint(0, 2 * n, (1, t, 2), key=mx.random.key(7)) for t in (1, 3, 24)]
    for ids in cases:
        tokens = ids.shape[1]
        x = mx.random.normal((1, tokens, d), key=mx.random.key(tokens))
        np.testing.assert_allclose(np.array(on(x, ids)), np.array(off(x, ids)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 3])
def test_bfloat16_experts_run_on_the_cpu(monkeypatch, tokens):
    """bf16 weights: no numpy (it has no bfloat16) and no gather_mm (MLX's
    CPU gather_mm takes float32 only): one matmul per expert instead."""
    from moe_mpi import shard_experts
    from moe_mpi.synthetic import build_model, tiny_config

    monkeypatch.setenv("MOE_MPI_NUMPY_KERNELS", "1")
    model, _ = build_model(tiny_config("qwen3_moe"), seed=3)
    mx.eval(model.parameters())
    switch = model.layers[0].mlp.switch_mlp
    # As moe_mpi.load does: shard a float32-built model, then bf16 weights arrive.
    shard_experts(model, _Rank0Of2())
    model.set_dtype(mx.bfloat16)
    assert switch.cpu_kernels.numpy_max_rows > 0 and switch.weight_views() is None
    full = np.array(switch.gate_proj.weight.astype(mx.float32))
    d = full.shape[2]
    x = mx.random.normal((1, tokens, d), key=mx.random.key(4)).astype(mx.bfloat16)
    ids = mx.broadcast_to(mx.array([0, 1]), (1, tokens, 2))  # both local to rank 0
    got = np.array(switch(x, ids).astype(mx.float32))  # [1, T, 2, D]
    # Reference: the same bf16 weights in float32.
    w = {n: mx.array(np.array(getattr(switch, n).weight.astype(mx.float32))) for n in ("gate_proj", "up_proj", "down_proj")}
    xf = x.astype(mx.float32)
    for slot, e in enumerate((0, 1)):
        g, u = xf @ w["gate_proj"][e].T, xf @ w["up_proj"][e].T
        want = np.array((nn.silu(g) * u) @ w["down_proj"][e].T)  # [1, T, D]
        np.testing.assert_allclose(got[:, :, slot], want, rtol=5e-2, atol=5e-2)


def test_tensor_parallel_model_with_numpy_kernels_matches_mlx(monkeypatch):
    """mlx-lm's shard() on a size-1 group, then accelerate_tensor_parallel: every
    projection, norm, RoPE and switch layer takes the numpy path at batch 1
    (checked with spies), and the logits match the plain model's."""
    from mlx.nn.layers.distributed import AllToShardedLinear
    from mlx_lm.models.cache import make_prompt_cache

    from moe_mpi.experts import LocalExperts
    from moe_mpi.cpu.tensor_parallel import NumpyShardedToAllLinear, accelerate_tensor_parallel
    from moe_mpi.synthetic import build_model, tiny_config

    if not numpy_kernels():
        pytest.skip("numpy kernels are CPU only")
    # The layers' own numpy paths: the numpy decode step (tests/mpi_tp_cpu.py)
    # would take the decode calls.
    monkeypatch.setenv("MOE_MPI_NUMPY_DECODE", "0")
    plain, _ = build_model(tiny_config("qwen3_moe"), seed=5)
    mx.eval(plain.parameters())
    tp, _ = build_model(tiny_config("qwen3_moe"), seed=5)
    tp.shard(mx.distributed.init())
    path = accelerate_tensor_parallel(tp, _Rank0Of2())
    kinds = [type(m) for _, m in tp.named_modules()]
    assert sum(issubclass(k, NumpyShardedToAllLinear) for k in kinds) == len(tp.layers)  # o_proj
    assert sum(issubclass(k, NumpyLinear) and issubclass(k, AllToShardedLinear) for k in kinds) == 3 * len(tp.layers)
    assert sum(issubclass(k, LocalExperts) for k in kinds) == len(tp.layers)
    assert path.numpy_layers == len([k for k in kinds if k.__name__.startswith("Numpy")])
    assert path.expert_layers == len(tp.layers) and path.decode_step is None
    calls = []
    real = NumpyShardedToAllLinear.__call__
    monkeypatch.setattr(NumpyShardedToAllLinear, "__call__", lambda self, x: calls.append(x.shape) or real(self, x))
    prompt = mx.array([[1, 5, 9, 2]])
    caches = [make_prompt_cache(m) for m in (plain, tp)]
    want, got = plain(prompt, cache=caches[0]), tp(prompt, cache=caches[1])  # prefill: MLX paths
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
    for token in (3, 7):  # decode: one row, numpy paths
        step = mx.array([[token]])
        want, got = plain(step, cache=caches[0]), tp(step, cache=caches[1])
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
    assert (1, 1, tp.layers[0].self_attn.o_proj.weight.shape[1]) in calls


@pytest.mark.skipif(not numpy_kernels(), reason="numpy kernels are CPU only")
def test_tensor_parallel_cpu_path_on_two_ranks():
    """The --tp-cpu-path baseline: mlx-lm's shard() over MLX's MPI group
    with moe_mpi's CPU speed path gives plain mlx-lm's logits and greedy tokens.
    (The tiny model's sizes do not split over 3 ranks, which mlx-lm requires.)"""
    import sys
    from pathlib import Path

    from moe_mpi.launch import run_mpirun

    script = Path(__file__).resolve().parent / "mpi_tp_cpu.py"
    proc = run_mpirun(2, [sys.executable, "-m", "mpi4py", str(script)], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("tensor parallel with the CPU speed path matches (12 greedy tokens)") == 2, proc.stdout


@pytest.mark.parametrize("layout", ["checkpoint", "transposed"])
def test_expert_matmuls_do_not_copy_weights(monkeypatch, layout):
    """Experts with many rows (prefill) run as MLX matmuls on views of the
    stacked weights: the peak grows by activations (tens of KB here), never
    by a copy of an expert's 1 MiB matrix (MLX 0.32 copied ``w[e]`` slices;
    moe_mpi takes them with ``mx.take``)."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models.switch_layers import SwitchGLU

    from moe_mpi.cpu.experts import transposed, use_cpu_experts
    from moe_mpi.experts import ExpertShard, make_local

    monkeypatch.setenv("MOE_MPI_NUMPY_KERNELS", "1")
    n, d, f = 4, 256, 1024
    switch = SwitchGLU(d, f, n)
    if layout == "transposed":
        switch.update(tree_unflatten([(p, transposed(a)) for p, a in tree_flatten(switch.parameters())]))
    mx.eval(switch.parameters())
    make_local(switch, ExpertShard(0, n, tuple(range(n))))
    use_cpu_experts(switch)
    local_ids = np.repeat(np.arange(n), 6)  # 6 rows per expert: more than the numpy path takes
    rows = mx.random.normal((local_ids.size, d), key=mx.random.key(3))
    mx.eval(rows)
    want = np.array(switch.compute(rows, local_ids))
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = switch.compute(rows, local_ids)
    mx.eval(out)
    grown = mx.get_peak_memory() - before
    assert grown < f * d * 4 // 2, grown  # activations ~0.3 MB; one expert matrix is 1 MiB
    np.testing.assert_array_equal(np.array(out), want)
