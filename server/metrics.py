"""Every Prometheus object the server exports, in one place.

A :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry`, so two servers
(or two tests) in one process never share counters. The metric names are a public contract:
alerts and dashboards in ``deploy/`` are written against them, and ``docs/metrics.md`` maps
them to Triton's ``nv_inference_*`` names.

Durations are in seconds. ``model`` and ``version`` labels only ever carry names of loaded
models (requests for unknown models are recorded under ``model="_unknown"``), so a client
cannot grow the label set without bound. The request metrics also carry ``protocol``
(``grpc`` or ``http``), taken from :data:`PROTOCOL`, which each transport sets for the
requests it serves; the registry also holds prometheus-client's ``process_*`` and
``python_info`` collectors (CPU, memory, open files of the server process).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Mapping, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector
from prometheus_client import start_http_server as _prom_start_http_server

logger = logging.getLogger(__name__)

#: Label value used for requests that name a model the server does not have.
UNKNOWN_MODEL = "_unknown"
#: Values of the ``protocol`` label of the request metrics.
PROTOCOLS: tuple[str, ...] = ("grpc", "http")
#: The transport serving the current task's request. A context variable rather than an
#: argument so the data plane stays transport-free: the HTTP transport sets it per request,
#: gRPC tasks never do and see the default.
PROTOCOL: contextvars.ContextVar[str] = contextvars.ContextVar("pruneserve_protocol", default="grpc")

#: Latency buckets from 100 µs to 10 s (1-2.5-5 steps): CPU INT8 encoders answer in
#: ~1-5 ms, a queued large batch in hundreds of ms, a stuck one in seconds.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Batch sizes (items per execution): powers of two up to the largest sensible max_batch_size.
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Live fidelity (cosine, or 0/1 agreement): fine steps where quality floors sit (0.9-1.0),
#: coarse below; values under 0.5 (or a disagreement, 0) land in the first bucket.
FIDELITY_BUCKETS: tuple[float, ...] = (
    0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0,
)  # fmt: skip
#: Largest absolute logit difference between served and reference classifier outputs.
LOGIT_DISTANCE_BUCKETS: tuple[float, ...] = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

_MV = ("model", "version")


class Metrics:
    """The server's Prometheus metrics on a private registry.

    Args:
        registry: where to register; a fresh :class:`CollectorRegistry` by default.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._pending: dict[tuple[str, str], int] = {}
        self._pending_lock = threading.Lock()
        self.requests = Counter(
            "pruneserve_requests",
            "Inference requests by how they ended (success or the error's reason) and the protocol "
            "they came by (grpc, http).",
            (*_MV, "outcome", "protocol"),
            registry=r,
        )
        self.inferences = Counter(
            "pruneserve_inferences",
            "Items (texts or token sequences) inferred; a request of batch 8 counts 8.",
            _MV,
            registry=r,
        )
        self.executions = Counter(
            "pruneserve_executions",
            "Engine runs (batches); inferences / executions is the mean batch size.",
            _MV,
            registry=r,
        )
        self.request_duration = Histogram(
            "pruneserve_request_duration_seconds",
            "Time from a request's arrival at the data plane to its answer (any outcome), by protocol.",
            (*_MV, "protocol"),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "pruneserve_queue_duration_seconds",
            "Time a request waited in the batching queue before its batch started.",
            _MV,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "pruneserve_compute_duration_seconds",
            "Time of one engine run (the whole batch), including assembling inputs and splitting outputs.",
            _MV,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "pruneserve_batch_size",
            "Items per engine run.",
            _MV,
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.pending_requests = Gauge(
            "pruneserve_pending_requests",
            "Requests waiting in the batching queue (not yet executing).",
            ("model",),
            registry=r,
        )
        self.tokens = Counter(
            "pruneserve_tokens",
            "Real (non-padding) tokens inferred.",
            _MV,
            registry=r,
        )
        self.padded_tokens = Counter(
            "pruneserve_padded_tokens",
            "Token positions computed including padding; padded/tokens shows batching waste.",
            _MV,
            registry=r,
        )
        self.model_info = Info(
            "pruneserve_model",
            "What each loaded model is and how it runs (engine, provider, quantization, pruning).",
            _MV,
            registry=r,
        )
        self.model_ready = Gauge(
            "pruneserve_model_ready",
            "1 when the model version is loaded and accepting requests, else 0.",
            _MV,
            registry=r,
        )
        self.provider_fallback = Counter(
            "pruneserve_provider_fallback",
            "Sessions that did not get the first execution provider requested "
            "(ONNX Runtime falls back silently; this makes it visible).",
            (*_MV, "requested", "actual"),
            registry=r,
        )
        self.model_load_failures = Counter(
            "pruneserve_model_load_failures",
            "Artifacts refused at load time (tampered, wrong schema, unloadable graph).",
            ("reason",),
            registry=r,
        )
        # Live quality (server/shadow.py): the served model against its unpruned reference on
        # sampled real requests. Alerts compare the fidelity's mean with the quality floor.
        self.live_fidelity = Histogram(
            "pruneserve_live_fidelity",
            "Per-item fidelity of sampled requests against the unpruned reference model: cosine "
            "similarity for embedding models, label agreement (1 or 0) for classifiers.",
            _MV,
            buckets=FIDELITY_BUCKETS,
            registry=r,
        )
        self.shadow_comparisons = Counter(
            "pruneserve_shadow_comparisons",
            "Sampled requests for live fidelity by outcome: compared, dropped (shadow queue full "
            "or shutting down) or failed (the reference run raised).",
            (*_MV, "outcome"),
            registry=r,
        )
        self.quality_floor = Gauge(
            "pruneserve_quality_floor",
            "The quality floor the artifact's manifest promises (mean cosine to the original for "
            "embedding models, 1 - accuracy drop for classifiers).",
            _MV,
            registry=r,
        )
        self.live_label_agreement = Counter(
            "pruneserve_live_label_agreement",
            "Classifier items compared with the reference, by whether the served label equals "
            "the reference's (agreed=true|false).",
            (*_MV, "agreed"),
            registry=r,
        )
        self.live_logit_distance = Histogram(
            "pruneserve_live_logit_distance",
            "Classifiers: largest absolute difference between the served and the reference "
            "logits of one item.",
            _MV,
            buckets=LOGIT_DISTANCE_BUCKETS,
            registry=r,
        )
        self.shadow_captures = Counter(
            "pruneserve_shadow_captures",
            "Texts written to the capture file (items whose live fidelity fell under the floor).",
            _MV,
            registry=r,
        )

        # The process's own health (CPU seconds, resident memory, open fds; Linux only, a no-op
        # elsewhere) beside the serving metrics, on the same private registry and endpoint.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    # -- recording helpers (the data plane calls only these) -----------------------------
    def observe_request(self, model: str, version: str, outcome: str, seconds: float, protocol: str | None = None) -> None:
        """Record one finished request (``protocol`` defaults to the current :data:`PROTOCOL`)."""
        proto = protocol if protocol is not None else PROTOCOL.get()
        self.requests.labels(model, version, outcome, proto).inc()
        self.request_duration.labels(model, version, proto).observe(seconds)

    def observe_queue(self, model: str, version: str, seconds: float) -> None:
        """Record how long one request waited before its batch started."""
        self.queue_duration.labels(model, version).observe(seconds)

    def observe_execution(
        self, model: str, version: str, items: int, seconds: float, tokens: int, padded_tokens: int
    ) -> None:
        """Record one engine run of ``items`` items."""
        self.executions.labels(model, version).inc()
        self.inferences.labels(model, version).inc(items)
        self.batch_size.labels(model, version).observe(items)
        self.compute_duration.labels(model, version).observe(seconds)
        self.tokens.labels(model, version).inc(tokens)
        self.padded_tokens.labels(model, version).inc(padded_tokens)

    def set_pending(self, model: str, count: int, version: str = "") -> None:
        """Set the number of queued requests of one model version; the gauge shows the model's sum."""
        with self._pending_lock:
            self._pending[(model, version)] = count
            total = sum(v for (m, _), v in self._pending.items() if m == model)
        self.pending_requests.labels(model).set(total)

    def set_model_ready(self, model: str, version: str, ready: bool) -> None:
        """Mark a model version ready (1) or not (0)."""
        self.model_ready.labels(model, version).set(1 if ready else 0)

    def set_model_info(self, model: str, version: str, info: Mapping[str, str]) -> None:
        """Publish a model's description (values are stringified)."""
        self.model_info.labels(model, version).info({k: str(v) for k, v in info.items()})

    def record_provider_fallback(self, model: str, version: str, requested: str, actual: str) -> None:
        """Count a session that got ``actual`` although ``requested`` was preferred."""
        self.provider_fallback.labels(model, version, requested, actual).inc()

    def set_quality_floor(self, model: str, version: str, floor: float) -> None:
        """Publish the quality floor of a loaded model version (from its manifest)."""
        self.quality_floor.labels(model, version).set(floor)

    def count_shadow(self, model: str, version: str, outcome: str) -> None:
        """Count one sampled request: ``compared``, ``dropped`` or ``failed``."""
        self.shadow_comparisons.labels(model, version, outcome).inc()

    def observe_fidelity(self, model: str, version: str, values: Sequence[float]) -> None:
        """Record the live fidelity of each compared item."""
        hist = self.live_fidelity.labels(model, version)
        for v in values:
            hist.observe(float(v))

    def observe_labels(self, model: str, version: str, agreed: Sequence[bool], distances: Sequence[float]) -> None:
        """Record a classifier comparison: per-item label agreement and largest logit difference."""
        if n_agreed := sum(1 for a in agreed if a):
            self.live_label_agreement.labels(model, version, "true").inc(n_agreed)
        if n_disagreed := len(agreed) - n_agreed:
            self.live_label_agreement.labels(model, version, "false").inc(n_disagreed)
        hist = self.live_logit_distance.labels(model, version)
        for d in distances:
            hist.observe(float(d))

    def count_captures(self, model: str, version: str, count: int) -> None:
        """Count texts written to the capture file."""
        self.shadow_captures.labels(model, version).inc(count)

    def record_load_failure(self, reason: str) -> None:
        """Count an artifact refused at load time (``reason``: integrity, schema, manifest, engine...)."""
        self.model_load_failures.labels(reason).inc()


def start_http_server(
    host: str, port: int, registry: CollectorRegistry
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    Returns the WSGI server (its ``server_port`` is the bound port, useful with ``port=0``;
    call ``shutdown()`` to stop it) and its thread. The caller logs the address.
    """
    return _prom_start_http_server(port, addr=host, registry=registry)


__all__ = [
    "DURATION_BUCKETS",
    "FIDELITY_BUCKETS",
    "LOGIT_DISTANCE_BUCKETS",
    "PROTOCOL",
    "PROTOCOLS",
    "UNKNOWN_MODEL",
    "Metrics",
    "start_http_server",
]
