"""Argparse pieces every command shares: number types, and the options that say how to shard.

Each function takes the option's text and returns the value, or raises
``argparse.ArgumentTypeError`` with a message that says what was expected
and repeats what was given; argparse prints it after the option's name::

    moe-mpi generate: error: argument --max-tokens/-m: expected a positive integer, got '0'

(A plain ``ValueError`` would instead give argparse's generic "invalid
positive_int value", which names the function, not the rule.)
"""

from __future__ import annotations

import argparse
from typing import List

from .attention import ATTENTION_CHOICES
from .vocab import LM_HEAD_CHOICES
from .balance import BALANCE_CHOICES

__all__ = [
    "add_attention_argument",
    "add_balance_arguments",
    "add_sharding_arguments",
    "float_list",
    "int_list",
    "non_negative_float",
    "non_negative_int",
    "port",
    "positive_float",
    "positive_int",
    "probability",
    "seed",
    "sharding_options",
    "timeout_seconds",
    "unit_interval",
]


def _int(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _float(text: str, expected: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1, e.g. a count of tokens or iterations.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not an integer, or is < 1.
    """
    expected = "a positive integer"
    value = _int(text, expected)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0, e.g. a number of warm-up iterations.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not an integer, or is < 0.
    """
    expected = "an integer >= 0"
    value = _int(text, expected)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A number >= 0 (``inf`` allowed, ``nan`` not), e.g. a temperature.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a number, or is < 0 or nan.
    """
    value = _float(text, "a number")
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0, e.g. a number of years.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a number, or is <= 0, inf or nan.
    """
    value = _float(text, "a number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


#: Seeds MLX's generator takes (``mx.random.seed``: an unsigned 64-bit integer).
SEED_MAX = 2**64 - 1


def seed(text: str) -> int:
    """A random seed: an integer in 0..2**64-1, what ``mx.random.seed`` takes.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not an integer, or is outside that range.
    """
    expected = f"an integer in 0..{SEED_MAX}"
    value = _int(text, expected)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port: 0..65535 (0: the system picks a free one).

    Raises:
        argparse.ArgumentTypeError: ``text`` is not an integer, or is outside that range.
    """
    expected = "a port number in 0..65535"
    value = _int(text, expected)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def probability(text: str) -> float:
    """A number in [0, 1], e.g. a min-p where 0 means off.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a number, or is outside [0, 1] (or nan).
    """
    value = _float(text, "a number")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


#: The shortest ``--timeout``: below it the watchdog cannot tell a frozen rank
#: from a busy machine's scheduling delays (every rank then names another).
MIN_TIMEOUT = 0.5


def timeout_seconds(text: str) -> float:
    """A watchdog timeout: 0 (off) or at least :data:`MIN_TIMEOUT` seconds.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a number, or is negative,
            nan or between 0 and the minimum.
    """
    value = _float(text, "a number")
    if not (value == 0 or value >= MIN_TIMEOUT):
        raise argparse.ArgumentTypeError(f"expected 0 (no watchdog) or at least {MIN_TIMEOUT:g} seconds, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """A number in (0, 1], e.g. a top-p.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a number, or is outside
            (0, 1] (or nan).
    """
    value = _float(text, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def int_list(text: str) -> List[int]:
    """Comma-separated positive integers: ``"1,8"`` -> ``[1, 8]``.

    Empty items are ignored (``"1,8,"`` is ``[1, 8]``); at least one is needed.

    Raises:
        argparse.ArgumentTypeError: An item is not an integer or is < 1, or
            there are none.
    """
    expected = "comma-separated positive integers such as 1,8"
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return values


def float_list(text: str) -> List[float]:
    """Comma-separated numbers: ``"2,1,1"`` -> ``[2.0, 1.0, 1.0]``.

    Only the syntax is checked: what the numbers must be (e.g. one positive
    weight per rank) is for the code that uses them, which knows the number
    of ranks. Empty items are ignored; at least one number is needed.

    Raises:
        argparse.ArgumentTypeError: An item is not a number, or there are none.
    """
    expected = "comma-separated numbers such as 2,1,1"
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return values


#: The modes a command that runs the model on every rank offers (``central`` needs its own driver).
SPMD_MODES = ("ep", "sliced", "auto")


#: What ``--profile`` does for mode auto (``moe-mpi plan`` says more: it also predicts with it).
PROFILE_HELP = (
    "mode auto: a `moe-mpi calibrate` profile of this machine; its measured expert kernel (float32 or "
    "q4, as the model's weights) prices rows for choosing layouts and for sharing a copied expert's rows "
    "between its holders (default: 1 + rows/16 reads); docs/balance.md"
)


def add_balance_arguments(parser: argparse.ArgumentParser, profile_help: str = PROFILE_HELP) -> None:
    """``--balance``, ``--replicas`` and ``--profile``: how mode auto treats hot experts.

    One definition for every command that offers mode auto (generate, serve,
    info, bench, plan); ``moe-mpi plan`` reads the same ``--profile`` for its
    machines too, so it passes its own ``profile_help``.
    """
    parser.add_argument(
        "--balance", choices=BALANCE_CHOICES, default="both",
        help="mode auto: what may happen to a hot expert: 'split' (a slice on every rank), 'replicate' "
        "(whole copies on other ranks, within --replicas; never split) or 'both' (default: per layer, "
        "whichever the cost model prefers); docs/balance.md",
    )
    parser.add_argument(
        "--replicas", type=non_negative_float, default=0.0,
        help="mode auto with --balance replicate or both: extra whole experts each rank may hold per "
        "layer (memory budget; default 0)",
    )
    parser.add_argument("--profile", metavar="FILE", default=None, help=profile_help)


def add_attention_argument(parser: argparse.ArgumentParser) -> None:
    """``--attention`` and ``--lm-head``: whether each rank computes every attention head, every logit."""
    parser.add_argument(
        "--attention", choices=ATTENTION_CHOICES, default="replicated",
        help="'replicated' (default: every rank computes every head; one all-reduce per MoE layer) or "
        "'split': each rank holds its share of the heads and of the KV cache, and each attention ends in an "
        "all-reduce too (pays on one host or a fast link, and at long context; `moe-mpi plan` predicts it)",
    )
    parser.add_argument(
        "--lm-head", choices=LM_HEAD_CHOICES, default="replicated",
        help="'replicated' (default: every rank computes every logit) or 'split': each rank holds and computes "
        "its share of the LM head's vocabulary rows, and one all-gather per step joins the logits (fewer bytes "
        "per rank where the head is a large part of a token's weights; `moe-mpi plan` predicts it)",
    )


def add_sharding_arguments(parser: argparse.ArgumentParser) -> None:
    """``--mode``, ``--placement``, ``--weights``, ``--stats``, ``--layouts``, ``--balance``, ``--replicas``, ``--profile``, ``--attention``, ``--lm-head``."""
    parser.add_argument(
        "--mode", choices=SPMD_MODES, default="ep",
        help="how experts are shared out: 'ep' (default: whole experts per rank), 'sliced' (a slice of "
        "every expert per rank) or 'auto' (per layer, from --stats: hot experts split or replicated, "
        "the rest placed to even out the load; docs/balance.md)",
    )
    parser.add_argument(
        "--placement", default="contiguous",
        help="ep: which rank owns which experts: 'contiguous' (default), 'round-robin' or a JSON placement file",
    )
    parser.add_argument(
        "--weights", type=float_list, default=None,
        help="relative share of the experts per rank, one number per rank, e.g. 2,1,1 (a bigger Mac takes more)",
    )
    parser.add_argument(
        "--stats", metavar="FILE", default=None,
        help="router statistics (moe-mpi profile): 'ep' places each layer's experts by them, 'auto' balances by them",
    )
    parser.add_argument(
        "--layouts", metavar="FILE", default=None,
        help="per-layer expert layouts (moe-mpi info --write-layouts) for 'ep' or 'auto'",
    )
    add_balance_arguments(parser)
    add_attention_argument(parser)
    parser.add_argument(
        "--warm-experts", action="store_true",
        help="Metal: idle ranks compute their least recently used experts as throw-away work, so the "
        "GPU keeps every expert's memory wired (off on the CPU)",
    )


def sharding_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`moe_mpi.load` from :func:`add_sharding_arguments`' options."""
    return dict(
        mode=args.mode, placement=args.placement, weights=args.weights,
        stats=args.stats, layouts=args.layouts, replicas=args.replicas, balance=args.balance,
        profile=args.profile, warm_experts=args.warm_experts, attention=args.attention,
        lm_head=args.lm_head,
    )
