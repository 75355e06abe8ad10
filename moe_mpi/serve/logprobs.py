"""Log probabilities in OpenAI's shapes, for ``moe-mpi serve``'s responses.

mlx-lm 0.32's server returns ``logprobs`` in a shape of its own: chat
entries ``{"id", "logprob"}`` without the token's text, or, with
``top_logprobs``, entries whose ``token`` is the first of the (unsorted) top
tokens rather than the token drawn, as a tokenizer piece (``Ġthe``); the same
shape for text completions, where OpenAI's clients read ``tokens`` and
``token_logprobs``; and nothing in streams. The ``openai`` client then gives
``None`` for ``choice.logprobs.content[0].token`` and for
``choice.logprobs.tokens``.

:class:`LogprobsWriter` makes OpenAI's shapes from the tokens a request
generated (mlx-lm's ``Response`` objects, as the desk made them), for a whole
response or chunk by chunk:

* chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}, ...]}, ...], "refusal": None}``, the top tokens most
  likely first;
* text completions: ``{"tokens", "token_logprobs", "top_logprobs": [{text:
  logprob}, ...] or None, "text_offset"}``, plus the chat entries as
  ``content``.

Every entry also keeps mlx-lm's ``id`` (the token id), so that clients
written for ``mlx_lm.server`` still find it. A token's text is its text
decoded alone (a byte of a longer UTF-8 character decodes to U+FFFD).
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["LogprobsWriter"]


class LogprobsWriter:
    """OpenAI's ``logprobs`` of one request's choice (see the module docstring).

    Args:
        tokenizer: The model's tokenizer (mlx-lm's wrapper).
        lock: The lock held around every use of the tokenizer.
        chat: Chat completion (else text completion) shapes.
        top: Top tokens per position (0: none).
    """

    def __init__(self, tokenizer, lock: threading.Lock, *, chat: bool, top: int):
        self.tokenizer = tokenizer
        self.lock = lock
        self.chat = chat
        self.top = max(top, 0)
        self.offset = 0  # characters written so far, for text_offset

    def _texts(self, ids: Sequence[int]) -> Dict[int, str]:
        with self.lock:
            return {t: self.tokenizer.decode([t]) for t in set(ids)}

    def __call__(self, responses: Sequence[Any]) -> Optional[dict]:
        """The ``logprobs`` of a choice covering ``responses`` (mlx-lm ``Response`` objects), or None if empty."""
        if not responses:
            return None
        tops = [sorted(r.top_tokens or (), key=lambda t: -t["logprob"])[: self.top] for r in responses]
        text = self._texts([r.token for r in responses] + [t["id"] for top in tops for t in top])

        def entry(token: int, logprob: float) -> dict:
            return {"token": text[token], "logprob": logprob, "bytes": list(text[token].encode("utf-8")), "id": token}

        content = [
            {**entry(r.token, r.logprob), "top_logprobs": [entry(t["id"], t["logprob"]) for t in top]}
            for r, top in zip(responses, tops)
        ]
        if self.chat:
            return {"content": content, "refusal": None}
        offsets: List[int] = []
        for r in responses:
            offsets.append(self.offset)
            self.offset += len(text[r.token])
        return {
            "tokens": [text[r.token] for r in responses],
            "token_logprobs": [r.logprob for r in responses],
            "top_logprobs": [{text[t["id"]]: t["logprob"] for t in top} for top in tops] if self.top else None,
            "text_offset": offsets,
            "content": content,
        }
