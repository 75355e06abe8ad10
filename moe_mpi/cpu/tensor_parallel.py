"""The CPU speed path for mlx-lm's tensor parallelism, for like-with-like benchmarks.

``moe-mpi bench decode --tp-cpu-path`` compares moe_mpi's modes with
mlx-lm's tensor-parallel ``model.shard()`` given the same CPU kernels: the
numpy layers on its sharded linears, the CPU expert kernels on its float32
switch layers (every expert local, each a slice of its intermediate
dimension), huge pages, and the numpy decode step. Its all-reduces stay
mlx-lm's own: ``mx.distributed.all_sum`` after ``o_proj`` and after the
MoE block, two per layer.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import AllToShardedLinear, ShardedToAllLinear
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from ..experts import ExpertShard, make_local
from . import CpuPath, switches
from .decode import use_numpy_decode
from .experts import use_cpu_experts
from .layers import MIXINS, NumpyLinear, use_numpy_layers
from .pages import use_huge_pages


class NumpyShardedToAllLinear(NumpyLinear):
    """Mixin for mlx's ``ShardedToAllLinear``: one float32 row through
    :func:`moe_mpi.cpu.gemv.matvec`, then the layer's own
    ``mx.distributed.all_sum`` and bias, as its ``__call__`` does."""

    def __call__(self, x: mx.array) -> mx.array:
        y = self.numpy_product(x)
        if y is None:
            return super(NumpyLinear, self).__call__(x)  # the layer's own call
        y = mx.distributed.all_sum(mx.array(y), group=self.group)  # [..., out]: the partials summed
        return y + self["bias"] if "bias" in self else y


def accelerate_tensor_parallel(model: nn.Module, comm) -> CpuPath:
    """Gives mlx-lm's tensor-parallel model (after ``model.shard()``) the CPU speed path.

    Args:
        model: The model after ``model.shard(group)``, weights loaded.
        comm: A :class:`moe_mpi.Communicator` with ``backend="mlx"`` over
            the same group: the numpy decode step's all-reduces go through
            ``mx.distributed.all_sum``, as mlx-lm's own do.

    Returns:
        The record, also kept as ``model.cpu_path``.
    """
    path = CpuPath(enabled=switches.numpy_kernels())
    model.cpu_path = path
    if not path.enabled:
        path.decode_step_off = "the numpy kernels are off"
        return path
    mixins = dict(MIXINS)
    mixins.update({AllToShardedLinear: NumpyLinear, ShardedToAllLinear: NumpyShardedToAllLinear})
    path.numpy_layers = use_numpy_layers(model, mixins)
    layer = 0
    for _, m in model.named_modules():
        if type(m) in (SwitchGLU, SwitchMLP) and all(a.dtype == mx.float32 for _, a in tree_flatten(m.parameters())):
            first = next(c for c in m.children().values() if isinstance(c, nn.Module) and "weight" in c)
            n = first["weight"].shape[0]  # every expert, each a slice of its intermediate dim
            make_local(m, ExpertShard(layer, n, tuple(range(n))))
            layer += 1
    path.expert_layers = use_cpu_experts(model)
    mx.eval(model.parameters())
    path.huge_page_bytes = use_huge_pages(model)
    path.decode_step_off = use_numpy_decode(model, tp_comm=comm)
    return path
