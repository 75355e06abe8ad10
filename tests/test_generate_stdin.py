"""``moe-mpi generate --prompt -``: the prompt read from stdin, under real ``mpirun``.

``echo`` (and any file whose last line is ended) sends a newline after the
prompt. It is dropped, once, so that ``echo TEXT | ... --prompt -`` asks
what ``--prompt TEXT`` asks. The runs compare the prompt's token count
(``--verbose``) and the greedy text with those of the same prompt given as
an argument (where ``\\n`` is an escape for a newline).
"""

import os
import re
import subprocess
import sys

import pytest

from moe_mpi import synthetic
from moe_mpi.launch import launch_again, mpirun_command
from moe_mpi.prompts import strip_final_newline

TIMEOUT = 60
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3_moe", "qwen3_moe", seed=1)


def generate(ckpt, prompt: str, stdin=None):
    """``moe-mpi generate`` on 2 ranks; returns (generated text, prompt tokens)."""
    argv = [sys.executable, "-m", "moe_mpi", "generate", "--model", str(ckpt), "--prompt", prompt,
            "--max-tokens", "8", "--ignore-chat-template", "--verbose"]
    launches = 1
    while True:  # run_mpirun's retry of a launch that failed before any rank ran; it takes no stdin
        proc = subprocess.run(
            mpirun_command(2, argv), input=stdin, capture_output=True, text=True, timeout=TIMEOUT, env=ENV,
            start_new_session=True,
        )
        if proc.returncode == 0 or not launch_again(proc.stdout + proc.stderr, launches):
            break
        launches += 1
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    tokens = re.search(r"Prompt: (\d+) tokens", proc.stderr)
    assert tokens, proc.stderr
    return proc.stdout, int(tokens.group(1))


@pytest.mark.parametrize("stdin, argument", [
    ("hello world\n", "hello world"),  # echo's newline is not part of the prompt
    ("hello world\r\n", "hello world"),  # nor a CRLF line's end
    ("hello world\n\n", "hello world\\n"),  # exactly one is dropped: a blank line typed stays
])
def test_one_trailing_newline_of_stdin_is_dropped(ckpt, stdin, argument):
    from_stdin = generate(ckpt, "-", stdin=stdin)
    assert from_stdin == generate(ckpt, argument)


def test_strip_final_newline():
    assert strip_final_newline("a\n") == "a"
    assert strip_final_newline("a\r\n") == "a"
    assert strip_final_newline("a\n\n") == "a\n"
    assert strip_final_newline("a\nb") == "a\nb"
    assert strip_final_newline("a") == "a"
    assert strip_final_newline("\n") == ""
    assert strip_final_newline("") == ""
