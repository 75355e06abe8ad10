"""Prompts for ``moe-mpi generate``: reading them and making them tokens.

As ``mlx_lm.generate`` does it: the tokenizer's chat template is applied
when it has one (with an optional system message), or the raw text is
encoded; ``--prompt`` turns ``\\n`` and ``\\t`` escapes into newline and
tab, and ``--prompt -`` reads stdin, less one trailing newline. Under
``mpirun`` only rank 0 reads stdin (that is where ``mpirun`` forwards it)
and broadcasts the text; Open MPI 5's ``mpirun`` never forwards the end of
file, so there the prompt ends after a second of silence (see
:func:`read_stdin`).

Batch mode reads a JSONL file of ``{"id": ..., "prompt": "..."}`` rows
(:func:`read_prompts_file`; ``id`` optional, default: the line number).

Every check here raises :class:`~moe_mpi.errors.UserError` with a message
that names the file and line, or the number of tokens against the model's
context, so that ``generate`` can check all input before generating.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import UserError
from .results import id_key
from .runner import under_launcher

__all__ = [
    "CONTEXT_KEYS",
    "DEFAULT_PROMPT",
    "STDIN_FIRST_SECONDS",
    "STDIN_IDLE_SECONDS",
    "check_prompt_length",
    "context_length",
    "detokenize",
    "encode_prompt",
    "read_prompt_argument",
    "read_prompts_file",
    "read_stdin",
    "strip_final_newline",
]

DEFAULT_PROMPT = "hello"  # as mlx_lm.generate

#: Under mpirun, the stdin prompt ends after this many quiet seconds (see
#: read_stdin), and must start arriving within STDIN_FIRST_SECONDS.
STDIN_IDLE_SECONDS = 1.0
STDIN_FIRST_SECONDS = 10.0

#: config.json keys that give a model's context length, in order of preference.
CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length")


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
    if not under_launcher():
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


def strip_final_newline(text: str) -> str:
    """``text`` without one trailing newline (``\\n`` or ``\\r\\n``), if it ends in one.

    ``echo hi | moe-mpi generate --prompt -`` and a file that ends its last
    line both send a newline nobody meant as part of the prompt, and it
    changes the tokens (and so the text). Only one is dropped: further blank
    lines at the end were typed on purpose. (A shell's ``$(cat)`` drops them
    all; one is what ``echo`` and editors add.)
    """
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


def read_prompt_argument(prompt: Optional[str]) -> str:
    """The prompt text of ``--prompt`` as ``mlx_lm.generate`` reads it.

    ``\\n`` and ``\\t`` escapes in the argument become newline and tab; ``-``
    reads stdin (see :func:`read_stdin`) without its one trailing newline
    (:func:`strip_final_newline`).
    """
    if prompt is None:
        return DEFAULT_PROMPT
    if prompt == "-":
        return strip_final_newline(read_stdin())
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
        key = id_key(row_id)
        if key in seen:
            raise UserError(f"{where}: duplicate id {row_id!r} (first on line {seen[key]})")
        seen[key] = number
        rows.append({"id": row_id, "prompt": obj["prompt"], "line": number})
    if not rows:
        raise UserError(f"{path}: no prompts (the file is empty)")
    return rows
