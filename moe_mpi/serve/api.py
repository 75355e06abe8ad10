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

Replaced here: reading the request (``do_POST``, with
:class:`~moe_mpi.serve.request.RequestReader`), so that every bad request
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
import socket
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from queue import Queue
from types import SimpleNamespace
from typing import Any, Dict, List, Optional
from urllib.parse import unquote

from mlx_lm.server import APIHandler, CompletionRequest, ModelProvider, ResponseGenerator

from ..argtypes import sharding_options
from ..errors import UserError
from ..prompts import context_length
from .desk import ModelOutputError, StatusQuery
from .logprobs import LogprobsWriter
from .request import MAX_BODY_BYTES, ApiError, PreparedRequest, RequestReader
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

#: Seconds an HTTP thread waits for the ranks' status figures.
STATUS_TIMEOUT = 30.0
ENDPOINTS = {"/v1/completions": "text", "/v1/chat/completions": "chat"}
#: Paths answered to GET (and HEAD); ``/v1/models/<id>`` too.
GET_PATHS = {"/health", "/v1/models", "/status"}


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
                if request.request_type == "text" and isinstance(request.prompt, list):
                    # A prompt of token ids (checked against the vocabulary later).
                    tokens, segments, types, state = request.prompt, [request.prompt], ["assistant"], "normal"
                else:
                    tokens, segments, types, state, _ = self._tokenize(tokenizer, request, template)
                stops = [[t] for t in tokenizer.eos_token_ids]
                stops += [list(tokenizer.encode(w, add_special_tokens=False)) for w in handler.stop_words]
                _, text_sm = self._make_state_machine(self.model_provider.model_key, tokenizer, handler.stop_words)
        except Exception as e:  # noqa: BLE001 - templates raise anything: all of it is the request's fault
            param = "messages" if request.request_type == "chat" else "prompt"
            raise ApiError(400, f"cannot make a prompt of this request: {type(e).__name__}: {e}", param=param) from None
        return PreparedRequest(
            **{f.name: getattr(request, f.name) for f in dataclasses.fields(CompletionRequest)},
            tokens=tokens,
            segments=segments,
            segment_types=types,
            initial_state=state,
            text_sm=text_sm,
            stop_tokens=stops,
        )

    def generate(self, request, args, progress_callback=None):
        """mlx-lm's ``generate``; a request that asked for log probabilities keeps its responses (:meth:`PreparedRequest.record`)."""
        ctx, responses = super().generate(request, args, progress_callback)
        if args.logprobs and isinstance(request, PreparedRequest):
            responses = request.record(responses)
        return ctx, responses

    def status(self, timeout: float = STATUS_TIMEOUT) -> Optional[List[dict]]:
        """Every rank's figures (one allgather at the next step), or None on timeout."""
        query = StatusQuery()
        self.requests.put(query)
        return query.wait(timeout)


class ServeHandler(RequestReader, APIHandler):
    """mlx-lm's ``APIHandler`` with checked requests and moe_mpi's GET endpoints.

    One instance per connection, on its own thread (``ThreadingHTTPServer``).
    """

    # Socket timeout: a client that stops reading (or sending) for this long
    # is treated as gone, and its slot in the batch is freed.
    timeout = 120
    # Answering HEAD: GET's headers without its body.
    head_only = False
    # The request being answered, the writer of its log probabilities and
    # the text that an echo puts before the first text.
    prepared: Optional[PreparedRequest] = None
    logprobs_writer: Optional[LogprobsWriter] = None
    echo_text = ""

    @property
    def served(self) -> ServeContext:
        """The served model's context (kept on the HTTP server object)."""
        return self.server.serve_context

    @property
    def route(self) -> str:
        """The request's path without query, percent-escapes or trailing slash, the OpenAI paths under ``/v1``.

        A client whose base URL lacks ``/v1`` asks for ``/chat/completions``
        (which mlx-lm answers too), ``/completions`` and ``/models``.
        """
        path = unquote(self.path.split("?", 1)[0]).rstrip("/")
        if path in ("/chat/completions", "/completions", "/models") or path.startswith("/models/"):
            path = "/v1" + path
        return path

    # --------------------------------------------------------------- errors

    def send_api_error(self, error: ApiError) -> None:
        """Writes ``error`` as a complete JSON response."""
        self._send_json_body(error.status, error.body(), error.headers)

    def send_json(self, status: int, obj: Any) -> None:
        """Writes ``obj`` as a complete JSON response."""
        self._send_json_body(status, json.dumps(obj).encode())

    def _send_json_body(self, status: int, body: bytes, headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self._set_cors_headers()
        self.end_headers()
        if not self.head_only:
            self.wfile.write(body)
        self.wfile.flush()

    def _set_cors_headers(self) -> None:
        # mlx-lm's, but naming Authorization: a browser does not count it in
        # the "*" of Access-Control-Allow-Headers, and the openai client
        # always sends it, so its preflight failed.
        origins = self.response_generator.cli_args.allowed_origins
        origin = self.headers.get("Origin")
        if "*" in origins:
            self.send_header("Access-Control-Allow-Origin", "*")
        elif origin in origins:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        self.send_header("Access-Control-Allow-Methods", "*")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type, *")

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

    def _wrong_method(self, path: str) -> ApiError:
        """404 for a path that nothing answers; 405 for one that takes other methods."""
        if path in ENDPOINTS:
            allow = "POST, OPTIONS"
        elif path in GET_PATHS or path.startswith("/v1/models/"):
            allow = "GET, HEAD, OPTIONS"
        else:
            return ApiError(404, f"no such endpoint: {self.command} {path or '/'}", code="not_found")
        return ApiError(405, f"{self.command} is not allowed on {path}; use {allow.split(',')[0]}", code="method_not_allowed", headers={"Allow": allow})

    def _discard_body(self) -> None:
        """Reads a body that was not needed, so that its client, maybe still sending it, reads the answer instead of a reset."""
        if self.body_read:
            return
        self.body_read = True
        try:
            length = int(self.headers.get("Content-Length", 0))
        except ValueError:
            return
        if 0 < length <= MAX_BODY_BYTES:
            self.rfile.read(length)

    def _refuse(self) -> None:
        """Methods that no endpoint takes: 405, or 404 for a path nothing answers."""
        self._discard_body()
        self.send_api_error(self._wrong_method(self.route))

    do_PUT = do_DELETE = do_PATCH = _refuse

    # ----------------------------------------------------------------- GET

    def do_HEAD(self):
        """GET's answer without its body."""
        self.head_only = True
        self.do_GET()

    def do_GET(self):
        """``/health``, ``/v1/models``, ``/v1/models/<id>``, ``/status``."""
        try:
            path = self.route
            if path == "/health":
                ok = self.response_generator.generation_available()
                self.send_json(200 if ok else 503, {"status": "ok" if ok else "unavailable"})
                return
            if path not in GET_PATHS and not path.startswith("/v1/models/"):
                raise self._wrong_method(path)
            self._check_auth()
            if path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [self._model_card()]})
            elif path.startswith("/v1/models/"):
                # The openai client escapes the id ("/" as %2F); route has unescaped it.
                name = path[len("/v1/models/"):]
                if name not in {a.rstrip("/") for a in self.served.aliases}:
                    raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.served.model_id!r}", param="model", code="model_not_found")
                self.send_json(200, self._model_card())
            else:  # /status
                figures = self.response_generator.status()
                if figures is None:
                    raise ApiError(503, "the ranks did not answer in time", kind="server_error")
                self.send_json(200, summarize(figures, self.served.model_info))
        except ApiError as e:
            self.send_api_error(e)

    def _model_card(self) -> dict:
        return {"id": self.served.model_id, "object": "model", "created": self.created, "owned_by": "moe_mpi"}

    # ---------------------------------------------------------------- POST

    def do_POST(self):
        """Checks the request completely, then answers it with mlx-lm's ``handle_completion``."""
        try:
            endpoint = ENDPOINTS.get(self.route)
            if endpoint is None:
                raise self._wrong_method(self.route)
            self._check_auth()
            request = self.read_request(endpoint)
            prepared = self.response_generator.prepare(request, self)
            self.check_prepared(prepared)
        except ApiError as e:
            self._discard_body()
            self.send_api_error(e)
            return
        self.prepared = prepared
        generator = self.response_generator
        if endpoint == "text" and self.body.get("echo"):
            prompt = prepared.prompt
            with generator.lock:
                self.echo_text = prompt if isinstance(prompt, str) else generator.model_provider.tokenizer.decode(prompt)
        if self.logprobs:
            self.logprobs_writer = LogprobsWriter(
                generator.model_provider.tokenizer, generator.lock, chat=endpoint == "chat", top=self.top_logprobs
            )
        try:
            self.handle_completion(prepared, self.stop_words)
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as e:
            # handle_completion has told the engine (ctx.stop()); the request
            # leaves the batch at the next step.
            logging.info("%s went away (%s); its request is cancelled", self.address_string(), type(e).__name__)
        except ModelOutputError as e:
            self._send_model_error(ApiError(500, str(e), kind="server_error", code="non_finite_logits"))

    def _send_model_error(self, error: ApiError) -> None:
        """Ends a request the model failed (:class:`ModelOutputError`) with ``error``, in OpenAI's shape.

        A stream has sent its 200 and its text so far: the error comes as
        one more event, ``data: {"error": {...}}``, which the ``openai``
        client raises as ``APIError``, and no ``[DONE]``. A whole response
        has only queued its 200 header line (mlx-lm's handler writes the
        headers out with the body): it is dropped, and the error is the
        answer.
        """
        try:
            if self.stream:
                self.wfile.write(b"data: " + error.body() + b"\n\n")
                self.wfile.flush()
            else:
                # BaseHTTPRequestHandler's buffer of header lines not yet sent.
                self._headers_buffer = []
                self.send_api_error(error)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client went away meanwhile: nobody to tell

    def generate_response(self, text, finish_reason, *args, **kwargs) -> dict:
        """mlx-lm's response or chunk, after an echoed prompt, with OpenAI's ``logprobs`` of its tokens (:mod:`.logprobs`)."""
        kwargs.update(token_logprobs=None, top_tokens=None, tokens=None)  # mlx-lm's own shape: none
        if self.echo_text:
            text, self.echo_text = self.echo_text + text, ""
        response = super().generate_response(text, finish_reason, *args, **kwargs)
        if self.logprobs_writer is not None:
            response["choices"][0]["logprobs"] = self.logprobs_writer(self.prepared.take_emitted())
        return response

    def completion_usage_response(self, *args, **kwargs) -> dict:
        """mlx-lm's last chunk of a stream, with the usage, of the stream's own object type."""
        response = super().completion_usage_response(*args, **kwargs)
        response["object"] = self.object_type  # mlx-lm: "chat.completion", in any stream
        return response


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
