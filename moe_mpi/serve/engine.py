"""The rank loop of ``moe-mpi serve``: every rank steps the same batch.

Each rank runs :meth:`Engine.run` on its main thread. One iteration is one
step of mlx-lm's continuous batcher (``BatchGenerator.next()``: a decode
step of the running sequences, plus a prefill chunk of the joining ones)::

    every rank, every step:
        message = channel.exchange(...)   the one control broadcast (control.py)
        apply message: joins, cancels     the same changes, in the same order
        [allgather of status figures]     only when a client asked for /status
        admit waiting joins               when no request awaits its first token
        batch.next()                      forward passes: one all_sum per MoE layer

Joins wait in a queue (on every rank alike) and enter the batch, up to
``prompt_concurrency`` at a time, only when every request in the batch has
shown its first text. mlx-lm's ``BatchGenerator.next()`` hands out a step's
tokens after that step's prefill, so a request that had finished its prompt
would otherwise wait for the next group's whole prefill for its first token:
a burst of 16 clients got every first token only after both groups of 8
were prefilled. A token is not always text: with a byte-level tokenizer a
character may take up to four tokens (UTF-8), and a client sees nothing
until the last. So every rank runs a detokenizer on each request until its
first text (the same tokenizer and tokens everywhere, so the same answer),
and a request counts as started at its first text, or after
:data:`FIRST_TEXT_TOKENS` tokens, so that a model that writes no valid
text cannot hold the queue.

Only rank 0 talks to clients. Its :class:`~moe_mpi.serve.desk.Desk`
composes the messages (validated, tokenized requests; cancellations of
clients that went away; stop) and turns the generated tokens into text for
the HTTP threads. The other ranks follow with a desk that does nothing.
Since every rank applies the same joins and cancels at the same step to the
same batch, and the logits are identical on every rank, every rank draws the
same tokens: greedy trivially, sampled because each request's sampler is
seeded from the request's seed (rank 0 picks one when the client did not),
so its draws depend on that seed alone.

A request's state that every rank keeps is only what the batch needs: its
tokens, sampling parameters and stop sequences. The prompt cache (mlx-lm's
``LRUPromptCache``) is kept on every rank too, updated at the same steps,
so a cache hit is a hit everywhere.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import resource
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from ..batching import solo_caches, unbatchable_caches
from ..finite import drawn_is_finite, non_finite_message
from ..overlap import Cohorts
from ..unread import skip_unread_prefill
from .control import ControlChannel
from .status import rank_figures

__all__ = ["BatchOptions", "Engine", "FIRST_TEXT_TOKENS", "Follower", "SeededSampler", "make_join"]

#: Tokens after which a request counts as started even if it has shown no
#: text yet: a UTF-8 character is at most 4 bytes, so a byte-level tokenizer
#: shows valid text within 4 tokens.
FIRST_TEXT_TOKENS = 4


@dataclasses.dataclass
class BatchOptions:
    """How the batch is run (the same on every rank).

    Attributes:
        decode_concurrency: Most sequences decoded together (mlx-lm's
            ``completion_batch_size``).
        prompt_concurrency: Most prompts prefilled together.
        prefill_step_size: Prompt tokens per prefill chunk.
        prompt_cache_size: Entries of the prompt cache (0: none).
        prompt_cache_bytes: Byte limit of the prompt cache, or None.
        cohorts: 1, or 2 for two-batch overlap: the sequences in two
            cohorts whose all-reduces travel while the other computes
            (:mod:`moe_mpi.overlap`).
    """

    decode_concurrency: int = 32
    prompt_concurrency: int = 8
    prefill_step_size: int = 2048
    prompt_cache_size: int = 10
    prompt_cache_bytes: Optional[int] = None
    cohorts: int = 1


class SeededSampler:
    """mlx-lm's sampler with draws that depend on the request's seed alone.

    Before each draw MLX's generator is seeded from ``(seed, draw number)``,
    so a request's tokens do not depend on which other requests share its
    batch (mlx-lm's server serves seeded requests one at a time for this)
    and are the same on every rank.
    """

    def __init__(self, sampler, seed: int):
        self.sampler = sampler
        self.seed = seed
        self.draws = 0

    def __call__(self, logprobs: mx.array) -> mx.array:
        digest = hashlib.blake2b(f"{self.seed}:{self.draws}".encode(), digest_size=8).digest()
        mx.random.seed(int.from_bytes(digest, "little"))
        self.draws += 1
        return self.sampler(logprobs)  # [1] token id


#: Sampling parameters of a join record, with the values left out when default.
SAMPLING_DEFAULTS = {"temp": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "xtc_probability": 0.0, "xtc_threshold": 0.1}
#: Logits processor parameters (``make_logits_processors``'s), likewise.
LOGITS_DEFAULTS = {
    "logit_bias": None,
    "repetition_penalty": 0.0,
    "repetition_context_size": 20,
    "presence_penalty": 0.0,
    "presence_context_size": 20,
    "frequency_penalty": 0.0,
    "frequency_context_size": 20,
}


def _changed(values: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in values.items() if v != defaults[k]}


def make_join(rid: int, prepared, args, seed: Optional[int]) -> Dict[str, Any]:
    """The msgpack-able record of a request joining the batch (built on rank 0).

    Defaults are left out, so that a typical request's record is little more
    than its token ids and fits a step's inline area (see :mod:`.control`).

    Args:
        rid: Rank 0's id of the request.
        prepared: The validated, tokenized request
            (:class:`~moe_mpi.serve.api.PreparedRequest`).
        args: mlx-lm's ``GenerationArguments`` of the request.
        seed: The seed of its sampler (None for greedy requests).
    """
    s = args.sampling
    sampling = {
        "temp": float(s.temperature),
        "top_p": float(s.top_p),
        "top_k": int(s.top_k),
        "min_p": float(s.min_p),
        "xtc_probability": float(s.xtc_probability),
        "xtc_threshold": float(s.xtc_threshold),
    }
    join = {
        "rid": rid,
        "prompt": list(prepared.tokens),
        "max_tokens": int(args.max_tokens),
        "stop": [list(seq) for seq in prepared.stop_tokens],
        "sampling": _changed(sampling, SAMPLING_DEFAULTS),
        "logits": _changed(dataclasses.asdict(args.logits), LOGITS_DEFAULTS),
    }
    if len(prepared.segments) > 1:
        # Consecutive slices of the prompt: their lengths suffice.
        join["segments"] = [len(seg) for seg in prepared.segments]
    if list(prepared.segment_types) != ["assistant"]:
        join["types"] = list(prepared.segment_types)
    if seed is not None:
        join["seed"] = seed
    return join


@functools.lru_cache(maxsize=128)
def _stop_sequences(stop: Tuple[Tuple[int, ...], ...]) -> StopSequences:
    return StopSequences(stop)


class Follower:
    """The desk of a rank other than 0: no clients, nothing to compose."""

    def compose(self, block: bool) -> Tuple[int, Optional[dict]]:
        """Ranks other than 0 send nothing: ``(0, None)``."""
        return 0, None

    def on_join(self, rid: int, uid: int, cached: int) -> None:
        """Nothing to do."""

    def on_progress(self, rid: int, progress: tuple) -> None:
        """Nothing to do."""

    def on_token(self, rid: int, response) -> None:
        """Nothing to do."""

    def on_cancelled(self, rid: int) -> None:
        """Nothing to do."""

    def on_failed(self, rid: int, message: str) -> None:
        """Nothing to do."""

    def on_status(self, figures: List[dict]) -> None:
        """Nothing to do."""


@dataclasses.dataclass
class _Sequence:
    """What every rank keeps of a request in the batch."""

    rid: int
    uid: int
    prompt_tokens: int
    # Cache types of the segments still to prefill, last first (mlx-lm's order).
    segment_types: List[str]
    # Whether its first text has come out (until then, joins wait).
    started: bool = False
    # Until started: a detokenizer of its tokens, and how many there were.
    detokenizer: Any = None
    tokens: int = 0
    # Tokens generated so far (for the message if its logits go bad).
    generated: int = 0

    def shows_text(self, response) -> bool:
        """Whether the request has started once ``response``'s token is out (see the module docstring)."""
        self.tokens += 1
        if response.finish_reason is None and self.tokens < FIRST_TEXT_TOKENS:
            self.detokenizer.add_token(response.token)
            if not self.detokenizer.last_segment:
                return False
        self.detokenizer = None
        return True


class Engine:
    """One rank's loop over the shared batch (see the module docstring).

    Args:
        model: This rank's shard (from :func:`moe_mpi.load`).
        tokenizer: The model's tokenizer (the sampler's XTC tokens; first text).
        comm: The :class:`moe_mpi.Communicator` of the job.
        options: Batch settings, the same on every rank.
        desk: Rank 0: a :class:`~moe_mpi.serve.desk.Desk`; elsewhere a
            :class:`Follower`.
        model_key: The prompt cache's key for this model.
        expert_timer: Counts the time in this rank's experts (for /status).
        unread_tail: What prompt chunks may skip (:func:`moe_mpi.unread.find_unread_tail`;
            the same on every rank), or None.
    """

    def __init__(self, model, tokenizer, comm, options: BatchOptions, desk, model_key, expert_timer=None,
                 unread_tail=None):
        self.model = model
        self.comm = comm
        self.desk = desk
        self.model_key = model_key
        self.expert_timer = expert_timer
        self.channel = ControlChannel(comm)
        self.prompt_concurrency = options.prompt_concurrency
        # mlx-lm cannot batch some models' caches (moe_mpi.batching): then one
        # sequence at a time (one per cohort), each with caches of its own.
        self.unbatchable = unbatchable_caches(model)
        together = options.cohorts if self.unbatchable else None
        sizes = dict(
            completion_batch_size=together or options.decode_concurrency,
            prefill_batch_size=together or options.prompt_concurrency,
            prefill_step_size=options.prefill_step_size,
        )
        # A prompt chunk keeps only its caches: its last MoE layer (and split
        # attention's all-reduce) is left out, as mlx-lm's lazy graph leaves it out.
        if options.cohorts > 1:
            self.batch = Cohorts(model, comm, options.cohorts, **sizes)
            skips = self.batch.skip_unread_prefill(unread_tail)
        else:
            self.batch = BatchGenerator(model, **sizes)
            skips = skip_unread_prefill(self.batch, unread_tail)
        self.unread_tail = unread_tail if skips else None
        self.prompt_cache = None
        if options.prompt_cache_size > 0:
            limit = options.prompt_cache_bytes if options.prompt_cache_bytes is not None else 1 << 63
            self.prompt_cache = LRUPromptCache(options.prompt_cache_size, limit)
        # As mlx-lm's server: XTC never removes newlines or end-of-sequence tokens.
        self.xtc_special = list(tokenizer.encode("\n")) + list(tokenizer.eos_token_ids)
        self.tokenizer = tokenizer
        self.sequences: Dict[int, _Sequence] = {}  # uid -> sequence
        self.uid_of: Dict[int, int] = {}  # rid -> uid
        self.waiting: collections.deque = collections.deque()  # join records not yet in the batch
        self.counts = {
            "requests": 0,
            "finished": 0,
            "cancelled": 0,
            "failed": 0,
            "prompt_tokens": 0,
            "cached_prompt_tokens": 0,
            "generated_tokens": 0,
            "steps": 0,
            "decode_steps": 0,
        }
        self.started = time.time()

    # ------------------------------------------------------------------ loop

    @property
    def idle(self) -> bool:
        """Nothing to run and no news on the way (the same on every rank)."""
        return not self.sequences and not self.waiting and not self.channel.news_pending

    def run(self, on_idle: Optional[Callable[[], None]] = None) -> None:
        """Steps the batch until a message says stop. Every rank calls it.

        Args:
            on_idle: Called (on this rank) whenever the batch is empty and
                the engine is about to wait for requests, e.g. to save
                router statistics between bursts.
        """
        while True:
            idle = self.idle
            if idle and on_idle is not None:
                on_idle()
            flags, events = self.desk.compose(block=idle)
            message = self.channel.exchange(flags, events, idle=idle)
            if message.gather_status:
                self.desk.on_status(self.comm.allgather(self.figures()))
            if message.stop:
                return
            self._apply(message.events)
            self._admit()
            if self.sequences:
                self._step()

    def _apply(self, events: dict) -> None:
        for rid in events.get("cancel", ()):
            self._cancel(rid)
        self.waiting.extend(events.get("join", ()))

    def _admit(self) -> None:
        """Waiting joins enter the batch when no request awaits its first text."""
        if any(not seq.started for seq in self.sequences.values()):
            return
        for _ in range(min(self.prompt_concurrency, len(self.waiting))):
            self._join(self.waiting.popleft())

    # ------------------------------------------------------------- changes

    def _sampler(self, join: dict):
        s = {**SAMPLING_DEFAULTS, **join["sampling"]}
        sampler = make_sampler(
            s["temp"],
            top_p=s["top_p"],
            min_p=s["min_p"],
            top_k=s["top_k"],
            xtc_probability=s["xtc_probability"],
            xtc_threshold=s["xtc_threshold"],
            xtc_special_tokens=self.xtc_special,
        )
        if s["temp"] == 0:
            # mlx-lm's one greedy sampler: a batch of greedy requests is
            # sampled in one call.
            return sampler
        return SeededSampler(sampler, join["seed"])

    def _cached_prefix(self, prompt: List[int]) -> Tuple[Optional[list], int]:
        """The prompt cache's nearest entry for ``prompt`` and how many tokens it covers."""
        if self.prompt_cache is None:
            return None, 0
        cache, rest = self.prompt_cache.fetch_nearest_cache(self.model_key, prompt)
        cached = len(prompt) - len(rest)
        if cache is not None and cached >= len(prompt):
            # An exact hit leaves no token to feed the model: give one back.
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                cached -= 1
            else:
                cache, cached = None, 0
        return cache, cached

    def _join(self, join: dict) -> None:
        prompt = join["prompt"]
        segments, start = [], 0
        for n in join.get("segments", [len(prompt)]):
            segments.append(prompt[start : start + n])
            start += n
        types = list(join.get("types", ["assistant"]))
        cache, cached = self._cached_prefix(prompt)
        skip = cached  # drop the cached tokens from the segments, as mlx-lm does
        while skip > 0:
            if skip >= len(segments[0]):
                skip -= len(segments.pop(0))
                types.pop(0)
            else:
                segments[0] = segments[0][skip:]
                break
        logits = {**LOGITS_DEFAULTS, **join["logits"]}
        if logits.get("logit_bias"):
            logits["logit_bias"] = {int(k): float(v) for k, v in logits["logit_bias"].items()}
        if cache is None and self.unbatchable:
            cache = solo_caches(self.model)
        (uid,) = self.batch.insert_segments(
            segments=[segments],
            max_tokens=[join["max_tokens"]],
            caches=[cache],
            all_tokens=[prompt[:cached]],
            samplers=[self._sampler(join)],
            logits_processors=[make_logits_processors(**logits)],
            stop_sequences=[_stop_sequences(tuple(tuple(s) for s in join["stop"]))],
        )
        rid = join["rid"]
        # A fresh detokenizer per request (mlx-lm's property makes one each time).
        self.sequences[uid] = _Sequence(rid, uid, len(prompt), types[::-1], detokenizer=self.tokenizer.detokenizer)
        self.uid_of[rid] = uid
        self.counts["requests"] += 1
        self.counts["prompt_tokens"] += len(prompt)
        self.counts["cached_prompt_tokens"] += cached
        self.desk.on_join(rid, uid, cached)

    def _cancel(self, rid: int) -> None:
        # A request may have finished at the step its client left: then
        # there is nothing to remove, on every rank alike.
        uid = self.uid_of.pop(rid, None)
        if uid is None:
            return
        self.batch.remove([uid])
        del self.sequences[uid]
        self.counts["cancelled"] += 1
        self.desk.on_cancelled(rid)

    # ---------------------------------------------------------------- step

    def _step(self) -> None:
        prompt_responses, responses = self.batch.next()
        self.counts["steps"] += 1
        if responses:
            self.counts["decode_steps"] += 1
        for r in prompt_responses:
            self.desk.on_progress(self.sequences[r.uid].rid, r.progress)
        self._save_segments(prompt_responses)
        for r in responses:
            seq = self.sequences[r.uid]
            if not drawn_is_finite(r.logprobs, r.token):
                self._fail(seq, r)
                continue
            seq.generated += 1
            seq.started = seq.started or seq.shows_text(r)
            self.counts["generated_tokens"] += 1
            self.desk.on_token(seq.rid, r)
            if r.finish_reason is not None:
                self._finish(seq, r)

    def _save_segments(self, prompt_responses: Sequence) -> None:
        """Caches the prompt at the end of a segment (e.g. a system prompt), as mlx-lm does."""
        if self.prompt_cache is None:
            return
        ends = [
            r.uid
            for r in prompt_responses
            if r.end_of_segment and not r.end_of_prompt and self.sequences[r.uid].segment_types
        ]
        for uid, (cache, tokens) in self.batch.extract_cache(ends).items():
            kind = self.sequences[uid].segment_types.pop()
            self.prompt_cache.insert_cache(self.model_key, tokens[:], cache, cache_type=kind)

    def _fail(self, seq: _Sequence, response) -> None:
        """Ends a request whose token came from non-finite logits (:mod:`moe_mpi.finite`), on every rank alike.

        Every rank has the same logits, so every rank ends it at this step;
        the token is not sent, and its cache is not kept for other prompts.
        The other requests of the batch go on: their rows of the batch are
        their own (a NaN in one expert, or an overflow on one prompt, spoils
        only the tokens that reach it).
        """
        if response.finish_reason is None:  # a finished one has left the batch already
            self.batch.remove([seq.uid])
        del self.sequences[seq.uid]
        del self.uid_of[seq.rid]
        self.counts["failed"] += 1
        self.desk.on_failed(seq.rid, non_finite_message(seq.generated + 1))

    def _finish(self, seq: _Sequence, response) -> None:
        if self.prompt_cache is not None:
            self.prompt_cache.insert_cache(
                self.model_key, response.all_tokens[:], response.prompt_cache, cache_type="assistant"
            )
        del self.sequences[seq.uid]
        del self.uid_of[seq.rid]
        self.counts["finished"] += 1

    # -------------------------------------------------------------- status

    def figures(self) -> Dict[str, Any]:
        """This rank's figures for /status (gathered from every rank)."""
        all_sum = self.comm.stats["all_sum"]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "rank": self.comm.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **self.counts,
            "active": len(self.sequences),
            "waiting": len(self.waiting),
            "expert_seconds": self.expert_timer.seconds if self.expert_timer else None,
            "all_reduces": all_sum.calls,
            "all_reduce_seconds": all_sum.seconds if all_sum.timed else None,  # --backend mlx: not timed
            "all_reduce_bytes": all_sum.bytes,
            # Left out in prompt chunks, where nobody reads the output (moe_mpi.unread).
            "all_reduces_skipped": self.unread_tail.skipped if self.unread_tail is not None else 0,
            # Started while the other cohort computed (two-batch overlap, moe_mpi.overlap).
            "all_reduces_overlapped": self.comm.overlapped,
            "cohorts": self.batch.sizes if isinstance(self.batch, Cohorts) else None,
            "control": self.channel.snapshot(),
            # --lm-head split: the logits' all-gathers, one per forward pass less those of prompt chunks.
            "logit_gathers": self.comm.stats["all_gather"].calls,
            "logit_gathers_skipped": self.unread_tail.skipped_of("all_gather") if self.unread_tail is not None else 0,
            # Anything but the MoE all-reduces: the status allgathers, and the logits' all-gathers.
            "other_collectives": {k: v.calls for k, v in self.comm.stats.items() if k != "all_sum" and v.calls},
            "status_allgathers": self.comm.stats["allgather"].calls,
            "peak_memory_bytes": mx.get_peak_memory(),
            "max_rss_bytes": rss if sys.platform == "darwin" else rss * 1024,  # KiB on Linux
            "uptime_seconds": time.time() - self.started,
            **rank_figures(self.model),  # forward passes, routing guard repairs
        }
