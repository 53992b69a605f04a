"""KServe v2 tensor encoding shared by the transports (gRPC and HTTP): bytes <-> numpy.

Protocol-independent pieces only: the BYTES length-prefixed encoding (a 4-byte little-endian
length followed by that many bytes, per element; used by gRPC's raw contents and by Triton's
HTTP binary-tensor extension alike), checked element counts of client-declared shapes, and
raw little-endian buffers <-> arrays. Every problem is an
:class:`~pruneserve.server.errors.InvalidArgumentError` naming the input, the limit and the fix.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

from pruneserve.server.errors import InvalidArgumentError, quote
from pruneserve.server.types import DATATYPE_TO_NUMPY, InferOutput

_LENGTH_PREFIX = struct.Struct("<I")
#: Most elements one request tensor may declare (the product of its non-zero dimensions).
#: A shape is a client's promise, checked against the contents before anything is sized by
#: it; this bound keeps counts inside what numpy can index and turns absurd promises into
#: INVALID_ARGUMENT rather than an allocation error. Real inputs are far smaller: the
#: message itself is capped by ``max_message_bytes`` (at most 2**31 - 1 bytes).
MAX_TENSOR_ELEMENTS = 2**31 - 1


# --------------------------------------------------------------------------------------
# BYTES raw encoding
# --------------------------------------------------------------------------------------
def serialize_bytes_tensor(items: Iterable[bytes]) -> bytes:
    """Encode BYTES elements as length-prefixed (4-byte little-endian) records."""
    parts: list[bytes] = []
    for item in items:
        parts.append(_LENGTH_PREFIX.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def deserialize_bytes_tensor(buffer: bytes, count: int, name: str) -> np.ndarray:
    """Decode exactly ``count`` length-prefixed BYTES elements; the buffer must end with the last.

    Returns a 1-D object array of :class:`bytes`. Every length is checked against what is
    left of the buffer before slicing, so a hostile length cannot make us read past it or
    allocate more than the message already occupies.
    """
    # Every element needs at least its 4-byte length, so a buffer of n bytes holds at most
    # n // 4 of them. Checked before the object array (8 bytes per declared element) is
    # allocated, so a 4-byte message declaring 2**25 texts costs nothing.
    if count > len(buffer) // _LENGTH_PREFIX.size:
        raise InvalidArgumentError(
            f"input {quote(name)}: raw BYTES contents end after {len(buffer)} bytes, room for at most "
            f"{len(buffer) // _LENGTH_PREFIX.size} of the {count} elements the shape declares (each element "
            "needs a 4-byte little-endian length followed by its bytes); make the shape match the contents"
        )
    out = np.empty(count, dtype=object)
    view = memoryview(buffer)
    offset, size = 0, len(buffer)
    for i in range(count):
        if size - offset < _LENGTH_PREFIX.size:
            raise InvalidArgumentError(
                f"input {quote(name)}: raw BYTES contents end after {i} of {count} elements; each element "
                "needs a 4-byte little-endian length followed by its bytes"
            )
        (length,) = _LENGTH_PREFIX.unpack_from(view, offset)
        offset += _LENGTH_PREFIX.size
        if length > size - offset:
            raise InvalidArgumentError(
                f"input {quote(name)}: raw BYTES element {i} declares {length} bytes but only "
                f"{size - offset} remain in the buffer"
            )
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != size:
        raise InvalidArgumentError(
            f"input {quote(name)}: raw BYTES contents hold {size - offset} bytes after the {count} elements "
            "the shape declares; make the shape match the number of elements"
        )
    return out


def element_count(name: str, shape: Iterable[int]) -> int:
    """The number of elements ``shape`` declares, refusing shapes no request can honestly carry.

    The bound applies to the product of the non-zero dimensions: a shape such as
    ``[0, 2**63 - 1]`` declares no elements, but reshaping even an empty array to it fails,
    so it is as unusable as a shape declaring that many elements.
    """
    dims = list(shape)
    if any(d < 0 for d in dims):
        raise InvalidArgumentError(
            f"input {quote(name)} has shape {shape_text(dims)}; every dimension of a request tensor must be >= 0"
        )
    # Python ints do not overflow, so the product is exact; it is compared with the bound
    # before the caller sizes anything by it (the count later sizes arrays and reshapes).
    nonzero = math.prod(d for d in dims if d)
    if nonzero > MAX_TENSOR_ELEMENTS:
        raise InvalidArgumentError(
            f"input {quote(name)} has shape {shape_text(dims)}, whose non-zero dimensions multiply to "
            f"{nonzero}, over the limit of {MAX_TENSOR_ELEMENTS} elements per tensor; send a shape that "
            "matches the contents"
        )
    return math.prod(dims)


def shape_text(dims: list[int], limit: int = 8) -> str:
    """A shape for a message; a client may send thousands of dimensions, so long ones are cut."""
    if len(dims) <= limit:
        return str(dims)
    return f"[{', '.join(map(str, dims[:limit]))}, … ({len(dims)} dimensions)]"


def decode_raw(name: str, datatype: str, dtype: np.dtype[Any], count: int, raw: bytes) -> np.ndarray:
    if datatype == "BYTES":
        return deserialize_bytes_tensor(raw, count, name)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgumentError(
            f"input {quote(name)}: raw contents are {len(raw)} bytes but {count} {datatype} elements need "
            f"{expected} ({dtype.itemsize} bytes each, little-endian)"
        )
    if datatype == "BOOL":
        return np.frombuffer(raw, dtype=np.uint8) != 0
    # frombuffer views the (read-only) message bytes; the copy gives the data plane its own array.
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)


def raw_bytes(output: InferOutput) -> bytes:
    if output.datatype == "BYTES":
        return serialize_bytes_tensor(bytes(x) for x in output.data.ravel())
    dtype = DATATYPE_TO_NUMPY[output.datatype]
    return np.ascontiguousarray(output.data, dtype=dtype.newbyteorder("<")).tobytes()


__all__ = [
    "MAX_TENSOR_ELEMENTS",
    "decode_raw",
    "deserialize_bytes_tensor",
    "element_count",
    "raw_bytes",
    "serialize_bytes_tensor",
    "shape_text",
]
