"""The :class:`Engine` interface, its options and the load error every engine raises.

Torch-free and gRPC-free: the server wraps :class:`EngineLoadError` into its own
``ModelLoadError`` (which carries a status code); the optimizer and the benchmarks see it as is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pruneserve.engines.keys import EXACT_PRECISION, engine_key
from pruneserve.engines.ort_settings import DEFAULT_SPINNING, SPINNING_MODES

#: Short provider names (config) -> ONNX Runtime execution provider names.
ORT_PROVIDERS: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class EngineLoadError(RuntimeError):
    """An engine cannot be built: package missing, graph unreadable, device unavailable.

    The message names what failed and how to fix it.
    """


class Engine(ABC):
    """A loaded graph that maps named input arrays to named output arrays.

    Implementations must be safe to call :meth:`run` from several threads at once (the
    batcher's worker pool) and must report the devices they really use, not the ones asked for.
    """

    #: Engine name as used in the config (``onnxruntime``, ``openvino``).
    name: str = ""

    @property
    @abstractmethod
    def providers(self) -> list[str]:
        """Execution providers/devices actually in use, most preferred first."""

    @property
    @abstractmethod
    def requested_providers(self) -> list[str]:
        """The providers asked for, most preferred first.

        The first entry is the operator's first choice even when this build lacks it, so a
        GPU deployment that got a CPU-only build shows up as a fallback.
        """

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph; returns the requested outputs (all when ``None``) by name."""

    def describe(self) -> dict[str, str]:
        """Labels describing this engine for logs and ``pruneserve_model_info``."""
        return {
            "engine": self.name,
            "provider": self.providers[0] if self.providers else "",
            "providers": ",".join(self.providers),
        }

    @property
    def precision(self) -> str:
        """Precision of the graph's float parts as the engine runs them (``f32`` = the graph's own)."""
        return EXACT_PRECISION

    @property
    def key(self) -> str:
        """The ``manifest.engines`` key of what this engine runs (engine and precision)."""
        return engine_key(self.name, self.precision)

    @property
    def exact(self) -> bool:
        """Whether the engine computes at the graph's own precision (fp32 stays fp32)."""
        return self.precision == EXACT_PRECISION

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources."""

    @property
    def fell_back(self) -> bool:
        """True when the session did not get the first provider requested."""
        wanted = self.requested_providers[:1]
        return bool(wanted) and (not self.providers or self.providers[0] != wanted[0])


@dataclass(frozen=True)
class EngineOptions:
    """What an engine needs from the server config and the model's limits.

    Raises:
        EngineLoadError: a field out of range (the message names the value and the fix).
    """

    providers: tuple[str, ...] = ("cpu",)
    threads: int = 1
    intra_op_spinning: str = DEFAULT_SPINNING
    max_batch_size: int = 32
    max_sequence_length: int = 512
    tensorrt_fp16: bool = True
    tensorrt_int8: bool = False
    tensorrt_cache_dir: str | None = None
    openvino_precision: str = "auto"

    def __post_init__(self) -> None:
        unknown = [p for p in self.providers if p not in ORT_PROVIDERS]
        if not self.providers or unknown:
            raise EngineLoadError(f"providers {list(self.providers)} must be non-empty names from {sorted(ORT_PROVIDERS)}")
        if self.intra_op_spinning not in SPINNING_MODES:
            raise EngineLoadError(
                f"intra-op spinning {self.intra_op_spinning!r} is not one of {SPINNING_MODES}; use 'run' or 'off'"
            )

    @classmethod
    def from_config(cls, config: Any, max_sequence_length: int) -> EngineOptions:
        """Take the engine-related fields of a ``ServeConfig`` (duck-typed: this layer imports no server)."""
        return cls(
            providers=tuple(config.providers),
            threads=int(config.threads or 1),
            intra_op_spinning=config.intra_op_spinning,
            max_batch_size=config.max_batch_size,
            max_sequence_length=max_sequence_length,
            tensorrt_fp16=config.tensorrt_fp16,
            tensorrt_int8=config.tensorrt_int8,
            tensorrt_cache_dir=config.tensorrt_cache_dir,
            openvino_precision=config.openvino_precision,
        )


__all__ = ["ORT_PROVIDERS", "Engine", "EngineLoadError", "EngineOptions"]
