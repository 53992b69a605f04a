"""Triton-style per-model statistics (the ``ModelStatistics`` extension), kept in memory.

Prometheus metrics (``metrics.py``) are for scraping; these cumulative counters answer the
KServe/Triton ``ModelStatistics`` RPC, which tools such as ``perf_analyzer`` read to split
latency into queue and compute time.
"""

from __future__ import annotations

import threading
import time

from pruneserve.server.types import BatchStats, ModelStats, StatDuration


class StatsRecorder:
    """Cumulative statistics of one model version; safe to update from any thread."""

    def __init__(self, name: str, version: str) -> None:
        self._lock = threading.Lock()
        self._stats = ModelStats(name=name, version=version)
        self._batches: dict[int, BatchStats] = {}

    def request_done(self, ok: bool, ns: int) -> None:
        """Record a finished request (``ok``: answered successfully) that took ``ns``."""
        with self._lock:
            (self._stats.success if ok else self._stats.fail).add(ns)
            if ok:
                self._stats.last_inference_ms = int(time.time() * 1000)

    def queued(self, ns: int) -> None:
        """Record one request's time in the queue."""
        with self._lock:
            self._stats.queue.add(ns)

    def execution(self, items: int, requests: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """Record one engine run of ``items`` items serving ``requests`` requests.

        As in Triton, each request in the batch is charged the batch's compute durations.
        """
        with self._lock:
            s = self._stats
            s.inference_count += items
            s.execution_count += 1
            s.compute_input.add(input_ns * requests, requests)
            s.compute_infer.add(infer_ns * requests, requests)
            s.compute_output.add(output_ns * requests, requests)
            b = self._batches.setdefault(items, BatchStats(batch_size=items))
            b.compute_input.add(input_ns)
            b.compute_infer.add(infer_ns)
            b.compute_output.add(output_ns)

    def snapshot(self) -> ModelStats:
        """A consistent copy of the statistics."""
        with self._lock:
            s = self._stats

            def cp(d: StatDuration) -> StatDuration:
                return StatDuration(d.count, d.ns)

            return ModelStats(
                name=s.name,
                version=s.version,
                last_inference_ms=s.last_inference_ms,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
                success=cp(s.success),
                fail=cp(s.fail),
                queue=cp(s.queue),
                compute_input=cp(s.compute_input),
                compute_infer=cp(s.compute_infer),
                compute_output=cp(s.compute_output),
                batch_stats=[
                    BatchStats(b.batch_size, cp(b.compute_input), cp(b.compute_infer), cp(b.compute_output))
                    for _, b in sorted(self._batches.items())
                ],
            )


__all__ = ["StatsRecorder"]
