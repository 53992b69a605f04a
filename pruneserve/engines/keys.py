"""Engine names and engine keys, spelled once for the optimizer, the server and the benchmarks.

An *engine name* is what ``serve --engine`` and ``manifest.runtime["engine"]`` say
(``onnxruntime``, ``openvino``). An *engine key* names one (engine, precision) pair as the
optimizer measured it and recorded it in ``manifest.engines`` (``onnxruntime``,
``openvino-f32``, ``openvino-bf16``): batch invariance and fidelity are facts of a key, not
of an engine, because OpenVINO in bf16 and in f32 compute different numbers.
"""

from __future__ import annotations

#: Engine names (config, ``manifest.runtime["engine"]``).
ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
#: Every engine name the server can build, plus ``auto`` (follow the manifest).
ENGINE_NAMES: tuple[str, ...] = (ONNXRUNTIME, OPENVINO)

#: OpenVINO inference precisions (``INFERENCE_PRECISION_HINT``); ``auto`` = the artifact's recorded choice, else f32.
OPENVINO_PRECISIONS: tuple[str, ...] = ("auto", "f32", "bf16")

#: Engine keys as recorded in ``manifest.engines``.
OPENVINO_F32 = f"{OPENVINO}-f32"
OPENVINO_BF16 = f"{OPENVINO}-bf16"
ENGINE_KEYS: tuple[str, ...] = (ONNXRUNTIME, OPENVINO_F32, OPENVINO_BF16)

#: Precision recorded for ONNX Runtime's CPU provider: it runs the graph's own types (fp32 or INT8 nodes).
GRAPH_PRECISION = "fp32-graph"
#: Precision an :class:`~pruneserve.engines.base.Engine` reports when it keeps the graph's own float types.
EXACT_PRECISION = "f32"


def engine_key(engine: str, precision: str) -> str:
    """The ``manifest.engines`` key of ``engine`` running at ``precision``.

    ONNX Runtime at the graph's own precision is ``onnxruntime``; any lowered precision
    (TensorRT fp16/int8) gets its own key (``onnxruntime-fp16``), which no optimizer run
    measures on a CPU, so the server knows it serves something unmeasured.
    """
    if engine == ONNXRUNTIME:
        return ONNXRUNTIME if precision in (EXACT_PRECISION, GRAPH_PRECISION) else f"{ONNXRUNTIME}-{precision}"
    return f"{engine}-{precision}"


__all__ = [
    "ENGINE_KEYS",
    "ENGINE_NAMES",
    "EXACT_PRECISION",
    "GRAPH_PRECISION",
    "ONNXRUNTIME",
    "OPENVINO",
    "OPENVINO_BF16",
    "OPENVINO_F32",
    "OPENVINO_PRECISIONS",
    "engine_key",
]
