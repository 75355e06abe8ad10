"""Rank 0's desk: requests from the HTTP threads in, text out.

The HTTP threads put mlx-lm's ``(response_queue, request, arguments)``
triples (:meth:`mlx_lm.server.ResponseGenerator.generate`, reused as is)
and status queries into one inbox queue. At every step the engine asks the
desk to :meth:`~Desk.compose` the next control message: the requests that
arrived since the last step (already validated and tokenized by the HTTP
thread, so nothing here can fail for one rank and not another), the
requests whose clients went away, and the flags. When the batch produces
tokens the desk detokenizes them as mlx-lm's server does and puts mlx-lm's
``Response`` objects on each request's queue, where mlx-lm's
``handle_completion`` turns them into JSON or server-sent events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import threading
import time
from queue import Empty, Queue
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

from mlx_lm.server import GenerationContext, Response, _format_top_logprobs

from ..runner import PROG
from .control import GATHER_STATUS, STOP
from .engine import make_join

__all__ = ["Desk", "ModelOutputError", "StatusQuery"]

#: How often a desk waiting for requests checks that the HTTP server still runs.
WAKE_SECONDS = 0.5
#: Woken from idle by a request, the desk takes whatever else arrives until
#: the inbox has been quiet this long (clients often come together, and
#: one prefill of all of them beats one per arrival) ...
GATHER_QUIET_SECONDS = 0.003
#: ... but waits no longer than this in all.
GATHER_MAX_SECONDS = 0.02


class ModelOutputError(Exception):
    """The model gave a request no usable token (non-finite logits, :mod:`moe_mpi.finite`).

    Put on the request's queue, where mlx-lm's ``generate`` raises it in the
    HTTP thread, which answers in OpenAI's error shape (status 500).
    """


class StatusQuery:
    """An HTTP thread's request for every rank's figures."""

    def __init__(self):
        self._done = threading.Event()
        self.figures: Optional[List[dict]] = None

    def resolve(self, figures: List[dict]) -> None:
        """Hands the gathered figures to the waiting thread."""
        self.figures = figures
        self._done.set()

    def wait(self, timeout: float) -> Optional[List[dict]]:
        """The figures, or None if they did not come within ``timeout`` seconds."""
        self._done.wait(timeout)
        return self.figures


@dataclasses.dataclass
class _Sink:
    """Where a request's tokens go, and how they become text."""

    rqueue: Queue
    ctx: GenerationContext
    detokenizer: Any
    logprobs: bool
    top_logprobs: int


class Desk:
    """Rank 0's side of the engine (see the module docstring).

    Args:
        inbox: The queue the HTTP threads put requests and queries on.
        tokenizer: The model's tokenizer wrapper.
        lock: Held around every use of the tokenizer: the HTTP threads
            tokenize while this thread detokenizes, and Hugging Face
            tokenizers are not safe to use from two threads at once.
        idle_wait: Held while the desk waits for requests with nothing
            running (the watchdog's ``busy``: the other ranks wait for
            this one in the next broadcast, and that is no hang).
    """

    def __init__(self, inbox: Queue, tokenizer, lock: threading.Lock, idle_wait: Callable[[], ContextManager] = contextlib.nullcontext):
        self.inbox = inbox
        self.tokenizer = tokenizer
        self.lock = lock
        self.idle_wait = idle_wait
        self.waiting: Dict[int, tuple] = {}  # rid -> HTTP triple, announced, not yet joined
        self.sinks: Dict[int, _Sink] = {}  # rid -> sink of a request in the batch
        self.cancelling: set = set()
        self.queries: List[StatusQuery] = []
        self.http_failure: Optional[BaseException] = None
        self._next_rid = 0
        self._stop = False

    def stop(self) -> None:
        """Makes every rank leave its loop at the next step (from any thread)."""
        self._stop = True
        self.inbox.put(None)  # wakes a desk waiting for requests

    # ----------------------------------------------------------- composing

    def compose(self, block: bool) -> Tuple[int, Optional[dict]]:
        """The flags of this step and the news for the next.

        Args:
            block: Nothing is running: wait for something to arrive.

        Returns:
            ``(flags, events)`` for :meth:`ControlChannel.exchange`.

        Raises:
            RuntimeError: The HTTP server died; no request could reach the
                cluster any more, so the job must end.
        """
        flags, joins = 0, []
        for item in self._take(block):
            if isinstance(item, StatusQuery):
                self.queries.append(item)
                flags |= GATHER_STATUS
            elif item is not None:
                joins.append(self._admit(item))
        if self._stop:
            flags |= STOP
        cancels = [rid for rid, sink in self.sinks.items() if sink.ctx._should_stop and rid not in self.cancelling]
        self.cancelling.update(cancels)
        events = {}
        if joins:
            events["join"] = joins
        if cancels:
            events["cancel"] = cancels
        return flags, events

    def _take(self, block: bool) -> list:
        items = []
        if block:
            with self.idle_wait():
                items = self._wait()
        self._check_http()
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except Empty:
                return items

    def _wait(self) -> list:
        """Waits for the first item, then takes what else arrives soon after."""
        items = []
        while not items and not self._stop:
            self._check_http()
            try:
                items.append(self.inbox.get(timeout=WAKE_SECONDS))
            except Empty:
                pass
        if items:
            deadline = time.monotonic() + GATHER_MAX_SECONDS
            while time.monotonic() < deadline:
                try:
                    items.append(self.inbox.get(timeout=GATHER_QUIET_SECONDS))
                except Empty:
                    break
        return items

    def _check_http(self) -> None:
        if self.http_failure is not None:
            raise RuntimeError(f"the HTTP server stopped: {self.http_failure!r}") from self.http_failure

    def _admit(self, item: tuple) -> dict:
        _, request, args = item
        rid = self._next_rid
        self._next_rid += 1
        seed = None
        if args.sampling.temperature > 0:
            # Every sampled request gets a seed, so that its draws (on every
            # rank) depend on it alone.
            seed = args.seed if args.seed is not None else secrets.randbits(63)
        self.waiting[rid] = item
        return make_join(rid, request, args, seed)

    # ------------------------------------------------------------ results

    def on_join(self, rid: int, uid: int, cached: int) -> None:
        """The request is in the batch: its HTTP thread gets its context."""
        rqueue, request, args = self.waiting.pop(rid)
        tok = self.tokenizer
        ctx = GenerationContext(
            has_tool_calling=tok.has_tool_calling,
            has_thinking=tok.has_thinking,
            tool_parser=tok.tool_parser,
            text_sm=request.text_sm,
            initial_state=request.initial_state,
            prompt=request.tokens,
            prompt_cache_count=cached,
        )
        with self.lock:
            detokenizer = tok.detokenizer  # a fresh one per request
        self.sinks[rid] = _Sink(rqueue, ctx, detokenizer, bool(args.logprobs), args.top_logprobs)
        rqueue.put(ctx)

    def on_progress(self, rid: int, progress: tuple) -> None:
        """Prompt progress, which mlx-lm's handler turns into keep-alives."""
        self.sinks[rid].rqueue.put(tuple(progress))

    def on_token(self, rid: int, r) -> None:
        """One generated token: its text, as mlx-lm's server makes it."""
        sink = self.sinks[rid]
        detok = sink.detokenizer
        with self.lock:
            # The stop token itself is not text.
            if r.finish_reason != "stop":
                detok.add_token(r.token)
            if r.finish_reason is not None:
                detok.finalize()
            text = detok.last_segment
            top = _format_top_logprobs(r.logprobs, sink.top_logprobs, self.tokenizer)
        logprob = r.logprobs[r.token].item() if sink.logprobs else 0.0
        sink.rqueue.put(Response(text, r.token, logprob, r.finish_reason, top))
        if r.finish_reason is not None:
            sink.rqueue.put(None)
            del self.sinks[rid]

    def on_cancelled(self, rid: int) -> None:
        """The request left the batch because its client went away."""
        self.cancelling.discard(rid)
        sink = self.sinks.pop(rid, None)
        if sink is not None:
            sink.rqueue.put(None)

    def on_failed(self, rid: int, message: str) -> None:
        """The request left the batch because the model's output for it was not finite."""
        logging.error("%s: error: request %d: %s", PROG, rid, message)
        self.cancelling.discard(rid)
        sink = self.sinks.pop(rid, None)
        if sink is not None:
            sink.rqueue.put(ModelOutputError(message))

    def on_status(self, figures: List[dict]) -> None:
        """Every rank's figures, gathered at this step."""
        queries, self.queries = self.queries, []
        for query in queries:
            query.resolve(figures)
