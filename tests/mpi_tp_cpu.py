"""Rank side of the tensor-parallel CPU-path test: run under ``mpirun ... python -m mpi4py``.

Every rank builds the same tiny random qwen3_moe model twice: plain, and
through mlx-lm's ``shard()`` on MLX's MPI group followed by
:func:`moe_mpi.cpu.tensor_parallel.accelerate_tensor_parallel`. The sharded
model's prefill and decode logits (one and two rows: the numpy decode step
of :mod:`moe_mpi.cpu.decode`, with mlx-lm's cross-rank ``all_sum`` of
``o_proj`` and of the MoE block) must match the plain model's, and so must
12 greedy tokens. An exception on any rank aborts every rank.
"""

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from moe_mpi.comm import Communicator, mlx_group
from moe_mpi.cpu.tensor_parallel import NumpyShardedToAllLinear, accelerate_tensor_parallel
from moe_mpi.experts import LocalExperts
from moe_mpi.synthetic import build_model, tiny_config


def main() -> None:
    group = mlx_group()
    assert group is not None and group.size() > 1, "needs MLX's MPI group on several ranks"
    config = tiny_config("qwen3_moe")
    plain, _ = build_model(config, seed=11)
    tp, _ = build_model(config, seed=11)
    mx.eval(plain.parameters(), tp.parameters())
    tp.shard(group)
    path = accelerate_tensor_parallel(tp, Communicator(backend="mlx", group=group))
    kinds = [type(m) for _, m in tp.named_modules()]
    assert any(issubclass(k, NumpyShardedToAllLinear) for k in kinds)
    assert any(issubclass(k, LocalExperts) for k in kinds)
    assert path.decode_step is not None, f"no numpy decode step: {path.decode_step_off}"
    for tokens in (mx.array([[3, 1, 4, 1, 5, 9, 2, 6]]), mx.array([[3, 1, 4], [2, 7, 1]])):
        caches = [make_prompt_cache(m) for m in (plain, tp)]
        for step in range(6):  # the prompt, then one token at a time (the numpy step)
            want, got = plain(tokens, cache=caches[0]), tp(tokens, cache=caches[1])
            np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
            tokens = mx.argmax(want[:, -1:], axis=-1)
    assert path.numpy_steps == 10, path.numpy_steps
    prompt = mx.array([2, 7, 1, 8])
    greedy = [[int(t) for t, _ in generate_step(prompt, m, max_tokens=12)] for m in (plain, tp)]
    assert greedy[0] == greedy[1], greedy
    print(f"rank {group.rank()}: tensor parallel with the CPU speed path matches ({len(greedy[0])} greedy tokens)", flush=True)


if __name__ == "__main__":
    main()
