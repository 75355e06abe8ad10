"""End-to-end tests of ``moe-mpi generate`` under real ``mpirun``.

Tiny random-weight checkpoints (``moe_mpi.synthetic``) are written once per
session. References come from plain single-process mlx-lm in this process,
with the prompt built the way ``mlx_lm.generate`` builds it; the sharded runs
are ``mpirun -n N python -m moe_mpi generate ...``.

Bad input: every case must exit non-zero, print its error exactly once, show
no traceback and end well within 20 s (the 60 s timeout turns a hang into a
failure instead of a stuck test run).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from moe_mpi import synthetic
from moe_mpi.launch import mpirun_command, run_mpirun

from ckpt_edits import edit_tensors
from configs import REFUSED_CONFIGS

HERE = Path(__file__).parent
MAX_TOKENS = 12
TIMEOUT = 60  # a hung job fails the test instead of blocking the run
FAIL_WITHIN = 20.0  # seconds of wall time for a bad-input run
# No network here: make a Hugging Face lookup fail at once.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

PROMPTS = [
    {"id": "first", "prompt": "hello world"},
    {"prompt": "the quick brown fox jumps over the lazy dog"},  # id: line 2
    {"id": 7, "prompt": "experts"},
    {"id": "x", "prompt": "a mixture of experts model routes every token to a few experts"},
    {"prompt": "numbers 0 1 2"},  # id: line 5
]
PROMPT_IDS = ["first", 2, 7, "x", 5]


def generate_cmd(*args) -> list:
    return [sys.executable, "-m", "moe_mpi", "generate", *map(str, args)]


def run(n: int, *args, argv=None, **kwargs):
    """Runs ``moe-mpi generate *args`` on ``n`` ranks; returns (proc, seconds)."""
    start = time.monotonic()
    proc = run_mpirun(n, argv or generate_cmd(*args), timeout=TIMEOUT, env=ENV, **kwargs)
    return proc, time.monotonic() - start


def normalize(text: str) -> str:
    # run_mpirun decodes with universal newlines; a random model may emit "\r".
    return text.replace("\r\n", "\n").replace("\r", "\n")


def assert_ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def assert_clean_failure(proc, seconds: float, needle: str, code=None):
    """One error line containing ``needle``, no traceback, quick, non-zero."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    if code is not None:
        assert proc.returncode == code, output
    assert proc.stderr.count(needle) == 1, output
    assert proc.stderr.count("error:") == 1, output  # one line, one rank
    assert "Traceback" not in output, output
    assert proc.stdout == "", output  # stdout carries generated text only
    assert seconds < FAIL_WITHIN, f"took {seconds:.1f} s\n{output}"


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A tiny qwen3_moe checkpoint (8 experts, chat template)."""
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3_moe", "qwen3_moe", seed=1)


@pytest.fixture(scope="session")
def reference(ckpt):
    """Single-process mlx-lm generation, prompts built as mlx_lm.generate does."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.utils import load as mlx_lm_load

    model, tokenizer = mlx_lm_load(str(ckpt))
    assert tokenizer.has_chat_template  # so the default path is the template
    cache = {}

    def get(prompt: str, ignore_chat_template: bool = False, max_tokens: int = MAX_TOKENS):
        key = (prompt, ignore_chat_template, max_tokens)
        if key not in cache:
            use_chat_template = not ignore_chat_template
            text = prompt
            if use_chat_template:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            ids = tokenizer.encode(text, add_special_tokens=not use_chat_template)
            out, tokens = "", []
            for r in stream_generate(model, tokenizer, ids, max_tokens=max_tokens):
                out += r.text
                if r.finish_reason != "stop":  # the stop token is not text
                    tokens.append(r.token)
            cache[key] = {"text": out, "prompt_tokens": len(ids), "tokens": tokens}
        return cache[key]

    return get


@pytest.fixture(scope="session")
def bad(ckpt, tmp_path_factory):
    """Broken inputs, each made on first use: ``bad("name") -> Path``."""
    root = tmp_path_factory.mktemp("bad")
    made = {}

    def copy_ckpt(name: str) -> Path:
        dst = root / name
        shutil.copytree(ckpt, dst)
        return dst

    def truncated(dst: Path) -> Path:
        f = dst / "model.safetensors"
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
        return dst

    def build(name: str) -> Path:
        if name == "truncated":
            return truncated(copy_ckpt(name))
        if name == "corrupt-header":
            dst = copy_ckpt(name)
            with open(dst / "model.safetensors", "r+b") as fh:
                fh.seek(8)
                fh.write(b"#garbage#")  # the JSON header no longer parses
            return dst
        if name == "missing-keys":
            dst = copy_ckpt(name)
            config = json.loads((dst / "config.json").read_text())
            del config["hidden_size"], config["num_attention_heads"]
            (dst / "config.json").write_text(json.dumps(config))
            return dst
        if name == "short-context":
            dst = copy_ckpt(name)
            config = json.loads((dst / "config.json").read_text())
            config["max_position_embeddings"] = 16
            (dst / "config.json").write_text(json.dumps(config))
            return dst
        if name == "config-list":
            dst = copy_ckpt(name)
            (dst / "config.json").write_text("[1, 2]")
            return dst
        if name == "no-model-type":
            return edit_config(copy_ckpt(name), lambda c: c.pop("model_type"))
        if name == "top-k-16":
            return edit_config(copy_ckpt(name), lambda c: c.update(num_experts_per_tok=16))
        if name == "one-layer-config":  # the checkpoint has 2 layers
            return edit_config(copy_ckpt(name), lambda c: c.update(num_hidden_layers=1))
        if name == "no-tokenizer":
            dst = copy_ckpt(name)
            (dst / "tokenizer.json").unlink()
            (dst / "tokenizer_config.json").unlink()
            return dst
        if name == "four-expert-tensor":  # one layer's gate_proj holds 4 of the config's 8 experts
            return edit_tensors(copy_ckpt(name), lambda w: w.update({GATE_1: w[GATE_1][:4]}))
        if name == "int-weights":
            return edit_tensors(copy_ckpt(name), lambda w: w.update({Q_PROJ_0: w[Q_PROJ_0].astype(mx.int32)}))
        if name == "dense":
            return write_dense(root / name)
        if name == "not-linear":  # a norm of the routed sum
            return synthetic.write_checkpoint(root / name, REFUSED_CONFIGS["kimi_k3-latent-norm"][0])
        if name == "latent-attention":  # DeepSeek's multi-head latent attention: not split by heads
            return synthetic.write_checkpoint(root / name, "deepseek_v3")
        if name == "one-kv-head":  # 2 query heads, 1 key/value head: 3 ranks cannot share them
            return synthetic.write_checkpoint(
                root / name, synthetic.tiny_config("mixtral", num_attention_heads=2, num_key_value_heads=1)
            )
        if name == "one-expert":
            # 2 ranks > 1 expert (2 ranks start faster than 3 on 2 cores).
            config = synthetic.tiny_config("mixtral", num_experts=1, num_experts_per_tok=1)
            return synthetic.write_checkpoint(root / name, config)
        if name == "placement.json":
            path = root / name
            path.write_text(json.dumps({"experts_per_rank": [[0, 1, 2, 3], [3, 4, 5, 6, 7]]}))
            return path
        if name == "empty.jsonl":
            path = root / name
            path.write_text("")
            return path
        if name == "malformed.jsonl":
            path = root / name
            path.write_text('{"id": 1, "prompt": "fine"}\n{"id": 2, "prompt": "broken\n')
            return path
        if name == "hosts":
            # Two "hosts" (working directories) with the same relative model
            # path; host b's copy of the weights is truncated.
            for host in ("a", "b"):
                shutil.copytree(ckpt, root / name / host / "model")
            truncated(root / name / "b" / "model")
            return root / name
        raise KeyError(name)

    def get(name: str) -> Path:
        if name not in made:
            made[name] = build(name)
        return made[name]

    return get


#: Tensors of the qwen3_moe checkpoint that the broken copies change.
GATE_1 = "model.layers.1.mlp.switch_mlp.gate_proj.weight"
Q_PROJ_0 = "model.layers.0.self_attn.q_proj.weight"


def edit_config(path: Path, change) -> Path:
    """``change(config)`` applied to ``path``'s config.json in place."""
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_dense(path: Path) -> Path:
    """A dense (non-MoE) qwen3 checkpoint, saved by mlx-lm itself."""
    import mlx.core as mx
    from mlx_lm.models import qwen3
    from mlx_lm.utils import save_config, save_model

    config = {
        "model_type": "qwen3",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    }
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(path, model)
    config["eos_token_id"] = synthetic.write_tokenizer(path, config["vocab_size"])
    save_config(config, config_path=path / "config.json")
    return path


def write_prompts(path: Path, rows=PROMPTS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------
# Single prompt
# --------------------------------------------------------------------------


def test_greedy_matches_mlx_lm_with_chat_template(ckpt, reference):
    prompt = "hello world"
    proc, _ = run(2, "--model", ckpt, "--prompt", prompt, "--max-tokens", MAX_TOKENS)
    assert_ok(proc)
    # Only the generated text, then a newline; nothing from rank 1.
    assert proc.stdout == normalize(reference(prompt)["text"]) + "\n"
    assert "error" not in proc.stderr


def test_greedy_matches_mlx_lm_raw_prompt_verbose(ckpt, reference):
    prompt = "the quick brown fox"
    proc, _ = run(
        2, "--model", ckpt, "--prompt", prompt, "--max-tokens", MAX_TOKENS,
        "--ignore-chat-template", "--verbose",
    )
    assert_ok(proc)
    expected = reference(prompt, ignore_chat_template=True)["text"]
    assert expected != reference(prompt)["text"]  # the template matters
    assert proc.stdout == normalize(expected) + "\n"
    err = proc.stderr
    assert "Prompt: " in err and "tokens-per-sec" in err
    assert f"Generation: {MAX_TOKENS} tokens" in err
    assert "Rank 0: peak memory" in err and "Rank 1: peak memory" in err and "max RSS" in err
    # 2 MoE layers, one all-reduce each per forward pass; the prompt's one chunk left out the last.
    assert "all-reduces per generated token" in err and "2 MoE layers" in err
    assert "; 1 left out of prompt chunks;" in err, err


def test_attention_split_by_heads_matches_mlx_lm(ckpt, reference):
    """--attention split on 3 ranks: the same greedy text, and a second all-reduce per layer."""
    prompt = "hello world"
    proc, _ = run(3, "--model", ckpt, "--prompt", prompt, "--max-tokens", MAX_TOKENS, "--attention", "split", "--verbose")
    assert_ok(proc)
    assert proc.stdout == normalize(reference(prompt)["text"]) + "\n"
    assert "attention split by heads" in proc.stderr
    assert "2 MoE layers and 2 split attentions" in proc.stderr
    # Four per forward call (each MoE block and each attention); a call per token and then some
    # (mlx-lm's generate_step evaluates a step ahead). The prompt's one chunk left out the last
    # MoE block's and the last attention's.
    calls = int(re.search(r"\((\d+) all_sum calls for (\d+) tokens", proc.stderr).group(1))
    assert "; 2 left out of prompt chunks;" in proc.stderr, proc.stderr
    assert (calls + 2) % 4 == 0 and calls >= 4 * MAX_TOKENS, proc.stderr


def test_prompt_from_stdin(ckpt, reference):
    prompt = "numbers 0 1 2\nand more"
    cmd = mpirun_command(2, generate_cmd("--model", ckpt, "--prompt", "-", "--max-tokens", MAX_TOKENS))
    proc = subprocess.run(
        cmd, input=prompt, capture_output=True, text=True, timeout=TIMEOUT, env=ENV,
        start_new_session=True,
    )
    assert_ok(proc)
    assert proc.stdout == normalize(reference(prompt)["text"]) + "\n"


def test_seeded_sampling_is_reproducible_and_ranks_agree(ckpt):
    args = ("--model", ckpt, "--prompt", "hello", "--max-tokens", 24,
            "--temp", "1.0", "--seed", "3", "--check-consistency")
    first, _ = run(2, *args)
    second, _ = run(2, *args)
    for proc in (first, second):
        assert_ok(proc)
        # Every step's tokens were allgathered and compared across ranks.
        assert "Consistency: all 2 ranks drew the same tokens at each of" in proc.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


def test_default_model(tmp_path):
    from moe_mpi.loading import demo_model_path

    proc, seconds = run(2, "--prompt", "This module provides", "--max-tokens", 8)
    if (demo_model_path() / "config.json").is_file():
        assert_ok(proc)
        assert proc.stdout.strip()
    else:
        assert_clean_failure(proc, seconds, "demo model is not installed")


# --------------------------------------------------------------------------
# Batch mode
# --------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [False, True], ids=["one-batch", "overlap"])
def test_batch_rows_match_single_generation(overlap, ckpt, reference, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "results.jsonl"
    # Batches of 2, 2 and 1 prompts of different lengths (padding); with
    # --overlap, a batch of 2 is two cohorts of one, stepped in turns.
    proc, _ = run(
        2, "--model", ckpt, "--prompts-file", prompts, "--output", out,
        "--batch-size", 2, "--max-tokens", MAX_TOKENS, "--verbose", *(["--overlap"] if overlap else []),
    )
    assert_ok(proc)
    assert proc.stdout == ""
    assert "wrote 5 results" in proc.stderr
    # Each prompt chunk leaves out its last MoE layer: 3 batches, one chunk each (5 cohorts with overlap).
    assert f"; {5 if overlap else 3} left out of prompt chunks;" in proc.stderr, proc.stderr
    if overlap:  # the two batches of 2 overlapped their all-reduces
        overlapped = int(re.search(r"; (\d+) overlapped;", proc.stderr).group(1))
        assert overlapped > 0, proc.stderr
    rows = read_rows(out)
    assert [r["id"] for r in rows] == PROMPT_IDS
    for row, source in zip(rows, PROMPTS):
        ref = reference(source["prompt"])
        assert set(row) == {"id", "prompt", "text", "prompt_tokens", "generation_tokens", "seconds"}
        assert row["prompt"] == source["prompt"]
        assert row["text"] == ref["text"], row["id"]
        assert row["prompt_tokens"] == ref["prompt_tokens"]
        assert row["generation_tokens"] == len(ref["tokens"])
        assert row["seconds"] > 0


def test_batch_resume_skips_done_ids_and_drops_partial_line(ckpt, reference, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:4])
    out = tmp_path / "results.jsonl"
    fake = {"id": "first", "prompt": "hello world", "text": "FAKE, kept",
            "prompt_tokens": 1, "generation_tokens": 1, "seconds": 0.0}
    # A finished row, then the torn last line of a run that died mid-write.
    out.write_text(json.dumps(fake) + "\n" + '{"id": 2, "prompt": "the quick br')
    # Also covers 3 ranks, round-robin placement and MLX's all-reduce.
    args = ("--model", ckpt, "--prompts-file", prompts, "--output", out, "--max-tokens", MAX_TOKENS,
            "--backend", "mlx", "--placement", "round-robin")
    proc, _ = run(3, *args)
    assert_ok(proc)
    assert "wrote 3 results" in proc.stderr and "1 already there" in proc.stderr
    rows = read_rows(out)
    assert [r["id"] for r in rows] == PROMPT_IDS[:4]
    assert rows[0] == fake  # not regenerated
    for row, source in zip(rows[1:], PROMPTS[1:4]):
        assert row["text"] == reference(source["prompt"])["text"], row["id"]

    before = out.read_bytes()
    proc, _ = run(2, *args)  # nothing left to do: the model is not even loaded
    assert_ok(proc)
    assert "all 4 prompts" in proc.stderr
    assert out.read_bytes() == before


def test_batch_interrupted_run_keeps_rows_and_rerun_completes(ckpt, tmp_path):
    # Enough prompts that the job cannot finish between its first row and
    # the signal: 8 of them did once decode got faster.
    total = 32
    rows = [{"id": i, "prompt": f"numbers {i} and the quick brown fox"} for i in range(total)]
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "results.jsonl"
    args = ("--model", ckpt, "--prompts-file", prompts, "--output", out,
            "--batch-size", 1, "--max-tokens", 32)
    proc = subprocess.Popen(
        mpirun_command(2, generate_cmd(*args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=ENV, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.02)
        if proc.poll() is not None:  # say how it ended, rather than fail to signal it
            _, err = proc.communicate()
            pytest.fail(f"the job ended (exit code {proc.returncode}) before it could be interrupted:\n{err}")
        # Interrupt the job after its first batch (as Ctrl-C or a batch
        # scheduler would); mpirun forwards the signal and ends every rank.
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    kept = out.read_bytes()
    done = [json.loads(line) for line in kept.decode().splitlines() if line.endswith("}")]
    assert 1 <= len(done) < total, "the job finished before it could be interrupted"

    proc, _ = run(2, *args)
    assert_ok(proc)
    final = read_rows(out)
    assert sorted(r["id"] for r in final) == list(range(total))
    assert final[: len(done)] == done  # rows written before the interruption survive


# --------------------------------------------------------------------------
# Bad input: one clear error, every rank ends, quickly
# --------------------------------------------------------------------------

# name -> (ranks, arguments (callable of the `bad` factory and tmp_path), needle)
BAD_INPUT = {
    "missing-model": (2, lambda bad, tmp: ["--model", tmp / "no-such-model"], "does not exist"),
    "hf-id-offline": (
        2, lambda bad, tmp: ["--model", "nonexistent-org/nonexistent-model"], "could not be fetched"
    ),
    "dense-model": (2, lambda bad, tmp: ["--model", bad("dense")], "has no MoE block"),
    "truncated-safetensors": (2, lambda bad, tmp: ["--model", bad("truncated")], "ends at byte"),
    "corrupt-header": (
        2, lambda bad, tmp: ["--model", bad("corrupt-header")], "corrupt safetensors header"
    ),
    "config-missing-keys": (
        2, lambda bad, tmp: ["--model", bad("missing-keys")], "is missing or has invalid keys"
    ),
    "block-not-linear-in-experts": (
        2, lambda bad, tmp: ["--model", bad("not-linear")],
        "model_type='kimi_k3': its MoE block language_model.model.layers.1.mlp (KimiK3SparseMoE) is not linear",
    ),
    "more-ranks-than-experts": (
        2, lambda bad, tmp: ["--model", bad("one-expert")], "num_experts=1 is less than num_ranks=2"
    ),
    "invalid-placement-file": (
        2, lambda bad, tmp: ["--placement", bad("placement.json")], "is placed more than once"
    ),
    "weights-wrong-length": (
        2, lambda bad, tmp: ["--weights", "2,1,1"], "got 3 weights for num_ranks=2"
    ),
    "profile-missing": (
        2, lambda bad, tmp: ["--mode", "auto", "--profile", tmp / "no-such-calib.json"], "cannot read it"
    ),
    "profile-without-expert-table": (
        3, lambda bad, tmp: ["--mode", "auto", "--profile", _write(tmp / "calib.json", '{"machine": {"kernels": {}}}')],
        "no machine.kernels['float32/expert'] table",
    ),
    "prompt-longer-than-context": (
        2,
        lambda bad, tmp: ["--model", bad("short-context"), "--prompt", "hello world " * 20],
        "more than the model's context of 16 tokens",
    ),
    "empty-prompts-file": (
        2,
        lambda bad, tmp: ["--prompts-file", bad("empty.jsonl"), "--output", tmp / "out.jsonl"],
        "no prompts",
    ),
    "malformed-jsonl-line": (
        2,
        lambda bad, tmp: ["--prompts-file", bad("malformed.jsonl"), "--output", tmp / "out.jsonl"],
        "malformed.jsonl, line 2: invalid JSON",
    ),
    "config-not-an-object": (2, lambda bad, tmp: ["--model", bad("config-list")], "must hold a JSON object, not a list"),
    "config-without-model-type": (2, lambda bad, tmp: ["--model", bad("no-model-type")], 'has no "model_type"'),
    "no-tokenizer": (2, lambda bad, tmp: ["--model", bad("no-tokenizer")], "has no tokenizer"),
    # Failed in the router on the first token, on every rank: a message per rank.
    "top-k-above-num-experts": (
        2, lambda bad, tmp: ["--model", bad("top-k-16")], "num_experts_per_tok=16 experts per token"
    ),
    # Rank 1 read experts 4..7 past the tensor's end, from the next tensor's bytes: wrong text, exit 0.
    "tensor-with-fewer-experts-than-config": (
        2, lambda bad, tmp: ["--model", bad("four-expert-tensor")], "has shape [4, 64, 64], so no position 7"
    ),
    # Ran a one-layer model from a two-layer checkpoint, silently.
    "config-with-fewer-layers-than-checkpoint": (
        2, lambda bad, tmp: ["--model", bad("one-layer-config")], "have no parameter in the model config.json"
    ),
    "integer-weights": (2, lambda bad, tmp: ["--model", bad("int-weights")], "is int32, the model needs float32"),
    # A traceback from every rank (mx.random.seed takes 0..2**64-1).
    "negative-seed": (2, lambda bad, tmp: ["--seed", "-1"], "expected an integer in 0..18446744073709551615"),
    "attention-split-of-latent-attention": (
        2, lambda bad, tmp: ["--model", bad("latent-attention"), "--attention", "split"],
        "attention split: model_type='deepseek_v3' has no attention moe_mpi can split by heads",
    ),
    "attention-split-over-too-few-heads": (
        3, lambda bad, tmp: ["--model", bad("one-kv-head"), "--attention", "split"],
        "num_attention_heads=2, num_key_value_heads=1: 3 ranks would share one key/value head",
    ),
    "attention-split-unknown-choice": (2, lambda bad, tmp: ["--attention", "halves"], "invalid choice: 'halves'"),
    "overlap-of-one-prompt": (2, lambda bad, tmp: ["--overlap"], "--overlap is for batch mode"),
    "overlap-with-mlx-backend": (
        2, lambda bad, tmp: ["--overlap", "--backend", "mlx", "--prompts-file", bad("empty.jsonl"), "--output", tmp / "out.jsonl"],
        "--overlap needs --backend mpi4py",
    ),
    # Was written after generating: the run's statistics were lost.
    "record-routing-into-a-directory": (2, lambda bad, tmp: ["--record-routing", tmp], "is a directory"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input(case, ckpt, bad, tmp_path):
    n, make_args, needle = BAD_INPUT[case]
    args = make_args(bad, tmp_path)
    if "--model" not in args:
        args = ["--model", ckpt, *args]
    if "--prompt" not in args and "--prompts-file" not in args:
        args += ["--prompt", "hello"]
    proc, seconds = run(n, *args, "--max-tokens", 4)
    assert_clean_failure(proc, seconds, needle)
    assert not (tmp_path / "out.jsonl").exists()  # nothing written on failure


def test_corrupt_file_on_one_rank_only(bad):
    # Two "hosts": mpirun runs rank 0 in host a's directory and rank 1 in
    # host b's, with the same command line and relative model path; only
    # host b's weights are truncated. Rank 0 loads fine and would wait
    # forever for rank 1 without the collective error check.
    hosts = bad("hosts")
    cmd = generate_cmd("--model", "./model", "--prompt", "hello", "--max-tokens", 4)
    argv = ["--wdir", hosts / "a", *cmd, ":", "-n", "1", "--wdir", hosts / "b", *cmd]
    proc, seconds = run(1, argv=[str(a) for a in argv])
    assert_clean_failure(proc, seconds, "ends at byte")
    assert "(on rank 1 of 2)" in proc.stderr


def test_argparse_error_printed_once():
    proc, seconds = run(2, "--max-tokens", "0")
    assert_clean_failure(proc, seconds, "expected a positive integer", code=None)
    assert proc.stderr.count("usage: moe-mpi generate") == 1


def test_argparse_error_on_one_rank_only_is_printed_by_that_rank():
    # mpirun's ':' gives rank 1 its own command line; rank 0's is fine, so
    # rank 0 says nothing and rank 1 must (it said nothing either, once).
    good = generate_cmd("--model", "unused", "--max-tokens", 4)
    bad_cmd = generate_cmd("--model", "unused", "--max-tokens", 0)
    proc, seconds = run(1, argv=[*good, ":", "-n", "1", *bad_cmd])
    assert proc.returncode != 0
    assert proc.stderr.count("error:") == 1, proc.stderr
    assert "[rank 1] moe-mpi generate: error: argument --max-tokens/-m: expected a positive integer" in proc.stderr
    assert seconds < FAIL_WITHIN


def test_debug_shows_traceback_once(tmp_path):
    proc, seconds = run(2, "--model", tmp_path / "no-such-model", "--debug")
    assert proc.returncode != 0
    assert proc.stderr.count("Traceback") == 1, proc.stderr
    assert proc.stderr.count("moe-mpi: error:") == 1, proc.stderr
    assert seconds < FAIL_WITHIN


def test_unexpected_error_on_one_rank_aborts_all():
    # Outside collective phases (e.g. mid-generation) the failing rank
    # prints its traceback, prefixed, and MPI_Abort ends the waiting ranks.
    start = time.monotonic()
    proc = run_mpirun(
        2, [sys.executable, str(HERE / "mpi_errors_helper.py"), "abort"], timeout=TIMEOUT, env=ENV
    )
    seconds = time.monotonic() - start
    assert proc.returncode != 0
    assert proc.stderr.count("RuntimeError: unexpected failure on rank 1 only") == 1, proc.stderr
    assert proc.stderr.count("[rank 1] Traceback") == 1, proc.stderr
    assert "[rank 0]" not in proc.stderr
    assert seconds < FAIL_WITHIN


# --------------------------------------------------------------------------
# In-process units (no MPI)
# --------------------------------------------------------------------------


class _FakeComm:
    """allgather returns what the (pretend) ranks drew."""

    size = 2

    def __init__(self, other):
        self.other = other

    def allgather(self, mine):
        return [mine, self.other]


def test_consistency_check_detects_disagreement():
    import mlx.core as mx

    from moe_mpi.errors import CollectiveError
    from moe_mpi.runstats import ConsistencyCheck

    def sampler(logprobs):
        return mx.argmax(logprobs, axis=-1)

    logprobs = mx.array([[0.0, 1.0, 0.5]])
    assert ConsistencyCheck(sampler, _FakeComm([1]))(logprobs).tolist() == [1]
    with pytest.raises(CollectiveError, match="rank 1: \\[2\\]"):
        ConsistencyCheck(sampler, _FakeComm([2]))(logprobs)


def test_read_prompts_file_validation(tmp_path):
    from moe_mpi.errors import UserError
    from moe_mpi.prompts import read_prompts_file

    path = tmp_path / "p.jsonl"
    # A raw U+2028 inside a JSON string is legal and must not split the line.
    path.write_text('\n{"prompt": "a\u2028b"}\n\n{"id": "z", "prompt": "c"}\n', encoding="utf-8")
    rows = read_prompts_file(str(path))
    assert [(r["id"], r["prompt"], r["line"]) for r in rows] == [(2, "a\u2028b", 2), ("z", "c", 4)]
    for text, message in [
        ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "line 2: duplicate id 1 (first on line 1)"),
        ('["a"]\n', "line 1: expected a JSON object"),
        ('{"text": "a"}\n', 'line 1: no "prompt" key'),
        ('{"prompt": 3}\n', '"prompt" must be a string'),
        ('{"id": [1], "prompt": "a"}\n', '"id" must be a string or an integer'),
        ("\n  \n", "no prompts"),
    ]:
        path.write_text(text)
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            read_prompts_file(str(path))


def test_scan_results_file(tmp_path):
    from moe_mpi.errors import UserError
    from moe_mpi.results import ResultWriter, scan_results_file

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    out = tmp_path / "out.jsonl"
    assert scan_results_file(str(out), str(prompts)) == (set(), None)
    # A complete last row without its newline is kept (and gets one).
    out.write_text('{"id": 1}\n{"id": "1"}')
    done, repair = scan_results_file(str(out), str(prompts))
    assert done == {"1", '"1"'} and repair == ("newline", 0)
    ResultWriter(str(out), repair).write([{"id": 2}])
    assert out.read_text() == '{"id": 1}\n{"id": "1"}\n{"id": 2}\n'
    # A torn last line is dropped.
    out.write_text('{"id": 1}\n{"id": 2, "te')
    done, repair = scan_results_file(str(out), str(prompts))
    assert done == {"1"} and repair == ("truncate", len('{"id": 1}\n'))
    # Garbage before the last line is an error, not silently skipped.
    out.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(UserError, match="line 2: not a result row"):
        scan_results_file(str(out), str(prompts))
    with pytest.raises(UserError, match="is the prompts file itself"):
        scan_results_file(str(prompts), str(prompts))


def test_results_that_cannot_be_written_are_rescued(tmp_path, monkeypatch):
    from moe_mpi.errors import UserError
    from moe_mpi.results import ResultWriter, check_writable, save_text

    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    check_writable(str(tmp_path / "ok.json"), "--out")
    for path, message in [(tmp_path, "is a directory"), (blocker / "x.json", "does not exist")]:
        with pytest.raises(UserError, match=message):
            check_writable(str(path), "--out")
    # The directory went away (or the disk filled) by the end of the run.
    with pytest.raises(UserError, match="its contents were saved to") as e:
        save_text(blocker / "stats.json", '{"x": 1}\n', "--record-routing")
    assert Path(e.value.rescued).read_text() == '{"x": 1}\n' and Path(e.value.rescued).parent == tmp_path
    save_text(os.devnull, "1\n", "--out")  # written in place, not replaced by a file
    assert not Path(os.devnull).is_file()
    # /dev/full: a full disk in the middle of a batch run.
    writer = ResultWriter("/dev/full", None)
    with pytest.raises(UserError, match=r"cannot write to /dev/full .*1 row\(s\) were saved to") as e:
        writer.write([{"id": 1, "text": "kept"}])
    rescued = [p for p in tmp_path.iterdir() if p.name.startswith("moe-mpi-rescued-") and p.name.endswith("-full")]
    assert [json.loads(p.read_text()) for p in rescued] == [{"id": 1, "text": "kept"}]


def test_progress_bar_only_on_a_tty():
    import io

    from moe_mpi.results import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = Progress(4, stream=stream)
        bar.update(2, 10)
        bar.close("summary line")
    drawn = tty.getvalue()
    assert "\r" in drawn and "2/4" in drawn and "prompt" in drawn and "tokens-per-sec" in drawn
    assert drawn.endswith("\nsummary line\n")
    assert pipe.getvalue() == "summary line\n"  # no bar when not a TTY
    forced = io.StringIO()  # under mpirun: a pipe to the launcher, shown on request
    bar = Progress(4, stream=forced, show=True)
    bar.update(4, 8)
    bar.close("done")
    assert "4/4" in forced.getvalue() and forced.getvalue().endswith("\ndone\n")
