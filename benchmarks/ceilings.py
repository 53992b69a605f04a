"""The machine's ceilings through ONNX Runtime, and how many FLOPs a model graph still has.

A model's speed only means something next to what the CPU can do: a large fp32 ``MatMul``
and a large ``MatMulInteger`` (uint8 activations x int8 weights, the op dynamic INT8
quantization emits) run through the same ONNX Runtime build and thread count give GFLOP/s
ceilings; a model's achieved rate (its FLOPs / its median time) over the int8 ceiling says
how much of the machine it uses.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import interleaved_medians, median, ort_session

logger = logging.getLogger(__name__)

_LINEAR_OPS = {"MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "FusedMatMul"}


@dataclass(frozen=True)
class Ceilings:
    """Measured peak rates, in GFLOP/s (int8: giga integer multiply-adds x 2 per second)."""

    fp32_gflops: float
    int8_gops: float
    shape: tuple[int, int, int]
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _matmul_model(m: int, k: int, n: int, int8: bool) -> Any:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        w = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
        nodes = [helper.make_node("MatMulInteger", ["a", "w"], ["y"])]
        a = helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])
        y = helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])
    else:
        w = rng.standard_normal((k, n)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["a", "w"], ["y"])]
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
    graph = helper.make_graph(nodes, "ceiling", [a], [y], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def measure_ceilings(threads: int, quick: bool, shape: tuple[int, int, int] | None = None) -> Ceilings:
    """Time a large fp32 MatMul and int8 MatMulInteger (interleaved) and return their rates."""
    import onnx

    m, k, n = shape or ((512, 1024, 1024) if quick else (1024, 1536, 1536))
    rng = np.random.default_rng(1)
    a_f = rng.standard_normal((m, k)).astype(np.float32)
    a_q = rng.integers(0, 256, size=(m, k), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for label, int8 in (("fp32", False), ("int8", True)):
            p = Path(tmp) / f"{label}.onnx"
            onnx.save(_matmul_model(m, k, n, int8), p)
            paths[label] = p
        s_f, s_q = ort_session(paths["fp32"], threads), ort_session(paths["int8"], threads)
        samples = interleaved_medians(
            {"fp32": lambda: s_f.run(None, {"a": a_f}), "int8": lambda: s_q.run(None, {"a": a_q})},
            repeats=10 if quick else 40,
            warmup=2,
        )
    flops = 2.0 * m * k * n
    result = Ceilings(
        fp32_gflops=flops / (median(samples["fp32"]) * 1e-3) / 1e9,
        int8_gops=flops / (median(samples["int8"]) * 1e-3) / 1e9,
        shape=(m, k, n),
        threads=threads,
    )
    logger.info("ceilings: fp32 %.1f GFLOP/s, int8 %.1f GOP/s", result.fp32_gflops, result.int8_gops)
    return result


def model_flops(path: Path, batch: int, seq: int) -> float:
    """FLOPs (2 x multiply-adds) of one ``batch x seq`` forward pass of an ONNX encoder graph.

    Counts every linear layer whose weight is a 2-D initializer (``MatMul``/``Gemm`` and their
    quantized forms, and the packed QKV weight of a fused ``Attention``), which is where pruning
    removes work, plus the attention products (``QK^T`` and ``AV``: ``4 x seq^2 x width`` per
    row, ``width`` = kept heads x head size, read from fused ``Attention`` nodes, or from the
    Q/K/V projection widths when unfused). Element-wise ops are ignored (< 2% here).
    """
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    shapes: dict[str, tuple[int, ...]] = {}
    for init in model.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    # Quantized weights may sit behind DequantizeLinear / Transpose: follow single-input producers.
    producers = {out: node for node in model.graph.node for out in node.output}

    def weight_shape(name: str) -> tuple[int, ...] | None:
        for _ in range(4):
            if name in shapes:
                return shapes[name]
            node = producers.get(name)
            if node is None or node.op_type not in ("DequantizeLinear", "Transpose", "Cast", "Identity"):
                return None
            name = node.input[0]
        return None

    per_token = 0.0
    attn_width = 0
    for node in model.graph.node:
        if node.op_type in _LINEAR_OPS and len(node.input) > 1:
            shp = weight_shape(node.input[1])
            if shp is not None and len(shp) == 2:
                kk, nn = shp
                if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
                    kk, nn = nn, kk
                per_token += 2.0 * kk * nn
        elif node.op_type in ("Attention", "QAttention") and len(node.input) > 1:
            shp = weight_shape(node.input[1])
            if shp is not None and len(shp) == 2:
                per_token += 2.0 * shp[0] * shp[1]
                attn_width += shp[1] // 3
    if attn_width == 0:
        attn_width = _unfused_attention_width(model)
    return batch * seq * per_token + batch * 4.0 * seq * seq * attn_width


def _unfused_attention_width(model: Any) -> int:
    """Sum over layers of the Q projection width, found as the MatMul feeding each Softmax's QK^T."""
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    width = 0
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        # Walk back from the Softmax to the first MatMul with an initializer weight (the Q projection).
        frontier, seen = [node.input[0]], set()
        found = 0
        while frontier and not found and len(seen) < 64:
            name = frontier.pop(0)
            if name in seen:
                continue
            seen.add(name)
            prod = producers.get(name)
            if prod is None:
                continue
            if prod.op_type == "MatMul" and len(prod.input) > 1 and prod.input[1] in inits:
                found = int(inits[prod.input[1]][-1])
                break
            frontier.extend(prod.input)
        width += found
    return width
