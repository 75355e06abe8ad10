"""Rank side of the equivalence tests: run under ``mpirun ... python -m mpi4py``.

For each case in the JSON file given as argv[1], every rank loads (or shards)
the model and checks, against the reference single-process mlx-lm results:

* logits of one forward pass: allclose, rtol = atol = 1e-4;
* exactly one all-reduce per MoE layer per forward call, no other collective
  (with ``"attention": "split"``, also one per attention layer; with
  ``"lm_head": "split"``, one all-gather of the logits per call);
* 16 greedy tokens from mlx-lm's own ``generate_step`` with a prompt cache;
* the same tokens from mlx-lm's ``BatchGenerator`` whose prompt chunks skip
  the modules :func:`moe_mpi.unread.find_unread_tail` found unread, with
  every all-reduce either sent or counted as skipped;
* the same again with two-batch overlap (:class:`moe_mpi.overlap.Cohorts`):
  the prompt in each of two cohorts stepped in turns, every all-reduce
  (on more than one rank) started while the other cohort computed;
* with ``"expect"`` (mode auto's ``balance`` cases), that the layouts chosen
  split, or copy, experts as expected;
* with ``"expect_shared"``, that some call shared a replicated expert's rows
  among several of its holders (so the case exercises that path);
* with ``"backend": "mlx"``, the all-reduces in MLX's lazy graph, and with
  ``"expect_lazy"``, that no forward pass read the routing back to Python
  (every slot computed by the switch layer's own call); no overlap check.

Cases with ``"parallel": "central"`` run the central-router mode instead:
rank 0 does the checks while the other ranks serve their experts; there is
no all-reduce, and every exchange is a counted point-to-point message.

An exception on any rank aborts every rank (``python -m mpi4py``).
"""

import json
import sys

import mlx.core as mx
import moe_mpi.experts
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load as mlx_lm_load

from moe_mpi import Communicator, load, shard_experts
from moe_mpi.central import drive
from moe_mpi.overlap import Cohorts
from moe_mpi.serve.status import count_forward_passes
from moe_mpi.unread import find_unread_tail, skip_unread_prefill

#: Prompt tokens per prefill chunk in the BatchGenerator check: several chunks per prompt.
CHUNK = 3


def _collectives(comm) -> dict:
    return {k: v["calls"] for k, v in comm.snapshot().items() if v["calls"]}


_COMMS = {}


def check_case(comm: Communicator, case: dict) -> str:
    backend = case.get("backend", comm.backend)
    if backend != comm.backend:
        if backend not in _COMMS:  # one per backend for the whole run
            _COMMS[backend] = Communicator(backend=backend)
        comm = _COMMS[backend]
    ref = np.load(case["reference"])
    parallel = case.get("parallel", "ep")
    kwargs = dict(placement=case.get("placement"), weights=case.get("weights"), mode=parallel, layouts=case.get("layouts"))
    for option in ("stats", "replicas", "balance", "profile", "attention", "lm_head"):  # auto's optimizer; splits
        if option in case:
            kwargs[option] = case[option]
    shared = watch_sharing()
    if case["mode"] == "load":
        model, _ = load(case["model"], comm=comm, **kwargs)
    else:  # a model already loaded by plain mlx-lm, then sharded
        model, _ = mlx_lm_load(case["model"])
        shard_experts(model, comm, **kwargs)
    layers = model.ep_info.num_moe_layers
    assert layers == int(ref["moe_layers"]), (layers, int(ref["moe_layers"]))
    layouts = model.ep_info.layouts
    chosen = dict(split=any(l.split for l in layouts), replicated=any(l.replicated for l in layouts))
    if case.get("expect"):
        assert chosen == case["expect"], (case["name"], chosen, [l.describe() for l in layouts])
    elif "balance" in case:  # "both": the cost decides, but the hot experts are split or copied
        assert chosen["split"] or chosen["replicated"], [l.describe() for l in layouts]
    if parallel == "central":
        return drive(model, lambda m: check_central(m, comm, ref, case["name"]))
    reads = watch_routing_reads()
    result = check_ep(model, comm, ref, case["name"])
    if case.get("expect_lazy"):
        assert comm.lazy and not reads, (case["name"], f"{len(reads)} forward calls read the routing back")
    if case.get("expect_shared"):
        assert any(shared), (case["name"], "no replicated expert's rows were shared among holders")
        # (the runner counts lines that end in "match")
        result = result.replace(" match", f" match, with rows shared in {sum(shared)} of {len(shared)} copies' calls; match")
    return result


def watch_sharing() -> list:
    """Records, per replicated expert and call, whether its slots went to more than one rank."""
    seen = []
    assign = moe_mpi.experts.__dict__.get("_unwatched_assign_slots", moe_mpi.experts.assign_slots)
    moe_mpi.experts._unwatched_assign_slots = assign

    def watched(layout, flat):
        ranks = assign(layout, flat)
        seen.extend(len(set(ranks[flat == e].tolist())) > 1 for e in layout.replicated if (flat == e).any())
        return ranks

    moe_mpi.experts.assign_slots = watched
    return seen


def watch_routing_reads() -> list:
    """Records each call of the switch layers' general path, the one that reads the routing back."""
    calls = []
    cls = moe_mpi.experts.LocalExperts
    plain = cls.__dict__.get("_unwatched_local_slots", cls.local_slots)
    cls._unwatched_local_slots = plain

    def watched(self, x, indices):
        calls.append(indices.shape)
        return plain(self, x, indices)

    cls.local_slots = watched
    return calls


def check_ep(model, comm: Communicator, ref, name: str) -> str:
    info = model.ep_info
    layers = info.num_moe_layers
    if info.attention == "split":
        assert info.attention_layers > 0, info.attention_layers
    else:
        assert info.attention_layers == 0, info.attention_layers
    calls = info.all_reduces_per_call  # one per MoE layer, one per split attention
    gathers = int(info.lm_head == "split")  # the logits' all-gather, one per call
    assert (info.lm_head_path != "") == bool(gathers), (info.lm_head, info.lm_head_path)

    def per_call(n: int) -> dict:
        return {"all_sum": n * calls, **({"all_gather": n * gathers} if gathers else {})}

    prompt = mx.array(ref["prompt"])
    comm.reset_stats()
    logits = model(prompt[None])
    mx.eval(logits)
    assert _collectives(comm) == per_call(1), _collectives(comm)
    np.testing.assert_allclose(np.array(logits), ref["logits"], rtol=1e-4, atol=1e-4)

    # Decode steps with a prompt cache: still one all-reduce per layer per call.
    cache = make_prompt_cache(model)
    comm.reset_stats()
    mx.eval(model(prompt[None], cache=cache))
    for _ in range(3):
        mx.eval(model(prompt[None, -1:], cache=cache))
    assert _collectives(comm) == per_call(4), _collectives(comm)

    tokens = [int(t) for t, _ in generate_step(prompt, model, max_tokens=len(ref["greedy"]))]
    assert tokens == ref["greedy"].tolist(), (tokens, ref["greedy"].tolist())
    skipped = check_unread_prefill(model, comm, ref, calls, gathers)
    if comm.backend == "mpi4py":  # two cohorts overlap only mpi4py's non-blocking all-reduces
        check_unread_prefill(model, comm, ref, calls, gathers, cohorts=2)
    heads = f" and {info.attention_layers} split attentions" if info.attention_layers else ""
    heads += f", the LM head split ({info.lm_head_path})" if gathers else ""
    return f"{name}: {layers} MoE layers{heads}; {skipped}; logits and {len(tokens)} greedy tokens match"


def _skips(tail) -> dict:
    """Calls of each kind the tail's modules skipped so far (the LM head's are all-gathers, the rest all-reduces)."""
    return {kind: tail.skipped_of(kind) for kind in ("all_sum", "all_gather")}


def check_unread_prefill(model, comm: Communicator, ref, calls: int, gathers: int = 0, cohorts: int = 1) -> str:
    """Greedy tokens of a BatchGenerator whose prompt chunks skip the unread tail; its all-reduce count.

    With ``cohorts=2``, two cohorts (two-batch overlap) each decode the prompt.
    """
    from mlx_lm.generate import BatchGenerator

    tail = find_unread_tail(model, comm)
    counter = count_forward_passes(model)
    counter.calls = 0
    before = _skips(tail)
    if cohorts > 1:
        gen = Cohorts(model, comm, cohorts, prefill_step_size=CHUNK)
        skipping = gen.skip_unread_prefill(tail)
    else:
        gen = BatchGenerator(model, prefill_step_size=CHUNK)
        skipping = skip_unread_prefill(gen, tail)
    assert skipping == bool(tail.modules), (skipping, tail.modules)
    comm.reset_stats()
    prompt = ref["prompt"].tolist()
    uids = gen.insert([prompt] * cohorts, max_tokens=[len(ref["greedy"])] * cohorts)
    tokens = {uid: [] for uid in uids}
    try:
        while responses := gen.next_generated():
            for r in responses:
                tokens[r.uid].append(r.token)
    except ValueError as e:  # mlx-lm's own refusal, on every rank alike (deepseek_v41's cache)
        if "does not yet support batching" not in str(e):
            raise
        return "mlx-lm's BatchGenerator refuses its cache"
    finally:
        gen.close()
    for uid in uids:
        assert tokens[uid] == ref["greedy"].tolist(), (cohorts, tokens[uid], ref["greedy"].tolist())
    chunks = -(-(len(prompt) - 1) // CHUNK)  # prompt[:-1] in chunks; the last token starts the decode
    after = _skips(tail)
    skipped = sum(after.values()) - sum(before.values())  # each module once per prompt chunk
    assert skipped == cohorts * chunks * len(tail.modules), (skipped, cohorts, chunks, len(tail.modules))
    assert tail.skipped == after["all_sum"], (tail.skipped, after)  # UnreadTail.skipped: all-reduces only
    # Every call's all-reduces (and all-gathers) are sent or, in a prompt chunk, counted as skipped.
    for kind, per_call in (("all_sum", calls), ("all_gather", gathers)):
        done = _collectives(comm).get(kind, 0)
        left = after.get(kind, 0) - before.get(kind, 0)
        assert done + left == counter.calls * per_call, (kind, done, left, counter.calls, per_call)
    sent = _collectives(comm).get("all_sum", 0)
    if cohorts > 1 and comm.size > 1:  # every one started while the other cohort computed
        assert comm.overlapped == sent, (comm.overlapped, sent)
    kept = "no module" if not tail.modules else " and ".join(type(m).skip_kind for m in tail.modules)
    return f"prompt chunks skip {kept}" + (f", kept {tail.rejected}" if tail.rejected else "")


def check_central(model, comm: Communicator, ref, name: str) -> str:
    """Rank 0 of central mode: same checks; exchanges are point-to-point."""
    layers = model.ep_info.num_moe_layers
    prompt = mx.array(ref["prompt"])
    comm.reset_stats()
    logits = model(prompt[None])
    mx.eval(logits)
    counts = _collectives(comm)
    assert "all_sum" not in counts, counts
    if comm.size > 1:  # a request and its rows to each owner, a reply back
        assert counts.get("send", 0) >= 2 * layers and counts.get("recv", 0) >= layers, counts
    np.testing.assert_allclose(np.array(logits), ref["logits"], rtol=1e-4, atol=1e-4)
    tokens = [int(t) for t, _ in generate_step(prompt, model, max_tokens=len(ref["greedy"]))]
    assert tokens == ref["greedy"].tolist(), (tokens, ref["greedy"].tolist())
    return f"{name}: {layers} MoE layers, central mode ({counts}), logits and {len(tokens)} greedy tokens match"


def main() -> None:
    comm = Communicator()
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    for case in cases:
        if comm.rank == 0:  # the runner names the last case started when a rank dies
            print(f"[{comm.size} ranks] starting {case['name']}", file=sys.stderr, flush=True)
        msg = check_case(comm, case)
        comm.barrier()
        if comm.rank == 0:
            print(f"[{comm.size} ranks] {msg}", flush=True)
    comm.barrier()


if __name__ == "__main__":
    main()
