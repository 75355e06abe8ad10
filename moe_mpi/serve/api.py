"""The HTTP side of ``moe-mpi serve``: mlx-lm's server, subclassed.

Reused from ``mlx_lm.server`` as they are:

* ``APIHandler.handle_completion``: the OpenAI response shapes, streaming
  as server-sent events, usage counts, stop words, reasoning and tool-call
  parsing, and ``validate_model_parameters`` (types and ranges of the
  sampling parameters);
* ``ResponseGenerator.generate`` (a request's way to the generation loop and
  back), ``_tokenize`` (chat templates, prompt segments for the prompt
  cache) and ``_make_state_machine``;
* ``ModelProvider`` with its loader replaced by :func:`moe_mpi.load`.

Replaced here: reading the request (``do_POST``), so that every bad request
gets a 4xx in the OpenAI error shape, ``{"error": {"message", "type",
"param", "code"}}``, before it can reach the cluster; the chat request's
construction (mlx-lm's downloads image URLs named in the request, which a
server open to a network must not do); and ``GET`` (``/health``,
``/v1/models`` of the one served model, ``/status``). mlx-lm's generation
thread is replaced by :class:`~moe_mpi.serve.engine.Engine`, which every
rank runs.

A request is tokenized and checked on the HTTP thread, completely, before
it is queued: whatever reaches the engine is known to be acceptable to it on
every rank, so that no request can fail on one rank and not another.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import math
import socket
import threading
import uuid
from http.server import ThreadingHTTPServer
from pathlib import Path
from queue import Queue
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import msgpack
from mlx_lm.server import APIHandler, CompletionRequest, ModelProvider, ResponseGenerator

from ..argtypes import sharding_options
from ..errors import UserError
from ..prompts import context_length
from .desk import StatusQuery
from .engine import make_join
from .status import summarize

__all__ = [
    "ApiError",
    "ClusterModelProvider",
    "ClusterResponseGenerator",
    "PreparedRequest",
    "ServeContext",
    "ServeHandler",
    "make_http_server",
    "start_http_server",
]

#: Largest request body accepted, in bytes.
MAX_BODY_BYTES = 16 << 20
#: Seconds an HTTP thread waits for the ranks' status figures.
STATUS_TIMEOUT = 30.0
# Chat template arguments a request may not set: they would change what
# the template returns, not how it renders.
RESERVED_TEMPLATE_ARGS = {"tokenize", "add_generation_prompt", "return_dict", "tools", "continue_final_message"}
ENDPOINTS = {"/v1/completions": "text", "/v1/chat/completions": "chat", "/chat/completions": "chat"}


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

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
    """

    tokens: List[int] = dataclasses.field(default_factory=list)
    segments: List[List[int]] = dataclasses.field(default_factory=list)
    segment_types: List[str] = dataclasses.field(default_factory=list)
    initial_state: str = "normal"
    text_sm: Any = None
    stop_tokens: List[List[int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ServeContext:
    """What the HTTP threads know about the served model.

    Attributes:
        model_id: The id clients use (``/v1/models``).
        aliases: Further names accepted in a request's ``model`` field.
        model_info: The ``model`` entry of ``/status``.
        config: The model's config.json.
        vocab_size: Token ids must be below this.
        max_tokens: Default ``max_tokens`` of a request.
        api_key: If set, requests need ``Authorization: Bearer <key>``.
    """

    model_id: str
    aliases: frozenset
    model_info: Dict[str, Any]
    config: Dict[str, Any]
    vocab_size: int
    max_tokens: int
    api_key: Optional[str] = None

    @property
    def context(self) -> Optional[int]:
        """The model's context length in tokens, if its config says."""
        found = context_length(self.config)
        return found[1] if found else None


class ClusterModelProvider(ModelProvider):
    """mlx-lm's ``ModelProvider`` with :func:`moe_mpi.load` as the loader.

    Every rank loads its shard: the dense part and its own experts.

    Args:
        cli_args: The ``moe-mpi serve`` options (with mlx-lm's server's
            names for the ones it reads).
        comm: The job's :class:`moe_mpi.Communicator`.
    """

    def __init__(self, cli_args, comm):
        self.comm = comm
        self.config: Dict[str, Any] = {}
        super().__init__(cli_args)

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        from ..loading import load

        if adapter_path is not None or draft_model_path is not None:
            raise UserError("adapters and draft models are not supported by moe-mpi serve")
        args = self.cli_args
        # The load of moe-mpi generate, with the same sharding options.
        model, tokenizer, config = load(
            model_path,
            comm=self.comm,
            tokenizer_config=self._tokenizer_config,
            return_config=True,
            **sharding_options(args),
        )
        if args.use_default_chat_template and tokenizer.chat_template is None:
            tokenizer.chat_template = tokenizer.default_chat_template
        self.model_key = (model_path, None, None)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.processor = None  # text only
        self.draft_model = None
        self.is_batchable = True

    def load_shard(self):
        """Loads the served model (mlx-lm's ``load_default``); returns ``(model, tokenizer, config)``."""
        self.load_default()
        return self.model, self.tokenizer, self.config


class ClusterResponseGenerator(ResponseGenerator):
    """mlx-lm's ``ResponseGenerator`` without its generation thread.

    ``generate`` (reused) puts a request on :attr:`requests`, which is the
    inbox of rank 0's :class:`~moe_mpi.serve.desk.Desk`; the engine on the
    main thread answers on the request's queue.

    Args:
        model_provider: The loaded :class:`ClusterModelProvider`.
        lock: The tokenizer lock shared with the desk.
    """

    def __init__(self, model_provider: ClusterModelProvider, lock: threading.Lock):
        # Not ResponseGenerator.__init__: it starts mlx-lm's generation
        # thread, which the engine replaces. These are the attributes the
        # reused methods read.
        self.model_provider = model_provider
        self.requests = Queue()
        self._state_machine_cache = {}
        self.lock = lock
        self.serving = False

    def generation_available(self) -> bool:
        """Whether the engine runs (it takes the whole job down if it stops)."""
        return self.serving

    def prepare(self, request: CompletionRequest, handler: "ServeHandler") -> PreparedRequest:
        """Tokenizes ``request`` (chat template, segments) and its stop words.

        Raises:
            ApiError: The messages or template arguments do not make a prompt.
        """
        tokenizer = self.model_provider.tokenizer
        template = SimpleNamespace(chat_template_kwargs=handler.chat_template_kwargs)
        try:
            with self.lock:
                tokens, segments, types, state, _ = self._tokenize(tokenizer, request, template)
                stops = [[t] for t in tokenizer.eos_token_ids]
                stops += [list(tokenizer.encode(w, add_special_tokens=False)) for w in handler.stop_words]
                _, text_sm = self._make_state_machine(self.model_provider.model_key, tokenizer, handler.stop_words)
        except Exception as e:  # noqa: BLE001 - templates raise anything: all of it is the request's fault
            raise ApiError(400, f"cannot make a prompt of this request: {type(e).__name__}: {e}", param="messages") from None
        return PreparedRequest(
            **{f.name: getattr(request, f.name) for f in dataclasses.fields(CompletionRequest)},
            tokens=tokens,
            segments=segments,
            segment_types=types,
            initial_state=state,
            text_sm=text_sm,
            stop_tokens=stops,
        )

    def status(self, timeout: float = STATUS_TIMEOUT) -> Optional[List[dict]]:
        """Every rank's figures (one allgather at the next step), or None on timeout."""
        query = StatusQuery()
        self.requests.put(query)
        return query.wait(timeout)


def _check_tokens(tokens, vocab_size: int, what: str) -> None:
    if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab_size for t in tokens):
        raise ApiError(400, f"{what} must be token ids below {vocab_size}", param="messages")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class ServeHandler(APIHandler):
    """mlx-lm's ``APIHandler`` with checked requests and moe_mpi's GET endpoints.

    One instance per connection, on its own thread (``ThreadingHTTPServer``).
    """

    # Socket timeout: a client that stops reading (or sending) for this long
    # is treated as gone, and its slot in the batch is freed.
    timeout = 120

    @property
    def served(self) -> ServeContext:
        """The served model's context (kept on the HTTP server object)."""
        return self.server.serve_context

    # --------------------------------------------------------------- errors

    def send_api_error(self, error: ApiError) -> None:
        """Writes ``error`` as a complete JSON response."""
        self._send_json_body(error.status, error.body())

    def send_json(self, status: int, obj: Any) -> None:
        """Writes ``obj`` as a complete JSON response."""
        self._send_json_body(status, json.dumps(obj).encode())

    def _send_json_body(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self._set_cors_headers()
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        """Access log lines through ``logging`` (not raw stderr)."""
        logging.info("%s %s", self.address_string(), format % args)

    def _check_auth(self) -> None:
        key = self.served.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")

    # ----------------------------------------------------------------- GET

    def do_GET(self):
        """``/health``, ``/v1/models``, ``/status``."""
        try:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/health":
                ok = self.response_generator.generation_available()
                self.send_json(200 if ok else 503, {"status": "ok" if ok else "unavailable"})
                return
            self._check_auth()
            if path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [self._model_card()]})
            elif path == f"/v1/models/{self.served.model_id}":
                self.send_json(200, self._model_card())
            elif path == "/status":
                figures = self.response_generator.status()
                if figures is None:
                    raise ApiError(503, "the ranks did not answer in time", kind="server_error")
                self.send_json(200, summarize(figures, self.served.model_info))
            else:
                raise ApiError(404, f"no such endpoint: GET {path}", code="not_found")
        except ApiError as e:
            self.send_api_error(e)

    def _model_card(self) -> dict:
        return {"id": self.served.model_id, "object": "model", "created": self.created, "owned_by": "moe_mpi"}

    # ---------------------------------------------------------------- POST

    def do_POST(self):
        """Checks the request completely, then answers it with mlx-lm's ``handle_completion``."""
        try:
            endpoint = ENDPOINTS.get(self.path.split("?", 1)[0])
            if endpoint is None:
                raise ApiError(404, f"no such endpoint: POST {self.path}", code="not_found")
            self._check_auth()
            self.body = self._read_body()
            self._read_parameters()
            request = self._chat_request() if endpoint == "chat" else self._text_request()
            prepared = self.response_generator.prepare(request, self)
            self._check_prepared(prepared)
        except ApiError as e:
            self.send_api_error(e)
            return
        try:
            self.handle_completion(prepared, self.stop_words)
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as e:
            # handle_completion has told the engine (ctx.stop()); the request
            # leaves the batch at the next step.
            logging.info("%s went away (%s); its request is cancelled", self.address_string(), type(e).__name__)

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
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

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
        self._check_more()

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
        role_mapping = self.body.get("role_mapping")
        if role_mapping is not None and not isinstance(role_mapping, dict):
            raise ApiError(400, "role_mapping must be an object", param="role_mapping")
        self.request_id = f"chatcmpl-{uuid.uuid4()}"
        self.object_type = "chat.completion.chunk" if self.stream else "chat.completion"
        return CompletionRequest("chat", "", messages, tools, role_mapping)

    def _text_request(self) -> CompletionRequest:
        if not isinstance(self.body.get("prompt"), str):
            raise ApiError(400, "prompt must be a string", param="prompt")
        return self.handle_text_completions()  # mlx-lm's

    def _check_prepared(self, prepared: PreparedRequest) -> None:
        """The prompt's length against the context; the join record the engine will get."""
        vocab = self.served.vocab_size
        n = len(prepared.tokens)
        if n == 0:
            raise ApiError(400, "the prompt is empty (0 tokens)", param="messages")
        context = self.served.context
        if context is not None:
            if n >= context:
                raise ApiError(
                    400,
                    f"This model's maximum context length is {context} tokens. However, your prompt has {n} tokens.",
                    param="messages", code="context_length_exceeded",
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
        _check_tokens(prepared.tokens, vocab, "the prompt")
        if sum(len(s) for s in prepared.segments) != n:
            raise ApiError(500, "internal error: prompt segments do not cover the prompt", kind="server_error")
        for seq in prepared.stop_tokens:
            _check_tokens(seq, vocab, "stop sequences")
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


class ServeHTTPServer(ThreadingHTTPServer):
    """mlx-lm's threading HTTP server, with a deeper accept queue.

    Python's default backlog of 5 drops connection attempts when dozens of
    clients connect at once, and each dropped one waits a second for TCP to
    retry.
    """

    request_queue_size = 128
    daemon_threads = True


def make_http_server(host: str, port: int) -> ServeHTTPServer:
    """Binds (but does not yet listen on) ``host:port``, resolved as mlx-lm's server does.

    A bound socket that is not listening refuses connections, so no client
    waits on a server that is still loading; :func:`start_http_server`
    listens once the engine is ready.

    Raises:
        UserError: The address cannot be bound (in use, not local, ...).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    server_class = type("ServeHTTPServer", (ServeHTTPServer,), {"address_family": family})
    try:
        httpd = server_class(address, None, bind_and_activate=False)
        httpd.server_bind()
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    return httpd


def start_http_server(httpd: ServeHTTPServer, generator: ClusterResponseGenerator, context: ServeContext, on_failure) -> None:
    """Listens and serves on a daemon thread; ``on_failure(exc)`` if serving ever stops.

    Args:
        httpd: From :func:`make_http_server`.
        generator: Where the handlers send requests.
        context: The served model, for the handlers.
        on_failure: Called with the exception that ended ``serve_forever``.
    """

    def handler(*args, **kwargs):
        return ServeHandler(generator, *args, **kwargs)

    def serve() -> None:
        try:
            httpd.serve_forever()
        except BaseException as e:  # noqa: BLE001 - whatever stops it, the engine must learn of it
            on_failure(e)

    httpd.RequestHandlerClass = handler
    httpd.serve_context = context
    httpd.server_activate()
    threading.Thread(target=serve, name="http", daemon=True).start()
    generator.serving = True


def describe_address(httpd: ServeHTTPServer) -> str:
    """``http://host:port`` of a bound server."""
    host, port = httpd.server_address[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def model_aliases(model_arg: str, model_path: Path) -> frozenset:
    """Names a request's ``model`` may use: as given, the resolved path, its name, mlx-lm's default."""
    return frozenset({model_arg, str(model_path), str(Path(model_path).resolve()), Path(model_path).name, "default_model"})
