"""``moe-mpi serve``: the command line, start-up and the run.

Start-up runs in collective phases (:mod:`moe_mpi.runner`), so a bad option,
a port in use or an unreadable model gives one ``moe-mpi: error:`` line and
every rank exits with code 1. Once serving, any unexpected error on any rank
aborts the whole job (``MPI_Abort``) after that rank prints its traceback:
there is never a server that accepts requests it cannot answer.

The checks of ``moe-mpi generate`` run here too, from the same code
(:mod:`moe_mpi.reliability`): the ranks compare their command lines and
then the models they loaded before anything listens, the watchdog ends a
job whose rank froze (``--timeout``; rank 0 waiting for requests counts as
busy, not as a hang), and the routing guard checks every MoE layer
(``--routing-guard``, ``--strict-routing``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from typing import Optional, Sequence

from ..argtypes import add_sharding_arguments, non_negative_float, non_negative_int, port, positive_int, probability, unit_interval
from ..batching import PROBE_TEXT, padded_prefill_is_exact
from ..comm import Communicator
from ..errors import UserError
from ..reliability import (
    add_data_path_arguments,
    add_reliability_arguments,
    backend_comm,
    check_reliability_arguments,
    guard_warning,
    load_checked,
    watched,
)
from ..results import check_writable
from ..routing import RoutingStats, record_routing
from ..runner import PROG, abort_on_error, add_debug_argument, collective_phase, env_rank, parse_args
from ..shard import model_identity
from ..unread import find_unread_tail
from .api import (
    ClusterModelProvider,
    ClusterResponseGenerator,
    ServeContext,
    describe_address,
    make_http_server,
    model_aliases,
    start_http_server,
)
from .desk import Desk
from .engine import BatchOptions, Engine, Follower
from .status import count_forward_passes, time_experts

__all__ = ["main", "setup_arg_parser"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_TOKENS = 512
DEMO_MODEL_ID = "moe_mpi-demo"

#: Options that only rank 0's HTTP side reads, left out of the start-up
#: fingerprint (moe_mpi.fingerprint.run_fields): a request carries its own
#: max_tokens and sampling parameters to every rank, and the API key is a
#: secret that must not appear in a message. Everything else (the batch
#: sizes, the prompt cache, the guard, --timeout, ...) must be equal.
PER_HOST = {
    name: None
    for name in (
        "host", "port", "api_key", "allowed_origins", "log_level", "max_tokens", "temp", "top_p", "top_k", "min_p",
        "chat_template", "use_default_chat_template", "chat_template_args", "record_routing",
    )
}


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _origins(text: str) -> list:
    return [o.strip() for o in text.split(",") if o.strip()]


def setup_arg_parser() -> argparse.ArgumentParser:
    """Set up and return the argument parser."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} serve",
        description=(
            "Serve an MoE model over an OpenAI-compatible HTTP API, its experts "
            "spread over the MPI ranks. Run with `mpirun -n N`: rank 0 answers "
            "HTTP, every rank steps the same continuous batch."
        ),
    )
    add = parser.add_argument
    add("--model", default=None, help="Local model directory or Hugging Face repo (default: the bundled demo model).")
    add("--host", default=DEFAULT_HOST, help=f"Address rank 0 listens on (default: {DEFAULT_HOST}, this machine only; 0.0.0.0 opens it to the network, see docs/serving.md).")
    add("--port", type=port, default=DEFAULT_PORT, help=f"Port (default: {DEFAULT_PORT}; 0 picks a free one).")
    add_sharding_arguments(parser)  # --mode, --placement, --weights, ...: as moe-mpi generate
    add_data_path_arguments(parser)  # --backend, --overlap: as moe-mpi generate
    add_reliability_arguments(parser)  # --routing-guard, --strict-routing, --timeout: as moe-mpi generate
    add("--api-key", default=None, help="Require 'Authorization: Bearer KEY' (default: the MOE_MPI_API_KEY environment variable, else none).")
    add("--allowed-origins", type=_origins, default=[], help="Comma-separated origins that browsers may call from (CORS); default: none.")
    add("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS, help=f"Default max_tokens of a request (default: {DEFAULT_MAX_TOKENS}).")
    add("--temp", type=non_negative_float, default=0.0, help="Default temperature (default: 0, greedy).")
    add("--top-p", type=unit_interval, default=1.0, help="Default top_p (default: 1).")
    add("--top-k", type=non_negative_int, default=0, help="Default top_k (default: 0, off).")
    add("--min-p", type=probability, default=0.0, help="Default min_p (default: 0, off).")
    add("--decode-concurrency", type=positive_int, default=32, help="Most requests decoded together (default: 32, as mlx_lm.server).")
    add("--prompt-concurrency", type=positive_int, default=8, help="Most prompts prefilled together (default: 8, as mlx_lm.server).")
    add("--prefill-step-size", type=positive_int, default=2048, help="Prompt tokens per prefill chunk (default: 2048).")
    add("--prompt-cache-size", type=non_negative_int, default=10, help="Prompt cache entries, kept on every rank (default: 10; 0: off).")
    add("--prompt-cache-bytes", type=positive_int, default=None, help="Byte limit of the prompt cache (default: none).")
    add("--chat-template", default="", help="A chat template to use instead of the tokenizer's.")
    add("--use-default-chat-template", action="store_true", help="Use the tokenizer's default chat template if it has none.")
    add("--chat-template-args", type=_json_object, default={}, help='JSON arguments for the chat template, e.g. \'{"enable_thinking": false}\'.')
    add("--trust-remote-code", action="store_true", help="Allow the tokenizer's own code.")
    add("--record-routing", metavar="FILE", default=None, help="Write router statistics of the requests served to FILE (docs/balance.md), between bursts of requests and at exit; for --mode auto or --stats on the next start.")
    add("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Rank 0's log level (default: INFO, one line per request).")
    add_debug_argument(parser)
    # What mlx-lm's ModelProvider and ResponseGenerator read of their options.
    parser.set_defaults(adapter_path=None, draft_model=None, pipeline=False, num_draft_tokens=0, kv_bits=None)
    return parser


def _configure_logging(level: str) -> None:
    # Only rank 0 talks to clients; the other ranks would repeat its lines.
    logging.basicConfig(
        level=getattr(logging, level) if env_rank() == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _vocab_size(config: dict, tokenizer) -> int:
    for source in (config, config.get("text_config") or {}):
        if isinstance(source.get("vocab_size"), int):
            return source["vocab_size"]
    return len(tokenizer.vocab)


def _context(args, provider: ClusterModelProvider, model_arg: Optional[str], engine: Engine,
             padded_exact: bool) -> ServeContext:
    import os

    model = provider.model
    info = model.ep_info
    path = provider.model_key[0]
    model_id = model_arg or DEMO_MODEL_ID
    guard = model.routing_guard
    return ServeContext(
        model_id=model_id,
        aliases=model_aliases(model_id, path),
        model_info={
            "id": model_id,
            "path": str(path),
            "mode": info.mode,
            "ranks": info.size,
            "moe_layers": info.num_moe_layers,
            "attention": info.attention,
            "lm_head": info.lm_head,
            "all_reduces_per_forward_pass": info.all_reduces_per_call,  # MoE layers, plus split attentions
            "overlap": bool(args.overlap),
            # Cache types mlx-lm cannot batch (moe_mpi/batching.py): if any, one sequence at a time.
            "unbatchable_caches": engine.unbatchable,
            # Whether prompts of different lengths may be prefilled together (padded); if not, one at a time.
            "padded_prefill_exact": padded_exact,
            "experts_per_rank": info.experts_per_rank(),
            "routing_guard": "off" if guard is None else "strict" if guard.strict else "repair",
            "timeout_seconds": args.timeout,
        },
        config=provider.config,
        vocab_size=_vocab_size(provider.config, provider.tokenizer),
        max_tokens=args.max_tokens,
        api_key=args.api_key or os.environ.get("MOE_MPI_API_KEY") or None,
    )


def _http_failed(desk: Desk):
    def failed(exc: BaseException) -> None:
        desk.http_failure = exc
        desk.inbox.put(None)  # wakes a desk waiting for requests

    return failed


def serve(args: argparse.Namespace, comm: Communicator, watchdog) -> None:
    """Loads the model, starts rank 0's HTTP server and runs the engine (every rank).

    Args:
        args: The parsed command line.
        comm: The job's communicator.
        watchdog: This rank's running :class:`moe_mpi.watchdog.Watchdog`.
    """
    from ..loading import resolve_model_path

    rank0 = comm.rank == 0
    httpd = None
    model_arg = args.model
    with collective_phase(comm, debug=args.debug, name_ranks=False):
        comm = backend_comm(comm, args.backend)
        if rank0:  # fail on a port in use, or an output that cannot be written, before the long load
            check_writable(args.record_routing, "--record-routing")
            httpd = make_http_server(args.host, args.port)
    with collective_phase(comm, debug=args.debug):
        args.model = str(resolve_model_path(model_arg))
        provider = ClusterModelProvider(args, comm)
    # The load of moe-mpi generate: the model's fingerprint, then the guard.
    load_checked(args, comm, watchdog, provider.load_shard)
    with collective_phase(comm, debug=args.debug):
        # Before the counters: its probe runs the model (every rank alike).
        # Routing recorded for statistics must see every layer of every token.
        tail = find_unread_tail(provider.model, comm) if not args.record_routing else None
        # Likewise a probe: whether padding prompts into one prefill changes their answers.
        padded_exact = padded_prefill_is_exact(provider.model, provider.tokenizer.encode(PROBE_TEXT))
        # Timing the experts evaluates each layer twice; --backend mlx keeps a pass one lazy graph.
        timer = None if comm.lazy else time_experts(provider.model)
        count_forward_passes(provider.model)
        lock = threading.Lock()
        generator = ClusterResponseGenerator(provider, lock)
        # Rank 0 waiting for requests is busy, not hung: the other ranks wait
        # in the step's broadcast as long as its heartbeats come.
        desk = Desk(generator.requests, provider.tokenizer, lock, idle_wait=watchdog.busy) if rank0 else Follower()
        options = BatchOptions(
            decode_concurrency=args.decode_concurrency,
            prompt_concurrency=args.prompt_concurrency if padded_exact else 1,
            prefill_step_size=args.prefill_step_size,
            prompt_cache_size=args.prompt_cache_size,
            prompt_cache_bytes=args.prompt_cache_bytes,
            cohorts=2 if args.overlap else 1,
        )
        engine = Engine(provider.model, provider.tokenizer, comm, options, desk, provider.model_key, timer, tail)
        context = _context(args, provider, model_arg, engine, padded_exact)
    if rank0:
        start_http_server(httpd, generator, context, on_failure=_http_failed(desk))
        info = context.model_info
        # Shown at every --log-level (bench serve reads the URL from it), as
        # what it is: news, not a warning.
        ready = logging.getLogger("moe_mpi.serve")
        ready.setLevel(logging.INFO)
        ready.info(
            "%s serve: %s on %d rank(s), mode %s, at %s (Ctrl-C or SIGTERM to mpirun stops every rank)",
            PROG, context.model_id, info["ranks"], info["mode"], describe_address(httpd),
        )
        if not info["padded_prefill_exact"]:
            ready.warning(
                "%s serve: padding prompts into one prefill changes this model's answers (a cache takes the "
                "padding in): prompts are prefilled one at a time, and still decoded together", PROG,
            )
        if info["unbatchable_caches"]:
            ready.warning(
                "%s serve: mlx-lm cannot batch this model's caches (%s): requests are served one at a time%s, "
                "as mlx_lm.server serves them",
                PROG, ", ".join(info["unbatchable_caches"]), " per cohort" if args.overlap else "",
            )
    comm.reset_stats()
    stats = RoutingStats.for_model(provider.model) if args.record_routing and rank0 else None
    hooks = [_routing_saver(args.record_routing, stats, context.model_info, provider.model)]
    hooks.append(_guard_reporter(provider.model.routing_guard) if rank0 else None)
    hooks = [hook for hook in hooks if hook is not None]

    def on_idle() -> None:
        for hook in hooks:
            hook()

    with record_routing(provider.model if stats is not None else None, stats):
        engine.run(on_idle=on_idle)
    on_idle()


def _routing_saver(path: Optional[str], stats: Optional[RoutingStats], info: dict, model):
    """Rank 0 with ``--record-routing``: saves the statistics when they have grown; else None."""
    if stats is None:
        return None
    saved = [0]
    target = [path]
    identity = model_identity(model)  # so that --stats can tell this model from another

    def save() -> None:
        if stats.tokens[0] != saved[0]:
            try:
                stats.save(target[0], model={"path": info["path"], "ranks": info["ranks"], "mode": info["mode"]},
                           identity=identity)
            except UserError as e:
                # A full disk must not end the server: say where the statistics
                # went, and keep saving there.
                logging.error("%s: error: %s", PROG, e)
                if getattr(e, "rescued", None) is None:
                    return
                target[0] = e.rescued
            saved[0] = stats.tokens[0]

    return save


def _guard_reporter(guard):
    """Rank 0: logs the routing guard's repairs when there are new ones (between bursts); None without a guard."""
    if guard is None:
        return None
    reported = [0]

    def report() -> None:
        if guard.repairs != reported[0]:
            logging.warning("%s: warning: %s", PROG, guard_warning(guard))
            reported[0] = guard.repairs

    return report


def _validate(parser: argparse.ArgumentParser):
    def validate(args: argparse.Namespace) -> None:
        check_reliability_arguments(parser, args)

    return validate


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Runs ``moe-mpi serve`` with ``argv`` (default ``sys.argv[1:]``)."""
    parser = setup_arg_parser()
    args = parse_args(parser, argv, validate=_validate(parser))
    _configure_logging(args.log_level)
    comm = Communicator()
    with abort_on_error(comm, debug=args.debug), watched(comm, args, PER_HOST) as watchdog:
        serve(args, comm, watchdog)
