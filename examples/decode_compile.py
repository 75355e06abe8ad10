"""What ``mx.compile`` saves on the MLX work of a batch-1 decode layer (CPU).

Issue 5 asks to measure ``mx.compile`` of the per-layer step. On the CPU,
moe_mpi's CPU decode runs every weight read in numpy (``moe_mpi.cpu.layers``,
``moe_mpi.cpu.experts``), so what is left in MLX comes in short segments
between syncs. This times those segments eager and compiled, at the
dbrx-like decode shapes, each call evaluated (as the next sync does):

* ``router``: softmax, top-k, renormalisation of 16 router logits (mlx-lm's
  qwen3_moe block);
* ``combine``: the router-weighted sum of the ``k`` expert outputs;
* ``attention``: query/key RMS norms, RoPE and attention over a KV cache of
  fixed length (mlx-lm's cache grows by one each step, so compiling it as
  it stands would trace again at every step; this is the best case of a
  static-shape cache);
* ``residual + norm``: the residual add and the next RMS norm.

Run on one core, as each rank of a 2-rank job on 2 cores is bound::

    taskset -c 0 .venv/bin/python examples/decode_compile.py
"""

import time

import moe_mpi  # noqa: F401  (the same BLAS as the benchmarks)
import mlx.core as mx
import mlx.nn as nn

from moe_mpi.bench.shapes import synthetic_config
from moe_mpi.cpu.layers import use_numpy_layers

CALLS, REPEATS = 500, 5
CACHE_LEN = 64


def per_call_us(fn, args) -> float:
    """Best-of-``REPEATS`` microseconds per evaluated call of ``fn(*args)``."""
    for _ in range(20):
        mx.eval(fn(*args))
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(CALLS):
            mx.eval(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best / CALLS * 1e6


def main() -> None:
    config = synthetic_config("dbrx-like")
    d, e, k = config["hidden_size"], config["num_experts"], config["num_experts_per_tok"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    key = mx.random.key(0)
    norm = nn.RMSNorm(head_dim, eps=1e-6)
    rope = nn.RoPE(head_dim, base=config["rope_theta"])

    def router(logits):  # [1, 1, E] -> ([1, 1, k] ids, [1, 1, k] scores)
        gates = mx.softmax(logits, axis=-1, precise=True)
        inds = mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]
        scores = mx.take_along_axis(gates, inds, axis=-1)
        return inds, scores / mx.sum(scores, axis=-1, keepdims=True)

    def combine(y, scores):  # [1, 1, k, D], [1, 1, k] -> [1, 1, D]
        return (y * scores[..., None]).sum(axis=-2)

    def make_attention(norm, rope):
        def attention(q, kk, keys, values):  # one token against a fixed cache
            q = rope(norm(q.reshape(1, 1, heads, -1)).transpose(0, 2, 1, 3), offset=CACHE_LEN)
            kk = rope(norm(kk.reshape(1, 1, kv_heads, -1)).transpose(0, 2, 1, 3), offset=CACHE_LEN)
            keys = mx.concatenate([keys, kk], axis=2)
            out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=head_dim**-0.5)
            return out.transpose(0, 2, 1, 3).reshape(1, 1, -1)

        return attention

    # moe_mpi's own path: the same norm and RoPE in numpy (not compilable).
    numpy_layers = nn.Sequential(nn.RMSNorm(head_dim, eps=1e-6), nn.RoPE(head_dim, base=config["rope_theta"]))
    use_numpy_layers(numpy_layers)

    weight = mx.ones((d,))

    def residual_norm(h, r):
        x = h + r
        return x, mx.fast.rms_norm(x, weight, 1e-6)

    keys = mx.random.normal((1, kv_heads, CACHE_LEN, head_dim), key=key)
    values = mx.random.normal((1, kv_heads, CACHE_LEN + 1, head_dim), key=key)
    cases = {
        "router": (router, (mx.random.normal((1, 1, e), key=key),)),
        "combine": (combine, (mx.random.normal((1, 1, k, d), key=key), mx.ones((1, 1, k)) / k)),
        "attention": (
            make_attention(norm, rope),
            (mx.random.normal((1, 1, heads * head_dim), key=key),
             mx.random.normal((1, 1, kv_heads * head_dim), key=key), keys, values),
        ),
        "residual + norm": (residual_norm, (mx.random.normal((1, 1, d), key=key),) * 2),
    }
    mx.eval([args for _, args in cases.values()])
    attention_args = cases["attention"][1]
    print(f"# dbrx-like decode shapes, one token; us per evaluated call, best of {REPEATS} x {CALLS}")
    print(f"{'segment':18s} {'eager':>8s} {'compiled':>9s}   per layer")
    for name, (fn, args) in cases.items():
        eager = per_call_us(fn, args)
        compiled = per_call_us(mx.compile(fn), args)
        print(f"{name:18s} {eager:8.1f} {compiled:9.1f}   saves {eager - compiled:6.1f} us")
    numpy_path = per_call_us(make_attention(numpy_layers.layers[0], numpy_layers.layers[1]), attention_args)
    print(f"{'attention, numpy norms and RoPE (moe_mpi)':44s} {numpy_path:8.1f}")


if __name__ == "__main__":
    main()
