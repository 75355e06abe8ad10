"""Rank side of the routing guard tests in tests/test_serve_faults.py: run under ``mpirun ... python -m mpi4py``.

argv: checkpoint, rank 1's checkpoint (MoE layer 0's router negated),
reference tokens .json, mode (``repair`` or ``strict``).

Every rank runs the serving engine (:class:`moe_mpi.serve.engine.Engine`,
its control broadcast and mlx-lm's ``BatchGenerator``) with the routing
guard installed and the forward passes counted, as ``moe-mpi serve`` does
(its start-up fingerprint would refuse rank 1's checkpoint, so the model is
loaded here without it). Rank 0's desk is a script: every prompt joins at
the first step, then, once all have finished, one status gather and stop.

* ``repair``: each rank prints one JSON line: its figures after the run;
  rank 0 adds the tokens of every request, the ``/status`` document and
  the guard's warning.
* ``strict``: the guard's error reaches ``abort_on_error`` as in
  ``moe-mpi serve``: one message, every rank exits with code 1.
"""

import json
import sys

from moe_mpi import Communicator, load
from moe_mpi.guard import guard_routing
from moe_mpi.reliability import guard_warning
from moe_mpi.runner import abort_on_error
from moe_mpi.serve.control import GATHER_STATUS, STOP
from moe_mpi.serve.engine import BatchOptions, Engine, Follower
from moe_mpi.serve.status import count_forward_passes, summarize


class ScriptedDesk:
    """Rank 0's desk: the prompts join at once; status and stop when all have finished."""

    def __init__(self, prompts, max_tokens):
        self.joins = [
            {"rid": rid, "prompt": list(p), "max_tokens": max_tokens, "stop": [], "sampling": {}, "logits": {}}
            for rid, p in enumerate(prompts)
        ]
        self.tokens = {rid: [] for rid in range(len(prompts))}
        self.finished = set()
        self.figures = None

    def compose(self, block):
        if self.joins:
            joins, self.joins = self.joins, []
            return 0, {"join": joins}
        if len(self.finished) == len(self.tokens):
            return GATHER_STATUS | STOP, None
        return 0, None

    def on_join(self, rid, uid, cached):
        pass

    def on_progress(self, rid, progress):
        pass

    def on_token(self, rid, r):
        self.tokens[rid].append(int(r.token))
        if r.finish_reason is not None:
            self.finished.add(rid)

    def on_cancelled(self, rid):
        raise AssertionError("nothing is cancelled")

    def on_status(self, figures):
        self.figures = figures


def main() -> None:
    ckpt, negated, reference, mode = sys.argv[1:5]
    ref = json.loads(open(reference).read())
    comm = Communicator()
    with abort_on_error(comm):
        model, tokenizer = load(negated if comm.rank == 1 else ckpt, comm=comm)
        model.routing_guard = guard = guard_routing(model, strict=mode == "strict")
        count_forward_passes(model)
        desk = ScriptedDesk(ref["prompts"], ref["max_tokens"]) if comm.rank == 0 else Follower()
        engine = Engine(model, tokenizer, comm, BatchOptions(prompt_cache_size=0), desk, (ckpt, None, None))
        comm.reset_stats()
        engine.run()
    row = {"rank": comm.rank, "figures": engine.figures()}
    if comm.rank == 0:
        row["tokens"] = [desk.tokens[rid] for rid in sorted(desk.tokens)]
        info = {"moe_layers": model.ep_info.num_moe_layers, "routing_guard": "strict" if guard.strict else "repair",
                "unbatchable_caches": engine.unbatchable}
        row["status"] = summarize(desk.figures, info)
        row["warning"] = guard_warning(guard)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
