"""A small synchronous client for pruneserve (or any KServe v2 / Triton gRPC server).

It uses the same generated stubs as the server, sends tensors as ``raw_input_contents``
(the compact encoding tritonclient uses too) and decodes either response encoding::

    with InferenceClient("localhost:8001") as client:
        out = client.infer_text("minilm", ["a sentence", "another one"])
        out["embedding"].shape          # (2, 384)

Failures surface as :class:`grpc.RpcError`; ``err.code()`` and ``err.details()`` carry
the server's status code and its explanation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from pruneserve.server._proto import grpc_service_pb2 as pb
from pruneserve.server._proto import grpc_service_pb2_grpc as pb_grpc
from pruneserve.server.servicer import CONTENTS_FIELD, deserialize_bytes_tensor, serialize_bytes_tensor
from pruneserve.server.types import DATATYPE_TO_NUMPY

logger = logging.getLogger(__name__)

_NUMPY_TO_DATATYPE: dict[np.dtype[Any], str] = {v: k for k, v in DATATYPE_TO_NUMPY.items() if k != "BYTES"}


def _datatype_of(array: np.ndarray) -> str:
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return _NUMPY_TO_DATATYPE[array.dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {array.dtype} has no KServe v2 datatype") from None


def encode_utf8(text: str, where: str) -> bytes:
    """``text`` as UTF-8 bytes; raises :class:`ValueError` naming ``where`` and what is not UTF-8.

    Python hands a program the bytes of a non-UTF-8 argument or file name as lone surrogates
    (U+DC80..U+DCFF, "surrogateescape"); the message names the original byte for those.
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise ValueError(
            f"{where} is not valid UTF-8 ({what} at character {exc.start + 1}); the server takes UTF-8 text: "
            "convert it first, e.g. iconv -f LATIN1 -t UTF-8"
        ) from None


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes_tensor(x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in array.ravel())
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The response's tensors as numpy arrays (BYTES as object arrays of :class:`bytes`)."""
    outputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(response.outputs):
        shape = tuple(int(d) for d in tensor.shape)
        count = int(np.prod(shape))
        if index < len(response.raw_output_contents):
            buffer = response.raw_output_contents[index]
            if tensor.datatype == "BYTES":
                flat = deserialize_bytes_tensor(buffer, count, tensor.name)
            else:
                flat = np.frombuffer(buffer, dtype=DATATYPE_TO_NUMPY[tensor.datatype].newbyteorder("<"))
        else:
            values = getattr(tensor.contents, CONTENTS_FIELD[tensor.datatype])
            flat = np.array(list(values), dtype=DATATYPE_TO_NUMPY[tensor.datatype])
        outputs[tensor.name] = flat.reshape(shape)
    return outputs


class InferenceClient:
    """A blocking gRPC client.

    Args:
        url: ``host:port`` of the server.
        tls_ca: PEM file of the CA that signed the server's certificate; enables TLS.
        tls_cert, tls_key: PEM client certificate and key, for servers that require mutual TLS.
        timeout: default per-call deadline in seconds (None: no deadline).
        max_message_bytes: largest message sent or received.
    """

    def __init__(
        self,
        url: str = "localhost:8001",
        *,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("give tls_cert and tls_key together (a client certificate needs its key)")
        if tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
                private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
            )
            self._channel = grpc.secure_channel(url, credentials, options)
        else:
            self._channel = grpc.insecure_channel(url, options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self.timeout = timeout

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- health and metadata ---------------------------------------------------------------
    def server_live(self) -> bool:
        """Whether the server process is up."""
        return self._stub.ServerLive(pb.ServerLiveRequest(), timeout=self.timeout).live

    def server_ready(self) -> bool:
        """Whether the server accepts inference."""
        return self._stub.ServerReady(pb.ServerReadyRequest(), timeout=self.timeout).ready

    def model_ready(self, model: str, version: str = "") -> bool:
        """Whether ``model`` (at ``version``) is ready."""
        return self._stub.ModelReady(pb.ModelReadyRequest(name=model, version=version), timeout=self.timeout).ready

    def server_metadata(self) -> pb.ServerMetadataResponse:
        """Server name, version and extensions."""
        return self._stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=self.timeout)

    def model_metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        """A model's versions and tensors."""
        return self._stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version), timeout=self.timeout)

    # -- inference -------------------------------------------------------------------------
    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] = (),
        version: str = "",
        request_id: str = "",
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on named numpy inputs; returns the outputs by name.

        String or bytes arrays are sent as BYTES; other arrays with their own datatype.
        """
        request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        for name, value in inputs.items():
            array = np.asarray(value, dtype=object) if isinstance(value, (list, tuple)) else np.asarray(value)
            datatype = _datatype_of(array)
            request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
            request.raw_input_contents.append(_raw(array, datatype))
        for name in outputs:
            request.outputs.add(name=name)
        response = self._stub.ModelInfer(request, timeout=self.timeout if timeout is None else timeout)
        return decode_outputs(response)

    def infer_text(
        self,
        model: str,
        texts: Sequence[str],
        *,
        outputs: Sequence[str] = (),
        version: str = "",
        request_id: str = "",
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Send ``texts`` as the ``text`` input (BYTES ``[n, 1]``, UTF-8; ValueError names a text that is not)."""
        encoded = [encode_utf8(t, f"text #{i}") for i, t in enumerate(texts, start=1)]
        array = np.array(encoded, dtype=object).reshape(-1, 1)
        return self.infer(
            model, {"text": array}, outputs=outputs, version=version, request_id=request_id, timeout=timeout
        )


__all__ = ["InferenceClient", "decode_outputs", "encode_utf8"]
