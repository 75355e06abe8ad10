"""Models whose caches mlx-lm cannot batch (moe_mpi/batching.py): served and batch-generated one at a time.

deepseek_v41's ``LayerCache`` and llama4's ``ChunkedKVCache`` have no
``merge``: mlx-lm's ``BatchGenerator`` raises at their first prompt. Before
moe_mpi/batching.py, ``moe-mpi serve`` and ``moe-mpi generate --prompts-file``
died on them; ``mlx_lm.server`` serves them one request at a time.
"""

import concurrent.futures
import copy
import http.client
import json
import signal
import sys
from pathlib import Path

import mlx.core as mx
import openai
import pytest
from mlx_lm.generate import BatchGenerator, generate_step

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from configs import EXTRA_CONFIGS  # noqa: E402
from serve_jobs import ENV, start_server  # noqa: E402

from moe_mpi import synthetic  # noqa: E402
from moe_mpi.launch import run_mpirun  # noqa: E402
from moe_mpi.batching import padded_prefill_is_exact, solo_caches, unbatchable_caches  # noqa: E402

UNBATCHABLE = {"deepseek_v41": ["LayerCache"], "llama4": ["ChunkedKVCache"]}
MAX_TOKENS = 8
TIMEOUT = 300
PROMPTS = ["the quick brown fox", "a", "mixture of experts across several machines", "hello world", "one two"]


def test_which_models_batch():
    for arch, names in UNBATCHABLE.items():
        model, _ = synthetic.build_model(EXTRA_CONFIGS[arch], seed=1)
        assert unbatchable_caches(model) == names
    model, _ = synthetic.build_model(synthetic.tiny_config("qwen3_moe"), seed=1)
    assert unbatchable_caches(model) == []
    model, _ = synthetic.build_model(EXTRA_CONFIGS["qwen3_next"], seed=1)  # ArraysCache merges
    assert unbatchable_caches(model) == []


@pytest.mark.parametrize("arch", sorted(UNBATCHABLE))
def test_batch_of_one_generates_what_generate_step_does(arch):
    model, _ = synthetic.build_model(EXTRA_CONFIGS[arch], seed=1)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(3, 22))]  # lengths 5, 3 and 19 (llama4 chunks of 8)
    expected = [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=MAX_TOKENS)] for p in prompts]
    with pytest.raises(ValueError, match="does not yet support batching"):  # what moe_mpi works around
        gen = BatchGenerator(model, completion_batch_size=1, prefill_batch_size=1)
        gen.insert(prompts[:1], [MAX_TOKENS])
        gen.next_generated()
    gen.close()
    gen = BatchGenerator(model, completion_batch_size=1, prefill_batch_size=1)
    uids = gen.insert(prompts, [MAX_TOKENS] * len(prompts), caches=[solo_caches(model) for _ in prompts])
    out = {uid: [] for uid in uids}
    while responses := gen.next_generated():
        assert len(responses) == 1  # one sequence at a time
        for r in responses:
            out[r.uid].append(r.token)
    gen.close()
    assert [out[uid] for uid in uids] == expected


def test_a_batch_of_one_stays_one():
    model, _ = synthetic.build_model(EXTRA_CONFIGS["llama4"], seed=1)
    caches = solo_caches(model)
    plain = type(caches[0]).__mro__[1]
    assert isinstance(caches[0], plain) and type(caches[0]).__name__ == plain.__name__  # the model sees its own type
    for c in caches:  # also the layers' KVCache, whose own merge would make a batch
        assert c.merge([c]) is c and c.extract(0) is c
        c.filter([0])
        with pytest.raises(ValueError, match="cannot merge 2"):
            c.merge([c, c])
        with pytest.raises(ValueError):
            c.filter([])
    copied = copy.deepcopy(caches)  # as mlx-lm's prompt cache hands them out
    assert [type(c) for c in copied] == [type(c) for c in caches]


def test_a_cache_that_dropped_its_front_is_not_trimmed():
    # llama4's chunked attention drops what lies before the current chunk (8
    # tokens here); mlx-lm's ChunkedKVCache still said it could be trimmed back,
    # and a prompt cache hit trimmed past its front answered wrongly.
    from mlx_lm.models.cache import can_trim_prompt_cache

    model, _ = synthetic.build_model(EXTRA_CONFIGS["llama4"], seed=1)
    caches = solo_caches(model)
    model(mx.array([[5, 6, 7]]), cache=caches)
    assert can_trim_prompt_cache(caches)
    for t in range(8, 30):  # decoded one token at a time, past the chunk
        model(mx.array([[t]]), cache=caches)
    assert not can_trim_prompt_cache(caches)
    assert not can_trim_prompt_cache(copy.deepcopy(caches))


@pytest.mark.parametrize("weights", ["float32", "q4-bfloat16"])
@pytest.mark.parametrize("arch, exact", [("qwen3_next", True), ("jamba", False), ("nemotron_h", False),
                                         ("deepseek_v41", True)])
def test_the_probe_finds_models_that_padding_changes(arch, exact, weights):
    options = dict(quantize=4, dtype="bfloat16") if weights == "q4-bfloat16" else {}  # 16-bit logits' tolerance
    model, _ = synthetic.build_model(EXTRA_CONFIGS[arch], seed=1, **options)
    assert padded_prefill_is_exact(model, list(range(1, 40))) == exact  # deepseek_v41: never padded
    model, _ = synthetic.build_model(synthetic.tiny_config("qwen3_moe"), seed=1)
    assert padded_prefill_is_exact(model, [7])


#: Served and batch-generated on 2 ranks: with no cache merge, and with padding that changes answers.
SERVED = {"deepseek_v41": "mlx-lm cannot batch this model's caches (LayerCache)",
          "llama4": "mlx-lm cannot batch this model's caches (ChunkedKVCache)",  # and its prompt cache hits
          "jamba": "padding prompts into one prefill changes this model's answers"}


@pytest.fixture(scope="module", params=sorted(SERVED))
def ckpt(request, tmp_path_factory) -> Path:
    arch = request.param
    return synthetic.write_checkpoint(tmp_path_factory.mktemp(arch) / arch, EXTRA_CONFIGS[arch], seed=1)


def generate(ckpt, *args, stderr: list = None) -> str:
    argv = [sys.executable, "-m", "moe_mpi", "generate", "--model", str(ckpt), "--max-tokens", str(MAX_TOKENS),
            "--ignore-chat-template", *map(str, args)]
    proc = run_mpirun(2, argv, timeout=TIMEOUT, env=ENV)
    assert proc.returncode == 0, proc.stderr
    if stderr is not None:
        stderr.append(proc.stderr)
    return proc.stdout


def test_generate_prompts_file_answers_as_alone(ckpt, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "out.jsonl"
    stderr = []
    generate(ckpt, "--prompts-file", prompts, "--output", out, "--batch-size", 3, stderr=stderr)
    if ckpt.name == "jamba":
        assert SERVED["jamba"] in stderr[0], stderr[0]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(PROMPTS)))
    for row, prompt in zip(rows, PROMPTS):
        assert row["text"] + "\n" == generate(ckpt, "--prompt", prompt), prompt


def test_serve_answers_as_alone(ckpt, tmp_path):
    job = start_server(2, ckpt, tmp_path)
    try:
        assert SERVED[ckpt.name] in job.output()
        client = openai.OpenAI(base_url=job.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)

        def complete(prompt: str, stream: bool = False) -> str:
            r = client.completions.create(model=str(ckpt), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                          stream=stream)
            return "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text

        alone = {p: complete(p) for p in PROMPTS}  # the second run of a prompt reuses its cache, trimmed
        assert alone[PROMPTS[0]] + "\n" == generate(ckpt, "--prompt", PROMPTS[0])
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # all at once, streaming
            texts = dict(zip(PROMPTS, pool.map(lambda p: complete(p, stream=True), PROMPTS, timeout=TIMEOUT)))
        assert texts == alone
        host, port = job.url.split("://")[1].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        conn.request("GET", "/status")
        body = json.loads(conn.getresponse().read())
        if ckpt.name == "jamba":  # prefilled one at a time, decoded together
            assert body["batching"] == {"continuous": True, "unbatchable_caches": []}
            assert body["model"]["padded_prefill_exact"] is False
            assert any(row["decode_steps"] < row["generated_tokens"] for row in body["ranks"]), body["ranks"]
            return
        caches = UNBATCHABLE[ckpt.name]
        assert body["batching"] == {"continuous": False, "unbatchable_caches": caches}
        assert body["model"]["unbatchable_caches"] == caches
        for row in body["ranks"]:  # never two sequences in one step: a token per decode step
            assert row["decode_steps"] == row["generated_tokens"] > 0, row
    finally:
        job.stop(signal.SIGTERM, timeout=30)
