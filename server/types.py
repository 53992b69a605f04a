"""Transport-neutral request, response and metadata types of the data plane.

The servicer converts KServe v2 / Triton protos to and from these; nothing here knows gRPC.
Tensors are numpy arrays whose shape equals the declared ``shape``; ``BYTES`` tensors are
``object`` arrays whose elements are :class:`bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: KServe v2 datatype name -> numpy dtype (BYTES is an object array of ``bytes``).
DATATYPE_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}


@dataclass
class InferInput:
    """One named input tensor of a request.

    For text models the usual input is ``text`` (``BYTES``, shape ``[batch]`` or
    ``[batch, 1]``); pre-tokenized ``input_ids``/``attention_mask``/``token_type_ids``
    (``INT64``, ``[batch, sequence]``) are accepted too.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class InferRequest:
    """A request for one model; ``version=""`` means the latest loaded version."""

    model: str
    version: str
    inputs: list[InferInput]
    #: Names of the outputs to return; empty = every output the model has.
    outputs: list[str] = field(default_factory=list)
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferOutput:
    """One named output tensor of a response."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class InferResponse:
    """The answer to an :class:`InferRequest` (``version`` is the version that served it)."""

    model: str
    version: str
    outputs: list[InferOutput]
    id: str = ""
    #: Real (non-padding) tokens the server's tokenizer made of the request (OpenAI ``usage``).
    tokens: int = 0


@dataclass
class TensorSpec:
    """Name, datatype and shape of a tensor; ``-1`` marks a dynamic dimension."""

    name: str
    datatype: str
    shape: list[int]
    #: Whether a request may leave this input out (Triton's ``optional``).
    optional: bool = False


@dataclass
class ModelMetadata:
    """KServe v2 model metadata; tensor shapes include the batch dimension (``-1``)."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass
class ModelConfigInfo:
    """The subset of Triton's ``ModelConfig`` the server can state truthfully.

    Tensor ``shape`` here excludes the batch dimension, as in Triton's ``dims``.
    """

    name: str
    max_batch_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_queue_delay_us: int
    preferred_batch_sizes: list[int]
    backend: str
    platform: str
    version: str = ""
    max_queue_size: int = 0
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass
class StatDuration:
    """A count of events and their total duration in nanoseconds (Triton ``StatisticDuration``)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        """Record ``count`` events that took ``ns`` nanoseconds in total."""
        self.count += count
        self.ns += ns


@dataclass
class BatchStats:
    """Per-batch-size execution statistics (Triton ``InferBatchStatistics``)."""

    batch_size: int
    compute_input: StatDuration = field(default_factory=StatDuration)
    compute_infer: StatDuration = field(default_factory=StatDuration)
    compute_output: StatDuration = field(default_factory=StatDuration)


@dataclass
class ModelStats:
    """Cumulative statistics of one model version (Triton ``ModelStatistics``).

    ``success``/``fail`` count requests; ``queue`` and ``compute_*`` durations are per
    request (a request in a batch of eight is charged the batch's whole compute time,
    as Triton does); ``inference_count`` counts items and ``execution_count`` batches.
    """

    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: StatDuration = field(default_factory=StatDuration)
    fail: StatDuration = field(default_factory=StatDuration)
    queue: StatDuration = field(default_factory=StatDuration)
    compute_input: StatDuration = field(default_factory=StatDuration)
    compute_infer: StatDuration = field(default_factory=StatDuration)
    compute_output: StatDuration = field(default_factory=StatDuration)
    batch_stats: list[BatchStats] = field(default_factory=list)

    # Flat accessors named as in the interface brief (``success_count``/``success_ns`` ...).
    @property
    def success_count(self) -> int:
        return self.success.count

    @property
    def success_ns(self) -> int:
        return self.success.ns

    @property
    def fail_count(self) -> int:
        return self.fail.count

    @property
    def fail_ns(self) -> int:
        return self.fail.ns

    @property
    def queue_count(self) -> int:
        return self.queue.count

    @property
    def queue_ns(self) -> int:
        return self.queue.ns


#: Model version states in the repository index (Triton's names).
READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


@dataclass(frozen=True)
class RepositoryEntry:
    """One row of the repository index (Triton's ``RepositoryIndexResponse.ModelIndex``).

    ``version`` is empty for a model that has no version loaded (e.g. unloaded); ``reason``
    says why a version is not ready (its load error, ``unloaded``, ``not selected by the
    version policy``).
    """

    name: str
    version: str
    state: str
    reason: str = ""
