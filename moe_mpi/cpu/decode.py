"""The numpy decode step: a whole decode step of a sharded MoE model in numpy.

On MLX's CPU backend a decode step of mlx-lm's model code is hundreds of
small MLX ops, each a round trip to MLX's stream thread. This module runs
the step in numpy instead, on zero-copy views of the model's own weights:
per layer the matrix-vector products go to :func:`moe_mpi.cpu.gemv.matvec`,
the norms, RoPE, attention and routing are a few numpy calls on ``[B, ...]``
rows, and the KV cache stays mlx-lm's ``KVCache`` (one update per layer).

It is a kernel, not a second model: :func:`use_numpy_decode` puts
:class:`NumpyDecode` in front of the model's class, whose ``__call__`` takes
only decode-sized calls (``[B, 1]`` token ids, a plain ``KVCache`` per
layer) and hands every other call (prefill, other caches) to the model's own
``__call__``. Every MoE layer ends in the all-reduce of the block's own
communicator (``block.expert_shard.comm.all_sum``), the one
:class:`moe_mpi.shard.ExpertParallelBlock` calls.

Because it re-implements mlx-lm's code, it runs only where that code is
known: the architectures of :func:`architectures` (``qwen3_moe``,
``mixtral``), with their exact layer classes, plain ``nn.RoPE``, no RoPE
scaling or sliding window, and mlx-lm sources whose fingerprint matches
the one the step was verified against (:data:`VERIFIED`). Anything else
keeps mlx-lm's code; :func:`unsupported` says why.
"""

import functools
import hashlib
import inspect
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..experts import LocalExperts, base_class, with_mixin
from . import gemv, switches
from .layers import rms_norm, rope_angles, rotate, view

# Rows a numpy step takes at most: decode batches (prefill stays in MLX).
MAX_BATCH = 64


@dataclass(frozen=True)
class Architecture:
    """An mlx-lm architecture the step covers: its classes and where it keeps what the step reads.

    Its attention has ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, an
    ``nn.RoPE`` ``rope`` and a ``scale`` (and per-head ``q_norm``/``k_norm``
    if it has them); its MoE block a ``gate`` router and a ``switch_mlp``
    (``SwitchGLU``), routed as softmax, top-k, then (maybe) renormalised.
    """

    name: str
    model: type  # the top-level Model
    inner: type  # model.model
    layer: type  # a decoder layer
    attention: type
    block: type  # the MoE block
    dense: Optional[type]  # a dense MLP layer in place of the MoE block, if the architecture has one
    block_attr: str  # the decoder layer's MoE block (or dense MLP) attribute
    heads: Tuple[str, str]  # the attention's query-head and key/value-head counts
    top_k: str  # the MoE block's experts per token
    renormalise: Callable  # block -> whether the top-k scores are renormalised to sum to 1

    def sources(self) -> List[Callable]:
        """The mlx-lm (and mlx) code the step re-implements."""
        from mlx_lm.models import base
        from mlx_lm.models.cache import KVCache
        from mlx_lm.models.switch_layers import SwiGLU, SwitchGLU

        found = [self.model.__call__, self.inner.__call__, self.layer.__init__, self.layer.__call__,
                 self.attention.__init__, self.attention.__call__, self.block.__init__, self.block.__call__]
        if self.dense is not None:
            found += [self.dense.__init__, self.dense.__call__]
        return found + [KVCache.update_and_fetch, SwitchGLU.__call__, SwiGLU.__call__,
                        base.scaled_dot_product_attention, nn.RoPE.__init__, nn.RoPE.__call__, nn.RMSNorm.__call__]


@functools.lru_cache(maxsize=None)
def architectures() -> Tuple[Architecture, ...]:
    """Every architecture the step covers."""
    from mlx_lm.models import mixtral, qwen3_moe

    return (
        Architecture("qwen3_moe", qwen3_moe.Model, qwen3_moe.Qwen3MoeModel, qwen3_moe.Qwen3MoeDecoderLayer,
                     qwen3_moe.Attention, qwen3_moe.Qwen3MoeSparseMoeBlock, qwen3_moe.MLP, "mlp",
                     ("n_heads", "n_kv_heads"), "top_k", lambda b: b.norm_topk_prob),
        # mixtral: softmax over the top-k logits, the same as the top k of the
        # softmax over all of them, renormalised.
        Architecture("mixtral", mixtral.Model, mixtral.MixtralModel, mixtral.MixtralDecoderLayer,
                     mixtral.MixtralAttention, mixtral.MixtralSparseMoeBlock, None, "block_sparse_moe",
                     ("num_heads", "num_key_value_heads"), "num_experts_per_tok", lambda b: True),
    )


#: Fingerprints of :meth:`Architecture.sources` the step was verified
#: against (tests/test_numpy_decode.py compares it with mlx-lm on 1, 2 and 3
#: ranks). Other sources keep mlx-lm's code; after checking the step against
#: a new mlx-lm, add its fingerprints here (tests/test_cpu_kernels.py prints them).
VERIFIED = {
    "qwen3_moe": {"mlx-lm 0.32.2": "88c31481a6184623"},
    "mixtral": {"mlx-lm 0.32.2": "a70fd51cdfea016e"},
}


@functools.lru_cache(maxsize=None)
def fingerprint(arch: Architecture) -> Optional[str]:
    """A hash of the source of the code the step re-implements, or None if unreadable."""
    try:
        text = "\n".join(inspect.getsource(f) for f in arch.sources())
    except (OSError, TypeError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def architecture(model) -> Optional[Architecture]:
    """The :class:`Architecture` of an mlx-lm ``model``, or None if not covered."""
    return next((arch for arch in architectures() if isinstance(model, arch.model)), None)


class NumpyAttention:
    """Zero-copy views of one attention block, and its decode step."""

    def __init__(self, attn, arch: Architecture, refs: list, reduce=None):
        self.q, self.k, self.v, self.o = (_weight(attn[p], refs) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        # Per-head RMS norms of queries and keys (qwen3_moe), if any.
        self.q_norm, self.k_norm = (_weight(attn[n], refs) if n in attn else None for n in ("q_norm", "k_norm"))
        self.eps = attn.q_norm.eps if "q_norm" in attn else None
        self.n_heads, self.n_kv = (getattr(attn, name) for name in arch.heads)
        self.head_dim = self.q.shape[0] // self.n_heads
        self.scale = attn.scale
        self.rope = attn.rope
        self.reduce = reduce  # tensor parallel: the heads are split, o_proj's output is summed

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
            cached_k, cached_v = (view(a)[:, :, :t] for a in (cache.keys, cache.values))  # [B, KV, t, hd]
            scores = np.concatenate([np.matmul(qg, cached_k[:, :, None].swapaxes(-1, -2))[..., 0, :], scores], axis=-1)
        p = _softmax(scores)  # [B, KV, rep, t + 1]
        out = p[..., -1:] * v  # [B, KV, rep, hd]: this token's value
        if t:
            out += np.matmul(p[..., :-1], cached_v)
            del cached_k, cached_v  # no view may hold the buffer the update writes into
        # The update stays lazy: NumpyDecodeStep evaluates every layer's at
        # once (one sync per step; MLX updates the buffer in place).
        cache.update_and_fetch(mx.array(k), mx.array(v))
        y = gemv.matvec(self.o, out.reshape(B, self.n_heads * hd))  # [B, D]
        return y if self.reduce is None else self.reduce(y)


class NumpyMoE:
    """One sharded MoE block: replicated router, this rank's experts, one all-reduce."""

    def __init__(self, block, arch: Architecture, refs: list, comm):
        self.gate = _weight(block.gate, refs)  # [E, D], the replicated router
        self.top_k = getattr(block, arch.top_k)
        self.norm_topk_prob = arch.renormalise(block)
        self.switch = block.switch_mlp  # this rank's experts (or slices), with the CPU expert kernels
        self.comm = comm  # the block's communicator: the layer's one all-reduce
        self.guard = None  # moe_mpi.guard's RoutingGuard: the all-reduce carries a routing check

    def __call__(self, h: np.ndarray) -> np.ndarray:
        """``[B, D]`` normed rows in, the block's output ``[B, D]`` (summed over ranks) out."""
        inds, scores = self.route(h)  # [B, k] each
        partial = self.partial(h, inds, scores)
        if self.guard is not None:
            return self.guard.numpy_all_sum(self, h, inds, partial, lambda logits: self.redo(h, logits))
        return self.comm.all_sum(partial)  # the one collective of this layer

    def redo(self, h: np.ndarray, logits: np.ndarray):
        """``(inds, partial)`` routed from the given router logits (rank 0's, on the guard's rare path)."""
        inds, scores = self.route(h, logits)
        return inds, self.partial(h, inds, scores)

    def partial(self, h: np.ndarray, inds: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """This rank's share ``[B, D]`` of the block's output for the given routing."""
        k = self.top_k
        own_slots, own_ids, split_slots, split_ids = self.switch.expert_shard.slots(inds.reshape(-1))
        partial = np.zeros_like(h)  # [B, D], this rank's share
        for slots, ids, unit in ((own_slots, own_ids, self.switch), (split_slots, split_ids, self.switch.get("split"))):
            if slots.size:
                order = np.argsort(ids, kind="stable")  # an expert's rows together
                slots, ids = slots[order], ids[order]
                y = unit.numpy_rows(h[slots // k], ids)  # [M, D]
                np.add.at(partial, slots // k, y * scores.reshape(-1)[slots, None])
        return partial

    def logits(self, h: np.ndarray) -> np.ndarray:
        """The router's logits ``[B, E]``."""
        return gemv.matvec(self.gate, h)

    def route(self, h: np.ndarray, logits: Optional[np.ndarray] = None):
        """The top-k experts of each row and their weights, ``[B, k]`` each, as the block routes."""
        k = self.top_k
        # Every rank computes the same routing: the router is replicated.
        gates = _softmax(self.logits(h) if logits is None else logits)  # [B, E]
        inds = np.argpartition(gates, -k, axis=-1)[:, -k:]  # [B, k]
        scores = np.take_along_axis(gates, inds, axis=-1)  # [B, k]
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return inds, scores


class NumpyMLP:
    """A replicated dense MLP layer (qwen3_moe ``mlp_only_layers``)."""

    def __init__(self, mlp, refs: list, reduce=None):
        self.gate, self.up, self.down = (_weight(mlp[p], refs) for p in ("gate_proj", "up_proj", "down_proj"))
        self.reduce = reduce  # tensor parallel: the MLP is split, down_proj's output is summed

    def __call__(self, h: np.ndarray) -> np.ndarray:
        g = gemv.matvec(self.gate, h)
        y = gemv.matvec(self.down, g / (1.0 + np.exp(-g)) * gemv.matvec(self.up, h))
        return y if self.reduce is None else self.reduce(y)


class NumpyLayer:
    """One decoder layer: attention, then the MoE block (or dense MLP), residuals around both."""

    def __init__(self, layer, arch: Architecture, refs: list, tp_comm=None):
        reduce = tp_comm.all_sum if tp_comm is not None else None
        self.attn = NumpyAttention(layer.self_attn, arch, refs, reduce)
        self.ln_in, self.ln_post = _weight(layer.input_layernorm, refs), _weight(layer.post_attention_layernorm, refs)
        self.eps_in, self.eps_post = layer.input_layernorm.eps, layer.post_attention_layernorm.eps
        block = getattr(layer, arch.block_attr)
        if "switch_mlp" not in block:
            self.mlp = NumpyMLP(block, refs, reduce)
        else:
            shard = block.__dict__.get("expert_shard")  # moe_mpi's ep or sliced shard
            self.mlp = NumpyMoE(block, arch, refs, shard.comm if shard is not None else tp_comm)

    def __call__(self, x: np.ndarray, cache) -> np.ndarray:
        h = x + self.attn(rms_norm(x, self.ln_in, self.eps_in), cache)  # [B, D]
        return h + self.mlp(rms_norm(h, self.ln_post, self.eps_post))


class NumpyDecodeStep:
    """A decode step of a sharded model in numpy: ``[B]`` tokens in, logits out."""

    def __init__(self, model, tp_comm=None):
        arch = architecture(model)
        inner = model.model
        # (module, name, array) of every weight viewed: see current().
        self.refs: List[tuple] = []
        self.embed = _weight(inner.embed_tokens, self.refs)  # [V, D]
        self.norm, self.eps = _weight(inner.norm, self.refs), inner.norm.eps
        self.head = self.embed if model.args.tie_word_embeddings else _weight(model.lm_head, self.refs)
        self.layers = [NumpyLayer(layer, arch, self.refs, tp_comm) for layer in inner.layers]
        self.tp_comm = tp_comm
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
        tokens = view(inputs).reshape(-1)  # [B]
        x = self.embed[tokens]  # [B, D]
        for layer, c in zip(self.layers, cache):
            x = layer(x, c)
        # The caches' updates run on MLX's stream while the LM head runs here.
        mx.async_eval([a for c in cache for a in (c.keys, c.values)])
        logits = gemv.matvec(self.head, rms_norm(x, self.norm, self.eps))  # [B, V]
        self.steps += 1
        return mx.array(logits[:, None])


class NumpyDecode:
    """Mixin for the top-level mlx-lm model: decode calls run its :class:`NumpyDecodeStep`."""

    def __call__(self, inputs, cache=None, input_embeddings=None, **kwargs):
        path = self.cpu_path
        step = path.decode_step
        if step is not None and input_embeddings is None and not kwargs and step.takes(inputs, cache):
            if not step.current():  # weights replaced since: view the new ones
                step = path.decode_step = build_step(self, step.tp_comm)
            if step is not None:
                return step(inputs, cache)
        return super().__call__(inputs, cache=cache, input_embeddings=input_embeddings, **kwargs)


def unsupported(model, tensor_parallel: bool = False) -> Optional[str]:
    """Why the numpy step would leave ``model`` to mlx-lm's code, or None.

    Args:
        model: A loaded model: moe_mpi's ``ep`` or ``sliced`` shard, or (with
            ``tensor_parallel``) mlx-lm's tensor-parallel shard with the CPU
            expert kernels on its switch layers.
    """
    from mlx.utils import tree_flatten

    if switches.get("MOE_MPI_NUMPY_DECODE") != "1":
        return "MOE_MPI_NUMPY_DECODE=0"
    if not switches.numpy_kernels():
        return "the numpy kernels are off (MLX on a GPU, MOE_MPI_CPU=0 or MOE_MPI_NUMPY_KERNELS=0)"
    arch = architecture(model)
    if arch is None:
        return f"model_type={getattr(model, 'model_type', type(model).__name__)!r} is not covered ({', '.join(a.name for a in architectures())})"
    known = VERIFIED.get(arch.name, {})
    if fingerprint(arch) not in known.values():
        return (
            f"mlx-lm's {arch.name} code (fingerprint {fingerprint(arch)}) is not the code the step was "
            f"verified against ({', '.join(known) or 'none'})"
        )
    why = _structure(model, arch)
    if why:
        return why
    if tensor_parallel:
        blocks = [getattr(layer, arch.block_attr) for layer in model.layers]
        if not all(isinstance(b.switch_mlp, LocalExperts) for b in blocks if "switch_mlp" in b):
            return "tensor parallel without the CPU expert kernels (moe_mpi.cpu.tensor_parallel)"
    elif getattr(model, "ep_info", None) is None or model.ep_info.mode not in ("ep", "sliced", "auto"):
        return "not an ep, sliced or auto shard"
    elif model.ep_info.attention != "replicated":
        return "attention split across ranks (the step computes every head)"
    elif model.ep_info.lm_head != "replicated":
        return "LM head split across ranks (the step computes every logit)"
    dtypes = {a.dtype for _, a in tree_flatten(model.parameters())}
    if dtypes != {mx.float32}:
        return f"weights are {sorted(str(d) for d in dtypes)}, not float32"
    return None


def _structure(model, arch: Architecture) -> Optional[str]:
    """Why the model's layers are not the ones the step was written for, or None."""
    args = model.args
    for key in ("rope_scaling", "sliding_window", "use_sliding_window", "layer_types"):
        if getattr(args, key, None):
            return f"{key}={getattr(args, key)!r} is set"
    if getattr(model.model, "pipeline_size", 1) != 1:
        return "pipeline parallel"
    for i, layer in enumerate(model.layers):
        attn, block = layer.self_attn, getattr(layer, arch.block_attr, None)
        kinds = (base_class(layer), base_class(attn), base_class(attn.rope), base_class(block))
        want = (arch.layer, arch.attention, nn.RoPE)
        if kinds[:3] != want or kinds[3] not in (arch.block, arch.dense):
            names = ", ".join(k.__name__ for k in kinds)
            return f"layer {i} is built of {names}, not the classes of mlx-lm's {arch.name}"
    return None


def use_numpy_decode(model, tp_comm=None) -> Optional[str]:
    """Gives a loaded model the numpy decode step, where :func:`unsupported` allows.

    Call after the weights are loaded (the step holds views of them) and
    after the CPU expert kernels. ``model.cpu_path`` (a
    :class:`moe_mpi.cpu.CpuPath`) holds the step.

    Args:
        model: moe_mpi's ``ep``/``sliced`` shard, or mlx-lm's tensor-parallel one.
        tp_comm: For mlx-lm's tensor parallel: the communicator of its own
            all-reduces (after ``o_proj`` and after the MoE block).

    Returns:
        None if installed, else why not.
    """
    why = unsupported(model, tensor_parallel=tp_comm is not None)
    if why is None:
        model.cpu_path.decode_step = build_step(model, tp_comm)
        model.__class__ = with_mixin(NumpyDecode, type(model))
    return why


def build_step(model, tp_comm=None) -> Optional[NumpyDecodeStep]:
    """The step on the model's current weights; None if they are no longer covered."""
    if unsupported(model, tensor_parallel=tp_comm is not None) is not None:
        return None
    mx.eval(model.parameters())
    return NumpyDecodeStep(model, tp_comm)


def _weight(module, refs: list, name: str = "weight") -> np.ndarray:
    """A view of ``module[name]``, noted in ``refs`` so a replaced weight is seen."""
    a = module[name]
    refs.append((module, name, a))
    return view(a)


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32 (``mx.softmax(precise=True)``)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
