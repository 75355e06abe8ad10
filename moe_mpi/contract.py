"""Checking the partial-sum contract of an MoE block before it is split.

Each rank's MoE block runs the block's own ``__call__`` on its part of the
experts, and the layer's one all-reduce adds the ranks' outputs. That sum is
the unsharded block's output only if the block is linear in its switch
layer's output and its shared experts' outputs (docs/design.md, the
partial-sum contract). Most mlx-lm MoE blocks are. Two kinds are not:

* a term that needs no expert: longcat_flash's identity "zero experts", a
  bias after the experts (nemotron_h's latent projection with ``mlp_bias``).
  Every rank would add it. Such a block is affine, ``f(s) = g(s) + f(0)``
  with ``g`` linear, so it is split all the same: one rank keeps ``f(0)``
  and the others subtract it (:class:`moe_mpi.shard.ExpertParallelBlock`,
  with :func:`silenced` experts);
* anything else not linear, e.g. a norm of the expert sum (kimi_k3's latent
  MoE with ``latent_moe_use_norm``): refused, as no sum of partial outputs
  gives it.

:func:`check_partial_sums` finds out by running the block itself, with
stand-ins for its experts: the switch layer and the shared experts return
chosen values ``a``, ``b`` (the router and everything else are the block's
own), and ``g(a) + g(b) = g(a + b)`` must hold. That needs no expert weight
and no data: four calls of the block on :data:`PROBE_TOKENS` random tokens,
once per kind of block, before any weight is read.
"""

import contextlib
import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .experts import with_mixin
from .slicing import OUT_PROJ, linear_dims

#: Tokens of the probe input: enough that the router picks every expert, so that a
#: term of some experts only (longcat_flash's zero experts) shows, whatever the
#: router's weights (before loading they are mlx-lm's random initial ones).
PROBE_TOKENS = 64
#: Largest difference of the two sides, relative to the output's largest value. The
#: probe computes in float32 whatever the weights' dtype (MLX promotes bfloat16
#: weights times float32 inputs to float32), so rounding stays far below it.
TOLERANCE = 1e-3


class StandIn:
    """Mixin for a switch layer or shared MLP under probe: returns its probe's
    values instead of computing anything."""

    def __call__(self, x: mx.array, indices: Optional[mx.array] = None, *args, **kwargs) -> mx.array:
        probe = self.__dict__["probe"]
        lead = tuple(indices.shape) if indices is not None else tuple(x.shape[:-1])  # [..., k] or [...]
        if indices is None:
            probe.inputs.append(x)
        width = probe.dims or x.shape[-1]  # a shared MLP of unknown width: the block's
        out = mx.zeros((*lead, width))
        for i, scale in enumerate(probe.scales):
            if scale:
                out = out + scale * probe.values(lead, width, i)
        return out.astype(x.dtype)  # the probe's inputs are float32; silenced experts keep the model's dtype


class Probe:
    """What one stand-in returns: ``sum(scales[i] * R_i)`` (float32) of width ``dims`` (None: its
    input's), ``R_i`` seeded by ``seed``; and the inputs it was called on."""

    def __init__(self, seed: int, dims: Optional[int]):
        self.seed, self.dims, self.scales, self.inputs = seed, dims, (0.0, 0.0), []

    def values(self, lead: tuple, width: int, i: int) -> mx.array:
        """``R_i``, ``[*lead, width]``: two outer products of random vectors, as cheap at width
        7168 as at 64 (a norm or a bias after the experts changes them all the same)."""
        keys = mx.random.split(mx.random.key(self.seed * 16 + i), 4)
        u, w = (mx.random.uniform(-1, 1, lead, key=k) for k in keys[:2])  # [*lead]
        v, z = (mx.random.uniform(-1, 1, (width,), key=k) for k in keys[2:])  # [width]
        return u[..., None] * v + w[..., None] * z


def out_dims(module: nn.Module) -> Optional[int]:
    """Output width of an MLP or switch layer: its out-projection's, or None."""
    for name in OUT_PROJ:
        if name in module:
            dims = linear_dims(module[name])
            return dims[1] if dims else None
    return None


def _input_widths(block: nn.Module) -> List[int]:
    """Candidate widths of the block's input: the input widths of its linear layers, most frequent first."""
    counts = Counter()
    for _, m in block.named_modules():
        dims = linear_dims(m)
        if dims is not None:
            counts[dims[0]] += 1
    return [d for d, _ in counts.most_common()]


def _needs_more_inputs(block: nn.Module) -> bool:
    """Whether the block's ``__call__`` needs arguments besides the hidden states
    (gemma4_text's ``Experts`` takes the routing from its caller): it cannot be probed alone."""
    params = list(inspect.signature(type(block).__call__).parameters.values())[2:]  # after self, x
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


@dataclass(frozen=True)
class BlockCheck:
    """What :func:`probe_block` found.

    Attributes:
        why: Why the block cannot be split across ranks, or None.
        expert_free: It adds a term that needs no expert (``f(0) != 0``), which one rank keeps.
    """

    why: Optional[str] = None
    expert_free: bool = False


@contextlib.contextmanager
def stand_ins(block: nn.Module, units: dict) -> Iterator[None]:
    """Within it, the children ``units`` names (switch layer, shared MLPs) return their probe's values."""
    classes = {name: type(block[name]) for name in units}
    try:
        for name, cls in classes.items():
            block[name].probe = units[name]
            block[name].__class__ = with_mixin(StandIn, cls)
        yield
    finally:
        for name, cls in classes.items():
            block[name].__class__ = cls
            del block[name].probe


def _units(block: nn.Module, switch_name: str, shared: Sequence[str]) -> dict:
    units = {switch_name: Probe(0, out_dims(block[switch_name]))}
    for i, name in enumerate(shared):
        units[name] = Probe(i + 1, out_dims(block[name]))
    return units


def silenced(block: nn.Module, names: Sequence[str]):
    """Within it, the block's switch layer (``names[0]``) and shared MLPs (the rest) return zeros:
    the block computes its term without experts, ``f(0)``."""
    return stand_ins(block, _units(block, names[0], names[1:]))


def probe_block(block: nn.Module, switch_name: str, shared: Sequence[str]) -> BlockCheck:
    """Whether ``block`` can be split across ranks (also when it cannot be probed alone).

    The switch layer ``block[switch_name]`` and the shared MLPs ``block[n]``
    (``n`` in ``shared``) are stand-ins during the probe; their classes are
    restored after it.
    """
    if out_dims(block[switch_name]) is None or _needs_more_inputs(block):
        return BlockCheck()
    units = _units(block, switch_name, shared)
    with stand_ins(block, units):
        for width in _input_widths(block):
            x = mx.random.normal((1, PROBE_TOKENS, width), key=mx.random.key(7))  # [1, T, D]
            try:
                outputs = [_call(block, x, units, scales) for scales in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))]
            except (ValueError, TypeError):  # not the block's input width
                continue
            return _verdict(outputs, x, [units[n] for n in shared], shared)
    return BlockCheck()


def _call(block: nn.Module, x: mx.array, units: dict, scales) -> np.ndarray:
    for probe in units.values():
        probe.scales, probe.inputs = scales, []
    y = block(x)
    if not isinstance(y, mx.array):
        raise TypeError(f"the block returns {type(y).__name__}, not an array")
    return np.array(y.astype(mx.float32))


def _verdict(outputs, x, shared_probes, shared_names) -> BlockCheck:
    zero, a, b, both = outputs
    tolerance = TOLERANCE * max(float(np.abs(both).max()), 1e-30)
    for probe, name in zip(shared_probes, shared_names):
        if probe.inputs and not np.allclose(np.array(probe.inputs[0].astype(mx.float32)).reshape(-1),
                                            np.array(x).reshape(-1)):
            return BlockCheck(f"calls its child {name!r}, which moe_mpi takes for a shared expert, on something "
                              "other than its input")
    # g(s) = f(s) - f(0) must be linear: g(a) + g(b) = g(a + b).
    if float(np.abs((a - zero) + (b - zero) - (both - zero)).max()) > tolerance:
        return BlockCheck("is not linear in its experts' outputs (e.g. a norm of the expert sum)")
    return BlockCheck(expert_free=float(np.abs(zero).max()) > tolerance)


def check_partial_sums(model_type: str, blocks: Sequence, shared_of, size: int) -> List[bool]:
    """Refuses a model whose MoE blocks cannot be split across ``size`` ranks exactly.

    Args:
        model_type: For the message.
        blocks: The model's :class:`moe_mpi.shard.MoEBlock` records, before sharding.
        shared_of: ``block -> names of its shared MLPs``.
        size: Ranks the blocks are to be split across.

    Returns:
        Per block, whether it adds a term without experts (one rank must keep it).

    Raises:
        ValueError: Naming the architecture, the block and the reason.
    """
    checks = {}
    found = []
    for moe in blocks:
        # Layers built alike compute alike: one probe per kind of block (a model's
        # dozens of MoE layers are usually one kind), as moe-mpi info plans every rank.
        kind = (type(moe.block), tuple((k, a.shape) for k, a in tree_flatten(moe.block.parameters())))
        if kind not in checks:
            checks[kind] = probe_block(moe.block, moe.switch_name, shared_of(moe.block))
        why = checks[kind].why
        if why is not None:
            raise ValueError(
                f"model_type={model_type!r}: its MoE block {moe.path} ({type(moe.block).__name__}) {why}; "
                f"the sum of the ranks' partial outputs would not be the block's output, so moe_mpi cannot "
                f"split its experts across num_ranks={size} (docs/architectures.md). It runs on one rank, "
                "or with mode='central'"
            )
        found.append(checks[kind].expert_free)
    return found
