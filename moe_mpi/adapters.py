"""Adapters for mlx-lm MoE blocks that do not hold their experts stacked.

The sharding pass works on any block with a ``SwitchGLU``/``SwitchMLP``
child. A few mlx-lm models keep a Python list of per-expert MLPs instead
(dbrx). An adapter rewrites such a block into an equivalent one with a
stacked switch layer, and tells the loader where expert ``e``'s tensors are
in the checkpoint (``expert_keys``).
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import dbrx
from mlx_lm.models.switch_layers import SwitchGLU


def _stack_linears(switch_linear: nn.Module, linears) -> nn.Module:
    """Stacks per-expert (float or quantized) linears into one switch linear."""
    first = linears[0]
    if isinstance(first, nn.QuantizedLinear):
        switch_linear = switch_linear.to_quantized(
            group_size=first.group_size, bits=first.bits, mode=first.mode
        )
    for name in ("weight", "scales", "biases"):
        if name in first:
            setattr(switch_linear, name, mx.stack([lin[name] for lin in linears]))
    return switch_linear


class DbrxSwitchMoeBlock(nn.Module):
    """DBRX's MoE block with stacked experts; same math as mlx-lm's ``SparseMoeBlock``.

    DBRX's expert is ``w2(silu(w1 x) * v1 x)``: a SwiGLU with gate ``w1``,
    up ``v1`` and down ``w2``.
    """

    expert_keys = {
        "gate_proj": "experts.{e}.w1",
        "up_proj": "experts.{e}.v1",
        "down_proj": "experts.{e}.w2",
    }

    def __init__(self, block: "dbrx.SparseMoeBlock"):
        super().__init__()
        self.num_experts_per_tok = block.num_experts_per_tok
        self.router = block.router
        self.switch_mlp = SwitchGLU(block.d_model, block.ffn_dim, block.num_experts)
        for proj, src in (("gate_proj", "w1"), ("up_proj", "v1"), ("down_proj", "w2")):
            linears = [expert[src] for expert in block.experts]
            stacked = _stack_linears(self.switch_mlp[proj], linears)
            setattr(self.switch_mlp, proj, stacked)

    def __call__(self, x: mx.array) -> mx.array:
        ne = self.num_experts_per_tok
        orig_shape = x.shape
        x = x.reshape(-1, x.shape[-1])  # [T, D]

        gates = mx.softmax(self.router(x).astype(mx.float32), axis=-1)  # [T, E]
        inds = mx.stop_gradient(mx.argpartition(-gates, kth=ne - 1, axis=-1)[:, :ne])
        scores = mx.take_along_axis(gates, inds, axis=-1)  # [T, k]
        scores = scores / mx.linalg.norm(scores, ord=1, axis=-1, keepdims=True)
        scores = scores.astype(x.dtype)

        y = self.switch_mlp(x, inds)  # [T, k, D]
        y = (y * scores[..., None]).sum(axis=-2)  # [T, D]
        return y.reshape(orig_shape)


ADAPTERS = {dbrx.SparseMoeBlock: DbrxSwitchMoeBlock}


def convert_blocks(model: nn.Module) -> int:
    """Replaces every block that has an adapter with its stacked equivalent.

    Returns:
        How many blocks were replaced.
    """
    replaced = 0
    for path, module in list(model.named_modules()):
        for name, child in list(module.children().items()):
            items = enumerate(child) if isinstance(child, list) else [(None, child)]
            for i, c in items:
                adapter = ADAPTERS.get(type(c))
                if adapter is None:
                    continue
                if i is None:
                    setattr(module, name, adapter(c))
                else:
                    child[i] = adapter(c)
                replaced += 1
    return replaced
