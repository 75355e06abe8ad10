"""Streamed chat completions in the serve tests: read from the ``openai`` client, or sent by hand."""

import json
import socket


def collect(chunks) -> tuple:
    """``(text, usage, finish_reason)`` of a stream of chat completion chunks."""
    text, usage, finish = "", None, None
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    return text, usage, finish


def open_stream(url: str, model_id: str, max_tokens: int, no_end_tokens) -> socket.socket:
    """A streaming chat completion sent over a raw socket, for a client that hangs up or reads on.

    ``no_end_tokens``: the end-of-sequence ids, banned (logit_bias), so that
    only the client or the server can end the stream.
    """
    host, port = url.split("://")[1].rsplit(":", 1)
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "go on"}],
                       "max_tokens": max_tokens, "stream": True,
                       "logit_bias": {str(t): -100 for t in no_end_tokens}}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock
