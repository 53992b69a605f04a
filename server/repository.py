"""The model repository: loads and verifies artifacts, and finds a model by name and version.

Every artifact goes through :func:`pruneserve.artifact.load_artifact` (schema version, every
file inside the folder, sizes and sha256), then gets its engine and tokenizer. An artifact
that fails any step is refused with one clear log line and a metric, and the others keep
serving: one tampered folder must not take the whole server down. Nothing is unpickled.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from pruneserve.artifact import (
    ArtifactError,
    ArtifactNotFoundError,
    IntegrityError,
    ManifestError,
    UnsupportedSchemaError,
    load_artifact,
)
from pruneserve.server.config import ServeConfig
from pruneserve.server.errors import ModelLoadError, NotFoundError
from pruneserve.server.metrics import Metrics
from pruneserve.server.runtime import ModelRuntime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadFailure:
    """An artifact the repository refused, and why."""

    path: str
    reason: str  # integrity | schema | manifest | not_found | artifact | io | engine
    message: str


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, UnsupportedSchemaError):
        return "schema"
    if isinstance(exc, ManifestError):
        return "manifest"
    if isinstance(exc, IntegrityError):
        return "integrity"
    if isinstance(exc, ArtifactNotFoundError):
        return "not_found"
    if isinstance(exc, ArtifactError):
        return "artifact"
    if isinstance(exc, OSError):
        return "io"
    return "engine"


class ModelRepository:
    """Loaded model versions by name; ``version=""`` resolves to the highest version.

    Thread-safe for lookups while loading happens (the data plane loads off the event loop).
    """

    def __init__(self, config: ServeConfig, metrics: Metrics | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._models: dict[str, dict[str, ModelRuntime]] = {}
        self._lock = threading.Lock()
        self.failures: list[LoadFailure] = []

    # -- loading ---------------------------------------------------------------------------
    def load(self, path: str | os.PathLike[str]) -> ModelRuntime:
        """Verify, load and serve one artifact as its manifest's name and version.

        Raises :class:`ModelLoadError` naming the problem.
        """
        return self.add(self.open(path))

    def open(
        self, path: str | os.PathLike[str], *, name: str | None = None, version: str | None = None
    ) -> ModelRuntime:
        """Verify an artifact, build its engine and tokenizer and warm it up, without serving it.

        ``name``/``version`` override the manifest's (a model repository's folder names).
        Raises :class:`ModelLoadError` naming the problem; nothing is left open then.
        """
        try:
            artifact = load_artifact(path, verify=True)
        except ArtifactError as exc:
            raise ModelLoadError(f"artifact {os.fspath(path)} refused: {exc}") from exc
        except OSError as exc:  # unreadable file or folder (permissions, I/O error)
            raise ModelLoadError(f"artifact {os.fspath(path)} cannot be read: {exc}") from exc
        except Exception as exc:
            # A manifest the schema checks did not anticipate (load_artifact should have
            # refused it as ArtifactError). Classified as a manifest fault: it is refused like
            # one, and the traceback goes to the log for whoever fixes the check.
            logger.warning("reading artifact %s raised %s", path, type(exc).__name__, exc_info=True)
            cause = ManifestError(f"unexpected {type(exc).__name__} while reading the manifest: {exc}")
            cause.__cause__ = exc
            raise ModelLoadError(f"artifact {os.fspath(path)} refused: {cause}") from cause
        name = name or artifact.manifest.name
        version = version or str(artifact.manifest.version)
        self._check_free(path, name, version)
        try:
            runtime = ModelRuntime.load(artifact, self._config, name=name, version=version)
        except ModelLoadError:
            raise
        except Exception as exc:  # a graph or tokenizer that passed sha256 but still cannot load
            logger.debug("loading %s failed", path, exc_info=True)
            raise ModelLoadError(f"artifact {os.fspath(path)} cannot be loaded: {exc}") from exc
        try:
            runtime.warmup()
        except Exception as exc:
            runtime.close()
            logger.debug("warming up %s failed", path, exc_info=True)
            raise ModelLoadError(f"artifact {os.fspath(path)} loaded but its warm-up run failed: {exc}") from exc
        except BaseException:
            runtime.close()
            raise
        return runtime

    def add(self, runtime: ModelRuntime) -> ModelRuntime:
        """Serve an opened runtime: lookups find it from now on. Raises :class:`ModelLoadError`
        (and closes it) when its name and version are taken meanwhile."""
        try:
            self._check_free(runtime.artifact.path, runtime.name, runtime.version)
        except ModelLoadError:
            runtime.close()
            raise
        with self._lock:
            self._models.setdefault(runtime.name, {})[runtime.version] = runtime
        self._publish(runtime)
        return runtime

    def remove(self, name: str, version: str) -> ModelRuntime:
        """Stop serving ``name`` at ``version`` (lookups no longer find it); the caller closes it
        once its accepted requests are done. Raises :class:`NotFoundError`."""
        with self._lock:
            versions = self._models.get(name, {})
            if version not in versions:
                raise NotFoundError(f"model {name!r} has no loaded version {version!r}")
            runtime = versions.pop(version)
            if not versions:
                del self._models[name]
        return runtime

    def _check_free(self, path: str | os.PathLike[str], name: str, version: str) -> None:
        with self._lock:
            if version in self._models.get(name, {}):
                other = self._models[name][version].artifact.path
                raise ModelLoadError(
                    f"artifact {os.fspath(path)} refused: model {name!r} version {version} is already "
                    f"served from {other}; give one of them another name or version"
                )

    def load_all(self, paths: Iterable[str | os.PathLike[str]]) -> list[LoadFailure]:
        """Load every artifact; refused ones are logged, counted and returned, the rest serve.

        Never raises for one artifact (short of KeyboardInterrupt and the like): whatever goes
        wrong with one folder becomes a :class:`LoadFailure`, so one bad folder cannot stop
        the server from starting with the good ones.
        """
        failures: list[LoadFailure] = []
        for path in paths:
            try:
                self.load(path)
            except Exception as exc:
                failures.append(self.record_failure(path, exc))
        return failures

    def record_failure(self, path: str | os.PathLike[str], exc: BaseException) -> LoadFailure:
        """Log and count an artifact that was refused (once per call), and remember it."""
        if not isinstance(exc, ModelLoadError):  # open() should have wrapped it: a bug, so the traceback
            logger.error("loading artifact %s raised %s", path, type(exc).__name__, exc_info=exc)
            exc = ModelLoadError(f"artifact {os.fspath(path)} cannot be loaded: {type(exc).__name__}: {exc}")
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        failure = LoadFailure(os.fspath(path), _failure_reason(cause), str(exc))
        logger.error("model load failed (%s): %s", failure.reason, failure.message)
        if self._metrics is not None:
            self._metrics.record_load_failure(failure.reason)
        with self._lock:
            self.failures.append(failure)
        return failure

    def _publish(self, rt: ModelRuntime) -> None:
        engine = rt.engine
        logger.info(
            "loaded model %s version %s from %s: engine=%s providers=%s (requested %s) batch_invariant=%s max_len=%d",
            rt.name, rt.version, rt.artifact.path, engine.name, engine.providers,
            engine.requested_providers, rt.batch_invariant, rt.max_sequence_length,
        )
        if engine.fell_back:
            logger.warning(
                "model %s version %s asked for %s but runs on %s (ONNX Runtime fell back)",
                rt.name, rt.version, engine.requested_providers[0], engine.providers[:1],
            )
        if not rt.batch_invariant:
            logger.warning(
                "model %s version %s is %s: an answer may depend slightly on its batch-mates%s",
                rt.name, rt.version,
                rt.invariance.describe() if rt.invariance is not None else "not batch-invariant",
                "; running it one request per execution" if self._config.isolate_batch_variant else "",
            )
        if self._metrics is not None:
            self._metrics.set_model_info(rt.name, rt.version, rt.info)
            if engine.fell_back:
                self._metrics.record_provider_fallback(
                    rt.name, rt.version, engine.requested_providers[0], engine.providers[0] if engine.providers else "none"
                )

    # -- lookup ----------------------------------------------------------------------------
    def get(self, name: str, version: str = "") -> ModelRuntime:
        """The runtime of ``name`` at ``version`` (``""`` = latest); raises :class:`NotFoundError`."""
        with self._lock:
            versions = self._models.get(name)
            if not versions:
                known = sorted(self._models)
                raise NotFoundError(f"model {name!r} is not served here; available models: {known}")
            if not version:
                return versions[max(versions, key=_version_key)]
            try:
                return versions[version]
            except KeyError:
                raise NotFoundError(
                    f"model {name!r} has no version {version!r}; available versions: {sorted(versions, key=_version_key)}"
                ) from None

    def has(self, name: str, version: str = "") -> bool:
        """Whether ``name`` (at ``version``) is loaded."""
        try:
            self.get(name, version)
        except NotFoundError:
            return False
        return True

    def names(self) -> list[str]:
        """Loaded model names, sorted."""
        with self._lock:
            return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        """Loaded versions of ``name``, oldest first (empty if unknown)."""
        with self._lock:
            return sorted(self._models.get(name, {}), key=_version_key)

    def runtimes(self) -> list[ModelRuntime]:
        """Every loaded model version."""
        with self._lock:
            return [rt for versions in self._models.values() for rt in versions.values()]

    def close(self) -> None:
        """Release every engine and forget the models."""
        with self._lock:
            runtimes = [rt for versions in self._models.values() for rt in versions.values()]
            self._models.clear()
        for rt in runtimes:
            rt.close()


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), v) if v.isdigit() else (-1, v)


__all__ = ["LoadFailure", "ModelRepository"]
