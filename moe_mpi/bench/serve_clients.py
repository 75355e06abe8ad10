"""The clients of ``moe-mpi bench serve``: streaming chat requests at a level of concurrency, and their summary.

Each request is one greedy streaming chat completion over a raw HTTP
connection, timed from sending it to its first chunk with text (time to
first token) and to its last chunk; a level's summary gives aggregate
tokens/s, TTFT percentiles and per-request rates, and :func:`agreement`
compares the servers' texts prompt by prompt.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from typing import Any, Dict, List, Optional

__all__ = ["REQUEST_TIMEOUT", "agreement", "agreement_lines", "fmt", "host_port", "make_prompts", "run_level",
           "stream_chat", "summarize_level"]

REQUEST_TIMEOUT = 1800.0


def host_port(url: str) -> tuple:
    """``("127.0.0.1", 8080)`` of ``http://127.0.0.1:8080/`` (IPv6 brackets dropped)."""
    hostport = url.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def fmt(value, spec: str) -> str:
    """``value`` formatted, ``-`` for None."""
    return "-" if value is None else format(value, spec)

_WORDS = (
    "river stone cloud engine market garden silver window orange planet music doctor "
    "winter yellow bridge forest letter camera island rocket summer paper dragon castle "
    "number mirror pocket ticket violin wallet zebra anchor bottle candle desert feather "
    "harbor jacket kettle ladder magnet needle oyster pepper quartz saddle tunnel umbrella"
).split()


def make_prompts(count: int, words: int, seed: int = 0) -> List[str]:
    """``count`` distinct prompts of ``words`` random words each."""
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(_WORDS) for _ in range(words)) for i in range(count)]


def stream_chat(url: str, model: str, prompt: str, max_tokens: int, timeout: float = REQUEST_TIMEOUT) -> Dict[str, Any]:
    """One greedy streaming chat completion, timed.

    Returns:
        ``{"start", "first", "end"}`` (``time.perf_counter`` seconds),
        ``"tokens"`` (the server's usage count), ``"prompt_tokens"``,
        ``"text"``; ``"error"`` instead when it failed.
    """
    host, port = host_port(url)
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    record: Dict[str, Any] = {"start": time.perf_counter(), "first": None, "end": None, "tokens": 0, "text": "", "retries": 0}
    try:
        response = _post(host, port, body, timeout, record)
        if response.status != 200:
            record["error"] = f"HTTP {response.status}: {response.read()[:200]!r}"
            return record
        while True:
            line = response.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue  # keep-alive comments, blank separators
            data = line[6:]
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    record["first"] = record["first"] or time.perf_counter()
                    record["text"] += text
            if chunk.get("usage"):
                record["tokens"] = chunk["usage"]["completion_tokens"]
                record["prompt_tokens"] = chunk["usage"]["prompt_tokens"]
        response.close()
    except (OSError, ValueError, http.client.HTTPException) as e:
        record["error"] = f"{type(e).__name__}: {e}"
    record["end"] = time.perf_counter()
    record["first"] = record["first"] or record["end"]
    return record


def _post(host: str, port: int, body: str, timeout: float, record: Dict[str, Any]):
    """POSTs a chat request; retries a connection the server dropped before answering.

    mlx_lm.server (Python's http.server) listens with a backlog of 5 and
    resets connections beyond it when many clients connect at once; the
    openai client retries those, and so does this one (up to 3 times, the
    request's clock still running from the first try).
    """
    for attempt in range(4):
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            return conn.getresponse()
        except (ConnectionResetError, ConnectionRefusedError, http.client.RemoteDisconnected):
            conn.close()
            if attempt == 3:
                raise
            record["retries"] += 1
            time.sleep(0.1 * (attempt + 1))


def run_level(url: str, model: str, clients: int, prompts: List[str], max_tokens: int) -> tuple:
    """``clients`` threads share ``prompts``, each sending one request at a time.

    Returns:
        ``(records, wall seconds)``.
    """
    todo = list(prompts)
    lock = threading.Lock()
    records: List[Dict[str, Any]] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                prompt = todo.pop(0)
            record = stream_chat(url, model, prompt, max_tokens)
            record["prompt"] = prompt
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - start


def _percentile(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize_level(records: List[Dict[str, Any]], wall: float) -> Dict[str, Any]:
    """Aggregate tokens/s, TTFT p50/p95/mean and per-request decode tokens/s of one level."""
    ok = [r for r in records if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["first"] - r["start"] for r in ok]
    rates = [r["tokens"] / (r["end"] - r["start"]) for r in ok if r["end"] > r["start"]]
    return {
        "requests": len(records),
        "errors": [r["error"] for r in records if "error" in r][:5],
        "failed": len(records) - len(ok),
        "retries": sum(r.get("retries", 0) for r in records),
        "tokens": tokens,
        "prompt_tokens_mean": sum(r.get("prompt_tokens", 0) for r in ok) / len(ok) if ok else None,
        "wall_s": wall,
        "aggregate_tps": tokens / wall if wall > 0 else None,
        "ttft_p50_ms": 1e3 * _percentile(ttft, 0.5) if ttft else None,
        "ttft_p95_ms": 1e3 * _percentile(ttft, 0.95) if ttft else None,
        # A burst is prefilled in groups, so the p50 of a level jumps with
        # how many requests the first group took; the mean moves smoothly.
        "ttft_mean_ms": 1e3 * sum(ttft) / len(ttft) if ttft else None,
        "request_tps_p50": _percentile(rates, 0.5),
        "texts": {r["prompt"]: r["text"] for r in ok if "prompt" in r},
        # Every request's TTFT, in the order sent: shows how a burst was prefilled.
        "ttft_ms": [round(1e3 * (r["first"] - r["start"])) for r in sorted(ok, key=lambda r: r["start"])],
    }


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each server's greedy texts against the first server's, per client count.

    Returns:
        One entry per (clients, server) after the first server: ``equal``
        and ``compared`` requests, and ``prefix``, the mean share of the
        reference text that the two texts have in common from the start.
    """
    out = []
    for clients in sorted({r["clients"] for r in rows}):
        level = [r for r in rows if r["clients"] == clients and r.get("texts")]
        if len(level) < 2:
            continue
        ref = level[0]
        for row in level[1:]:
            common = [p for p in ref["texts"] if p in row["texts"]]
            equal = sum(ref["texts"][p] == row["texts"][p] for p in common)
            shares = [_common_prefix(ref["texts"][p], row["texts"][p]) / max(len(ref["texts"][p]), 1) for p in common]
            out.append({
                "clients": clients, "server": row["server"], "reference": ref["server"],
                "equal": equal, "compared": len(common), "prefix": sum(shares) / len(shares) if shares else None,
            })
    return out


def agreement_lines(checks: List[Dict[str, Any]]) -> List[str]:
    """The output check as comment lines."""
    return [
        f"# output check, {c['clients']} clients: {c['server']} texts equal {c['reference']}'s in "
        f"{c['equal']}/{c['compared']} requests (common prefix {fmt(c['prefix'] and 100 * c['prefix'], '.0f')}% of the text)"
        for c in checks
    ]


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------
