"""Rank side of the equivalence tests: run under ``mpirun ... python -m mpi4py``.

For each case in the JSON file given as argv[1], every rank loads (or shards)
the model and checks, against the reference single-process mlx-lm results:

* logits of one forward pass: allclose, rtol = atol = 1e-4;
* exactly one all-reduce per MoE layer per forward call, no other collective;
* 16 greedy tokens from mlx-lm's own ``generate_step`` with a prompt cache.

An exception on any rank aborts every rank (``python -m mpi4py``).
"""

import json
import sys

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load as mlx_lm_load

from moe_mpi import Communicator, load, shard_experts


def _collectives(comm) -> dict:
    return {k: v["calls"] for k, v in comm.snapshot().items() if v["calls"]}


def check_case(comm: Communicator, case: dict) -> str:
    ref = np.load(case["reference"])
    if case["mode"] == "load":
        model, _ = load(case["model"], comm=comm, placement=case.get("placement"), weights=case.get("weights"))
    else:  # a model already loaded by plain mlx-lm, then sharded
        model, _ = mlx_lm_load(case["model"])
        shard_experts(model, comm, placement=case.get("placement"), weights=case.get("weights"))
    layers = model.ep_info.num_moe_layers
    assert layers == int(ref["moe_layers"]), (layers, int(ref["moe_layers"]))

    prompt = mx.array(ref["prompt"])
    comm.reset_stats()
    logits = model(prompt[None])
    mx.eval(logits)
    assert _collectives(comm) == {"all_sum": layers}, _collectives(comm)
    np.testing.assert_allclose(np.array(logits), ref["logits"], rtol=1e-4, atol=1e-4)

    # Decode steps with a prompt cache: still one all-reduce per layer per call.
    cache = make_prompt_cache(model)
    comm.reset_stats()
    mx.eval(model(prompt[None], cache=cache))
    for _ in range(3):
        mx.eval(model(prompt[None, -1:], cache=cache))
    assert _collectives(comm) == {"all_sum": 4 * layers}, _collectives(comm)

    tokens = [int(t) for t, _ in generate_step(prompt, model, max_tokens=len(ref["greedy"]))]
    assert tokens == ref["greedy"].tolist(), (tokens, ref["greedy"].tolist())
    return f"{case['name']}: {layers} MoE layers, logits and {len(tokens)} greedy tokens match"


def main() -> None:
    comm = Communicator()
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    for case in cases:
        msg = check_case(comm, case)
        if comm.rank == 0:
            print(f"[{comm.size} ranks] {msg}", flush=True)
    comm.barrier()


if __name__ == "__main__":
    main()
