"""The results file of ``moe-mpi generate --prompts-file``: append, resume.

One JSON line per prompt, appended by rank 0 after every batch::

    {"id", "prompt", "text", "prompt_tokens", "generation_tokens", "seconds"}

``generation_tokens`` counts the tokens of ``text`` (a final end-of-sequence
token is not part of it) and ``seconds`` is the wall time of the batch the
prompt was in (:func:`result_row`). Rows are flushed and fsync'd after every
batch (:class:`ResultWriter`), so an interrupted run loses at most the batch
in progress; running the same command again skips the ids already in the
file, and a partially written last line, from a crash, is dropped and
regenerated (:func:`scan_results_file`).

Ids are compared by their JSON text (:func:`id_key`), so the id ``1`` and
the id ``"1"`` are different prompts. Rank 0 shows the run's progress
(:class:`Progress`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, TextIO, Tuple

from .errors import UserError

__all__ = [
    "Progress", "ResultWriter", "check_writable", "id_key", "rescue_text", "result_row", "save_text", "scan_results_file",
]


def id_key(row_id: Any) -> str:
    """The identity of a prompt id: its JSON text (``1`` and ``"1"`` differ)."""
    return json.dumps(row_id)


def result_row(
    prompt_row: Dict[str, Any],
    text: str,
    prompt_tokens: int,
    generation_tokens: int,
    seconds: float,
) -> Dict[str, Any]:
    """One result row for a prompt row of the prompts file.

    Args:
        prompt_row: ``{"id", "prompt", ...}`` as read from the prompts file.
        text: The generated text.
        prompt_tokens: Tokens of the prompt (after the chat template).
        generation_tokens: Tokens of ``text``.
        seconds: Wall time of the batch the prompt was in.
    """
    return {
        "id": prompt_row["id"],
        "prompt": prompt_row["prompt"],
        "text": text,
        "prompt_tokens": prompt_tokens,
        "generation_tokens": generation_tokens,
        "seconds": round(seconds, 4),
    }


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
    if not out.is_file():
        return set(), None  # /dev/null: nothing to resume (reading /dev/zero would never end)
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
            done.add(id_key(row["id"]))
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
        try:
            os.fsync(self._file.fileno())
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: /dev/null or a pipe, nothing to sync
                raise

    def write(self, rows: Sequence[Dict[str, Any]]) -> None:
        """Writes ``rows`` (one JSON line each), flushed and fsync'd.

        Raises:
            UserError: The file could not be written (a full disk); the rows
                were saved to another file, which the message names.
        """
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        try:
            self._file.write(text)
            # fsync: an interrupted run (or a crashed machine) keeps every
            # finished batch, so a rerun only redoes the batch in progress.
            self._sync()
        except OSError as e:
            rescued = rescue_text(text, Path(self._file.name).name)
            where = f"saved to {rescued}" if rescued else "not saved anywhere (no writable directory)"
            raise UserError(
                f"cannot write to {self._file.name} ({e.strerror or e}); the batch's {len(rows)} row(s) were {where}; "
                "the rows before them are in the file, and a rerun generates the rest"
            ) from None

    def close(self) -> None:
        """Closes the file."""
        self._file.close()


def check_writable(path: Optional[str], option: str) -> None:
    """Raises a :class:`UserError` unless ``path`` can be written (None: nothing to check).

    For output files written at the end of a long run: checked before the
    run, so that its results are not lost to a typo. ``path`` must not be a
    directory, its directory must exist, and the file (if it exists) or the
    directory (if not) must be writable.
    """
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{option} {path} is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"{option} {path}: directory {directory} does not exist")
    if target.exists() and not os.access(target, os.W_OK):
        raise UserError(f"{option} {path} is not writable")
    if not target.exists() and not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: directory {directory} is not writable")


def rescue_text(text: str, name: str) -> Optional[str]:
    """Saves ``text`` to a new file in the working directory (else the temporary directory); its path, or None."""
    for directory in (os.getcwd(), tempfile.gettempdir()):
        try:
            fd, rescued = tempfile.mkstemp(prefix="moe-mpi-rescued-", suffix=f"-{name}", dir=directory)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            return rescued
        except OSError:
            continue
    return None


def save_text(path, text: str, what: str) -> None:
    """Writes ``text`` to ``path`` atomically (a temporary file, then a rename).

    The results of a long run must not be lost to a full disk or a directory
    that went away: if the write fails, ``text`` is saved to a new file in
    the working directory (or the temporary directory) and the error names
    it.

    Args:
        path: The file to write.
        text: Its contents.
        what: What it is, for the message (e.g. ``"--out"``).

    Raises:
        UserError: The file could not be written; the message says where the
            text went, and its ``rescued`` attribute is that path (or None).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        if target.exists() and not target.is_file():
            # /dev/null or a pipe: written in place (a rename would replace
            # the device node with a file).
            with open(target, "w", encoding="utf-8") as f:
                f.write(text)
            return
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        reason = e.strerror or str(e)
        rescued = rescue_text(text, target.name)
        where = f"saved to {rescued} instead" if rescued else "not saved anywhere (no writable directory)"
        error = UserError(f"cannot write {what} {path} ({reason}); its contents were {where}")
        error.rescued = rescued
        raise error from None


class Progress:
    """Rank 0's progress through a batch run: a bar, then a summary line.

    The bar is tqdm's, on ``stream`` (stderr), counting prompts and showing
    the generation rate; ``show`` None leaves it out when the stream is not
    a terminal (under mpirun, pass :func:`moe_mpi.runner.show_progress`: the
    launcher gives the ranks pipes). The summary line is written either way.
    """

    def __init__(self, total: int, stream: Optional[TextIO] = None, show: Optional[bool] = None):
        from tqdm import tqdm

        self.stream = sys.stderr if stream is None else stream
        self.tokens = 0
        self.start = time.perf_counter()
        # disable=None: tqdm turns itself off on a stream that is not a TTY.
        disable = None if show is None else not show
        self.bar = tqdm(total=total, unit="prompt", file=self.stream, disable=disable, dynamic_ncols=True, mininterval=0.5)

    @property
    def seconds(self) -> float:
        """Wall time since the bar was created."""
        return time.perf_counter() - self.start

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of wall time so far."""
        return self.tokens / max(self.seconds, 1e-9)

    def update(self, prompts: int, tokens: int) -> None:
        """Counts ``prompts`` more prompts done with ``tokens`` generated tokens."""
        self.tokens += tokens
        self.bar.set_postfix_str(f"{self.tokens_per_second:.1f} tokens-per-sec", refresh=False)
        self.bar.update(prompts)

    def close(self, summary: str) -> None:
        """Ends the bar and writes ``summary`` (always)."""
        self.bar.close()
        self.stream.write(summary + "\n")
        self.stream.flush()
