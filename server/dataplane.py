"""The transport-free data plane: everything the server does, without gRPC.

The gRPC servicer is a thin layer over :class:`DataPlane` (the shape of KServe's
``kserve.protocol.dataplane``): it converts protos to :mod:`pruneserve.server.types`, calls one
method here, and maps :class:`~pruneserve.server.errors.ServerError` subclasses to status codes.

One request's path: :meth:`DataPlane.infer` -> :meth:`ModelRuntime.prepare` (validate and
tokenize: on the event loop for small requests, in a small thread pool for large ones) -> :class:`DynamicBatcher` (queue, length bucket, deadline)
-> :meth:`ModelRuntime.execute` (worker thread, engine run) -> :meth:`ModelRuntime.make_outputs`.
With ``shadow_rate > 0``, a sample of answered requests is then handed (non-blocking) to the
:class:`~pruneserve.server.shadow.ShadowComparator`, which measures live fidelity against the
artifact's reference model on its own low-priority thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pruneserve import __version__
from pruneserve.server.batcher import DynamicBatcher
from pruneserve.server.config import ServeConfig
from pruneserve.server.errors import DeadlineExceededError, ServerError, UnavailableError
from pruneserve.server.metrics import UNKNOWN_MODEL, Metrics
from pruneserve.server.model_control import ModelController
from pruneserve.server.repository import LoadFailure, ModelRepository
from pruneserve.server.runtime import ModelRuntime, Prepared
from pruneserve.server.shadow import CaptureWriter, ShadowComparator, ShadowJob, request_texts
from pruneserve.server.statistics import StatsRecorder
from pruneserve.server.types import (
    InferRequest,
    InferResponse,
    ModelConfigInfo,
    ModelMetadata,
    ModelStats,
    RepositoryEntry,
)

logger = logging.getLogger(__name__)

#: asyncio.timeout (Python 3.11+) bounds a request run alone without a task of its own.
_HAS_TIMEOUT = hasattr(asyncio, "timeout")
_ANSWER_LATE = "the request's deadline passed before its answer was computed; raise the client timeout or add capacity"

#: Triton's platform string for ONNX models (clients and perf_analyzer read it).
PLATFORM = "onnxruntime_onnx"
SERVER_NAME = "pruneserve"
#: Protocol extensions the data plane implements (KServe v2 / Triton names).
EXTENSIONS: tuple[str, ...] = ("model_configuration", "statistics", "model_repository")

Key = tuple[str, str]
#: Requests whose inputs hold at most this many bytes are validated and tokenized on the event
#: loop (about a paragraph of text: well under a millisecond), larger ones in a thread.
INLINE_PREPARE_MAX_BYTES = 2048


def request_payload_bytes(request: InferRequest) -> int:
    """Bytes of input data a request carries (text bytes, or the arrays' size); cheap to compute."""
    total = 0
    for inp in request.inputs:
        data = inp.data
        if data.dtype == object:
            for item in data.flat:
                total += len(item) if isinstance(item, (bytes, bytearray, memoryview, str)) else 0
                if total > INLINE_PREPARE_MAX_BYTES:  # the caller only compares with the bound
                    return total
        else:
            total += int(data.nbytes)
    return total


class DataPlane:
    """Models, batching, inference, metadata and statistics behind one asyncio API.

    Lifecycle: ``await start()`` loads every artifact (a refused one is logged and counted,
    the others serve); ``await stop(grace)`` refuses new requests with UNAVAILABLE, lets the
    accepted ones finish for up to ``grace`` seconds, then fails what is left and releases
    the engines. All methods are called from the event loop's thread.
    """

    def __init__(self, config: ServeConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self.repository = ModelRepository(config, self.metrics)
        self._batchers: dict[Key, DynamicBatcher] = {}
        self._stats: dict[Key, StatsRecorder] = {}
        self._workers: ThreadPoolExecutor | None = None
        self._prep: ThreadPoolExecutor | None = None
        # Model loads and closes (seconds each) get their own thread: tokenization keeps its pool.
        self._loader: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._started = False
        self._stopping = False
        self._stopped = False
        # infer() calls past the admission check; stop() waits for them, wherever they are
        # (tokenizing, queued or executing), so no accepted request is dropped.
        self._active = 0
        self._no_active = asyncio.Event()
        self._no_active.set()
        # The same per model version: a version being retired closes only once its count is 0.
        self._admitted: dict[Key, int] = {}
        self._version_idle: dict[Key, asyncio.Event] = {}
        self.control = ModelController(self)
        self._shadow: ShadowComparator | None = None
        self._rng = random.Random()
        #: Requests prepared on the event loop because they were small (for introspection and tests).
        self.inline_prepares = 0

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every configured artifact and start a batcher per model version."""
        if self._started:
            return
        loop = asyncio.get_running_loop()
        self._workers = ThreadPoolExecutor(self.config.workers, thread_name_prefix="pruneserve-engine")
        self._prep = ThreadPoolExecutor(min(4, max(1, self.config.threads or 1)), thread_name_prefix="pruneserve-prep")
        self._slots = asyncio.Semaphore(self.config.workers)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="pruneserve-load")
        # Loading builds ONNX Runtime sessions (seconds for real models): keep the loop free.
        await loop.run_in_executor(self._loader, self.repository.load_all, list(self.config.artifacts))
        for rt in self.repository.runtimes():
            self._add_batcher(rt)
        await self.control.start(set(self.repository.names()))
        self._start_shadow()
        self._started = True
        if not self._batchers:
            logger.error(
                "no model could be loaded (%d artifact(s)%s); the server is not ready", len(self.config.artifacts),
                f", model repository {self.config.model_repository} in mode {self.config.model_control_mode}"
                if self.config.model_repository else "",
            )
        else:
            logger.info("serving %s", ", ".join(f"{n}:{v}" for n, v in sorted(self._batchers)))

    @property
    def expects_models(self) -> bool:
        """Whether start was asked to load anything (explicit mode with no ``load_models`` is not)."""
        explicit_empty = self.config.model_control_mode == "explicit" and not self.config.load_models
        return bool(self.config.artifacts) or (self.config.model_repository is not None and not explicit_empty)

    # -- model versions (used by model control) ---------------------------------------------
    async def add_version(self, path: str | os.PathLike[str], name: str, version: str) -> ModelRuntime:
        """Verify and load the artifact at ``path`` as ``name`` ``version`` off the event loop
        (sha256 of every file, engine, tokenizer, a warm-up run), then make it ready.

        Raises:
            ModelLoadError: the artifact was refused (nothing is left open).
            UnavailableError: the server began shutting down meanwhile.
        """
        assert self._loader is not None
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(self._loader, lambda: self.repository.open(path, name=name, version=version))
        try:
            rt = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The load runs on in its thread (it cannot be interrupted): close what it opens.
            opening.add_done_callback(_close_opened)
            raise
        if self._stopping:
            await self._close_runtime(rt)
            raise UnavailableError(f"the server is shutting down; model {name} version {version} was not started")
        # Served and batched in one step of the loop: no request can find it without its batcher.
        self.repository.add(rt)
        self._add_batcher(rt)
        logger.info("model %s version %s is ready", name, version)
        return rt

    async def retire_version(self, name: str, version: str) -> None:
        """Stop taking requests for ``name`` ``version``, finish the ones it accepted, then close it.

        Requests that name no version find the highest version still served from this call
        on; the batcher runs what it holds without waiting for batch-mates, and it is closed
        only once every request that found this version has been answered.
        """
        rt = self.repository.remove(name, version)  # from here on, new requests do not find it
        key = (name, version)
        self.metrics.set_model_ready(name, version, False)
        batcher = self._batchers.get(key)
        if batcher is not None:
            batcher.flush()  # queued work runs at once: no waiting for batch-mates that will not come
        idle = self._version_idle.get(key)
        if idle is not None and not idle.is_set():
            waited = time.monotonic()
            while not idle.is_set():
                try:
                    await asyncio.wait_for(idle.wait(), timeout=max(self.config.grace_seconds, 1.0))
                except asyncio.TimeoutError:
                    logger.warning(
                        "model %s version %s: %d accepted requests still running after %.1f s; still waiting for them",
                        name, version, self._admitted.get(key, 0), time.monotonic() - waited,
                    )
        batcher = self._batchers.pop(key, None)
        if batcher is not None:
            await batcher.close(UnavailableError(f"model {name} version {version} was unloaded; retry"))
        self._stats.pop(key, None)
        self._admitted.pop(key, None)
        self._version_idle.pop(key, None)
        # pruneserve_model_info describes loaded versions only. (A Metrics method would be its home.)
        try:
            self.metrics.model_info.remove(name, version)
        except KeyError:
            pass
        await self._close_runtime(rt)
        logger.info("model %s version %s unloaded", name, version)

    async def _close_runtime(self, rt: ModelRuntime) -> None:
        # Closing releases sessions (can take a while): off the loop, unless shutdown has
        # already shut the loader pool down.
        try:
            assert self._loader is not None
            await asyncio.get_running_loop().run_in_executor(self._loader, rt.close)
        except RuntimeError:
            rt.close()

    def _hold(self, key: Key) -> None:
        self._admitted[key] = self._admitted.get(key, 0) + 1
        event = self._version_idle.get(key)
        if event is None:
            event = self._version_idle[key] = asyncio.Event()
        event.clear()

    def _release(self, key: Key) -> None:
        left = self._admitted.get(key, 0) - 1
        self._admitted[key] = max(left, 0)
        if left <= 0 and key in self._version_idle:
            self._version_idle[key].set()

    # -- the repository extension ----------------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        """Every model version the server and its model repository know of, with its state."""
        return self.control.index(ready_only)

    async def load_model(self, name: str, parameters: Iterable[str] = ()) -> None:
        """Load ``name`` from the model repository (``explicit`` mode); see :class:`ModelController`."""
        await self.control.load(name, parameters)

    async def unload_model(self, name: str, parameters: Iterable[str] = ()) -> None:
        """Unload every version of ``name`` (``explicit`` mode); accepted requests finish first."""
        await self.control.unload(name, parameters)

    def _add_batcher(self, rt: ModelRuntime) -> None:
        assert self._workers is not None and self._slots is not None
        key = (rt.name, rt.version)
        stats = StatsRecorder(rt.name, rt.version)
        batcher = DynamicBatcher(
            rt,
            executor=self._workers,
            slots=self._slots,
            max_batch_size=self.config.max_batch_size,
            max_queue_delay_s=self.config.max_queue_delay_s,
            max_queue_size=self.config.max_queue_size,
            length_buckets=self.config.length_buckets,
            isolate=self.config.isolate_batch_variant and not rt.batch_invariant,
            dispatch_when_idle=self.config.dispatch_when_idle,
            metrics=self.metrics,
            stats=stats,
        )
        batcher.start()
        self._batchers[key], self._stats[key] = batcher, stats
        self.metrics.set_model_ready(rt.name, rt.version, True)
        if rt.manifest.quality_floor is not None:
            self.metrics.set_quality_floor(rt.name, rt.version, float(rt.manifest.quality_floor))

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new work, finish accepted work within ``grace`` seconds, then release everything."""
        if self._stopped:
            return
        grace = self.config.grace_seconds if grace is None else grace
        self._stopping = True
        await self.control.stop()
        for name, version in self._batchers:
            self.metrics.set_model_ready(name, version, False)
        batchers = list(self._batchers.values())
        for b in batchers:
            b.flush()
        try:
            await asyncio.wait_for(self._no_active.wait(), timeout=max(grace, 0.0))
        except asyncio.TimeoutError:
            logger.warning("shutdown grace of %.1f s ran out with %d requests unfinished; failing them", grace, self._active)
        for b in batchers:
            await b.close(UnavailableError("the server shut down before this request ran; retry"))
        if self._shadow is not None:
            # Shadow samples still queued are dropped: shutdown never waits for them.
            self._shadow.close(timeout=1.0)
        for pool in (self._workers, self._prep, self._loader):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self.repository.close()
        self._stopped = True
        logger.info("data plane stopped")

    # -- health ----------------------------------------------------------------------------
    def live(self) -> bool:
        """The process can serve health checks (true until :meth:`stop` completes)."""
        return not self._stopped

    def ready(self) -> bool:
        """Started, not shutting down, and at least one model loaded and ready."""
        # The repository, not the batchers: a version being retired keeps its batcher until
        # drained, but is no longer served.
        return self._started and not self._stopping and bool(self.repository.names())

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether ``name`` (at ``version``; ``""`` = latest) is loaded and accepting requests."""
        if not self._started or self._stopping:
            return False
        return self.repository.has(name, version)

    @property
    def load_failures(self) -> list[LoadFailure]:
        """Artifacts refused at start."""
        return list(self.repository.failures)

    def batcher(self, name: str, version: str = "") -> DynamicBatcher:
        """The batcher of a loaded model version (for introspection and tests)."""
        rt = self.repository.get(name, version)
        try:
            return self._batchers[(rt.name, rt.version)]
        except KeyError:
            raise UnavailableError(f"model {name!r} is not ready") from None

    # -- metadata --------------------------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        """Server name, version and supported protocol extensions."""
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def model_names(self) -> list[str]:
        """Names of the loaded models."""
        return self.repository.names()

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        """KServe v2 model metadata (shapes include the batch dimension)."""
        rt = self.repository.get(name, version)
        return ModelMetadata(
            name=rt.name,
            versions=self.repository.versions(rt.name),
            platform=PLATFORM,
            inputs=rt.input_specs(with_batch=True),
            outputs=rt.output_specs(with_batch=True),
        )

    def model_config(self, name: str, version: str = "") -> ModelConfigInfo:
        """Triton-style model configuration (shapes exclude the batch dimension)."""
        rt = self.repository.get(name, version)
        batcher = self._batchers.get((rt.name, rt.version))
        isolate = batcher.isolate if batcher is not None else False
        params = {
            "task": rt.manifest.task,
            "batch_invariant": str(rt.batch_invariant).lower(),
            "max_sequence_length": str(rt.max_sequence_length),
            "length_buckets": ",".join(str(b) for b in self.config.length_buckets),
            "providers": ",".join(rt.engine.providers),
            "truncate": str(self.config.truncate).lower(),
            "isolate_batch_variant": str(isolate).lower(),
            "dispatch_when_idle": str(self.config.dispatch_when_idle).lower(),
        }
        if rt.manifest.labels:
            params["labels"] = ",".join(rt.manifest.labels)
        # An embedding's meaning depends on both; artifacts made before they were recorded omit them.
        if rt.manifest.pooling is not None:
            params["pooling"] = rt.manifest.pooling
        if rt.manifest.normalize is not None:
            params["normalize"] = str(rt.manifest.normalize).lower()
        return ModelConfigInfo(
            name=rt.name,
            version=rt.version,
            max_batch_size=self.config.max_batch_size,
            inputs=rt.input_specs(with_batch=False),
            outputs=rt.output_specs(with_batch=False),
            max_queue_delay_us=int(round(self.config.max_queue_delay_ms * 1000)),
            preferred_batch_sizes=[],
            max_queue_size=self.config.max_queue_size,
            backend=rt.engine.name,
            platform=PLATFORM,
            parameters=params,
        )

    def model_statistics(self, name: str = "", version: str = "") -> list[ModelStats]:
        """Cumulative statistics of one model (all its versions when ``version`` is empty) or all."""
        if not name:
            return [self._stats[k].snapshot() for k in sorted(self._stats)]
        if version:
            rt = self.repository.get(name, version)
            return [self._stats[(rt.name, rt.version)].snapshot()]
        if not self.repository.has(name):
            self.repository.get(name)  # raises NotFoundError with the available names
        return [self._stats[k].snapshot() for k in sorted(self._stats) if k[0] == name]

    # -- inference -------------------------------------------------------------------------
    async def infer(self, request: InferRequest, deadline: float | None = None) -> InferResponse:
        """Answer one request; ``deadline`` is a :func:`time.monotonic` instant or None.

        Raises a :class:`ServerError` subclass for every failure a caller can see; anything
        unexpected is logged with the request id and reported as a bare INTERNAL error.
        """
        t0 = time.monotonic()
        # Without a client id, leave the log field to the transport's request-id context.
        rid = request.id
        extra = {"request_id": rid} if rid else {}
        model, version = UNKNOWN_MODEL, ""
        outcome = "internal"
        stats: StatsRecorder | None = None
        admitted = False
        held: Key | None = None
        try:
            if not self._started or self._stopping:
                if self.repository.has(request.model, request.version):  # label it as the model it was for
                    rt = self.repository.get(request.model, request.version)
                    model, version = rt.name, rt.version
                raise UnavailableError("the server is not accepting requests (starting or shutting down); retry")
            admitted = True
            self._active += 1
            self._no_active.clear()
            rt = self.repository.get(request.model, request.version)
            model, version = rt.name, rt.version
            held = (model, version)
            self._hold(held)  # before any await: a retiring version waits for this request
            stats = self._stats.get((model, version))
            batcher = self._batchers.get((model, version))
            if batcher is None or stats is None:  # pragma: no cover - loaded models always have one
                raise UnavailableError(f"model {model!r} version {version} is not ready; retry")
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceededError("the request's deadline had passed when it arrived; raise the client timeout")
            prepared = await self._prepare(rt, request)
            if batcher.can_run_alone() and (deadline is None or _HAS_TIMEOUT):
                raw = await self._run_alone(batcher, prepared, deadline)
            else:
                raw = await self._wait(batcher.submit(prepared, deadline, rid), deadline)
            response = InferResponse(
                model, version, rt.make_outputs(prepared, raw), id=request.id, tokens=prepared.encoded.tokens
            )
            outcome = "success"
            self._maybe_shadow(rt, request, prepared, raw)
            return response
        except ServerError as exc:
            outcome = exc.reason
            # Client errors are logged once, by the transport; here only at DEBUG.
            log = logger.warning if exc.reason == "internal" else logger.debug
            log(
                "infer model=%s version=%s failed: %s %s", request.model, request.version or "latest", exc.code, exc,
                extra={**extra, "model": request.model, "outcome": outcome},
            )
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            logger.info("infer model=%s cancelled by the caller", request.model, extra={**extra, "outcome": outcome})
            raise
        except Exception:
            logger.exception("infer model=%s: unexpected error", request.model, extra={**extra, "outcome": outcome})
            raise ServerError("internal error; the server log has the details") from None
        finally:
            if held is not None:
                self._release(held)
            if admitted:
                self._active -= 1
                if self._active == 0:
                    self._no_active.set()
            elapsed = time.monotonic() - t0
            self.metrics.observe_request(model, version, outcome, elapsed)
            if stats is not None:
                stats.request_done(outcome == "success", int(elapsed * 1e9))
            logger.debug(
                "infer model=%s version=%s outcome=%s duration_ms=%.3f",
                model, version, outcome, elapsed * 1000,
                extra={**extra, "model": model, "version": version, "outcome": outcome},
            )

    async def _prepare(self, rt: ModelRuntime, request: InferRequest) -> Prepared:
        # Tokenizing a large request takes milliseconds; keep it off the event loop. A small
        # one (a sentence: ~0.1 ms) costs less than the hop to a thread and back, which on a
        # busy machine waits for that thread to be scheduled (measured: 0.27 ms inline vs
        # 0.49 ms through the pool for one sentence), so it is prepared right here.
        if request_payload_bytes(request) <= INLINE_PREPARE_MAX_BYTES:
            self.inline_prepares += 1
            return rt.prepare(request, self.config.max_batch_size)
        assert self._prep is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prep, rt.prepare, request, self.config.max_batch_size)

    @staticmethod
    async def _run_alone(batcher: DynamicBatcher, prepared: Prepared, deadline: float | None) -> dict[str, np.ndarray]:
        # Straight from this task: wait_for would wrap the run in a new task, which starts a
        # loop iteration later, after other requests may have found the model idle too.
        if deadline is None:
            return await batcher.run_alone(prepared)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):  # type: ignore[attr-defined]
                return await batcher.run_alone(prepared)
        except TimeoutError:
            raise DeadlineExceededError(_ANSWER_LATE) from None

    @staticmethod
    async def _wait(future: asyncio.Future[dict[str, np.ndarray]], deadline: float | None) -> dict[str, np.ndarray]:
        if deadline is None:
            return await future
        # On timeout wait_for cancels the future, which tells the batcher to drop the work.
        try:
            return await asyncio.wait_for(future, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise DeadlineExceededError(_ANSWER_LATE) from None

    # -- shadow traffic --------------------------------------------------------------------
    def _start_shadow(self) -> None:
        """Start the live-fidelity comparator when sampling is on and some model has a reference."""
        if self.config.shadow_rate <= 0:
            if self.config.capture_path:
                logger.warning("capture_path is set but shadow_rate is 0: nothing is compared, so nothing is captured")
            return
        shadowed = [f"{rt.name}:{rt.version}" for rt in self.repository.runtimes() if rt.reference is not None]
        if not shadowed:
            logger.warning("shadow_rate is %g but no loaded model has a reference model; live fidelity is off", self.config.shadow_rate)
            return
        capture = None
        if self.config.capture_path:
            capture = CaptureWriter(self.config.capture_path, self.config.capture_max_bytes, self.config.capture_backups)
            logger.warning(
                "capturing the texts of requests under the quality floor to %s (user text; at most %d bytes on disk)",
                self.config.capture_path, self.config.capture_max_bytes,
            )
        self._shadow = ShadowComparator(self.metrics, self.config.shadow_queue_size, capture)
        self._shadow.start()
        logger.info(
            "live fidelity: %.4g of requests to %s compared with the reference (queue %d)",
            self.config.shadow_rate, ", ".join(shadowed), self.config.shadow_queue_size,
        )

    @property
    def shadow(self) -> ShadowComparator | None:
        """The live-fidelity comparator, when shadowing is on (for introspection and tests)."""
        return self._shadow

    def _maybe_shadow(self, rt: ModelRuntime, request: InferRequest, prepared: Prepared, raw: dict[str, np.ndarray]) -> None:
        """Hand a sample of answered requests to the comparator; O(1) and never blocking.

        The comparison itself runs later on the comparator's low-priority thread; a full
        queue drops the sample (counted) instead of slowing this request or the next ones.
        """
        shadow = self._shadow
        if shadow is None or rt.reference is None:
            return
        if self.config.shadow_rate < 1.0 and self._rng.random() >= self.config.shadow_rate:
            return
        served = raw.get(rt.primary_output)
        if served is None:  # the client asked only for outputs the comparison does not use
            return
        texts = request_texts(request) if shadow.capturing else None
        shadow.submit(ShadowJob(rt, prepared, served, texts))


def _close_opened(opening: asyncio.Future[ModelRuntime]) -> None:
    """Close the runtime a load nobody waits for any more produced (if it produced one)."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


__all__ = ["DataPlane", "EXTENSIONS", "INLINE_PREPARE_MAX_BYTES", "PLATFORM", "request_payload_bytes"]

