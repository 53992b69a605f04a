"""Serve a pruneserve artifact with NVIDIA Triton (via PyTriton) as the server-level peer.

This script runs inside its own virtual environment (``benchmarks/.peers/triton-venv``, made by
:func:`benchmarks.server.ensure_triton_venv`) because ``nvidia-pytriton`` pins ``numpy<2`` and
its own ``tritonclient``, which must not disturb the project's environment. It therefore imports
nothing from pruneserve: it reads the artifact's ``manifest.json`` as plain JSON and uses the same
ONNX Runtime session and ``tokenizers`` tokenizer the pruneserve server would, so the comparison is
between the two serving stacks, not between two models.

Triton's own dynamic batcher forms the batches; the inference callable tokenizes the batch
(padding to its longest text) and runs one ``session.run``. Triton serves gRPC on
``--grpc-port`` and KServe v2 HTTP/REST on ``--http-port`` (its own HTTP endpoint, which the
server benchmark drives with ``perf_analyzer -i http``), metrics on ``--metrics-port``; every
endpoint is bound to 127.0.0.1. The process serves until SIGTERM/SIGINT.

Two things are needed for PyTriton's bundled Triton to start from a venv:

* the Python backend's stub links ``libpython3.X.so``; it must find the running interpreter's own
  copy, so that interpreter's ``LIBDIR`` goes first on ``LD_LIBRARY_PATH`` (done here, before
  Triton starts, and by the launcher);
* ``perf_analyzer`` reads the statistics endpoint, so it must not be among the restricted
  (token-protected) gRPC protocols; this script restricts none.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger("triton_peer")


def _prepend_libdir() -> None:
    """Put this interpreter's LIBDIR first on LD_LIBRARY_PATH for Triton's Python-backend stub."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and not current.startswith(libdir):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


class ArtifactModel:
    """The artifact's ONNX Runtime session and tokenizer, used exactly as the server uses them."""

    def __init__(self, artifact: Path, threads: int, spinning: str = "run") -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        manifest: dict[str, Any] = json.loads((artifact / "manifest.json").read_text())
        self.name: str = manifest["name"]
        self.inputs: list[str] = list(manifest["inputs"])
        self.output: str = manifest["outputs"][0]["name"]
        self.dim: int = int(manifest["outputs"][0]["dims"][-1])
        self.max_len: int = int(manifest["max_sequence_length"])
        self.tokenizer = Tokenizer.from_file(str(artifact / (manifest.get("tokenizer_file") or "tokenizer.json")))
        self.tokenizer.enable_truncation(self.max_len)
        self.tokenizer.enable_padding()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # The same session options as pruneserve's engine and the in-process ceiling, mapped as
        # pruneserve.engines.ort_settings.spinning_entries maps them (this file runs in Triton's venv,
        # without pruneserve; a test keeps the two in step): the harness passes every server
        # the same --intra-op-spinning.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0" if spinning == "off" else "1")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.add_session_config_entry("session.force_spinning_stop", "1" if spinning == "run" else "0")
        self.session = ort.InferenceSession(
            str(artifact / manifest.get("model_file", "model.onnx")), opts, providers=["CPUExecutionProvider"]
        )

    def embed(self, texts: list[str]) -> Any:
        import numpy as np

        encs = self.tokenizer.encode_batch(texts)
        feeds = {
            "input_ids": np.asarray([e.ids for e in encs], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encs], dtype=np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in encs], dtype=np.int64),
        }
        return self.session.run([self.output], {k: feeds[k] for k in self.inputs})[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path, help="a pruneserve artifact directory")
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True, help="Triton's HTTP/REST (KServe v2) port")
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--model-name", default=None, help="defaults to the manifest's name")
    p.add_argument(
        "--intra-op-spinning", choices=("off", "run", "always"), default="run",
        help="ONNX Runtime intra-op threads waiting for work, as `pruneserve serve --intra-op-spinning`: "
             "off = sleep, run = spin only inside a run (serve's default), always = ONNX Runtime's default",
    )  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Start Triton with the artifact bound as one model, then block until signalled."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s triton_peer %(levelname)s: %(message)s")
    _prepend_libdir()

    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    model = ArtifactModel(args.artifact, args.threads, spinning=args.intra_op_spinning)
    name = args.model_name or model.name

    @batch
    def infer(text: np.ndarray) -> dict[str, np.ndarray]:
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in text.reshape(-1)]
        return {model.output: model.embed(texts).astype(np.float32, copy=False)}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        log_verbose=0,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with Triton(config=config) as triton:
        triton.bind(
            model_name=name,
            infer_func=infer,
            inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name=model.output, dtype=np.float32, shape=(model.dim,))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=int(args.max_queue_delay_ms * 1000)),
            ),
            strict=False,
        )
        triton.run()
        logger.info("serving %s on 127.0.0.1:%d (gRPC) and 127.0.0.1:%d (HTTP)", name, args.grpc_port, args.http_port)
        print("TRITON_PEER_READY", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
