"""``moe-mpi generate``: text generation with the experts spread over MPI ranks.

Run it on N ranks (or alone, N = 1)::

    mpirun -n 2 moe-mpi generate --model PATH_OR_REPO --prompt "Hello"
    echo "Hello" | mpirun -n 2 moe-mpi generate --prompt -
    mpirun -n 2 moe-mpi generate --prompts-file prompts.jsonl --output results.jsonl

Every rank runs the same command line. Each rank loads the replicated dense
part of the model and only its own experts; mlx-lm's own generation loop
(``mlx_lm.generate.stream_generate``, or ``batch_generate`` in batch mode)
runs unchanged on every rank, and the sharded MoE blocks do one all-reduce
per layer. The logits are then identical on every rank, so every rank picks
the same next token: greedy decoding trivially, and sampling because every
rank seeds MLX's generator with the same ``--seed`` before generating.
``--check-consistency`` verifies that after every step.

Only rank 0 writes: the generated text to stdout (nothing else goes to
stdout), statistics (``--verbose``), progress and errors to stderr.

Prompt handling follows ``mlx_lm.generate``: the tokenizer's chat template
is applied when it has one (``--system-prompt`` adds a system message),
``--ignore-chat-template`` uses the raw text, and ``--prompt -`` reads the
prompt from stdin (rank 0 reads it, which is where ``mpirun`` forwards
stdin, and broadcasts it; Open MPI 5's ``mpirun`` never forwards the end of
file, so there the prompt ends after a second of silence, see
:func:`read_stdin`).

Batch mode (``--prompts-file``) reads a JSONL file of ``{"id": ...,
"prompt": "..."}`` rows (``id`` optional, default: the line number),
generates ``--batch-size`` prompts at a time with mlx-lm's
``batch_generate`` and appends one row per prompt to ``--output``::

    {"id", "prompt", "text", "prompt_tokens", "generation_tokens", "seconds"}

``generation_tokens`` counts the tokens of ``text`` (a final end-of-sequence
token is not part of it) and ``seconds`` is the wall time of the batch the
prompt was in. Rows are flushed and fsync'd after every batch, so an
interrupted run loses at most the batch in progress, and running the same
command again skips the ids already in the output (a partially written last
line, from a crash, is dropped and regenerated). Greedy rows are the text
single-prompt mode gives for the same prompt (tested; in general a batched
forward pass rounds differently and could flip a near-tie between two
tokens, as in mlx-lm itself); with ``--temp > 0`` the draws
depend on which prompts share a batch, so a resumed run samples its
remaining prompts differently from an uninterrupted one.

Errors (see :mod:`moe_mpi.runner`): all input (options, prompt, prompts
file, output file, model files, placement, prompt lengths against the
model's context) is checked in collective phases before generating, so bad
input gives one ``moe-mpi: error: ...`` line and every rank exits with code
1. An unexpected error during generation aborts all ranks (``MPI_Abort``)
after the failing rank prints its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .argtypes import float_list, non_negative_float, positive_int, unit_interval
from .comm import BACKENDS, Communicator
from .errors import CollectiveError, UserError
from .runner import PROG, abort_on_error, add_debug_argument, collective_phase, parse_args

DEFAULT_PROMPT = "hello"  # as mlx_lm.generate
DEFAULT_MAX_TOKENS = 100
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_SEED = 0
DEFAULT_BATCH_SIZE = 8
DEFAULT_PLACEMENT = "contiguous"

#: Under mpirun, the stdin prompt ends after this many quiet seconds (see
#: read_stdin), and must start arriving within STDIN_FIRST_SECONDS.
STDIN_IDLE_SECONDS = 1.0
STDIN_FIRST_SECONDS = 10.0

#: config.json keys that give a model's context length, in order of preference.
CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length")


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
            "Message to be processed by the model ('-' reads from stdin; under "
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
        type=int,
        default=DEFAULT_SEED,
        help=(
            "PRNG seed, the same on every rank so that all ranks draw the "
            f"same tokens (default: {DEFAULT_SEED})."
        ),
    )
    parser.add_argument(
        "--placement",
        default=DEFAULT_PLACEMENT,
        help=(
            "Which rank owns which experts: 'contiguous' (default), "
            "'round-robin' or a JSON placement file."
        ),
    )
    parser.add_argument(
        "--weights",
        type=float_list,
        default=None,
        help=(
            "Relative share of the experts per rank for contiguous placement, "
            "one number per rank, e.g. 2,1,1 (a faster machine takes more)."
        ),
    )
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
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="mpi4py",
        help="Data path of the per-layer all-reduce (default: mpi4py).",
    )
    parser.add_argument(
        "--check-consistency",
        action="store_true",
        help=(
            "After every generation step, check that all ranks drew the same "
            "tokens (one extra small allgather per step); exit with an error "
            "if not. For checking a cluster, e.g. of different machines."
        ),
    )
    add_debug_argument(parser)
    return parser


def _validate(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    def validate(args: argparse.Namespace) -> None:
        if args.prompts_file is not None and args.output is None:
            parser.error("--prompts-file needs --output (the results file)")
        if args.output is not None and args.prompts_file is None:
            parser.error("--output is for batch mode: use it with --prompts-file")

    return validate


# --------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------


def _under_launcher() -> bool:
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK"))


def read_stdin(
    idle_seconds: float = STDIN_IDLE_SECONDS, first_seconds: float = STDIN_FIRST_SECONDS
) -> str:
    """All of stdin as text; under ``mpirun``, up to a pause instead of EOF.

    Alone, this is ``sys.stdin.read()``. Under a launcher it cannot be:
    Open MPI 5.0's ``mpirun`` forwards stdin to rank 0 but never forwards
    the end of file (a PMIx bug, fixed upstream in openpmix PR #4024), so a
    read to EOF would wait forever. There the prompt ends when stdin has
    been quiet for ``idle_seconds`` after data arrived (or at a real EOF),
    and nothing arriving within ``first_seconds`` is an error, not a hang.

    Raises:
        UserError: Nothing arrived in time, or the bytes are not UTF-8.
    """
    if not _under_launcher():
        return sys.stdin.read()
    import select

    fd = sys.stdin.fileno()
    chunks: List[bytes] = []
    timeout = first_seconds
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            if not chunks:
                raise UserError(
                    f"--prompt -: nothing arrived on stdin within {first_seconds:g} s"
                )
            break
        data = os.read(fd, 1 << 16)
        if not data:  # a launcher that does forward EOF
            break
        chunks.append(data)
        timeout = idle_seconds
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt -: stdin is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_prompt_argument(prompt: Optional[str]) -> str:
    """The prompt text of ``--prompt`` as ``mlx_lm.generate`` reads it.

    ``\\n`` and ``\\t`` escapes in the argument become newline and tab; ``-``
    reads stdin (taken as is, see :func:`read_stdin`).
    """
    if prompt is None:
        return DEFAULT_PROMPT
    if prompt == "-":
        return read_stdin()
    return prompt.replace("\\n", "\n").replace("\\t", "\t")


def encode_prompt(
    tokenizer,
    text: str,
    *,
    system_prompt: Optional[str] = None,
    ignore_chat_template: bool = False,
) -> List[int]:
    """Token ids of a prompt, exactly as ``mlx_lm.generate`` makes them.

    With a chat template (and not ``ignore_chat_template``) the text becomes
    a user message (after an optional system message) and the template adds
    the generation prompt; special tokens then come from the template only.
    Without, the raw text is encoded with the tokenizer's special tokens.
    """
    use_chat_template = not ignore_chat_template and tokenizer.has_chat_template
    if use_chat_template:
        messages = []
        if system_prompt is not None:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": text})
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    return list(tokenizer.encode(text, add_special_tokens=not use_chat_template))


def context_length(config: Dict[str, Any]) -> Optional[Tuple[str, int]]:
    """``(key, value)`` of the model's context length in ``config``, or None."""
    for key in CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def check_prompt_length(num_tokens: int, config: Dict[str, Any], what: str = "the prompt") -> None:
    """Raises a :class:`UserError` for an empty prompt or one over the context."""
    if num_tokens == 0:
        raise UserError(f"{what} is empty (0 tokens)")
    context = context_length(config)
    if context is not None and num_tokens > context[1]:
        key, value = context
        raise UserError(
            f"{what} has {num_tokens} tokens, more than the model's context "
            f"of {value} tokens ({key} in config.json)"
        )


def detokenize(tokenizer, tokens: Sequence[int]) -> str:
    """Text of generated ``tokens``, exactly as ``stream_generate`` builds it.

    mlx-lm's ``batch_generate`` returns ``tokenizer.decode(tokens)``, which
    can differ from the streamed text (the streaming detokenizer trims the
    leading space of the first token); using the same detokenizer here makes
    a batch row's text equal to what single-prompt mode prints.
    """
    detokenizer = tokenizer.detokenizer  # a fresh copy
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


def _id_key(row_id: Any) -> str:
    # JSON text as the identity, so that the id 1 and the id "1" differ.
    return json.dumps(row_id)


def read_prompts_file(path: str) -> List[Dict[str, Any]]:
    """Reads and validates a whole JSONL prompts file.

    Returns:
        Rows ``{"id", "prompt", "line"}`` in file order. Blank lines are
        skipped; a row's default id is its line number (from 1).

    Raises:
        UserError: Unreadable file, a line that is not a JSON object with a
            string ``prompt``, an id that is not a string or an integer, a
            duplicate id, or no prompts at all.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    seen: Dict[str, int] = {}
    # Split on "\n" only: str.splitlines() would also split inside JSON
    # strings that contain U+2028 or other Unicode line breaks.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(
                f'{where}: expected a JSON object like {{"id": 1, "prompt": "..."}}, '
                f"got {type(obj).__name__}"
            )
        if "prompt" not in obj:
            raise UserError(f'{where}: no "prompt" key')
        if not isinstance(obj["prompt"], str):
            raise UserError(f'{where}: "prompt" must be a string, got {type(obj["prompt"]).__name__}')
        row_id = obj.get("id", number)
        if isinstance(row_id, bool) or not isinstance(row_id, (int, str)):
            raise UserError(f'{where}: "id" must be a string or an integer, got {row_id!r}')
        if isinstance(row_id, int) and not -(2**63) <= row_id < 2**63:
            raise UserError(f'{where}: "id" {row_id} does not fit in 64 bits')
        key = _id_key(row_id)
        if key in seen:
            raise UserError(f"{where}: duplicate id {row_id!r} (first on line {seen[key]})")
        seen[key] = number
        rows.append({"id": row_id, "prompt": obj["prompt"], "line": number})
    if not rows:
        raise UserError(f"{path}: no prompts (the file is empty)")
    return rows


def scan_results_file(path: str, prompts_path: str) -> Tuple[set, Optional[Tuple[str, int]]]:
    """The ids already in an output file, and the repair its end needs.

    Returns:
        ``(done, repair)``: the id keys of complete rows, and ``None``,
        ``("truncate", offset)`` (drop a partially written last line) or
        ``("newline", 0)`` (a complete last row without its newline).

    Raises:
        UserError: The output is the prompts file, its directory does not
            exist, or a line other than the last is not a result row.
    """
    out = Path(path)
    if out.is_dir():
        raise UserError(f"--output {path} is a directory")
    if not out.exists():
        parent = out.parent
        if not parent.is_dir():
            raise UserError(f"--output {path}: directory {str(parent)!r} does not exist")
        if not os.access(parent, os.W_OK):
            raise UserError(f"--output {path}: directory {str(parent)!r} is not writable")
        return set(), None
    if Path(prompts_path).exists() and out.samefile(prompts_path):
        raise UserError(f"--output {path} is the prompts file itself")
    if not os.access(out, os.W_OK):
        raise UserError(f"--output {path} is not writable")
    data = out.read_bytes()
    lines = data.split(b"\n")
    done = set()
    offset = 0
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        if last and raw == b"":  # the file ends with a newline
            return done, None
        row = None
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        if isinstance(row, dict) and "id" in row:
            done.add(_id_key(row["id"]))
        elif last:
            # The unterminated tail of a run that died mid-write: drop it.
            return done, ("truncate", offset)
        elif raw.strip():
            raise UserError(
                f'{path}, line {number}: not a result row (a JSON object with an "id"); '
                "fix or remove that line, or choose another --output"
            )
        offset += len(raw) + 1
    # A complete row without its newline (e.g. written by hand).
    return done, ("newline", 0)


class ResultWriter:
    """Appends result rows to the output file, durably, batch by batch."""

    def __init__(self, path: str, repair: Optional[Tuple[str, int]]):
        if repair is not None and repair[0] == "truncate":
            os.truncate(path, repair[1])
        self._file = open(path, "a", encoding="utf-8")
        if repair is not None and repair[0] == "newline":
            self._file.write("\n")
        self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, rows: Sequence[Dict[str, Any]]) -> None:
        """Writes ``rows`` (one JSON line each), flushed and fsync'd."""
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        # fsync: an interrupted run (or a crashed machine) keeps every
        # finished batch, so a rerun only redoes the batch in progress.
        self._sync()

    def close(self) -> None:
        """Closes the file."""
        self._file.close()


class Progress:
    """A one-line progress bar on a TTY stderr (rank 0), plus a summary line."""

    def __init__(self, total: int, stream=None, width: int = 30):
        self.total = total
        self.done = 0
        self.tokens = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._draw()

    def update(self, prompts: int, tokens: int) -> None:
        """Counts ``prompts`` more prompts done with ``tokens`` generated tokens."""
        self.done += prompts
        self.tokens += tokens
        self._draw()

    @property
    def seconds(self) -> float:
        """Wall time since the bar was created."""
        return time.perf_counter() - self.start

    def _draw(self) -> None:
        if not self.tty:
            return
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        tps = self.tokens / max(self.seconds, 1e-9)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} prompts, {tps:.1f} tokens-per-sec")
        self.stream.flush()

    def close(self, summary: str) -> None:
        """Ends the bar's line and prints ``summary`` (always)."""
        if self.tty:
            self.stream.write("\n")
        self.stream.write(summary + "\n")
        self.stream.flush()


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------


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


def _make_sampler(args: argparse.Namespace, comm) -> Tuple[Callable, Optional[ConsistencyCheck]]:
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(args.temp, args.top_p)
    if args.check_consistency:
        check = ConsistencyCheck(sampler, comm)
        return check, check
    return sampler, None


def _seed(seed: int) -> None:
    import mlx.core as mx

    # The same seed on every rank, right before generating: the logits are
    # identical on every rank, so identical generator states give identical
    # draws, whatever random numbers loading may have used before.
    mx.random.seed(seed)


def _load(args: argparse.Namespace, comm):
    from .loading import load

    # No --model: resolve_model_path gives the bundled demo model.
    return load(
        args.model,
        comm=comm,
        placement=args.placement,
        weights=args.weights,
        return_config=True,
    )


def _backend_comm(comm: Communicator, backend: str) -> Communicator:
    if backend == comm.backend:
        return comm
    try:
        return Communicator(backend=backend)
    except RuntimeError as e:  # MLX cannot share this MPI world: a setup problem
        raise UserError(f"--backend {backend}: {e}") from None


def _rank_stats(comm) -> List[Dict[str, float]]:
    """Every rank's memory and all-reduce time (a collective)."""
    import mlx.core as mx

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # KiB on Linux
    mine = {
        "peak": mx.get_peak_memory() / 1e9,
        "rss": rss_bytes / 1e9,
        "all_sum_s": comm.stats["all_sum"].seconds,
    }
    return comm.allgather(mine)


def _print_stats(lines: List[str]) -> None:
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


def _consistency_line(comm, check: ConsistencyCheck) -> str:
    return (
        f"Consistency: all {comm.size} ranks drew the same tokens at each of "
        f"{check.steps} sampling steps"
    )


def _report_stats(
    args: argparse.Namespace,
    model,
    comm,
    snapshot: Dict[str, Dict[str, float]],
    head: List[str],
    generated: int,
    check: Optional[ConsistencyCheck],
) -> None:
    """Rank 0 prints the ``--verbose`` statistics (gathered from all ranks).

    Collective when ``args.verbose``: every rank must call it.
    """
    if not args.verbose:
        if check is not None and comm.rank == 0:
            _print_stats([_consistency_line(comm, check)])
        return
    ranks = _rank_stats(comm)
    if comm.rank != 0:
        return
    calls = snapshot["all_sum"]["calls"]
    other = sum(v["calls"] for k, v in snapshot.items() if k != "all_sum")
    lines = list(head)
    lines += [
        f"Rank {r}: peak memory {s['peak']:.3f} GB, max RSS {s['rss']:.3f} GB, "
        f"{1e3 * s['all_sum_s']:.1f} ms in all-reduce"
        for r, s in enumerate(ranks)
    ]
    per_token = calls / generated if generated else float("nan")
    lines.append(
        f"Collectives: {per_token:.2f} all-reduces per generated token "
        f"({calls} all_sum calls for {generated} tokens, "
        f"{model.ep_info.num_moe_layers} MoE layers; {other} other collectives)"
    )
    if check is not None:
        lines.append(_consistency_line(comm, check))
    _print_stats(lines)


def _model_name(args: argparse.Namespace) -> str:
    from .loading import demo_model_path

    return str(args.model or demo_model_path())


def _describe_model(model, comm, model_name: str) -> str:
    info = model.ep_info
    counts = ", ".join(
        "/".join(str(p.counts[r]) for p in info.placements) for r in range(comm.size)
    )
    return (
        f"Model: {model_name}; {comm.size} rank(s), {info.num_moe_layers} MoE layers, "
        f"experts per rank: {counts}"
    )


def generate_one(args: argparse.Namespace, comm: Communicator) -> None:
    """Single-prompt mode: rank 0 streams the text to stdout."""
    debug = args.debug
    # Only rank 0 reads (stdin goes to rank 0 alone): no "(on rank 0)".
    with collective_phase(comm, debug=debug, name_ranks=False):
        comm = _backend_comm(comm, args.backend)
        text = read_prompt_argument(args.prompt) if comm.rank == 0 else None
    # After the phase: if rank 0 could not read stdin, all ranks left above.
    text = comm.bcast(text)

    with collective_phase(comm, debug=debug):
        model, tokenizer, config = _load(args, comm)
    with collective_phase(comm, debug=debug):
        prompt = encode_prompt(
            tokenizer,
            text,
            system_prompt=args.system_prompt,
            ignore_chat_template=args.ignore_chat_template,
        )
        check_prompt_length(len(prompt), config)

    from mlx_lm.generate import stream_generate

    rank0 = comm.rank == 0
    if args.verbose and rank0:
        _print_stats([_describe_model(model, comm, _model_name(args))])
    sampler, check = _make_sampler(args, comm)
    _seed(args.seed)
    comm.reset_stats()
    response = None
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler
    ):
        if rank0:
            sys.stdout.write(response.text)
            sys.stdout.flush()
    snapshot = comm.snapshot()
    if rank0:
        sys.stdout.write("\n")
        sys.stdout.flush()
    _report_stats(
        args,
        model,
        comm,
        snapshot,
        [
            f"Prompt: {response.prompt_tokens} tokens, "
            f"{response.prompt_tps:.3f} tokens-per-sec",
            f"Generation: {response.generation_tokens} tokens, "
            f"{response.generation_tps:.3f} tokens-per-sec",
        ],
        response.generation_tokens,
        check,
    )


def generate_batch(args: argparse.Namespace, comm: Communicator) -> None:
    """Batch mode: prompts file in, results file out (written by rank 0)."""
    debug = args.debug
    rank0 = comm.rank == 0
    plan = None
    with collective_phase(comm, debug=debug, name_ranks=False):
        comm = _backend_comm(comm, args.backend)
        if rank0:
            # Rank 0 alone reads the files: on several hosts only its copies
            # matter, and the others get the prompts by broadcast.
            rows = read_prompts_file(args.prompts_file)
            done, repair = scan_results_file(args.output, args.prompts_file)
            todo = [r for r in rows if _id_key(r["id"]) not in done]
            plan = {"todo": todo, "total": len(rows), "repair": repair}
    plan = comm.bcast(plan)
    todo, total = plan["todo"], plan["total"]
    skipped = total - len(todo)
    if not todo:
        if rank0:
            _print_stats(
                [f"{PROG}: all {total} prompts of {args.prompts_file} are already in {args.output}"]
            )
        return

    with collective_phase(comm, debug=debug):
        model, tokenizer, config = _load(args, comm)
    writer = None
    with collective_phase(comm, debug=debug):
        tokens = []
        for row in todo:
            ids = encode_prompt(
                tokenizer,
                row["prompt"],
                system_prompt=args.system_prompt,
                ignore_chat_template=args.ignore_chat_template,
            )
            what = f"{args.prompts_file}, line {row['line']} (id {row['id']!r}): the prompt"
            check_prompt_length(len(ids), config, what)
            tokens.append(ids)
        if rank0:
            writer = ResultWriter(args.output, plan["repair"])

    from mlx_lm.generate import batch_generate

    if args.verbose and rank0:
        _print_stats([_describe_model(model, comm, _model_name(args))])
    sampler, check = _make_sampler(args, comm)
    progress = Progress(len(todo)) if rank0 else None
    _seed(args.seed)
    comm.reset_stats()
    prompt_tokens = generated = 0
    for start in range(0, len(todo), args.batch_size):
        rows = todo[start : start + args.batch_size]
        batch = tokens[start : start + args.batch_size]
        tic = time.perf_counter()
        result = batch_generate(
            model,
            tokenizer,
            prompts=batch,
            max_tokens=args.max_tokens,
            sampler=sampler,
            return_token_ids=True,
            # The whole batch is prefilled and decoded together.
            prefill_batch_size=len(batch),
            completion_batch_size=len(batch),
        )
        seconds = time.perf_counter() - tic
        prompt_tokens += sum(len(t) for t in batch)
        generated += sum(len(t) for t in result.token_ids)
        if rank0:
            writer.write(
                [
                    {
                        "id": row["id"],
                        "prompt": row["prompt"],
                        "text": detokenize(tokenizer, out),
                        "prompt_tokens": len(ids),
                        "generation_tokens": len(out),
                        "seconds": round(seconds, 4),
                    }
                    for row, ids, out in zip(rows, batch, result.token_ids)
                ]
            )
            progress.update(len(rows), sum(len(t) for t in result.token_ids))
    snapshot = comm.snapshot()
    if rank0:
        writer.close()
        already = f", {skipped} already there" if skipped else ""
        progress.close(
            f"{PROG}: wrote {len(todo)} results to {args.output}{already}; "
            f"{generated} tokens in {progress.seconds:.1f} s "
            f"({generated / max(progress.seconds, 1e-9):.1f} tokens-per-sec)"
        )
    _report_stats(
        args,
        model,
        comm,
        snapshot,
        [f"Prompt: {prompt_tokens} tokens; Generation: {generated} tokens"],
        generated,
        check,
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Runs ``moe-mpi generate`` with ``argv`` (default ``sys.argv[1:]``)."""
    parser = setup_arg_parser()
    args = parse_args(parser, argv, validate=_validate(parser))
    comm = Communicator()
    with abort_on_error(comm, debug=args.debug):
        if args.prompts_file is not None:
            generate_batch(args, comm)
        else:
            generate_one(args, comm)


if __name__ == "__main__":
    main()
