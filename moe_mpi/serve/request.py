"""A request to ``moe-mpi serve``, read and checked on rank 0's HTTP thread.

:class:`RequestReader` is the part of the HTTP handler
(:class:`~moe_mpi.serve.api.ServeHandler`) that reads a POST's body and
sets, checked, the attributes that mlx-lm's ``handle_completion`` reads
(``max_tokens``, ``temperature``, ``logprobs``, ...), as mlx-lm's ``do_POST``
does, and then checks the tokenized request against the model (context,
vocabulary) and the engine (what its join record can carry). Whatever it
refuses raises :class:`ApiError`, which the handler sends in OpenAI's error
shape, ``{"error": {"message", "type", "param", "code"}}``, before the
request can reach the cluster.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional

import msgpack
from mlx_lm.server import CompletionRequest

from .engine import make_join

__all__ = ["ApiError", "MAX_BODY_BYTES", "PreparedRequest", "RequestReader"]

#: Largest request body accepted, in bytes.
MAX_BODY_BYTES = 16 << 20
# Chat template arguments a request may not set: they would change what
# the template returns, not how it renders.
RESERVED_TEMPLATE_ARGS = {"tokenize", "add_generation_prompt", "return_dict", "tools", "continue_final_message"}
#: Most top tokens per position (mlx-lm's limit of ``top_logprobs``).
MAX_TOP_LOGPROBS = 11


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None, kind: str = "invalid_request_error", headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}  # further response headers (e.g. Allow)

    def body(self) -> bytes:
        """The JSON body, in the shape OpenAI's API and its clients use."""
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode()


@dataclasses.dataclass
class PreparedRequest(CompletionRequest):
    """mlx-lm's request with what the HTTP thread made of it.

    Attributes:
        tokens: The prompt's token ids.
        segments: Consecutive slices of ``tokens`` (system prompt, user
            turn, ...), where the prompt cache may keep a prefix.
        segment_types: The cache type of each segment.
        initial_state: Where mlx-lm's text state machine starts.
        text_sm: mlx-lm's text state machine (stop words, reasoning, tools).
        stop_tokens: Token sequences that end generation (EOS, stop words).
        emitted: The responses handed to the HTTP thread and not yet taken
            (kept only for requests that asked for log probabilities).
    """

    tokens: List[int] = dataclasses.field(default_factory=list)
    segments: List[List[int]] = dataclasses.field(default_factory=list)
    segment_types: List[str] = dataclasses.field(default_factory=list)
    initial_state: str = "normal"
    text_sm: Any = None
    stop_tokens: List[List[int]] = dataclasses.field(default_factory=list)
    emitted: List[Any] = dataclasses.field(default_factory=list)

    def record(self, responses: Iterator) -> Iterator:
        """Passes ``responses`` on, keeping each in :attr:`emitted` as it goes."""
        for response in responses:
            self.emitted.append(response)
            yield response

    def take_emitted(self) -> List[Any]:
        """The responses passed on since the last call."""
        taken, self.emitted = self.emitted, []
        return taken


def _check_tokens(tokens, vocab_size: int, what: str, param: str) -> None:
    if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab_size for t in tokens):
        raise ApiError(400, f"{what} must be token ids below {vocab_size}", param=param)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class RequestReader:
    """The request-reading half of the HTTP handler (a mixin of mlx-lm's ``APIHandler``).

    Reads ``self.served`` (the :class:`~moe_mpi.serve.api.ServeContext`) and
    ``self.response_generator`` of the handler it is mixed into.
    """

    #: Whether the body has been read from the connection.
    body_read = False
    #: ``"chat"`` or ``"text"``: the endpoint of the request being read.
    endpoint: Optional[str] = None

    def read_request(self, endpoint: str) -> CompletionRequest:
        """Reads and checks the body of a POST to ``endpoint`` (``"chat"`` or ``"text"``).

        Raises:
            ApiError: The request is refused.
        """
        self.endpoint = endpoint
        self.body = self._read_body()
        self._read_parameters()
        return self._chat_request() if endpoint == "chat" else self._text_request()

    def _read_body(self) -> dict:
        ctype = self.headers.get("Content-Type", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, not {ctype or 'missing'!r}", code="unsupported_media_type")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required", code="length_required")
        try:
            length = int(length)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length {length!r}") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise ApiError(413, f"the body may have at most {MAX_BODY_BYTES} bytes", code="request_too_large")
        self.body_read = True
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        # A field given as null is a field left out: the openai client sends
        # a parameter given as None as null (temperature=None, ...).
        return {k: v for k, v in body.items() if v is not None}

    def _read_parameters(self) -> None:
        """Sets what mlx-lm's ``handle_completion`` reads, as its ``do_POST`` does, and checks it."""
        body, cli = self.body, self.response_generator.cli_args
        self.stream = body.get("stream", False)
        self.stream_options = body.get("stream_options")
        self.requested_model = body.get("model", self.served.model_id)
        self.requested_draft_model = "default_model"
        self.num_draft_tokens = 0
        self.adapter = None
        self.max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        self.max_tokens_given = self.max_tokens is not None
        if self.max_tokens is None:
            self.max_tokens = self.served.max_tokens
        self.temperature = body.get("temperature", cli.temp)
        self.top_p = body.get("top_p", cli.top_p)
        self.top_k = body.get("top_k", cli.top_k)
        self.min_p = body.get("min_p", cli.min_p)
        self.repetition_penalty = body.get("repetition_penalty", 0.0)
        self.repetition_context_size = body.get("repetition_context_size", 20)
        self.presence_penalty = body.get("presence_penalty", 0.0)
        self.presence_context_size = body.get("presence_context_size", 20)
        self.frequency_penalty = body.get("frequency_penalty", 0.0)
        self.frequency_context_size = body.get("frequency_context_size", 20)
        self.xtc_probability = body.get("xtc_probability", 0.0)
        self.xtc_threshold = body.get("xtc_threshold", 0.1)
        self.logit_bias = body.get("logit_bias")
        self.logprobs = body.get("logprobs", False)
        self.top_logprobs = body.get("top_logprobs", -1)
        if self.endpoint == "text" and type(self.logprobs) is int:
            # OpenAI's completions take logprobs=N: the N most likely tokens too.
            if not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
                raise ApiError(400, f"logprobs must be from 0 to {MAX_TOP_LOGPROBS}", param="logprobs")
            self.logprobs, self.top_logprobs = True, self.logprobs
        self.seed = body.get("seed")
        self.chat_template_kwargs = body.get("chat_template_kwargs")
        for unsupported in ("adapters", "draft_model", "num_draft_tokens"):
            if body.get(unsupported) is not None:
                raise ApiError(400, f"{unsupported} is not supported by moe-mpi serve", param=unsupported)
        if self.requested_model not in self.served.aliases:
            raise ApiError(404, f"the model {self.requested_model!r} does not exist; this server serves {self.served.model_id!r}", param="model", code="model_not_found")
        try:
            self.validate_model_parameters()  # mlx-lm's checks of types and ranges
        except ValueError as e:
            raise ApiError(400, str(e), param=str(e).split(" ", 1)[0]) from None
        # Top tokens come with the drawn token's own log probability.
        self.logprobs = self.logprobs or self.top_logprobs > 0
        self._check_more()
        self._check_unsupported()

    def _check_more(self) -> None:
        """Checks beyond mlx-lm's: what the engine relies on, on every rank."""
        if self.body.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if self.top_k > self.served.vocab_size:
            raise ApiError(400, f"top_k must be at most the vocabulary size {self.served.vocab_size}", param="top_k")
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 63):
            raise ApiError(400, "seed must fit in 64 bits", param="seed")
        if self.logit_bias is not None:
            bias = self.logit_bias  # mlx-lm's check made it {int: float}
            if not all(0 <= k < self.served.vocab_size and math.isfinite(v) for k, v in bias.items()):
                raise ApiError(400, f"logit_bias needs token ids below {self.served.vocab_size} and finite values", param="logit_bias")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not _finite(getattr(self, name)):
                raise ApiError(400, f"{name} must be a finite number", param=name)
        options = self.stream_options
        if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)):
            raise ApiError(400, "stream_options must be an object with a boolean include_usage", param="stream_options")
        if options is not None:
            self.stream_options = {"include_usage": options.get("include_usage", False)}
        stop = self.body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(w, str) for w in stop):
            raise ApiError(400, "stop must be a string or a list of strings", param="stop")
        self.stop_words = stop
        kwargs = self.chat_template_kwargs
        if kwargs is not None and not (isinstance(kwargs, dict) and not RESERVED_TEMPLATE_ARGS & set(kwargs)):
            raise ApiError(400, f"chat_template_kwargs must be an object without {sorted(RESERVED_TEMPLATE_ARGS)}", param="chat_template_kwargs")

    def _check_unsupported(self) -> None:
        """Refuses what OpenAI's API offers and this server would otherwise ignore without a word."""
        body = self.body
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise ApiError(400, 'only response_format {"type": "text"} is supported: the output is not constrained to JSON (ask for JSON in the prompt)', param="response_format")
        if self.endpoint == "text" and body.get("best_of", 1) != 1:
            raise ApiError(400, "only best_of=1 is supported", param="best_of")
        if self.endpoint == "text" and body.get("suffix", "") != "":
            raise ApiError(400, "suffix is not supported", param="suffix")

    def _chat_request(self) -> CompletionRequest:
        """mlx-lm's ``handle_chat_completions``, checked, and without fetching image URLs."""
        messages = self.body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "every message must be an object with a string role", param="messages")
            content = m.get("content")
            parts = content if isinstance(content, list) else []
            if not (content is None or isinstance(content, str) or isinstance(content, list)) or not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts
            ):
                raise ApiError(400, "message content must be a string or a list of text parts (no images)", param="messages")
        tools = self.body.get("tools") or None
        if tools is not None and not isinstance(tools, list):
            raise ApiError(400, "tools must be a list", param="tools")
        if tools and self.body.get("tool_choice") != "none" and not self.response_generator.model_provider.tokenizer.has_tool_calling:
            # mlx-lm would pass them to a template that ignores them: the
            # model would never call one, and the client would not know why.
            raise ApiError(400, "this model's chat template has no tool calling: tools cannot be used", param="tools")
        role_mapping = self.body.get("role_mapping")
        if role_mapping is not None and not isinstance(role_mapping, dict):
            raise ApiError(400, "role_mapping must be an object", param="role_mapping")
        self.request_id = f"chatcmpl-{uuid.uuid4()}"
        self.object_type = "chat.completion.chunk" if self.stream else "chat.completion"
        return CompletionRequest("chat", "", messages, tools, role_mapping)

    def _text_request(self) -> CompletionRequest:
        """mlx-lm's ``handle_text_completions``, for one prompt: text or token ids, alone or in a list of one."""
        prompt = self.body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise ApiError(400, "only one prompt per request is supported", param="prompt")
        if not (isinstance(prompt, str) or isinstance(prompt, list) and all(type(t) is int for t in prompt)):
            raise ApiError(400, "prompt must be a string or a list of token ids", param="prompt")
        if not isinstance(self.body.get("echo", False), bool):
            raise ApiError(400, "echo must be a boolean", param="echo")
        if self.body.get("echo") and self.logprobs:
            raise ApiError(400, "echo with logprobs is not supported (the prompt's log probabilities are not computed)", param="echo")
        self.body["prompt"] = prompt
        return self.handle_text_completions()  # mlx-lm's

    def check_prepared(self, prepared: PreparedRequest) -> None:
        """The prompt's length against the context; the join record the engine will get."""
        vocab = self.served.vocab_size
        n = len(prepared.tokens)
        param = "messages" if self.endpoint == "chat" else "prompt"
        if n == 0:
            raise ApiError(400, "the prompt is empty (0 tokens)", param=param)
        context = self.served.context
        if context is not None:
            if n >= context:
                raise ApiError(
                    400,
                    f"This model's maximum context length is {context} tokens. However, your prompt has {n} tokens.",
                    param=param, code="context_length_exceeded",
                )
            if n + self.max_tokens > context:
                if self.max_tokens_given:
                    raise ApiError(
                        400,
                        f"This model's maximum context length is {context} tokens. However, you requested "
                        f"{n + self.max_tokens} tokens ({n} in the prompt, {self.max_tokens} in the completion).",
                        param="max_tokens", code="context_length_exceeded",
                    )
                self.max_tokens = context - n  # the default, cut to what fits
        _check_tokens(prepared.tokens, vocab, "the prompt", param)
        if sum(len(s) for s in prepared.segments) != n:
            raise ApiError(500, "internal error: prompt segments do not cover the prompt", kind="server_error")
        for seq in prepared.stop_tokens:
            _check_tokens(seq, vocab, "stop sequences", "stop")
        # What the desk will send: it must encode (e.g. no integer beyond 64 bits).
        probe = SimpleNamespace(sampling=self, logits=self._logits_arguments(), max_tokens=self.max_tokens)
        try:
            msgpack.packb(make_join(0, prepared, probe, self.seed), use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise ApiError(400, f"the request's parameters cannot be encoded: {e}") from None

    def _logits_arguments(self):
        from mlx_lm.server import LogitsProcessorArguments

        return LogitsProcessorArguments(
            logit_bias=self.logit_bias,
            repetition_penalty=self.repetition_penalty,
            repetition_context_size=self.repetition_context_size,
            presence_penalty=self.presence_penalty,
            presence_context_size=self.presence_context_size,
            frequency_penalty=self.frequency_penalty,
            frequency_context_size=self.frequency_context_size,
        )
