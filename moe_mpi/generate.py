"""``moe-mpi generate``: text generation with the experts spread over MPI ranks.

Run it on N ranks (or alone, N = 1)::

    mpirun -n 2 moe-mpi generate --model PATH_OR_REPO --prompt "Hello"
    echo "Hello" | mpirun -n 2 moe-mpi generate --prompt -
    mpirun -n 2 moe-mpi generate --prompts-file prompts.jsonl --output results.jsonl

Every rank runs the same command line. Each rank loads the replicated dense
part of the model and only its own experts; mlx-lm's own generation loop
(``mlx_lm.generate.stream_generate``, or ``BatchGenerator`` in batch mode)
runs unchanged on every rank, and the sharded MoE blocks do one all-reduce
per layer. The logits are then identical on every rank, so every rank picks
the same next token: greedy decoding trivially, and sampling because every
rank seeds MLX's generator with the same ``--seed`` before generating.
``--check-consistency`` verifies that after every step.

Only rank 0 writes: the generated text to stdout (nothing else goes to
stdout), statistics (``--verbose``), progress and errors to stderr.

Prompts are read and encoded as ``mlx_lm.generate`` does it (chat
template, ``--system-prompt``, ``--ignore-chat-template``, ``--prompt -``
for stdin): see :mod:`moe_mpi.prompts`.

Batch mode (``--prompts-file``) reads a JSONL file of ``{"id": ...,
"prompt": "..."}`` rows, generates ``--batch-size`` prompts at a time with
mlx-lm's ``BatchGenerator`` (``batch_generate``'s loop) and appends one row
per prompt to ``--output``, durably after every batch, so that rerunning an
interrupted command resumes it (the row format and the resume rules:
:mod:`moe_mpi.results`). A model whose caches mlx-lm cannot batch
generates its prompts one at a time, and one whose answers a padded
prefill would change prefills them one at a time (:mod:`moe_mpi.batching`,
found at start-up). Rank 0
shows a progress bar on a terminal's stderr and always ends with a summary
line. Greedy rows are the text single-prompt mode gives for the same prompt
(tested; in general a batched forward pass rounds differently and could
flip a near-tie between two tokens, as in mlx-lm itself); with ``--temp >
0`` the draws depend on which prompts share a batch, so a resumed run
samples its remaining prompts differently from an uninterrupted one.

Errors (see :mod:`moe_mpi.runner`): all input (options, prompt, prompts
file, output file, model files, placement, prompt lengths against the
model's context) is checked in collective phases before generating, so bad
input gives one ``moe-mpi: error: ...`` line and every rank exits with code
1. So does a model whose logits stop being finite (NaN or infinite weights,
or an overflow): each drawn token is checked (:mod:`moe_mpi.finite`), and
the text stops before the first token drawn from such logits; in batch mode
that batch is not written and the error names the prompt. An unexpected
error during generation aborts all ranks (``MPI_Abort``) after the failing
rank prints its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .argtypes import add_sharding_arguments, non_negative_float, positive_int, seed, sharding_options, unit_interval
from .batching import PROBE_TEXT, padded_prefill_is_exact, solo_caches, unbatchable_caches
from .comm import Communicator
from .errors import CollectiveError
from .finite import drawn_is_finite, non_finite_message
from .prompts import (
    DEFAULT_PROMPT,
    STDIN_IDLE_SECONDS,
    check_prompt_length,
    detokenize,
    encode_prompt,
    read_prompt_argument,
    read_prompts_file,
)
from .results import Progress, ResultWriter, check_writable, id_key, result_row, scan_results_file
from .overlap import Cohorts
from .reliability import (
    add_data_path_arguments,
    add_reliability_arguments,
    backend_comm,
    check_reliability_arguments,
    load_checked,
    watched,
)
from .runner import PROG, abort_on_error, add_debug_argument, collective_phase, parse_args, say, show_progress
from .runstats import make_sampler, print_stats, report_guard, report_stats
from .unread import UnreadTail, find_unread_tail, prefill_cache, skip_unread_prefill
from .watchdog import Watchdog

DEFAULT_MAX_TOKENS = 100
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_SEED = 0
DEFAULT_BATCH_SIZE = 8

# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def setup_arg_parser() -> argparse.ArgumentParser:
    """Set up and return the argument parser."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} generate",
        description=(
            "Generate text with a Mixture-of-Experts model whose experts are "
            "spread over the MPI ranks. Run with `mpirun -n N`; every rank "
            "runs the same command line and rank 0 prints the text."
        ),
    )
    parser.add_argument(
        "--model",
        type=str,
        default=None,
        help=(
            "The path to the local model directory or Hugging Face repo. "
            "Default: the bundled demo model (moe_mpi/demo_model)."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--prompt",
        "-p",
        default=None,
        help=(
            "Message to be processed by the model ('-' reads from stdin, dropping one "
            "trailing newline (\\n or \\r\\n) as echo adds; under "
            f"mpirun, which does not forward end-of-file, up to {STDIN_IDLE_SECONDS:g} s "
            f"of silence). Default: {DEFAULT_PROMPT!r}."
        ),
    )
    source.add_argument(
        "--prompts-file",
        type=str,
        default=None,
        help=(
            'Batch mode: a JSONL file of {"id": ..., "prompt": "..."} rows '
            "(id optional, default: the line number). Needs --output."
        ),
    )
    parser.add_argument(
        "--output",
        "-o",
        type=str,
        default=None,
        help=(
            "Batch mode: the JSONL file results are appended to. Ids already "
            "in it are skipped, so rerunning an interrupted command resumes it."
        ),
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"Batch mode: prompts generated together (default: {DEFAULT_BATCH_SIZE}).",
    )
    parser.add_argument(
        "--max-tokens",
        "-m",
        type=positive_int,
        default=DEFAULT_MAX_TOKENS,
        help=f"Maximum number of tokens to generate (default: {DEFAULT_MAX_TOKENS}).",
    )
    parser.add_argument(
        "--temp",
        type=non_negative_float,
        default=DEFAULT_TEMP,
        help="Sampling temperature; 0 is greedy (default: 0).",
    )
    parser.add_argument(
        "--top-p", type=unit_interval, default=DEFAULT_TOP_P, help="Sampling top-p (default: 1)."
    )
    parser.add_argument(
        "--seed",
        type=seed,
        default=DEFAULT_SEED,
        help=(
            "PRNG seed, the same on every rank so that all ranks draw the "
            f"same tokens (default: {DEFAULT_SEED})."
        ),
    )
    add_sharding_arguments(parser)
    parser.add_argument(
        "--system-prompt",
        default=None,
        help="System prompt to be used for the chat template.",
    )
    parser.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="Use the raw prompt without the tokenizer's chat template.",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=(
            "Print statistics to stderr: prompt and generation tokens/s, peak "
            "memory of every rank, collectives per generated token."
        ),
    )
    add_data_path_arguments(parser)  # --backend, --overlap (batch mode)
    parser.add_argument(
        "--check-consistency",
        action="store_true",
        help=(
            "After every generation step, check that all ranks drew the same "
            "tokens (one extra small allgather per step); exit with an error "
            "if not. For checking a cluster, e.g. of different machines."
        ),
    )
    add_reliability_arguments(parser)  # --routing-guard, --strict-routing, --timeout: as moe-mpi serve
    parser.add_argument(
        "--record-routing",
        metavar="FILE",
        default=None,
        help=(
            "Write router statistics of this run to FILE (JSON, docs/balance.md): per MoE "
            "layer, how often each expert was chosen. For --mode auto or --stats. In batch "
            "mode --output may then be left out."
        ),
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "Progress bars on rank 0's stderr: loading (shares over 1 GiB) and "
            "batch mode. Default: on when stderr is a terminal or under mpirun."
        ),
    )
    add_debug_argument(parser)
    return parser


def _validate(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    def validate(args: argparse.Namespace) -> None:
        if args.prompts_file is not None and args.output is None and args.record_routing is None:
            parser.error("--prompts-file needs --output (the results file) or --record-routing")
        if args.output is not None and args.prompts_file is None:
            parser.error("--output is for batch mode: use it with --prompts-file")
        if args.overlap and args.prompts_file is None:
            parser.error("--overlap is for batch mode (--prompts-file): one prompt has no second batch to overlap with")
        check_reliability_arguments(parser, args)

    return validate


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------


def _seed(seed: int) -> None:
    import mlx.core as mx

    # The same seed on every rank, right before generating: the logits are
    # identical on every rank, so identical generator states give identical
    # draws, whatever random numbers loading may have used before.
    mx.random.seed(seed)


def _load(args: argparse.Namespace, comm, watchdog: Watchdog):
    """Loads this rank's shard and checks it against the others' (collective; see :func:`load_checked`)."""
    from .loading import load

    return load_checked(args, comm, watchdog, lambda: load(
        args.model, comm=comm, return_config=True, progress=args.progress, **sharding_options(args)
    ))


def _model_name(args: argparse.Namespace) -> str:
    from .loading import demo_model_path

    return str(args.model or demo_model_path())


def _describe_model(model, comm, model_name: str) -> str:
    info = model.ep_info
    return (
        f"Model: {model_name}; {comm.size} rank(s), mode {info.mode}"
        + (f", attention split by heads ({info.attention_layers} modules)" if info.attention == "split" else "")
        + "".join(f"; kept whole: {why}" for why in info.attention_kept)
        + (f", LM head split by vocabulary rows ({info.lm_head_path})" if info.lm_head == "split" else "")
        + f", {info.num_moe_layers} MoE layers, "
        f"experts per rank: {', '.join(info.experts_per_rank())}"
    )


@contextlib.contextmanager
def _recording(args: argparse.Namespace, model, rank0: bool):
    """Rank 0 records the routing while open, with ``--record-routing``; yields the statistics or None."""
    from .routing import RoutingStats, record_routing

    stats = RoutingStats.for_model(model) if args.record_routing else None
    with record_routing(model if stats is not None and rank0 else None, stats):
        yield stats


def _save_routing(args: argparse.Namespace, model, comm, stats) -> None:
    """Rank 0 writes ``--record-routing``; collective."""
    if stats is None:
        return
    with collective_phase(comm, debug=args.debug, name_ranks=False):
        if comm.rank == 0:
            from .shard import model_identity

            info = model.ep_info
            stats.save(args.record_routing, model={
                "path": _model_name(args), "model_type": getattr(model, "model_type", None),
                "ranks": info.size, "mode": info.mode,
            }, identity=model_identity(model))  # so that --stats can tell this model from another
            print_stats([f"{PROG}: router statistics of {stats.tokens[0]} tokens written to {args.record_routing}"])


def generate_one(args: argparse.Namespace, comm: Communicator, watchdog: Watchdog) -> None:
    """Single-prompt mode: rank 0 streams the text to stdout."""
    debug = args.debug
    # Only rank 0 reads (stdin goes to rank 0 alone): no "(on rank 0)".
    with collective_phase(comm, debug=debug, name_ranks=False):
        comm = backend_comm(comm, args.backend)
        with watchdog.busy():  # stdin may take its time
            text = read_prompt_argument(args.prompt) if comm.rank == 0 else None
        if comm.rank == 0:
            check_writable(args.record_routing, "--record-routing")
    # After the phase: if rank 0 could not read stdin, all ranks left above.
    text = comm.bcast(text)

    model, tokenizer, config = _load(args, comm, watchdog)
    with collective_phase(comm, debug=debug):
        prompt = encode_prompt(
            tokenizer,
            text,
            system_prompt=args.system_prompt,
            ignore_chat_template=args.ignore_chat_template,
        )
        check_prompt_length(len(prompt), config)
        # Recorded routing must see every layer of every prompt token.
        tail = find_unread_tail(model, comm) if not args.record_routing else None

    from mlx_lm.generate import stream_generate

    rank0 = comm.rank == 0
    if args.verbose and rank0:
        print_stats([_describe_model(model, comm, _model_name(args))])
    sampler, check = make_sampler(args, comm)
    _seed(args.seed)
    comm.reset_stats()
    response = None
    with _recording(args, model, rank0) as stats:
        # The prompt but its last token, in chunks that leave out the work nobody reads.
        tic = time.perf_counter()
        cache = prefill_cache(model, prompt, tail)
        prefill_seconds = time.perf_counter() - tic
        for response in stream_generate(
            model, tokenizer, prompt[-1:], max_tokens=args.max_tokens, sampler=sampler, prompt_cache=cache
        ):
            if not drawn_is_finite(response.logprobs, response.token):
                # Every rank has the same logits, so every rank stops here, before any garbage is printed.
                if rank0 and response.generation_tokens > 1:
                    sys.stdout.write("\n")  # end the text so far
                    sys.stdout.flush()
                raise CollectiveError(non_finite_message(response.generation_tokens))
            if rank0:
                sys.stdout.write(response.text)
                sys.stdout.flush()
    snapshot = comm.snapshot()
    _save_routing(args, model, comm, stats)
    if rank0:
        sys.stdout.write("\n")
        sys.stdout.flush()
    report_guard(model, comm)
    report_stats(
        args,
        model,
        comm,
        snapshot,
        [
            f"Prompt: {len(prompt)} tokens, "
            f"{len(prompt) / (prefill_seconds + response.prompt_tokens / response.prompt_tps):.3f} tokens-per-sec",
            f"Generation: {response.generation_tokens} tokens, "
            f"{response.generation_tps:.3f} tokens-per-sec",
        ],
        response.generation_tokens,
        check,
        tail,
    )


def _batch_plan(args: argparse.Namespace, comm: Communicator, watchdog: Watchdog) -> Dict:
    """The prompts still to do and the output's repair, read by rank 0 only.

    On several hosts only rank 0's copies of the files matter; the other
    ranks get the plan by broadcast after the phase, so that a rank-0
    failure cannot strand them in the ``bcast``.
    """
    plan = None
    with collective_phase(comm, debug=args.debug, name_ranks=False), watchdog.busy():
        if comm.rank == 0:
            check_writable(args.record_routing, "--record-routing")
            rows = read_prompts_file(args.prompts_file)
            done, repair = scan_results_file(args.output, args.prompts_file) if args.output else (set(), None)
            todo = [r for r in rows if id_key(r["id"]) not in done]
            plan = {"todo": todo, "total": len(rows), "repair": repair}
    return comm.bcast(plan)


def _encode_rows(args: argparse.Namespace, tokenizer, config: Dict, rows: List[Dict]) -> List[List[int]]:
    """Token ids of every prompt row, each checked against the model's context."""
    tokens = []
    for row in rows:
        ids = encode_prompt(
            tokenizer,
            row["prompt"],
            system_prompt=args.system_prompt,
            ignore_chat_template=args.ignore_chat_template,
        )
        what = f"{args.prompts_file}, line {row['line']} (id {row['id']!r}): the prompt"
        check_prompt_length(len(ids), config, what)
        tokens.append(ids)
    return tokens


def _generate_batches(
    args: argparse.Namespace,
    model,
    tokenizer,
    rows: List[Dict],
    tokens: List[List[int]],
    sampler: Callable,
    rank0: bool,
    writer: Optional[ResultWriter],
    progress: Optional[Progress],
    tail: Optional[UnreadTail] = None,
    overlap_comm=None,
    padded_exact: bool = True,
) -> Tuple[int, int]:
    """Generates ``--batch-size`` rows at a time; rank 0 writes each batch.

    Returns:
        ``(prompt_tokens, generated_tokens)`` over all rows.

    Raises:
        CollectiveError: A row's logits were not finite (on every rank
            alike); its batch is not written.
    """
    prompt_tokens = generated = 0
    for start in range(0, len(rows), args.batch_size):
        batch_rows = rows[start : start + args.batch_size]
        batch = tokens[start : start + args.batch_size]
        tic = time.perf_counter()
        outputs = _batch_tokens(model, tokenizer, batch, args.max_tokens, sampler, batch_rows, tail,
                                overlap_comm=overlap_comm, padded_exact=padded_exact)
        seconds = time.perf_counter() - tic
        new_tokens = sum(len(t) for t in outputs)
        prompt_tokens += sum(len(t) for t in batch)
        generated += new_tokens
        if writer is not None:
            writer.write(
                [
                    result_row(row, detokenize(tokenizer, out), len(ids), len(out), seconds)
                    for row, ids, out in zip(batch_rows, batch, outputs)
                ]
            )
        if progress is not None:
            progress.update(len(batch_rows), new_tokens)
    return prompt_tokens, generated


def _batch_tokens(model, tokenizer, prompts: List[List[int]], max_tokens: int, sampler: Callable,
                  rows: List[Dict], tail: Optional[UnreadTail] = None, overlap_comm=None,
                  padded_exact: bool = True) -> List[List[int]]:
    """The generated token ids of each prompt, decoded together: mlx-lm's ``batch_generate``.

    Its loop, so that each drawn token is seen with its log-probabilities
    and checked (:mod:`moe_mpi.finite`); ``batch_generate`` returns only the
    tokens. The stop token is not kept, as there. With ``overlap_comm``
    (``--overlap``), the prompts go to two cohorts whose all-reduces overlap
    (:mod:`moe_mpi.overlap`).
    """
    from mlx_lm.generate import BatchGenerator

    # The whole batch is prefilled and decoded together, unless mlx-lm cannot
    # batch the model's caches (one prompt at a time, one per cohort), or
    # padding changes the model's answers (prefilled one at a time).
    together = prefill = len(prompts)
    caches = None
    if unbatchable_caches(model):
        together = prefill = 1 if overlap_comm is None else 2
        caches = [solo_caches(model) for _ in prompts]
    elif not padded_exact:
        prefill = 1 if overlap_comm is None else 2
    sizes = dict(stop_tokens=[[t] for t in tokenizer.eos_token_ids], sampler=sampler,
                 prefill_batch_size=prefill, completion_batch_size=together)
    if overlap_comm is not None:
        gen = Cohorts(model, overlap_comm, 2, **sizes)
        gen.skip_unread_prefill(tail)  # prompt chunks leave out the work nobody reads
    else:
        gen = BatchGenerator(model, **sizes)
        skip_unread_prefill(gen, tail)
    try:
        uids = gen.insert(prompts, [max_tokens] * len(prompts), caches=caches)
        out: Dict[int, List[int]] = {uid: [] for uid in uids}
        while responses := gen.next_generated():
            for r in responses:
                if not drawn_is_finite(r.logprobs, r.token):
                    row = rows[uids.index(r.uid)]
                    # The same logits on every rank: every rank raises here.
                    raise CollectiveError(
                        f"prompt id {row['id']!r} (line {row['line']}): {non_finite_message(len(out[r.uid]) + 1)}"
                    )
                if r.finish_reason != "stop":
                    out[r.uid].append(r.token)
    finally:
        gen.close()
    return [out[uid] for uid in uids]


def generate_batch(args: argparse.Namespace, comm: Communicator, watchdog: Watchdog) -> None:
    """Batch mode: prompts file in, results file out (written by rank 0)."""
    debug = args.debug
    rank0 = comm.rank == 0
    with collective_phase(comm, debug=debug, name_ranks=False):
        comm = backend_comm(comm, args.backend)
    plan = _batch_plan(args, comm, watchdog)
    todo, total = plan["todo"], plan["total"]
    skipped = total - len(todo)
    if not todo:
        if rank0:
            print_stats(
                [f"{PROG}: all {total} prompts of {args.prompts_file} are already in {args.output}"]
            )
        return

    model, tokenizer, config = _load(args, comm, watchdog)
    writer = None
    with collective_phase(comm, debug=debug):
        tokens = _encode_rows(args, tokenizer, config, todo)
        if rank0 and args.output:
            writer = ResultWriter(args.output, plan["repair"])

    if args.verbose and rank0:
        print_stats([_describe_model(model, comm, _model_name(args))])
    sampler, check = make_sampler(args, comm)
    progress = Progress(len(todo), show=show_progress(args.progress)) if rank0 else None
    # Recorded routing must see every layer of every prompt token.
    with collective_phase(comm, debug=debug):
        tail = find_unread_tail(model, comm) if not args.record_routing else None
        # Prompts of different lengths are padded into one prefill, unless that changes their answers.
        padded_exact = padded_prefill_is_exact(model, tokenizer.encode(PROBE_TEXT))
    if rank0 and not padded_exact and args.batch_size > 1:
        say(f"{PROG}: padding prompts into one prefill changes this model's answers: "
            "prompts are prefilled one at a time, and still decoded together", sys.stderr)
    _seed(args.seed)
    comm.reset_stats()
    with _recording(args, model, rank0) as stats:
        prompt_tokens, generated = _generate_batches(
            args, model, tokenizer, todo, tokens, sampler, rank0, writer, progress, tail,
            overlap_comm=comm if args.overlap else None, padded_exact=padded_exact,
        )
    snapshot = comm.snapshot()
    _save_routing(args, model, comm, stats)
    report_guard(model, comm)
    if rank0:
        if writer is not None:
            writer.close()
        already = f", {skipped} already there" if skipped else ""
        wrote = f"wrote {len(todo)} results to {args.output}{already}" if writer is not None else (
            f"generated for {len(todo)} prompts"
        )
        progress.close(
            f"{PROG}: {wrote}; {generated} tokens in {progress.seconds:.1f} s "
            f"({progress.tokens_per_second:.1f} tokens-per-sec)"
        )
    report_stats(
        args,
        model,
        comm,
        snapshot,
        [f"Prompt: {prompt_tokens} tokens; Generation: {generated} tokens"],
        generated,
        check,
        tail,
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Runs ``moe-mpi generate`` with ``argv`` (default ``sys.argv[1:]``)."""
    parser = setup_arg_parser()
    args = parse_args(parser, argv, validate=_validate(parser))
    comm = Communicator()
    with abort_on_error(comm, debug=args.debug), watched(comm, args) as watchdog:
        if args.prompts_file is not None:
            generate_batch(args, comm, watchdog)
        else:
            generate_one(args, comm, watchdog)


if __name__ == "__main__":
    main()
