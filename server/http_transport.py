"""The HTTP transport: KServe v2 / Triton REST and OpenAI-compatible routes over the data plane.

A thin layer, like the gRPC servicer: each handler parses JSON (and Triton's binary tensors),
calls one :class:`~pruneserve.server.dataplane.DataPlane` verb and writes the answer. Nothing
here decides anything about models, batching or limits. It runs on aiohttp's server, on the
same asyncio loop as ``grpc.aio``, so one process, one loop and one data plane serve both.

Routes (Triton's HTTP/REST protocol unless said otherwise):
    * ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]/ready``;
    * ``GET /v2`` (server metadata), ``/v2/models/{name}[/versions/{v}]`` (model metadata),
      ``.../config``, ``.../stats`` and ``/v2/models/stats``;
    * ``POST /v2/repository/index``, ``/v2/repository/models/{name}/load`` and ``.../unload``
      (the model repository extension; see docs/model-control.md);
    * ``POST /v2/models/{name}[/versions/{v}]/infer``: JSON tensors, or Triton's binary-tensor
      extension (an input's ``binary_data_size`` parameter; the JSON header's length in the
      ``Inference-Header-Content-Length`` header, the tensors' bytes after it; BYTES elements
      4-byte little-endian length-prefixed; an output's ``binary_data`` parameter, or the
      request's ``binary_data_output``, asks for binary outputs);
    * ``POST /v1/embeddings`` (OpenAI's shape), ``POST /v1/classify`` (labels and scores, the
      shape documented in docs/http.md), ``GET /v1/models``.

Errors: a :class:`~pruneserve.server.errors.ServerError` becomes
:func:`~pruneserve.server.errors.http_status` of its code (the table beside the gRPC codes)
with ``{"error": "<message>"}`` (``/v1`` routes: OpenAI's ``{"error": {"message", "type",
"code"}}``); anything else is a bug, answered 500 naming only the request id. Bodies over
``max_message_bytes`` get 413, bodies slower than ``http_read_timeout_s`` 408 (the connection
is then closed), and neither touches any other request.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from pruneserve.server.errors import (
    InvalidArgumentError,
    ServerError,
    UnavailableError,
    http_status,
    quote,
)
from pruneserve.server.interceptors import REQUEST_ID_METADATA, bind_request_id
from pruneserve.server.metrics import PROTOCOL, UNKNOWN_MODEL
from pruneserve.server.tensors import decode_raw, element_count, raw_bytes
from pruneserve.server.types import (
    DATATYPE_TO_NUMPY,
    InferInput,
    InferRequest,
    InferResponse,
    ModelConfigInfo,
    ModelMetadata,
    ModelStats,
    RepositoryEntry,
    StatDuration,
    TensorSpec,
)

if TYPE_CHECKING:
    import ssl

    from pruneserve.server.config import ServeConfig
    from pruneserve.server.dataplane import DataPlane

logger = logging.getLogger(__name__)

#: Triton's header giving the length of the JSON part of a binary-tensor body.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: Routes that keep answering while the server drains (probes must see it go unready).
_HEALTH_PREFIX = "/v2/health/"
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: A datatype's numpy kind -> the JSON value kinds accepted for it.
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
EMBEDDING_OUTPUT = "embedding"
LOGITS_OUTPUT = "logits"
LABEL_OUTPUT = "label"


class _ReadTimeout(Exception):
    """The request body did not arrive within ``http_read_timeout_s``."""


# --------------------------------------------------------------------------------------
# JSON / binary tensors -> domain
# --------------------------------------------------------------------------------------
def split_body(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """The parsed JSON header of an infer body and the binary part after it.

    Raises:
        InvalidArgumentError: the header length is not an integer within the body, or the
            JSON part does not parse.
    """
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidArgumentError(
                f"{HEADER_LENGTH} {quote(header_length)} is not an integer; give the byte length of the JSON part"
            ) from None
        if not 0 <= length <= len(body):
            raise InvalidArgumentError(
                f"{HEADER_LENGTH} is {length} but the body holds {len(body)} bytes; give the byte length of "
                "the JSON part that starts the body"
            )
        json_part, binary = body[:length], body[length:]
    return parse_json(json_part), binary


def parse_json(data: bytes) -> Any:
    """``json.loads`` with a client-facing error (position and reason, never the payload)."""
    try:
        return json.loads(data)
    except UnicodeDecodeError:
        raise InvalidArgumentError("the request body is not UTF-8 JSON; send a JSON object") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(
            f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); send a JSON object"
        ) from None


def _flatten(name: str, data: Any, count: int) -> list[Any]:
    """The leaves of a (possibly nested) JSON list, refusing more than ``count`` of them."""
    out: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
            if len(out) > count:
                break
    if len(out) != count:
        raise InvalidArgumentError(
            f"input {quote(name)}: data holds {'more than ' + str(count) if len(out) > count else len(out)} "
            f"elements but the shape declares {count}; send exactly one value per element"
        )
    return out


def _decode_json_data(name: str, datatype: str, dtype: np.dtype[Any], count: int, data: Any) -> np.ndarray:
    values = _flatten(name, data if isinstance(data, list) else [data], count)
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise InvalidArgumentError(f"input {quote(name)} is BYTES: element {i} must be a JSON string, got {type(v).__name__}")
            out[i] = v.encode("utf-8")
        return out
    want = _JSON_KINDS.get(dtype.kind, "iuf")
    for i, v in enumerate(values):
        kind = "b" if isinstance(v, bool) else "i" if isinstance(v, int) else "f" if isinstance(v, float) else "?"
        if kind not in want:
            raise InvalidArgumentError(
                f"input {quote(name)} is {datatype}: element {i} is {quote(v, 24)}, not a "
                f"{'boolean' if want == 'b' else 'integer' if want == 'iu' else 'number'}"
            )
    if dtype.kind in "iu" and values:
        info = np.iinfo(dtype)
        lo, hi = min(values), max(values)
        if lo < info.min or hi > info.max:
            raise InvalidArgumentError(
                f"input {quote(name)}: values must fit {datatype} ([{info.min}, {info.max}]), got range [{lo}, {hi}]"
            )
    return np.array(values, dtype=dtype) if values else np.empty(0, dtype=dtype)


def _parameters(obj: Any, where: str) -> dict[str, Any]:
    params = obj.get("parameters", {}) if isinstance(obj, dict) else {}
    if not isinstance(params, dict):
        raise InvalidArgumentError(f"{where}: 'parameters' must be a JSON object")
    return params


def _str_field(obj: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{where}: {key!r} must be a string, got {quote(value)}")
    return value


def decode_infer_json(model: str, version: str, header: Any, binary: bytes) -> tuple[InferRequest, dict[str, bool]]:
    """A KServe v2 JSON infer request (with Triton binary tensors) as an :class:`InferRequest`.

    Returns the request and, per requested output, whether it is to be sent as binary
    (``"*"`` holds the default for outputs the request did not list).

    Raises:
        InvalidArgumentError: the JSON or the tensors are not a consistent encoding.
    """
    if not isinstance(header, dict):
        raise InvalidArgumentError("the infer request must be a JSON object with an 'inputs' list")
    inputs_json = header.get("inputs")
    if not isinstance(inputs_json, list) or not inputs_json:
        raise InvalidArgumentError("the infer request needs a non-empty 'inputs' list of tensors")
    request_params = _parameters(header, "the request")
    seen: set[str] = set()
    inputs: list[InferInput] = []
    offset = 0
    for index, tensor in enumerate(inputs_json):
        if not isinstance(tensor, dict):
            raise InvalidArgumentError(f"inputs[{index}] must be a JSON object with name, datatype, shape and data")
        name = _str_field(tensor, "name", f"inputs[{index}]")
        if name in seen:
            raise InvalidArgumentError(f"input {quote(name)} appears more than once; send each input once")
        seen.add(name)
        datatype = _str_field(tensor, "datatype", f"input {quote(name)}")
        dtype = DATATYPE_TO_NUMPY.get(datatype)
        if dtype is None:
            raise InvalidArgumentError(
                f"input {quote(name)} has unknown datatype {quote(datatype)}; use one of {', '.join(DATATYPE_TO_NUMPY)}"
            )
        shape_json = tensor.get("shape")
        if not isinstance(shape_json, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape_json):
            raise InvalidArgumentError(f"input {quote(name)}: 'shape' must be a list of integers, e.g. [2, 1]")
        count = element_count(name, shape_json)
        params = _parameters(tensor, f"input {quote(name)}")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgumentError(f"input {quote(name)}: binary_data_size must be a non-negative integer")
            if "data" in tensor:
                raise InvalidArgumentError(f"input {quote(name)} has both 'data' and binary_data_size; send one")
            if offset + size > len(binary):
                raise InvalidArgumentError(
                    f"input {quote(name)}: binary_data_size {size} at offset {offset} runs past the "
                    f"{len(binary)} binary bytes after the JSON header; check {HEADER_LENGTH} and the sizes"
                )
            flat = decode_raw(name, datatype, dtype, count, binary[offset : offset + size])
            offset += size
        elif "data" in tensor:
            flat = _decode_json_data(name, datatype, dtype, count, tensor["data"])
        else:
            raise InvalidArgumentError(f"input {quote(name)} has no 'data' and no binary_data_size parameter")
        shape = tuple(shape_json)
        inputs.append(InferInput(name=name, datatype=datatype, shape=shape, data=flat.reshape(shape)))
    if offset != len(binary):
        raise InvalidArgumentError(
            f"{len(binary) - offset} bytes follow the binary tensors the inputs declare; make {HEADER_LENGTH} "
            "and the binary_data_size parameters add up to the body"
        )
    binary_default = request_params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidArgumentError("the request's binary_data_output parameter must be true or false")
    binary_of: dict[str, bool] = {"*": binary_default}
    outputs: list[str] = []
    outputs_json = header.get("outputs", [])
    if not isinstance(outputs_json, list):
        raise InvalidArgumentError("'outputs' must be a list of {\"name\": ...} objects")
    for index, out in enumerate(outputs_json):
        if not isinstance(out, dict):
            raise InvalidArgumentError(f"outputs[{index}] must be a JSON object with a name")
        name = _str_field(out, "name", f"outputs[{index}]")
        params = _parameters(out, f"output {quote(name)}")
        if params.get("classification"):
            raise InvalidArgumentError(
                f"output {quote(name)}: the classification extension is not supported; request the 'label' "
                "output (classifiers) or POST /v1/classify for labels and scores"
            )
        binary_out = params.get("binary_data", binary_default)
        if not isinstance(binary_out, bool):
            raise InvalidArgumentError(f"output {quote(name)}: binary_data must be true or false")
        outputs.append(name)
        binary_of[name] = binary_out
    rid = header.get("id", "")
    if not isinstance(rid, str):
        raise InvalidArgumentError(f"the request 'id' must be a string, got {quote(rid)}")
    extra = {k: v for k, v in request_params.items() if k != "binary_data_output"}
    return InferRequest(model=model, version=version, inputs=inputs, outputs=outputs, id=rid, parameters=extra), binary_of


# --------------------------------------------------------------------------------------
# domain -> JSON
# --------------------------------------------------------------------------------------
def encode_infer_json(response: InferResponse, binary_of: dict[str, bool]) -> tuple[bytes, int | None]:
    """The body of an infer answer and, when it carries binary outputs, the JSON part's length."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in response.outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if binary_of.get(output.name, binary_of["*"]):
            raw = raw_bytes(output)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif output.datatype == "BYTES":
            entry["data"] = [bytes(x).decode("utf-8", "replace") for x in output.data.ravel()]
        else:
            entry["data"] = output.data.ravel().tolist()
        outputs.append(entry)
    header: dict[str, Any] = {"model_name": response.model, "model_version": response.version, "outputs": outputs}
    if response.id:
        header["id"] = response.id
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if not chunks:
        return text, None
    return text + b"".join(chunks), len(text)


def _spec(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def model_metadata_json(meta: ModelMetadata) -> dict[str, Any]:
    """KServe v2 model metadata as JSON."""
    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": [_spec(s) for s in meta.inputs],
        "outputs": [_spec(s) for s in meta.outputs],
    }


def _config_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_config_json(info: ModelConfigInfo) -> dict[str, Any]:
    """Triton's model configuration as Triton's HTTP endpoint writes it (dims exclude the batch)."""
    return {
        "name": info.name,
        "platform": info.platform,
        "backend": info.backend,
        "max_batch_size": info.max_batch_size,
        "input": [
            {"name": s.name, "data_type": _config_type(s.datatype), "dims": list(s.shape), "optional": s.optional}
            for s in info.inputs
        ],
        "output": [{"name": s.name, "data_type": _config_type(s.datatype), "dims": list(s.shape)} for s in info.outputs],
        "dynamic_batching": {
            "preferred_batch_size": list(info.preferred_batch_sizes),
            "max_queue_delay_microseconds": info.max_queue_delay_us,
        },
        "parameters": {k: {"string_value": str(v)} for k, v in info.parameters.items()},
    }


def _duration(d: StatDuration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def model_stats_json(stats: ModelStats) -> dict[str, Any]:
    """Triton's ``ModelStatistics`` as JSON."""
    return {
        "name": stats.name,
        "version": stats.version,
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {
            "success": _duration(stats.success),
            "fail": _duration(stats.fail),
            "queue": _duration(stats.queue),
            "compute_input": _duration(stats.compute_input),
            "compute_infer": _duration(stats.compute_infer),
            "compute_output": _duration(stats.compute_output),
        },
        "batch_stats": [
            {
                "batch_size": b.batch_size,
                "compute_input": _duration(b.compute_input),
                "compute_infer": _duration(b.compute_infer),
                "compute_output": _duration(b.compute_output),
            }
            for b in stats.batch_stats
        ],
    }


def index_entry_json(entry: RepositoryEntry) -> dict[str, str]:
    """One repository index entry as Triton writes it (``version`` only when there is one)."""
    out = {"name": entry.name}
    if entry.version:
        out["version"] = entry.version
    out["state"] = entry.state
    out["reason"] = entry.reason
    return out


# --------------------------------------------------------------------------------------
# OpenAI-compatible requests
# --------------------------------------------------------------------------------------
def texts_of(body: Any, route: str) -> tuple[str, list[str]]:
    """``(model, texts)`` of an OpenAI-style body: ``input`` is a string or a list of strings."""
    if not isinstance(body, dict):
        raise InvalidArgumentError(f"POST {route} needs a JSON object with 'model' and 'input'")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgumentError(f"POST {route}: 'model' must be the name of a served model (GET /v1/models lists them)")
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise InvalidArgumentError(f"POST {route}: 'input' must be a string or a non-empty list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidArgumentError(
                f"POST {route}: input[{i}] is {type(text).__name__}; send text (token-id arrays are not accepted: "
                "the server tokenizes with the model's own tokenizer)"
            )
    return model, texts


def text_request(model: str, texts: list[str], outputs: list[str]) -> InferRequest:
    """An :class:`InferRequest` of ``texts`` as the ``text`` input (shape ``[n]``)."""
    data = np.empty(len(texts), dtype=object)
    data[:] = [t.encode("utf-8") for t in texts]
    return InferRequest(model=model, version="", inputs=[InferInput("text", "BYTES", (len(texts),), data)], outputs=outputs)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: the row's maximum is subtracted first)."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------
# the transport
# --------------------------------------------------------------------------------------
class HttpTransport:
    """An aiohttp server answering the KServe v2 and OpenAI routes from a data plane.

    Lifecycle: :meth:`start` binds and returns the port; :meth:`start_draining` makes new
    requests (health checks excepted) get 503 while the ones in flight finish;
    :meth:`wait_idle` waits for them; :meth:`stop` closes the listener and the connections.
    """

    def __init__(self, dataplane: DataPlane, config: ServeConfig) -> None:
        self._dataplane = dataplane
        self._config = config
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        # client_max_size: the same body limit as gRPC's message limit (413 beyond it).
        self.app = web.Application(client_max_size=config.max_message_bytes, middlewares=[self._middleware])
        self._add_routes(self.app.router)

    def _add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v2/health/live", self.live)
        router.add_get("/v2/health/ready", self.ready)
        router.add_get("/v2", self.server_metadata)
        # Fixed paths before the {name} patterns: "stats" is not a model name here.
        router.add_get("/v2/models/stats", self.stats)
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            router.add_get(base, self.model_metadata)
            router.add_get(base + "/ready", self.model_ready)
            router.add_get(base + "/config", self.model_config)
            router.add_get(base + "/stats", self.stats)
            router.add_post(base + "/infer", self.infer)
        router.add_post("/v2/repository/index", self.repository_index)
        router.add_post("/v2/repository/models/{name}/load", self.load_model)
        router.add_post("/v2/repository/models/{name}/unload", self.unload_model)
        router.add_post("/v1/embeddings", self.embeddings)
        router.add_post("/v1/classify", self.classify)
        router.add_get("/v1/models", self.list_models)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Bind ``host:port`` (0 = a free port) and serve; returns the bound port."""
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=self._config.grace_seconds)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=False)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    def start_draining(self) -> None:
        """Refuse new requests with 503 (health checks still answer: not ready)."""
        self._draining = True

    @property
    def in_flight(self) -> int:
        """Requests being answered now."""
        return self._in_flight

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False when ``timeout`` seconds pass first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, timeout))
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self) -> None:
        """Close the listener and every connection (waits up to the grace for handlers)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- request plumbing ------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        PROTOCOL.set("http")  # this connection's task: request metrics get protocol="http"
        rid = bind_request_id(request.headers.get(REQUEST_ID_METADATA, ""))
        openai = request.path.startswith("/v1/")
        if self._draining and not request.path.startswith(_HEALTH_PREFIX):
            response = self._error(UnavailableError("the server is shutting down; retry on another replica"), openai)
            response.force_close()
            return response
        self._in_flight += 1
        self._idle.clear()
        try:
            return await handler(request)
        except ServerError as exc:
            # Logged once, here, as the gRPC interceptor does: client errors at INFO, INTERNAL at ERROR.
            status = http_status(exc)
            level = logging.ERROR if exc.code == "INTERNAL" else logging.INFO
            logger.log(level, "%s %s %s -> %d: %s", request.method, request.path, rid, status, exc,
                       extra={"request_id": rid, "code": exc.code})  # fmt: skip
            return self._error(exc, openai)
        except _ReadTimeout:
            logger.info("%s %s %s -> 408: body not received in time", request.method, request.path, rid)
            response = self._error_status(
                408, f"the request body did not arrive within {self._config.http_read_timeout_s:g} s; send it faster "
                "or raise --http-read-timeout-s", openai,
            )  # fmt: skip
            response.force_close()
            return response
        except web.HTTPException as exc:  # aiohttp's own: unknown route (404), wrong method (405), too large (413)
            message = self._http_exception_text(exc)
            response = self._error_status(exc.status, message, openai)
            if exc.status == 413:
                response.force_close()  # the rest of the body is never read
            return response
        except Exception:
            logger.exception("%s %s %s failed", request.method, request.path, rid, extra={"request_id": rid})
            return self._error_status(500, f"internal error (request id {rid}); the server log has the details", openai)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def _http_exception_text(self, exc: web.HTTPException) -> str:
        if exc.status == 413:
            return (
                f"the request body is larger than the server's limit of {self._config.max_message_bytes} bytes "
                "(max_message_bytes); send fewer or shorter texts per request"
            )
        if exc.status == 404:
            return "no such route; see /v2 (KServe v2), /v1/embeddings, /v1/classify"
        return exc.reason or "bad request"

    @staticmethod
    def _error_status(status: int, message: str, openai: bool) -> web.Response:
        if openai:
            kind = "invalid_request_error" if status < 500 else "server_error"
            body: dict[str, Any] = {"error": {"message": message, "type": kind, "code": status}}
        else:
            body = {"error": message}
        return web.json_response(body, status=status)

    def _error(self, exc: ServerError, openai: bool) -> web.Response:
        return self._error_status(http_status(exc), str(exc), openai)

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, within the size limit and the read timeout."""
        if request.content_length is not None and request.content_length > self._config.max_message_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self._config.max_message_bytes, actual_size=request.content_length)
        try:
            return await asyncio.wait_for(request.read(), timeout=self._config.http_read_timeout_s)
        except asyncio.TimeoutError:
            raise _ReadTimeout() from None

    def _count_refusal(self, model: str, exc: ServerError, t0: float) -> None:
        # As the gRPC servicer does: a request that cannot be decoded never reaches the data
        # plane; count it here, labelled only with served names.
        label = model if model in self._dataplane.model_names() else UNKNOWN_MODEL
        self._dataplane.metrics.observe_request(label, "", exc.reason, time.monotonic() - t0)

    # -- health and metadata ---------------------------------------------------------------
    async def live(self, request: web.Request) -> web.Response:
        live = self._dataplane.live()
        return web.json_response({"live": live}, status=200 if live else 503)

    async def ready(self, request: web.Request) -> web.Response:
        ready = self._dataplane.ready() and not self._draining
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        ready = self._dataplane.model_ready(name, version) and not self._draining
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self._dataplane.server_metadata())

    async def model_metadata(self, request: web.Request) -> web.Response:
        meta = self._dataplane.model_metadata(request.match_info["name"], request.match_info.get("version", ""))
        return web.json_response(model_metadata_json(meta))

    async def model_config(self, request: web.Request) -> web.Response:
        info = self._dataplane.model_config(request.match_info["name"], request.match_info.get("version", ""))
        return web.json_response(model_config_json(info))

    async def stats(self, request: web.Request) -> web.Response:
        stats = self._dataplane.model_statistics(request.match_info.get("name", ""), request.match_info.get("version", ""))
        return web.json_response({"model_stats": [model_stats_json(s) for s in stats]})

    # -- the model repository extension ----------------------------------------------------
    async def _optional_json(self, request: web.Request, route: str) -> dict[str, Any]:
        # tritonclient sends an empty body to the index and "{}" to load: both mean no options.
        body = await self._read_body(request)
        if not body.strip():
            return {}
        payload = parse_json(body)
        if not isinstance(payload, dict):
            raise InvalidArgumentError(f"POST {route} takes a JSON object (or an empty body)")
        return payload

    async def repository_index(self, request: web.Request) -> web.Response:
        """``POST /v2/repository/index``: every model version and its state (``{"ready": true}``: ready ones only)."""
        payload = await self._optional_json(request, "/v2/repository/index")
        ready = payload.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgumentError(f"'ready' must be true or false, got {quote(ready)}")
        entries = self._dataplane.repository_index(ready_only=ready)
        return web.json_response([index_entry_json(e) for e in entries])

    async def load_model(self, request: web.Request) -> web.Response:
        """``POST /v2/repository/models/{name}/load`` (``--model-control-mode explicit``)."""
        payload = await self._optional_json(request, "/v2/repository/models/{name}/load")
        await self._dataplane.load_model(request.match_info["name"], list(_parameters(payload, "the load request")))
        return web.Response(status=200)

    async def unload_model(self, request: web.Request) -> web.Response:
        """``POST /v2/repository/models/{name}/unload``: accepted requests finish first."""
        payload = await self._optional_json(request, "/v2/repository/models/{name}/unload")
        await self._dataplane.unload_model(request.match_info["name"], list(_parameters(payload, "the unload request")))
        return web.Response(status=200)

    # -- inference -------------------------------------------------------------------------
    async def infer(self, request: web.Request) -> web.Response:
        t0 = time.monotonic()
        name, version = request.match_info["name"], request.match_info.get("version", "")
        body = await self._read_body(request)
        try:
            header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
            infer_request, binary_of = decode_infer_json(name, version, header, binary)
        except ServerError as exc:
            self._count_refusal(name, exc, t0)
            raise
        if infer_request.id:
            bind_request_id(infer_request.id)
        response = await self._dataplane.infer(infer_request, None)
        payload, json_length = encode_infer_json(response, binary_of)
        if json_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(
            body=payload, content_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)}
        )

    def _outputs_of(self, model: str) -> dict[str, TensorSpec]:
        return {s.name: s for s in self._dataplane.model_metadata(model).outputs}

    async def _openai_body(self, request: web.Request, route: str) -> tuple[dict[str, Any], str, list[str], float]:
        t0 = time.monotonic()
        body = await self._read_body(request)
        payload: Any = None
        try:
            payload = parse_json(body)
            model, texts = texts_of(payload, route)
        except ServerError as exc:
            named = payload.get("model") if isinstance(payload, dict) else None
            self._count_refusal(named if isinstance(named, str) else "", exc, t0)
            raise
        return payload, model, texts, t0

    async def embeddings(self, request: web.Request) -> web.Response:
        """OpenAI ``POST /v1/embeddings``: ``float`` lists or ``base64`` little-endian float32."""
        payload, model, texts, t0 = await self._openai_body(request, "/v1/embeddings")
        try:
            encoding = payload.get("encoding_format", "float")
            if encoding not in ("float", "base64"):
                raise InvalidArgumentError(f"encoding_format {quote(encoding)} is not 'float' or 'base64'; send one of those")
            outputs = self._outputs_of(model)
            spec = outputs.get(EMBEDDING_OUTPUT)
            if spec is None:
                raise InvalidArgumentError(
                    f"model {quote(model)} is a classifier (outputs {sorted(outputs)}), not an embedding model; "
                    "POST /v1/classify for its labels and scores"
                )
            dimensions = payload.get("dimensions")
            if dimensions is not None and dimensions != spec.shape[-1]:
                raise InvalidArgumentError(
                    f"dimensions={quote(dimensions)} but model {quote(model)} makes {spec.shape[-1]}-dimensional "
                    "embeddings (it cannot shorten them); omit 'dimensions' or send that value"
                )
        except ServerError as exc:
            self._count_refusal(model, exc, t0)
            raise
        response = await self._dataplane.infer(text_request(model, texts, [EMBEDDING_OUTPUT]), None)
        vectors = np.ascontiguousarray(response.outputs[0].data, dtype="<f4")
        data = []
        for i, row in enumerate(vectors):
            value: Any = base64.b64encode(row.tobytes()).decode("ascii") if encoding == "base64" else row.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return web.json_response({
            "object": "list",
            "data": data,
            "model": response.model,
            "usage": {"prompt_tokens": response.tokens, "total_tokens": response.tokens},
        })  # fmt: skip

    async def classify(self, request: web.Request) -> web.Response:
        """``POST /v1/classify``: each text's label, its probability and every label's (softmax of the logits)."""
        _payload, model, texts, t0 = await self._openai_body(request, "/v1/classify")
        try:
            outputs = self._outputs_of(model)
            if LOGITS_OUTPUT not in outputs or LABEL_OUTPUT not in outputs:
                raise InvalidArgumentError(
                    f"model {quote(model)} is an embedding model (outputs {sorted(outputs)}), not a classifier; "
                    "POST /v1/embeddings for its embeddings"
                )
        except ServerError as exc:
            self._count_refusal(model, exc, t0)
            raise
        response = await self._dataplane.infer(text_request(model, texts, [LOGITS_OUTPUT, LABEL_OUTPUT]), None)
        by_name = {o.name: o.data for o in response.outputs}
        labels = list(self._dataplane.repository.get(response.model, response.version).manifest.labels)
        probs = softmax(np.asarray(by_name[LOGITS_OUTPUT]))
        data = []
        for i, (row, label) in enumerate(zip(probs, np.asarray(by_name[LABEL_OUTPUT]).ravel())):
            scores = sorted(
                ({"label": labels[j] if j < len(labels) else str(j), "score": float(p)} for j, p in enumerate(row)),
                key=lambda s: -s["score"],
            )
            data.append({"object": "classification", "index": i, "label": bytes(label).decode("utf-8"),
                         "score": float(row.max()), "scores": scores})  # fmt: skip
        return web.json_response({
            "object": "list",
            "data": data,
            "model": response.model,
            "usage": {"prompt_tokens": response.tokens, "total_tokens": response.tokens},
        })  # fmt: skip

    async def list_models(self, request: web.Request) -> web.Response:
        """OpenAI ``GET /v1/models``: the served model names."""
        names = self._dataplane.model_names()
        return web.json_response(
            {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "pruneserve"} for n in names]}
        )


__all__ = [
    "HEADER_LENGTH",
    "HttpTransport",
    "decode_infer_json",
    "encode_infer_json",
    "index_entry_json",
    "model_config_json",
    "model_metadata_json",
    "model_stats_json",
    "split_body",
]
