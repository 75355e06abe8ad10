"""Routers that prefer some experts, to measure balancing on uneven load.

A random model's routers favour no expert in particular, unlike trained
ones. :func:`skew_routers` refits a random model's routers so that each
layer's expert shares follow a capped Zipf law (``router_skew`` of
:func:`moe_mpi.synthetic.build_model`; the ``dbrx-like-skewed`` shape of
``moe-mpi bench``, docs/balance.md).
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import mlx.core as mx
import mlx.nn as nn


def capped_zipf(n: int, exponent: float, cap: float) -> np.ndarray:
    """Shares ``∝ 1 / rank**exponent``, none above ``cap`` (an expert is in a
    token's top k at most once, so its share of the slots is at most 1/k)."""
    share = 1.0 / np.arange(1, n + 1) ** exponent
    share /= share.sum()
    for _ in range(n):
        over = share > cap
        if not over.any():
            break
        share[over] = cap
        free = ~over
        share[free] *= (1.0 - cap * over.sum()) / share[free].sum()
    return share


def skew_routers(model: nn.Module, config: Dict[str, Any], exponent: float, seed: int, iterations: int = 40) -> None:
    """Makes every router prefer some experts: shares about ``1 / rank**exponent``.

    A random model's hidden states point nowhere in particular, so a
    router cannot prefer anything. This adds a fixed direction ``u`` to every
    token embedding, which the hidden states then carry, and adds to each
    router row ``b_e`` times that direction as the layer sees it: a bias of
    about ``b_e`` on expert ``e``'s logit. The biases are fitted, layer by
    layer on random tokens through the model itself, until each expert's
    share of the top-k slots is near Zipf's (capped at ``1/k``: an expert is
    chosen at most once per token); each layer ranks its experts in its own
    random order. Only routers that are a ``gate`` linear layer are skewed.
    """
    from .shard import find_moe_blocks

    k = config.get("num_experts_per_tok") or (config.get("ffn_config") or {}).get("moe_top_k") or 2
    rng = np.random.default_rng(seed + 4049)
    inner = model.model if "model" in model else model
    embed = inner.embed_tokens
    u = rng.standard_normal(embed.weight.shape[1]).astype(np.float32)
    u *= SKEW_DIRECTION_NORM / np.linalg.norm(u)
    embed.weight = embed.weight + mx.array(u)[None]  # [V, D]: every token carries u
    tokens = mx.array(rng.integers(0, embed.weight.shape[0], (8, 64)).astype(np.int32))
    for moe in find_moe_blocks(model):
        block = moe.block
        if "gate" not in block or not isinstance(block.gate, nn.Linear):
            raise ValueError(f"router_skew needs a 'gate' linear router; {moe.path} has none")
        h = _block_input(model, block, tokens)  # [S, D]
        d = h.mean(axis=0)
        w = np.array(block.gate.weight)  # [E, D]
        e = w.shape[0]
        target = capped_zipf(e, exponent, 1.0 / k)[rng.permutation(e)]  # this layer's order
        base = h @ w.T  # [S, E]
        bias = np.zeros(e)
        for _ in range(iterations):
            top = np.argpartition(-(base + bias), k - 1, axis=-1)[:, :k]  # [S, k]
            share = np.bincount(top.reshape(-1), minlength=e) / top.size
            bias += 0.5 * np.log(target / np.maximum(share, 1e-4))
        # h·d/|d|² is about 1 for every token: the bias moves each logit by about b_e.
        block.gate.weight = mx.array((w + np.outer(bias, d / (d @ d))).astype(np.float32))
    mx.eval(model.parameters())


#: Length of the direction skew_routers adds to every token embedding (embeddings have ~sqrt(D)).
SKEW_DIRECTION_NORM = 16.0


def _block_input(model: nn.Module, block: nn.Module, tokens: mx.array) -> np.ndarray:
    """``[S, D]`` what ``block`` receives when ``model`` runs ``tokens``."""
    captured = []
    cls = type(block)

    class Capture(cls):
        def __call__(self, x, *args, **kwargs):
            captured.append(np.array(x.reshape(-1, x.shape[-1])))
            return super().__call__(x, *args, **kwargs)

    block.__class__ = Capture
    try:
        mx.eval(model(tokens))
    finally:
        block.__class__ = cls
    return captured[0]
