"""``moe-mpi profile``: router statistics of a set of prompts, for balancing the experts.

Run it on the prompts your users send (or any like them)::

    mpirun -n 2 moe-mpi profile --model PATH --prompts-file prompts.jsonl --output stats.json

It is ``moe-mpi generate``'s batch mode with ``--record-routing`` and no
results file: each prompt is prefilled and decoded greedily for
``--max-tokens`` tokens, and rank 0 records, per MoE layer, how often each
expert was chosen (:mod:`moe_mpi.routing`; the format is in
docs/balance.md). ``--mode auto --stats stats.json``, ``--mode ep --stats``
and ``moe-mpi info --stats`` read the file. The routing does not depend on
how many ranks run it.
"""

from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

from . import generate
from .argtypes import positive_int
from .runner import PROG, add_debug_argument, parse_args

DEFAULT_MAX_TOKENS = 32


def setup_arg_parser() -> argparse.ArgumentParser:
    """The options of ``moe-mpi profile``."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} profile",
        description="Record router statistics (per MoE layer, how often each expert is chosen) "
        "over a prompts file, for --mode auto and --stats. Run with mpirun -n N.",
    )
    parser.add_argument("--model", default=None, help="model directory or Hugging Face repo (default: the demo model)")
    parser.add_argument("--prompts-file", required=True, help='JSONL of {"id": ..., "prompt": "..."} rows')
    parser.add_argument("--output", "-o", required=True, help="the statistics file to write (JSON)")
    parser.add_argument(
        "--max-tokens", "-m", type=positive_int, default=DEFAULT_MAX_TOKENS,
        help=f"greedy tokens decoded per prompt after its prefill (default: {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=generate.DEFAULT_BATCH_SIZE,
        help=f"prompts decoded together (default: {generate.DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument("--ignore-chat-template", action="store_true", help="use the raw prompts")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar on rank 0")
    add_debug_argument(parser)
    return parser


def generate_argv(args: argparse.Namespace) -> List[str]:
    """The ``moe-mpi generate`` command line this profile runs."""
    argv = ["--prompts-file", args.prompts_file, "--record-routing", args.output,
            "--max-tokens", str(args.max_tokens), "--batch-size", str(args.batch_size), "--temp", "0"]
    if args.model is not None:
        argv += ["--model", args.model]
    if args.ignore_chat_template:
        argv.append("--ignore-chat-template")
    if args.progress is not None:
        argv.append("--progress" if args.progress else "--no-progress")
    if args.debug:
        argv.append("--debug")
    return argv


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Runs ``moe-mpi profile`` with ``argv`` (default ``sys.argv[1:]``)."""
    args = parse_args(setup_arg_parser(), argv)
    generate.main(generate_argv(args))
