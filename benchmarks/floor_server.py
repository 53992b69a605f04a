"""``pruneserve serve`` with part of the work taken away, to measure what the rest costs.

``python benchmarks/floor_server.py --floor engine|transport serve ARTIFACT [serve flags...]``

A benchmark tool, never a server to deploy: the answers it gives are not the model's.

* ``engine``: the engine computes one real answer per set of requested outputs (the first
  run, usually the server's warm-up), then answers every batch with copies of its first row. Everything else is the real server: gRPC, decoding,
  validation, tokenization, the batcher and its thread hops, metrics, encoding. Its latency at
  concurrency 1 is what pruneserve adds to a request besides the engine run.
* ``transport``: ModelInfer returns the first real answer again (with the caller's id),
  skipping the data plane. What is left is grpc.aio, our interceptors, protobuf and the
  client: the floor of any server written on grpcio. The ``statistics`` extension is not
  advertised, because perf_analyzer then checks ModelStatistics for executions this mode
  never makes.

``benchmarks.server_latency --floors`` runs both beside the real server and the in-process
ceiling.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FLOORS = ("engine", "transport")


def stub_engine() -> None:
    """Make every engine ``create_engine`` builds answer from one cached real run."""
    import pruneserve.server.runtime as runtime

    real_create = runtime.create_engine

    def create_engine(*args: Any, **kwargs: Any) -> Any:
        engine = real_create(*args, **kwargs)
        real_run = engine.run
        cache: dict[tuple[str, ...], dict[str, np.ndarray]] = {}

        def run(feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
            key = tuple(outputs or ())
            if key not in cache:
                cache[key] = {k: v[:1].copy() for k, v in real_run(feeds, outputs).items()}
            n = next(iter(feeds.values())).shape[0]
            return {k: np.repeat(v, n, axis=0) for k, v in cache[key].items()}

        engine.run = run
        return engine

    runtime.create_engine = create_engine


def canned_transport() -> None:
    """Answer every ModelInfer with the first real answer, skipping the data plane."""
    import pruneserve.server.dataplane as dataplane
    import pruneserve.server.servicer as servicer

    dataplane.EXTENSIONS = tuple(e for e in dataplane.EXTENSIONS if e != "statistics")
    real_infer = servicer.InferenceServicer._infer
    canned: list[Any] = []

    async def _infer(self: Any, message: Any, deadline: float | None) -> Any:
        if not canned:
            canned.append(await real_infer(self, message, deadline))
        reply = type(canned[0])()
        reply.CopyFrom(canned[0])
        reply.id = message.id
        return reply

    servicer.InferenceServicer._infer = _infer  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    """Patch the chosen part away, then run the pruneserve CLI with the remaining arguments."""
    p = argparse.ArgumentParser(prog="floor_server.py", description=__doc__.splitlines()[0])
    p.add_argument("--floor", choices=FLOORS, required=True)
    args, rest = p.parse_known_args(argv)
    {"engine": stub_engine, "transport": canned_transport}[args.floor]()
    from pruneserve.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
