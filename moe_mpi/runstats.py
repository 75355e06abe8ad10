"""What ``moe-mpi generate`` checks and prints besides the text: the sampler's consistency check and ``--verbose``.

Every function that gathers from the ranks is a collective: each rank calls it.
"""

from __future__ import annotations

import argparse
import resource
import sys
from typing import Callable, Dict, List, Optional, Tuple

from .errors import CollectiveError
from .reliability import guard_warning
from .runner import PROG
from .unread import UnreadTail

__all__ = ["ConsistencyCheck", "make_sampler", "print_stats", "report_guard", "report_stats"]


class ConsistencyCheck:
    """Wraps a sampler: after each draw, all ranks compare their tokens.

    Every rank calls the sampler at the same steps, so the allgather here is
    a collective like any other; and since all ranks receive the same list,
    all of them detect a disagreement at once and raise the same
    :class:`CollectiveError`, before diverging tokens could make one rank
    stop at an end-of-sequence token while the others go on.
    """

    def __init__(self, sampler: Callable, comm):
        self.sampler = sampler
        self.comm = comm
        self.steps = 0
        self.tokens = 0

    def __call__(self, logprobs):
        import numpy as np

        token = self.sampler(logprobs)
        mine = np.array(token).reshape(-1).tolist()  # evaluates the draw
        drawn = self.comm.allgather(mine)
        if any(other != mine for other in drawn):
            raise CollectiveError(
                f"ranks drew different tokens at generation step {self.steps + 1}: "
                + "; ".join(f"rank {r}: {t}" for r, t in enumerate(drawn))
            )
        self.steps += 1
        self.tokens += len(mine)
        return token


def make_sampler(args: argparse.Namespace, comm) -> Tuple[Callable, Optional[ConsistencyCheck]]:
    """mlx-lm's sampler for ``--temp``/``--top-p``, wrapped in a :class:`ConsistencyCheck` if asked."""
    from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

    sampler = mlx_lm_sampler(args.temp, args.top_p)
    if args.check_consistency:
        check = ConsistencyCheck(sampler, comm)
        return check, check
    return sampler, None


def report_guard(model, comm) -> None:
    """Rank 0 says how often the routing guard redid a layer (nothing if never)."""
    warning = guard_warning(getattr(model, "routing_guard", None))
    if warning is not None and comm.rank == 0:
        print_stats([f"{PROG}: warning: {warning}"])


def rank_stats(comm) -> List[Dict[str, float]]:
    """Every rank's memory and all-reduce time (a collective)."""
    import mlx.core as mx

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # KiB on Linux
    mine = {
        "peak": mx.get_peak_memory() / 1e9,
        "rss": rss_bytes / 1e9,
        "all_sum_s": comm.stats["all_sum"].seconds if comm.stats["all_sum"].timed else None,
    }
    return comm.allgather(mine)


def print_stats(lines: List[str]) -> None:
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


def consistency_line(comm, check: ConsistencyCheck) -> str:
    return (
        f"Consistency: all {comm.size} ranks drew the same tokens at each of "
        f"{check.steps} sampling steps"
    )


def report_stats(
    args: argparse.Namespace,
    model,
    comm,
    snapshot: Dict[str, Dict[str, float]],
    head: List[str],
    generated: int,
    check: Optional[ConsistencyCheck],
    tail: Optional[UnreadTail] = None,
) -> None:
    """Rank 0 prints the ``--verbose`` statistics (gathered from all ranks).

    Collective when ``args.verbose``: every rank must call it.
    """
    if not args.verbose:
        if check is not None and comm.rank == 0:
            print_stats([consistency_line(comm, check)])
        return
    ranks = rank_stats(comm)
    if comm.rank != 0:
        return
    calls = snapshot["all_sum"]["calls"]
    other = sum(v["calls"] for k, v in snapshot.items() if k != "all_sum")
    lines = list(head)
    lines += [
        f"Rank {r}: peak memory {s['peak']:.3f} GB, max RSS {s['rss']:.3f} GB, "
        + (f"{1e3 * s['all_sum_s']:.1f} ms in all-reduce" if s["all_sum_s"] is not None
           else "all-reduces in MLX's graph (not timed)")
        for r, s in enumerate(ranks)
    ]
    per_token = calls / generated if generated else float("nan")
    lines.append(
        f"Collectives: {per_token:.2f} all-reduces per generated token "
        f"({calls} all_sum calls for {generated} tokens, "
        f"{model.ep_info.num_moe_layers} MoE layers"
        + (f" and {model.ep_info.attention_layers} split attentions" if model.ep_info.attention_layers else "")
        + f"; {tail.skipped if tail else 0} left out of prompt chunks"
        + (f"; {comm.overlapped} overlapped" if args.overlap else "")
        + f"; {other} other collectives)"
    )
    if check is not None:
        lines.append(consistency_line(comm, check))
    print_stats(lines)
