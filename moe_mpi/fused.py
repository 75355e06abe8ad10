"""Fused CPU decode: a whole decode step of a sharded MoE model in numpy.

On the CPU a decode step of mlx-lm's model code is hundreds of small MLX ops,
each a round trip to MLX's stream thread, and the host kernels of
:mod:`moe_mpi.host` add one sync per layer they replace. Measured in place
(``examples/decode_phases.py``, docs/benchmarks.md) everything but the
weight reads took 11-15 ms of a 40-50 ms batch-1 step. This module runs the
step in numpy instead, reading the model's own weights through zero-copy
views: per layer the matrix-vector products go to :func:`moe_mpi.gemv.matvec`,
the norms, RoPE, attention and routing are a few numpy calls on ``[B, ...]``
rows, and the KV cache stays mlx-lm's ``KVCache`` (one update per layer).

It is a kernel, not a second model: :func:`use_fused_decode` puts
:class:`FusedDecode` in front of the model's class, whose ``__call__`` takes
only decode-sized calls (``[B, 1]`` token ids, mlx-lm ``KVCache`` per layer,
float32 weights) and hands every other call (prefill, other caches) to the
model's own ``__call__``. The ``qwen3_moe`` and ``mixtral`` architectures
are covered (:func:`architecture`); a model it does not cover keeps
mlx-lm's code. Every rank runs the same
step: the dense part and the router are replicated, so each rank routes by
itself, and each MoE layer ends in the one all-reduce of
:meth:`FusedMoE.__call__`.
"""

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from . import gemv
from .host import rms_norm, rope_angles, rotate

# Rows a fused step takes at most: decode batches (prefill stays in MLX).
MAX_BATCH = 64


@dataclass(frozen=True)
class Architecture:
    """Where an mlx-lm architecture keeps what a fused step reads.

    Its attention has ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, an
    ``nn.RoPE`` ``rope`` and a ``scale`` (and per-head ``q_norm``/``k_norm``
    if it has them); its MoE block a ``gate`` router and a ``switch_mlp``
    (SwitchGLU), routed as softmax, top-k, then (maybe) renormalised.
    """

    block: str  # the decoder layer's MoE block (or dense MLP) attribute
    heads: Tuple[str, str]  # the attention's query-head and key/value-head counts
    top_k: str  # the MoE block's experts per token
    renormalise: Callable  # block -> whether the top-k scores are renormalised to sum to 1


def _architectures() -> list:
    """``(mlx-lm Model class, Architecture)`` of every architecture covered."""
    from mlx_lm.models import mixtral, qwen3_moe

    return [
        (qwen3_moe.Model, Architecture("mlp", ("n_heads", "n_kv_heads"), "top_k", lambda b: b.norm_topk_prob)),
        # mixtral: softmax over the top-k logits, the same as the top k of the
        # softmax over all of them, renormalised.
        (mixtral.Model, Architecture("block_sparse_moe", ("num_heads", "num_key_value_heads"),
                                     "num_experts_per_tok", lambda b: True)),
    ]


def architecture(model) -> Optional[Architecture]:
    """The :class:`Architecture` of an mlx-lm ``model``, or None if not covered."""
    return next((arch for cls, arch in _architectures() if isinstance(model, cls)), None)


def _view(a: mx.array) -> np.ndarray:
    """A zero-copy numpy view of an evaluated float32 MLX array."""
    return np.asarray(memoryview(a))


def _weight(module, refs: list, name: str = "weight") -> np.ndarray:
    """A view of ``module[name]``, noted in ``refs`` so a replaced weight is seen."""
    a = module[name]
    refs.append((module, name, a))
    return _view(a)


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32 (``mx.softmax(precise=True)``)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _group_sum(group):
    """Sums a numpy array over an ``mx.distributed`` group with ``mx.distributed.all_sum``.

    For mlx-lm's tensor-parallel model (``model.shard()``), whose all-reduces
    are its own: the attention's ``ShardedToAllLinear`` and the MoE block's
    ``sharding_group``.
    """

    def reduce(x: np.ndarray) -> np.ndarray:
        return np.asarray(memoryview(mx.distributed.all_sum(mx.array(x), group=group)))

    return reduce


def _reduce_of(linear):
    """The all-reduce after an output projection: mlx's ``ShardedToAllLinear``'s, else None."""
    from mlx.nn.layers.distributed import ShardedToAllLinear

    return _group_sum(linear.group) if isinstance(linear, ShardedToAllLinear) else None


class FusedAttention:
    """Zero-copy views of one attention block (qwen3_moe, mixtral), and its decode step."""

    def __init__(self, attn, arch: Architecture, refs: list):
        self.q, self.k, self.v, self.o = (_weight(attn[p], refs) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        # Per-head RMS norms of queries and keys (qwen3_moe), if any.
        self.q_norm, self.k_norm = (_weight(attn[n], refs) if n in attn else None for n in ("q_norm", "k_norm"))
        self.eps = attn.q_norm.eps if "q_norm" in attn else None
        self.n_heads, self.n_kv = (getattr(attn, name) for name in arch.heads)
        self.head_dim = self.q.shape[0] // self.n_heads
        self.scale = attn.scale
        self.reduce = _reduce_of(attn.o_proj)  # tensor parallel: heads are split
        self.rope = attn.rope

    def __call__(self, h: np.ndarray, cache) -> np.ndarray:
        """``[B, D]`` normed rows in, the attention output ``[B, D]`` out; appends to ``cache``."""
        B, hd = h.shape[0], self.head_dim
        q = gemv.matvec(self.q, h).reshape(B, self.n_heads, hd)
        k = gemv.matvec(self.k, h).reshape(B, self.n_kv, hd)
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        v = gemv.matvec(self.v, h).reshape(B, self.n_kv, 1, hd)
        t = cache.offset  # positions already in the cache
        rope = self.rope
        cos, sin = rope_angles(rope.dims, rope.base, rope.scale, t, 1)  # [1, dims/2] each
        q = rotate(q, cos, sin, rope.dims, rope.traditional)  # [B, H, hd]
        k = rotate(k, cos, sin, rope.dims, rope.traditional)[:, :, None]  # [B, KV, 1, hd]
        qg = q.reshape(B, self.n_kv, self.n_heads // self.n_kv, 1, hd) * np.float32(self.scale)  # [B, KV, rep, 1, hd]
        # Scores against the cached keys (a view of mlx-lm's cache, evaluated
        # at the end of the last step) and against this token's own key.
        scores = np.matmul(qg, k[:, :, None].swapaxes(-1, -2))[..., 0]  # [B, KV, rep, 1]
        if t:
            cached_k, cached_v = (_view(a)[:, :, :t] for a in (cache.keys, cache.values))  # [B, KV, t, hd]
            scores = np.concatenate([np.matmul(qg, cached_k[:, :, None].swapaxes(-1, -2))[..., 0, :], scores], axis=-1)
        p = _softmax(scores)  # [B, KV, rep, t + 1]
        out = p[..., -1:] * v  # [B, KV, rep, hd]: this token's value
        if t:
            out += np.matmul(p[..., :-1], cached_v)
            del cached_k, cached_v  # no view may hold the buffer the update writes into
        # mlx-lm's cache keeps the keys and values: the update stays lazy, and
        # FusedStep evaluates every layer's at once (one sync per step, and
        # MLX updates the buffer in place: nothing else holds it).
        cache.update_and_fetch(mx.array(k), mx.array(v))
        out = out.reshape(B, self.n_heads * hd)  # [B, H*hd]
        y = gemv.matvec(self.o, out)  # [B, D]
        return y if self.reduce is None else self.reduce(y)


class FusedMoE:
    """One sharded MoE block: replicated router, this rank's experts, one all-reduce."""

    def __init__(self, block, arch: Architecture, refs: list):
        self.gate = _weight(block.gate, refs)  # [E, D], the replicated router
        self.top_k = getattr(block, arch.top_k)
        self.norm_topk_prob = arch.renormalise(block)
        self.switch = block.switch_mlp  # LocalExperts: this rank's experts (or slices)
        if "ep_comm" in block.__dict__:  # moe_mpi's shard: the Communicator
            comm = block.ep_comm
            # Another object with all_sum (mx.array in and out) works too.
            self.all_sum = getattr(comm, "all_sum_host", None) or (
                lambda x: np.asarray(memoryview(comm.all_sum(mx.array(x))))
            )
        else:  # mlx-lm's tensor parallel: its own all_sum over the sharding group
            self.all_sum = _group_sum(block.sharding_group)

    def __call__(self, h: np.ndarray) -> np.ndarray:
        """``[B, D]`` normed rows in, the block's output ``[B, D]`` (summed over ranks) out."""
        k = self.top_k
        inds, scores = self.route(h)  # [B, k] each
        local = self.switch.ep_local_of[inds.reshape(-1)]  # [B*k], -1 where another rank owns it
        slots = np.flatnonzero(local >= 0)
        slots = slots[np.argsort(local[slots], kind="stable")]  # an expert's rows together
        partial = np.zeros_like(h)  # [B, D], this rank's share
        if slots.size:
            y = self.switch._gemv_rows(h[slots // k], local[slots])  # [M, D]
            np.add.at(partial, slots // k, y * scores.reshape(-1)[slots, None])
        return self.all_sum(partial)  # the one collective of this layer


    def route(self, h: np.ndarray):
        """The top-k experts of each row and their weights, ``[B, k]`` each, as the block routes."""
        k = self.top_k
        # Every rank computes the same routing: the router is replicated.
        gates = _softmax(gemv.matvec(self.gate, h))  # [B, E]
        inds = np.argpartition(gates, -k, axis=-1)[:, -k:]  # [B, k]
        scores = np.take_along_axis(gates, inds, axis=-1)  # [B, k]
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return inds, scores


class FusedMLP:
    """A replicated dense MLP layer (qwen3_moe ``mlp_only_layers``)."""

    def __init__(self, mlp, refs: list):
        self.gate, self.up, self.down = (_weight(mlp[p], refs) for p in ("gate_proj", "up_proj", "down_proj"))
        self.reduce = _reduce_of(mlp.down_proj)  # tensor parallel: the MLP is split

    def __call__(self, h: np.ndarray) -> np.ndarray:
        g = gemv.matvec(self.gate, h)
        y = gemv.matvec(self.down, g / (1.0 + np.exp(-g)) * gemv.matvec(self.up, h))
        return y if self.reduce is None else self.reduce(y)


class FusedLayer:
    """One decoder layer: attention, then the MoE block (or dense MLP), residuals around both."""

    def __init__(self, layer, arch: Architecture, refs: list):
        self.attn = FusedAttention(layer.self_attn, arch, refs)
        self.ln_in, self.ln_post = _weight(layer.input_layernorm, refs), _weight(layer.post_attention_layernorm, refs)
        self.eps_in, self.eps_post = layer.input_layernorm.eps, layer.post_attention_layernorm.eps
        block = getattr(layer, arch.block)
        self.mlp = FusedMoE(block, arch, refs) if "switch_mlp" in block else FusedMLP(block, refs)

    def __call__(self, x: np.ndarray, cache) -> np.ndarray:
        h = x + self.attn(rms_norm(x, self.ln_in, self.eps_in), cache)  # [B, D]
        return h + self.mlp(rms_norm(h, self.ln_post, self.eps_post))


class FusedStep:
    """A decode step of a sharded model in numpy: ``[B]`` tokens in, logits out."""

    def __init__(self, model):
        arch = architecture(model)
        inner = model.model
        # (module, name, array) of every weight viewed: see current().
        self.refs: List[tuple] = []
        self.embed = _weight(inner.embed_tokens, self.refs)  # [V, D]
        self.norm, self.eps = _weight(inner.norm, self.refs), inner.norm.eps
        self.head = self.embed if model.args.tie_word_embeddings else _weight(model.lm_head, self.refs)
        self.layers = [FusedLayer(layer, arch, self.refs) for layer in inner.layers]
        self.steps = 0  # decode steps taken, for tests and benchmarks

    def current(self) -> bool:
        """Whether the model still holds the weights viewed (``update`` replaces them)."""
        return all(m.get(name) is a for m, name, a in self.refs)

    def takes(self, inputs: mx.array, cache) -> bool:
        """Whether ``model(inputs, cache=cache)`` is a decode call this step covers."""
        from mlx_lm.models.cache import KVCache

        return (
            inputs.ndim == 2
            and inputs.shape[1] == 1
            and inputs.shape[0] <= MAX_BATCH
            and isinstance(cache, (list, tuple))
            and len(cache) == len(self.layers)
            and all(type(c) is KVCache for c in cache)
        )

    def __call__(self, inputs: mx.array, cache: Sequence) -> mx.array:
        """Logits ``[B, 1, V]`` of one decode step; the caches advance by one."""
        tokens = np.asarray(memoryview(inputs)).reshape(-1)  # [B]
        x = self.embed[tokens]  # [B, D]
        for layer, c in zip(self.layers, cache):
            x = layer(x, c)
        # The caches' updates run on MLX's stream while the LM head runs here.
        mx.async_eval([a for c in cache for a in (c.keys, c.values)])
        logits = gemv.matvec(self.head, rms_norm(x, self.norm, self.eps))  # [B, V]
        self.steps += 1
        return mx.array(logits[:, None])


class FusedDecode:
    """Mixin for the top-level mlx-lm model: decode calls run :class:`FusedStep`."""

    def __call__(self, inputs, cache=None, input_embeddings=None, **kwargs):
        step = getattr(self, "ep_fused_step", None)
        if step is not None and input_embeddings is None and not kwargs and step.takes(inputs, cache):
            if not step.current():  # weights replaced since: view the new ones
                step = _build(self)
            if step is not None:
                return step(inputs, cache)
        return super().__call__(inputs, cache=cache, input_embeddings=input_embeddings, **kwargs)


def fused_unsupported(model) -> Optional[str]:
    """Why :func:`use_fused_decode` would leave ``model`` alone, or None."""
    from mlx.utils import tree_flatten

    from .host import host_gemv_enabled

    if os.environ.get("MOE_MPI_FUSED_DECODE", "1") != "1":
        return "MOE_MPI_FUSED_DECODE=0"
    if not host_gemv_enabled():
        return "the host path is off (a GPU, or MOE_MPI_HOST_GEMV=0)"
    arch = architecture(model)
    if arch is None:
        return f"model_type={getattr(model, 'model_type', type(model).__name__)!r} is not covered (qwen3_moe, mixtral)"
    if _tensor_parallel(model):
        from .experts import LocalExperts

        blocks = [getattr(layer, arch.block) for layer in model.layers]
        if not all(isinstance(b.switch_mlp, LocalExperts) for b in blocks if "switch_mlp" in b):
            return "tensor parallel without moe_mpi's host kernels (moe_mpi.host.use_host_kernels_tp)"
    elif getattr(model, "ep_info", None) is None or model.ep_info.mode not in ("ep", "sliced"):
        return "not an ep or sliced shard, nor mlx-lm's tensor parallel"
    dtypes = {a.dtype for _, a in tree_flatten(model.parameters())}
    if dtypes != {mx.float32}:
        return f"weights are {sorted(str(d) for d in dtypes)}, not float32"
    return None


def _tensor_parallel(model) -> bool:
    """Whether ``model`` is mlx-lm's tensor-parallel shard (``model.shard()``)."""
    from mlx.nn.layers.distributed import AllToShardedLinear

    return isinstance(model.layers[0].self_attn.q_proj, AllToShardedLinear)


def use_fused_decode(model) -> bool:
    """Gives a sharded qwen3_moe or mixtral model the fused CPU decode step.

    For moe_mpi's ``ep`` and ``sliced`` shards, and, for benchmarks that
    compare like with like, mlx-lm's tensor-parallel shard after
    :func:`moe_mpi.host.use_host_kernels_tp` (its all-reduces stay
    ``mx.distributed.all_sum``, two per layer).

    Call after the weights are loaded: the step holds views of them.
    ``MOE_MPI_FUSED_DECODE=0`` turns it off. Returns whether it did.
    """
    if fused_unsupported(model) is not None:
        return False
    from .experts import with_mixin

    _build(model)
    model.__class__ = with_mixin(FusedDecode, type(model))
    return True


def _build(model) -> Optional[FusedStep]:
    """(Re)builds the model's step on its current weights; None if they are no longer covered."""
    step = None
    if fused_unsupported(model) is None:
        mx.eval(model.parameters())
        step = FusedStep(model)
    # A plain attribute: nn.Module would take a list of layers for parameters.
    object.__setattr__(model, "ep_fused_step", step)
    return step
