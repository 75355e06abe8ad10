"""Rank side of tests/test_guard.py: run under ``mpirun ... python -m mpi4py``.

argv: checkpoint, rank 1's checkpoint, reference .npz, mode:

* ``clean``: every rank loads the same checkpoint. A prompt (MLX) and four
  greedy decode steps (the numpy step) run unguarded, then guarded on a
  fresh cache: the logits must be bit-identical, with no repair and one
  all-reduce per MoE layer per call.
* ``repair``: rank 1's checkpoint has MoE layer 0's router negated, so rank 1
  routes every token of that layer to other experts. The guard must redo
  layer 0 in every call (prompt and decode steps), and the logits must match
  single-process mlx-lm on the real checkpoint (rank 0's routing).
* ``strict``: as ``repair``, with ``strict``: every rank must raise the same
  CollectiveError at the first call.
"""

import sys

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from moe_mpi import Communicator, load
from moe_mpi.errors import CollectiveError
from moe_mpi.guard import guard_routing

DECODE_STEPS = 4


def run(model, prompt, comm):
    """Logits of the prompt and of greedy decode steps; all_sum calls and numpy steps made."""
    cache = make_prompt_cache(model)
    comm.reset_stats()
    numpy_before = model.cpu_path.numpy_steps
    out = [np.array(model(prompt[None], cache=cache)[:, -1])]
    for _ in range(DECODE_STEPS):
        token = mx.array([[int(np.argmax(out[-1][0]))]])
        out.append(np.array(model(token, cache=cache)[:, -1]))
    return out, comm.stats["all_sum"].calls, model.cpu_path.numpy_steps - numpy_before


def main() -> None:
    ckpt, other, reference, mode = sys.argv[1:5]
    comm = Communicator()
    model, _ = load(other if comm.rank == 1 and mode != "clean" else ckpt, comm=comm)
    layers = model.ep_info.num_moe_layers
    ref = np.load(reference)
    prompt = mx.array(ref["prompt"])
    calls = 1 + DECODE_STEPS
    assert model.cpu_path.decode_step is not None, model.cpu_path.decode_step_off
    if mode == "clean":
        plain, n_plain, _ = run(model, prompt, comm)
        guard = guard_routing(model)
        guarded, n_guarded, numpy_steps = run(model, prompt, comm)
        assert numpy_steps == DECODE_STEPS, numpy_steps
        assert guard.repairs == 0, guard.events
        assert n_plain == n_guarded == calls * layers, (n_plain, n_guarded)
        for i, (a, b) in enumerate(zip(plain, guarded)):
            assert np.array_equal(a, b), (i, float(np.abs(a - b).max()))
        print(f"rank {comm.rank}: clean: {calls} calls bit-identical guarded and not", flush=True)
        return
    guard = guard_routing(model, strict=mode == "strict")
    if mode == "strict":
        try:
            run(model, prompt, comm)
        except CollectiveError as e:
            print(f"rank {comm.rank}: strict: {e}", flush=True)
            return
        raise AssertionError("no divergence detected")
    got, n_calls, numpy_steps = run(model, prompt, comm)
    assert numpy_steps == DECODE_STEPS, numpy_steps
    # Layer 0 diverges in every call; each repair costs one more all-reduce.
    assert guard.repairs == calls, guard.events
    assert {layer for layer, _, _ in guard.events} == {0}, guard.events
    assert all(ranks == [1] for _, ranks, _ in guard.events), guard.events
    assert n_calls == calls * layers + guard.repairs, n_calls
    for i, logits in enumerate(got):
        want = ref[f"logits{i}"]
        assert np.allclose(logits, want, rtol=1e-4, atol=1e-4), (i, float(np.abs(logits - want).max()))
    print(f"rank {comm.rank}: repair: {guard.repairs} repairs, {calls} calls match mlx-lm", flush=True)


if __name__ == "__main__":
    main()
