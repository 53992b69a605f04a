"""The KServe v2 / Triton gRPC servicer: converts protos to domain objects and back.

Nothing here decides anything about models, batching or limits; that is the data plane's
job (:mod:`pruneserve.server.dataplane`). This module only checks that a message is a
well-formed tensor encoding (datatype known, shape consistent with the contents, raw
buffers of the right length), because only the transport can see the encoding. Every
problem is raised as a :class:`~pruneserve.server.errors.ServerError`; the interceptor in
:mod:`pruneserve.server.interceptors` turns it into a status code.

Tensor encodings (KServe v2):
    * typed: ``InferTensorContents``, one repeated field per datatype family;
    * raw: ``raw_input_contents[i]`` holds input ``i`` as little-endian bytes; a BYTES
      element is a 4-byte little-endian length followed by that many bytes.
A response uses the raw encoding when its request did (tritonclient reads only raw numeric
outputs) or when an output has no typed field (FP16/BF16), and typed contents otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from pruneserve.server._proto import grpc_service_pb2 as pb
from pruneserve.server._proto import grpc_service_pb2_grpc as pb_grpc
from pruneserve.server._proto import model_config_pb2 as mc
from pruneserve.server.errors import InvalidArgumentError, ServerError, quote
from pruneserve.server.interceptors import bind_request_id
from pruneserve.server.metrics import UNKNOWN_MODEL
# The tensor codec is shared with the HTTP transport; imported under the names this module used.
from pruneserve.server.tensors import MAX_TENSOR_ELEMENTS, deserialize_bytes_tensor, serialize_bytes_tensor  # noqa: F401 - re-exported
from pruneserve.server.tensors import decode_raw as _decode_raw
from pruneserve.server.tensors import element_count as _element_count
from pruneserve.server.tensors import raw_bytes as _raw_bytes
from pruneserve.server.tensors import shape_text as _shape_text
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
)

if TYPE_CHECKING:
    from pruneserve.server.dataplane import DataPlane

logger = logging.getLogger(__name__)

#: Datatype -> the ``InferTensorContents`` field that carries it (FP16/BF16: raw only).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_CONTENTS_FIELDS: tuple[str, ...] = tuple(sorted(set(CONTENTS_FIELD.values())))
#: A client-supplied deadline beyond this is treated as none (grpc reports "infinite" as huge).
_MAX_DEADLINE_S = 10 * 365 * 24 * 3600.0


# --------------------------------------------------------------------------------------
# proto -> domain
# --------------------------------------------------------------------------------------
def _parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        values[key] = getattr(param, which) if which else None
    return values


def _decode_typed(tensor: pb.ModelInferRequest.InferInputTensor, dtype: np.dtype[Any], count: int) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgumentError(
            f"input {quote(name)} is {datatype}, which has no typed contents field; send it in raw_input_contents"
        )
    contents = tensor.contents
    misplaced = [f for f in _ALL_CONTENTS_FIELDS if f != field and len(getattr(contents, f))]
    if misplaced:
        raise InvalidArgumentError(
            f"input {quote(name)} is {datatype} but carries data in {', '.join(misplaced)}; put its "
            f"{count} elements in contents.{field}"
        )
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidArgumentError(
            f"input {quote(name)} has shape {_shape_text(list(tensor.shape))} ({count} elements) but contents.{field} "
            f"holds {len(values)}; send exactly one value per element"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out
    wide = np.array(values, dtype=np.float64 if dtype.kind == "f" else None)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        if int(wide.min()) < info.min or int(wide.max()) > info.max:
            raise InvalidArgumentError(
                f"input {quote(name)}: values must fit {datatype} ([{info.min}, {info.max}]), "
                f"got range [{int(wide.min())}, {int(wide.max())}]"
            )
    return wide.astype(dtype, copy=False) if wide.size else np.empty(0, dtype=dtype)


def decode_infer_request(request: pb.ModelInferRequest) -> InferRequest:
    """Convert a ``ModelInferRequest`` into the data plane's :class:`InferRequest`.

    Raises:
        InvalidArgumentError: the tensors are not a consistent KServe v2 encoding.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgumentError(
            f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; send one "
            "raw buffer per input, in input order, or none"
        )
    seen: set[str] = set()
    inputs: list[InferInput] = []
    for index, tensor in enumerate(request.inputs):
        name, datatype = tensor.name, tensor.datatype
        if name in seen:
            raise InvalidArgumentError(f"input {quote(name)} appears more than once; send each input once")
        seen.add(name)
        dtype = DATATYPE_TO_NUMPY.get(datatype)
        if dtype is None:
            raise InvalidArgumentError(
                f"input {quote(name)} has unknown datatype {quote(datatype)}; use one of {', '.join(DATATYPE_TO_NUMPY)}"
            )
        count = _element_count(name, tensor.shape)
        if raw:
            if tensor.HasField("contents") and any(len(getattr(tensor.contents, f)) for f in _ALL_CONTENTS_FIELDS):
                raise InvalidArgumentError(
                    f"input {quote(name)} has typed contents while the request uses raw_input_contents; "
                    "use one encoding for all inputs"
                )
            flat = _decode_raw(name, datatype, dtype, count, raw[index])
        else:
            flat = _decode_typed(tensor, dtype, count)
        shape = tuple(int(d) for d in tensor.shape)
        inputs.append(InferInput(name=name, datatype=datatype, shape=shape, data=flat.reshape(shape)))
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        inputs=inputs,
        outputs=[o.name for o in request.outputs],
        id=request.id,
        parameters=_parameters(request.parameters),
    )


# --------------------------------------------------------------------------------------
# domain -> proto
# --------------------------------------------------------------------------------------
def encode_infer_response(response: InferResponse, *, raw: bool) -> pb.ModelInferResponse:
    """Convert an :class:`InferResponse`; ``raw`` selects ``raw_output_contents``."""
    # A response is all-raw or all-typed: raw_output_contents is indexed by output position.
    raw = raw or any(o.datatype not in CONTENTS_FIELD for o in response.outputs)
    message = pb.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id)
    for output in response.outputs:
        tensor = message.outputs.add(name=output.name, datatype=output.datatype, shape=list(output.shape))
        if raw:
            message.raw_output_contents.append(_raw_bytes(output))
        elif output.datatype == "BYTES":
            tensor.contents.bytes_contents.extend(bytes(x) for x in output.data.ravel())
        else:
            getattr(tensor.contents, CONTENTS_FIELD[output.datatype]).extend(output.data.ravel().tolist())
    return message


def _config_datatype(datatype: str) -> int:
    # Triton's model configuration calls KServe's BYTES "TYPE_STRING".
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def encode_model_config(info: ModelConfigInfo) -> mc.ModelConfig:
    """Convert :class:`ModelConfigInfo` into Triton's ``ModelConfig`` (dims exclude the batch)."""
    config = mc.ModelConfig(
        name=info.name,
        platform=info.platform,
        backend=info.backend,
        max_batch_size=info.max_batch_size,
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=info.preferred_batch_sizes,
            max_queue_delay_microseconds=info.max_queue_delay_us,
        ),
    )
    for spec in info.inputs:
        config.input.add(
            name=spec.name,
            data_type=_config_datatype(spec.datatype),
            dims=spec.shape,
            optional=spec.optional,
        )
    for spec in info.outputs:
        config.output.add(name=spec.name, data_type=_config_datatype(spec.datatype), dims=spec.shape)
    for key, value in info.parameters.items():
        config.parameters[key].string_value = str(value)
    return config


def encode_model_metadata(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    """Convert :class:`ModelMetadata` (shapes include the batch dimension)."""
    message = pb.ModelMetadataResponse(name=meta.name, versions=meta.versions, platform=meta.platform)
    for spec in meta.inputs:
        message.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    for spec in meta.outputs:
        message.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    return message


def _duration(d: StatDuration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def encode_model_stats(stats: ModelStats) -> pb.ModelStatistics:
    """Convert :class:`ModelStats` into Triton's ``ModelStatistics``."""
    message = pb.ModelStatistics(
        name=stats.name,
        version=stats.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
        ),
    )
    for b in stats.batch_stats:
        message.batch_stats.add(
            batch_size=b.batch_size,
            compute_input=_duration(b.compute_input),
            compute_infer=_duration(b.compute_infer),
            compute_output=_duration(b.compute_output),
        )
    return message


def encode_index_entry(entry: RepositoryEntry) -> pb.RepositoryIndexResponse.ModelIndex:
    """Convert one :class:`RepositoryEntry` into Triton's ``RepositoryIndexResponse.ModelIndex``."""
    return pb.RepositoryIndexResponse.ModelIndex(
        name=entry.name, version=entry.version, state=entry.state, reason=entry.reason
    )


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline on the ``time.monotonic`` clock, or None when the client set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > _MAX_DEADLINE_S:
        return None
    return time.monotonic() + remaining


# --------------------------------------------------------------------------------------
# the servicer
# --------------------------------------------------------------------------------------
class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over a :class:`~pruneserve.server.dataplane.DataPlane`."""

    def __init__(self, dataplane: DataPlane, shutdown: asyncio.Event | None = None) -> None:
        """``shutdown``, once set, makes open streams stop reading and end (see ModelStreamInfer)."""
        self._dataplane = dataplane
        self._shutdown = shutdown if shutdown is not None else asyncio.Event()

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._dataplane.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._dataplane.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._dataplane.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        meta = self._dataplane.server_metadata()
        return pb.ServerMetadataResponse(
            name=meta["name"], version=meta["version"], extensions=list(meta.get("extensions", ()))
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return encode_model_metadata(self._dataplane.model_metadata(request.name, request.version))

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        info = self._dataplane.model_config(request.name, request.version)
        return pb.ModelConfigResponse(config=encode_model_config(info))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        stats = self._dataplane.model_statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[encode_model_stats(s) for s in stats])

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        entries = self._dataplane.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[encode_index_entry(e) for e in entries])

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        await self._dataplane.load_model(request.model_name, list(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self._dataplane.unload_model(request.model_name, list(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, _deadline(context))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Answer each streamed request as soon as it is done (possibly out of order).

        Requests run concurrently, so a stream batches like many unary calls would; a failed
        request is answered with ``error_message`` (and its id) and the stream goes on, as
        Triton does. The stream's deadline, if any, applies to every request in it. When the
        server starts shutting down, the stream stops reading, answers what it accepted and
        ends, so an idle open stream does not hold shutdown until the grace runs out.
        """
        deadline = _deadline(context)
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(message: pb.ModelInferRequest) -> None:
            rid = bind_request_id(message.id)
            try:
                reply = pb.ModelStreamInferResponse(infer_response=await self._infer(message, deadline))
            except ServerError as exc:
                # Per-message failures never reach the interceptor: log them here, once.
                logger.info(
                    "stream request %s -> %s: %s", rid, exc.code, exc,
                    extra={"request_id": rid, "model": message.model_name, "code": exc.code},
                )  # fmt: skip
                reply = self._stream_error(message, str(exc))
            except Exception:
                logger.exception(
                    "stream request %s failed", rid, extra={"request_id": rid, "model": message.model_name}
                )
                reply = self._stream_error(message, "internal error; the server log has the details")
            await answers.put(reply)

        async def read_all() -> None:
            try:
                iterator = request_iterator.__aiter__()
                while (message := await self._next_unless_shutdown(iterator)) is not None:
                    task = asyncio.create_task(answer(message))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(set(tasks))
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read_all())
        try:
            while (reply := await answers.get()) is not None:
                yield reply
            await reader  # re-raises a failure to read the stream
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _next_unless_shutdown(self, iterator: AsyncIterator[pb.ModelInferRequest]) -> pb.ModelInferRequest | None:
        """The stream's next request; None at its end or once shutdown begins."""
        if self._shutdown.is_set():
            return None
        read = asyncio.ensure_future(iterator.__anext__())
        # The stream's end arrives as StopAsyncIteration; if this coroutine is cancelled (the
        # client went away) nobody else would look at it, so mark it retrieved here.
        read.add_done_callback(lambda t: t.cancelled() or t.exception())
        stop = asyncio.ensure_future(self._shutdown.wait())
        try:
            await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not read.done():
                read.cancel()
        if not read.done() or read.cancelled():  # shutdown came first (cancel() takes effect later)
            return None
        try:
            return read.result()
        except StopAsyncIteration:
            return None

    @staticmethod
    def _stream_error(message: pb.ModelInferRequest, text: str) -> pb.ModelStreamInferResponse:
        echo = pb.ModelInferResponse(model_name=message.model_name, model_version=message.model_version, id=message.id)
        return pb.ModelStreamInferResponse(error_message=text, infer_response=echo)

    async def _infer(self, message: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        t0 = time.monotonic()
        try:
            request = decode_infer_request(message)
        except ServerError as exc:
            # The data plane never sees a request that cannot be decoded; count it here so
            # pruneserve_requests_total still sees every refusal. Only served names become
            # label values (and never the client's version string), so a client cannot grow
            # the label set.
            model = message.model_name if message.model_name in self._dataplane.model_names() else UNKNOWN_MODEL
            self._dataplane.metrics.observe_request(model, "", exc.reason, time.monotonic() - t0)
            raise
        response = await self._dataplane.infer(request, deadline)
        return encode_infer_response(response, raw=bool(message.raw_input_contents))


__all__ = [
    "CONTENTS_FIELD",
    "InferenceServicer",
    "decode_infer_request",
    "deserialize_bytes_tensor",
    "encode_index_entry",
    "encode_infer_response",
    "encode_model_config",
    "encode_model_metadata",
    "encode_model_stats",
    "serialize_bytes_tensor",
]
