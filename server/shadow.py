"""Live quality: compare the served (pruned) model with its unpruned reference on sampled traffic.

Pruning keeps quality on the calibration domain, not everywhere, so the server can measure it
on real requests. For a sampled fraction of successful requests (``shadow_rate``), the data
plane hands a :class:`ShadowJob` (the request's token ids and the answer it already computed)
to a :class:`ShadowComparator`. The comparator has one bounded queue and one worker thread at
the lowest CPU priority; it runs the artifact's ``reference.onnx`` on the same ids and compares:

* embedding models: the cosine similarity between the served and the reference embedding;
* classifiers: whether the served label equals the reference's (the per-item fidelity is 1 or
  0) and the largest absolute logit difference.

Submitting never blocks and never waits: when the queue is full the sample is dropped and
counted, so shadowing cannot queue work without bound or slow serving. Every result goes to
:class:`~pruneserve.server.metrics.Metrics` (``pruneserve_live_fidelity`` and friends); with a
:class:`CaptureWriter`, the texts of items whose fidelity fell under the manifest's quality
floor are appended to a size-capped, rotated JSON Lines file that ``pruneserve optimize --data``
reads directly. The capture stores user text, so it is off unless a path is configured.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pruneserve.engines.measure import cosine_rows
from pruneserve.outputs import check_capture_file
from pruneserve.server.metrics import Metrics
from pruneserve.server.runtime import TEXT_INPUT, ModelRuntime, Prepared
from pruneserve.server.types import InferRequest

logger = logging.getLogger(__name__)

#: Outcomes of a sampled request (``pruneserve_shadow_comparisons_total{outcome}``).
OUTCOMES: tuple[str, ...] = ("compared", "dropped", "failed")
#: Nice value of the worker thread: the scheduler runs it only on otherwise idle CPU time.
WORKER_NICE = 19
_STOP = object()


# -- comparisons -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """How one request's served outputs compare with the reference's, per item.

    Attributes:
        fidelity: cosine (embedding) or label agreement as 1.0/0.0 (classifier), per item.
        agreed: classifiers only: whether the served label equals the reference's.
        logit_distance: classifiers only: largest absolute logit difference.
    """

    fidelity: np.ndarray
    agreed: np.ndarray | None = None
    logit_distance: np.ndarray | None = None


def compare_logits(served: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: whether the argmax labels agree, and the largest absolute logit difference."""
    a = np.asarray(served, dtype=np.float64).reshape(len(served), -1)
    b = np.asarray(reference, dtype=np.float64).reshape(a.shape)
    return a.argmax(axis=1) == b.argmax(axis=1), np.abs(a - b).max(axis=1)


def compare(task: str, served: np.ndarray, reference: np.ndarray) -> Comparison:
    """Compare a request's served primary output with the reference's (``task`` from the manifest)."""
    if len(served) != len(reference):
        raise ValueError(f"served output has {len(served)} rows but the reference's has {len(reference)}")
    if task == "classification":
        agreed, distance = compare_logits(served, reference)
        return Comparison(agreed.astype(np.float64), agreed, distance)
    return Comparison(cosine_rows(served, reference))


# -- capture -----------------------------------------------------------------------------------
class CaptureWriter:
    """Append ``{"text": ...}`` lines to a JSON Lines file, bounded on disk and rotated.

    ``max_bytes`` bounds all files together: the current file rotates (``PATH`` -> ``PATH.1``
    -> ... -> ``PATH.backups``, the oldest deleted) before a line would take it past
    ``max_bytes // (backups + 1)``; with ``backups=0`` the file starts over. A line longer
    than one file's share is skipped. Files are created readable by their owner only, as they
    hold user text. Only ``text`` is written, so every file is valid input for
    ``pruneserve optimize --data``. A path that is a folder, or whose files are not earlier
    captures, raises :class:`~pruneserve.outputs.OutputError` before anything is written.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int, backups: int) -> None:
        if backups < 0 or max_bytes // (backups + 1) < 1:
            raise ValueError(f"capture needs backups >= 0 and max_bytes >= backups + 1, got {max_bytes}, {backups}")
        check_capture_file(path, backups=backups)
        self.path = Path(path)
        self.backups = backups
        self.file_limit = max_bytes // (backups + 1)
        self._lock = threading.Lock()
        self._size = self.path.stat().st_size if self.path.exists() else 0
        if self._size > self.file_limit:  # left by an earlier run with a larger cap
            self._rotate()

    def files(self) -> list[Path]:
        """The capture files that exist now, newest first."""
        candidates = [self.path, *(self._backup(i) for i in range(1, self.backups + 1))]
        return [p for p in candidates if p.exists()]

    def write(self, texts: Sequence[str]) -> int:
        """Append one line per text; returns how many were written (over-long ones are skipped)."""
        written = 0
        with self._lock:
            for text in texts:
                line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
                if len(line) > self.file_limit:
                    logger.debug("capture: skipped a %d-byte line (each capture file holds %d bytes)", len(line), self.file_limit)
                    continue
                if self._size + len(line) > self.file_limit:
                    self._rotate()
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
                self._size += len(line)
                written += 1
        return written

    def _backup(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            self._backup(self.backups).unlink(missing_ok=True)
            for i in range(self.backups - 1, 0, -1):
                if self._backup(i).exists():
                    os.replace(self._backup(i), self._backup(i + 1))
            if self.path.exists():
                os.replace(self.path, self._backup(1))
        self._size = 0


def request_texts(request: InferRequest) -> list[str] | None:
    """The texts of a text request, decoded (None for a pre-tokenized request)."""
    for inp in request.inputs:
        if inp.name == TEXT_INPUT:
            values = np.asarray(inp.data, dtype=object).reshape(-1)
            return [v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v) for v in values]
    return None


# -- the comparator ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ShadowJob:
    """One sampled request: its ids, the primary output it was answered with, and its texts."""

    runtime: ModelRuntime
    prepared: Prepared
    served: np.ndarray
    #: Only set when capture is on (the texts are otherwise not kept).
    texts: list[str] | None = None


class ShadowComparator:
    """A bounded queue of :class:`ShadowJob` and one low-priority worker thread comparing them.

    Args:
        metrics: where results are recorded.
        queue_size: most jobs waiting; :meth:`submit` drops (and counts) a job beyond it.
        capture: writer for the texts of items under the quality floor, or None (off).
    """

    def __init__(self, metrics: Metrics, queue_size: int, capture: CaptureWriter | None = None) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.metrics = metrics
        self.capture = capture
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._closed = False
        # Jobs accepted but not finished (queued or running), for wait_idle().
        self._unfinished = 0
        self._idle = threading.Condition()
        self._warned: set[tuple[str, str]] = set()

    @property
    def capturing(self) -> bool:
        """Whether texts are kept for capture (the data plane extracts them only then)."""
        return self.capture is not None

    @property
    def queue_size(self) -> int:
        """Most jobs that may wait."""
        return self._queue.maxsize

    @property
    def pending(self) -> int:
        """Jobs waiting now (not counting the one being compared)."""
        return self._queue.qsize()

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pruneserve-shadow", daemon=True)
            self._thread.start()

    def submit(self, job: ShadowJob) -> bool:
        """Queue a job without blocking; False (counted as ``dropped``) when the queue is full."""
        rt = job.runtime
        if self._closed:
            return False
        with self._idle:
            self._unfinished += 1
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._finished()
            self.metrics.count_shadow(rt.name, rt.version, "dropped")
            return False
        return True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every accepted job is compared; False if ``timeout`` seconds ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout)

    def close(self, timeout: float = 1.0) -> None:
        """Stop accepting jobs, drop (and count) the waiting ones, and let the worker end.

        A comparison already running is not interrupted; the worker is a daemon thread, so a
        slow reference run cannot hold up the process past ``timeout``.
        """
        self._closed = True
        while True:
            self._drop_waiting()
            try:
                self._queue.put_nowait(_STOP)
                break
            except queue.Full:  # a submit raced with close; drop it as well
                continue
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the shadow worker is still comparing after %.1f s; leaving it to end with the process", timeout)

    def _drop_waiting(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, ShadowJob):
                self.metrics.count_shadow(job.runtime.name, job.runtime.version, "dropped")
                self._finished()

    def _finished(self) -> None:
        with self._idle:
            self._unfinished -= 1
            if self._unfinished == 0:
                self._idle.notify_all()

    # -- worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        _lower_thread_priority()
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            assert isinstance(job, ShadowJob)
            try:
                self._process(job)
            finally:
                self._finished()

    def _process(self, job: ShadowJob) -> None:
        rt = job.runtime
        try:
            reference = rt.run_reference(job.prepared)
            result = compare(rt.manifest.task, job.served, reference)
        except Exception as exc:  # any reference failure must stay off the serving path
            key = (rt.name, rt.version)
            log = logger.debug if key in self._warned else logger.warning
            self._warned.add(key)
            log("live fidelity of %s version %s: the reference comparison failed: %s", rt.name, rt.version, exc)
            self.metrics.count_shadow(rt.name, rt.version, "failed")
            return
        self.metrics.observe_fidelity(rt.name, rt.version, result.fidelity.tolist())
        if result.agreed is not None and result.logit_distance is not None:
            self.metrics.observe_labels(rt.name, rt.version, result.agreed.tolist(), result.logit_distance.tolist())
        self.metrics.count_shadow(rt.name, rt.version, "compared")
        floor = rt.manifest.quality_floor
        if self.capture is not None and job.texts is not None and floor is not None:
            below = [job.texts[i] for i in np.flatnonzero(result.fidelity < floor) if i < len(job.texts)]
            if below:
                try:
                    written = self.capture.write(below)
                except OSError as exc:
                    logger.warning("cannot write captured texts to %s: %s", self.capture.path, exc)
                    return
                if written:
                    self.metrics.count_captures(rt.name, rt.version, written)


def _lower_thread_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux: nice applies per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
    except (AttributeError, OSError) as exc:  # pragma: no cover - non-Linux or restricted
        logger.debug("could not lower the shadow worker's priority: %s", exc)


__all__ = [
    "OUTCOMES",
    "CaptureWriter",
    "Comparison",
    "ShadowComparator",
    "ShadowJob",
    "compare",
    "compare_logits",
    "request_texts",
]
