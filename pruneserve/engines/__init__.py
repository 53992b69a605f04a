"""The engine layer: every inference engine pruneserve runs, for the optimizer, the server and the benchmarks.

Torch-free and transformers-free (the server imports it); ``onnxruntime`` and ``openvino``
are imported on use.

* :mod:`~pruneserve.engines.keys`: engine names and ``manifest.engines`` keys, spelled once.
* :mod:`~pruneserve.engines.base`: the :class:`Engine` interface, :class:`EngineOptions`, :class:`EngineLoadError`.
* :mod:`~pruneserve.engines.ort`: the one place that builds ONNX Runtime sessions (spinning
  modes in :mod:`~pruneserve.engines.ort_settings`).
* :mod:`~pruneserve.engines.openvino`: the one place that creates ``openvino.Core`` and compiles models.
* :mod:`~pruneserve.engines.measure`: fidelity, batch invariance, interleaved timing (numpy).
* :mod:`~pruneserve.engines.facts`: what the server knows about the engine it runs (measured, probed or assumed).

:data:`ENGINES` maps an engine name to its factory; a new runtime is one :class:`Engine`
subclass registered there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pruneserve.engines.base import ORT_PROVIDERS, Engine, EngineLoadError, EngineOptions
from pruneserve.engines.keys import ENGINE_NAMES, ONNXRUNTIME, OPENVINO, engine_key

if TYPE_CHECKING:
    from pruneserve.artifact import Manifest

#: ``(model_path, options, input_names, manifest) -> Engine``.
EngineFactory = Callable[..., Engine]


def _onnxruntime(
    model_path: str | Path, options: EngineOptions, input_names: Sequence[str], manifest: Manifest | None = None
) -> Engine:
    from pruneserve.engines.ort import OnnxRuntimeEngine

    return OnnxRuntimeEngine(model_path, options, input_names)


def _openvino(
    model_path: str | Path, options: EngineOptions, input_names: Sequence[str], manifest: Manifest | None = None
) -> Engine:
    from pruneserve.engines.openvino import create_openvino_engine

    return create_openvino_engine(model_path, options, input_names, manifest)


#: Engine name -> factory. Batching, metrics and transport are shared by every engine.
ENGINES: dict[str, EngineFactory] = {ONNXRUNTIME: _onnxruntime, OPENVINO: _openvino}


def create_engine(
    name: str,
    model_path: str | Path,
    options: EngineOptions,
    input_names: Sequence[str],
    manifest: Manifest | None = None,
) -> Engine:
    """Build the named engine for ``model_path``; ``manifest`` (verified) guides engine-specific choices.

    Raises:
        EngineLoadError: the name is unknown, or the engine cannot load the graph.
    """
    try:
        factory = ENGINES[name]
    except KeyError:
        raise EngineLoadError(f"engine {name!r} is unknown; use one of {sorted(ENGINES)}") from None
    return factory(model_path, options, input_names, manifest)


__all__ = [
    "ENGINES",
    "ENGINE_NAMES",
    "ONNXRUNTIME",
    "OPENVINO",
    "ORT_PROVIDERS",
    "Engine",
    "EngineFactory",
    "EngineLoadError",
    "EngineOptions",
    "create_engine",
    "engine_key",
]
