"""The server's configuration: one typed dataclass, validated on construction.

Every field can come from a YAML file (:meth:`ServeConfig.from_yaml`) or from CLI flags; an
invalid value raises :class:`~pruneserve.server.errors.ConfigError` whose message names the
field, the value, the allowed range and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruneserve.engines.keys import ENGINE_NAMES as _ENGINE_NAMES
from pruneserve.engines.keys import OPENVINO_PRECISIONS
from pruneserve.engines.ort_settings import DEFAULT_SPINNING, SPINNING_MODES
from pruneserve.outputs import OutputError, check_capture_file
from pruneserve.server.errors import ConfigError
from pruneserve.server.versions import CONTROL_MODES, VersionPolicy

logger = logging.getLogger(__name__)

#: Execution-provider short names, in the order of preference the server tries them.
PROVIDER_NAMES: tuple[str, ...] = ("tensorrt", "cuda", "cpu")
#: Engines a config may name; ``auto`` picks the artifact's recommendation, else ONNX Runtime.
ENGINE_NAMES: tuple[str, ...] = ("auto", *_ENGINE_NAMES)
#: Default sequence-length bucket bounds: a request joins the smallest bucket that holds it.
DEFAULT_LENGTH_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
#: Smallest size of one capture file: room for a few captured texts before it rotates.
MIN_CAPTURE_FILE_BYTES = 1024


def _default_threads() -> int:
    # sched_getaffinity honours cgroup/taskset limits that cpu_count ignores.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class ServeConfig:
    """Everything ``pruneserve serve`` needs.

    Attributes:
        artifacts: artifact directories to serve (each written by ``pruneserve optimize``), as
            the version their manifest names; always loaded, never unloaded by model control.
        model_repository: a folder of ``<model name>/<version>/`` artifact folders (versions
            are positive integers; the folder name is the model's name, the version folder its
            version). See ``docs/model-control.md``.
        model_control_mode: Triton's modes. ``none``: load the repository's models at start,
            refuse load/unload requests. ``explicit``: load ``load_models`` at start, then
            what the repository load/unload requests say. ``poll``: as ``none``, and rescan
            the repository every ``repository_poll_secs``: a new version is loaded, verified
            and made ready before the version it replaces stops taking requests and drains.
        load_models: model names ``explicit`` mode loads at start (``*`` = all).
        repository_poll_secs: seconds between rescans in ``poll`` mode.
        version_policy: which versions of each repository model to serve: ``latest:N`` (the
            N highest that load; a version that fails verification is skipped, never replacing
            a good one), ``all``, or ``specific:1,3``.
        host, grpc_port: where the gRPC server listens.
        http, http_port: serve KServe v2 / Triton HTTP/REST and the OpenAI-compatible routes
            on ``host:http_port`` (Triton's 8000; 0 = a free port, named in the log);
            ``http`` off (``--no-http``) = gRPC only. TLS and ``max_message_bytes`` apply to
            it as to gRPC.
        http_read_timeout_s: most seconds an HTTP request's body may take to arrive; a slower
            client gets 408 and its connection is closed, without holding up other requests.
        metrics_host, metrics_port: where Prometheus scrapes ``/metrics`` (port 0 = a free
            port, named in the log, as for ``grpc_port``).
        metrics: serve the Prometheus endpoint at all (``--no-metrics`` turns it off).
        exit_on_error: exit non-zero at start when artifacts were asked for and none loads (each
            refusal logged on one line), as Triton's ``--exit-on-error`` does. When some load,
            the refused ones are logged and counted and the rest serve: one bad artifact never
            stops the others. Off = stay up without models, not ready (health NOT_SERVING),
            until stopped or until model control loads one.
        max_batch_size: most requests' items computed in one engine run.
        max_queue_delay_ms: how long the first queued item may wait for batch-mates while a
            batch of its model executes (and always, when ``dispatch_when_idle`` is off).
        dispatch_when_idle: run a queued request at once when nothing of its model is
            executing, instead of waiting ``max_queue_delay_ms`` for batch-mates; under load
            batches still form from the requests that queue during each run. Off = Triton's
            policy (every batch waits up to the delay unless it is full).
        max_queue_size: most requests waiting per model; beyond it requests fail at once with
            RESOURCE_EXHAUSTED instead of queueing without bound.
        threads: ONNX Runtime intra-op threads per session (default: available cores
            divided by ``workers``).
        workers: engine runs that may execute at the same time (thread pool size).
        intra_op_spinning: what ONNX Runtime's intra-op threads do while they wait for work:
            ``off`` (sleep at once), ``run`` (spin between the parallel steps of one run and
            sleep as soon as the run ends) or ``always`` (ONNX Runtime's default: also spin
            for a while after each run, which takes cores from the event loop and from other
            models' sessions).
        providers: execution providers in order of preference (``tensorrt``, ``cuda``,
            ``cpu``); unavailable ones are skipped, and the providers the session really
            got are logged and exported as a metric.
        engine: ``auto`` | ``onnxruntime`` | ``openvino``.
        max_sequence_length: longest accepted token sequence (None = the artifact's).
        truncate: cut over-long texts to the limit instead of refusing them.
        length_buckets: upper bounds of sequence-length buckets for batching.
        isolate_batch_variant: run artifacts whose manifest says ``batch_invariant: false``
            (dynamic INT8) one request per execution, so an answer never depends on others.
        probe_invariance: when the engine and precision served were not measured by the
            optimizer (no ``manifest.engines`` entry for them), measure batch invariance at
            load with a few synthetic token batches instead of assuming it.
        max_message_bytes: largest gRPC message, and largest HTTP request body, accepted or sent.
        grace_seconds: how long shutdown waits for accepted work.
        max_connection_age_s: close each client connection after about this many seconds
            (gRPC adds +/-10% jitter), letting its in-flight calls finish within
            ``grace_seconds``; clients then reconnect, so clients using client-side round
            robin discover pods added by a scale-up. None (default) = connections live on.
        tls_cert, tls_key, tls_client_ca: PEM paths; cert+key enable TLS, client CA enables mTLS.
        shadow_rate: fraction of successful requests also run on the artifact's unpruned
            reference model (``reference.onnx``) in the background, to measure live fidelity
            (0 = off). See ``docs/live-quality.md``.
        shadow_queue_size: most sampled requests waiting for the shadow worker; a sample that
            finds the queue full is dropped and counted, never queued behind serving.
        capture_path: a JSON Lines file where the texts of shadowed items whose fidelity fell
            under the artifact's quality floor are written as ``{"text": ...}`` lines, ready for
            ``pruneserve optimize --data``. None (default) = off. **It stores user text.**
        capture_max_bytes: the most bytes the capture may hold on disk, rotated files included.
        capture_backups: rotated capture files kept (``PATH.1`` newest ... ``PATH.N``); each
            file holds up to ``capture_max_bytes / (capture_backups + 1)`` bytes, and with 0
            the single file starts over when full.
        tensorrt_fp16, tensorrt_int8, tensorrt_cache_dir: TensorRT provider options.
        openvino_precision: OpenVINO ``INFERENCE_PRECISION_HINT``: ``auto`` (the artifact's
            recorded choice, else ``f32``), ``f32`` (batch-invariant), or ``bf16`` (faster on
            CPUs with bf16 units; answers then depend slightly on batch-mates).
    """

    artifacts: list[str] = field(default_factory=list)
    model_repository: str | None = None
    model_control_mode: str = "none"
    load_models: list[str] = field(default_factory=list)
    repository_poll_secs: float = 15.0
    version_policy: str = "latest:1"
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8002
    metrics: bool = True
    http: bool = True
    http_port: int = 8000
    http_read_timeout_s: float = 30.0
    exit_on_error: bool = True
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    dispatch_when_idle: bool = True
    max_queue_size: int = 1024
    threads: int | None = None
    workers: int = 1
    intra_op_spinning: str = DEFAULT_SPINNING
    providers: list[str] = field(default_factory=lambda: ["cpu"])
    engine: str = "auto"
    max_sequence_length: int | None = None
    truncate: bool = False
    length_buckets: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTH_BUCKETS))
    isolate_batch_variant: bool = False
    probe_invariance: bool = False
    max_message_bytes: int = 64 * 1024 * 1024
    grace_seconds: float = 10.0
    max_connection_age_s: float | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    shadow_rate: float = 0.0
    shadow_queue_size: int = 64
    capture_path: str | None = None
    capture_max_bytes: int = 16 * 1024 * 1024
    capture_backups: int = 2
    tensorrt_fp16: bool = True
    tensorrt_int8: bool = False
    tensorrt_cache_dir: str | None = None
    openvino_precision: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.artifacts, (str, os.PathLike)):
            self.artifacts = [str(self.artifacts)]
        self.artifacts = [str(a) for a in self.artifacts]
        if isinstance(self.load_models, str):
            self.load_models = [m.strip() for m in self.load_models.split(",") if m.strip()]
        if isinstance(self.providers, str):
            self.providers = [p.strip() for p in self.providers.split(",") if p.strip()]
        self.providers = [_provider_short_name(p) for p in self.providers]
        if self.threads is None:
            self.threads = max(1, _default_threads() // max(1, int(self.workers)))
        self._validate()

    # -- validation ----------------------------------------------------------------------
    def _validate(self) -> None:
        for name in ("grpc_port", "metrics_port", "http_port"):
            _check_int(name, getattr(self, name), 0, 65535, "a TCP port, 0 = pick a free one")
        _check_float("http_read_timeout_s", self.http_read_timeout_s, 0.1, 3600.0)
        self._validate_model_control()
        _check_int("max_batch_size", self.max_batch_size, 1, 4096, "e.g. 32")
        _check_int("max_queue_size", self.max_queue_size, 1, 10_000_000, "e.g. 1024")
        _check_int("threads", self.threads, 1, 1024, "intra-op threads per session, e.g. the core count")
        _check_int("workers", self.workers, 1, 256, "concurrent engine runs, e.g. 1 on CPU, 2 on GPU")
        _check_int("max_message_bytes", self.max_message_bytes, 1024, 2**31 - 1, "e.g. 67108864")
        _check_float("max_queue_delay_ms", self.max_queue_delay_ms, 0.0, 10_000.0)
        _check_float("grace_seconds", self.grace_seconds, 0.0, 3600.0)
        if self.max_connection_age_s is not None:
            # Under a second, clients would spend their time reconnecting; past a week it is off in all but name.
            _check_float("max_connection_age_s", self.max_connection_age_s, 1.0, 7 * 24 * 3600.0)
        _check_float("shadow_rate", self.shadow_rate, 0.0, 1.0)
        _check_int("shadow_queue_size", self.shadow_queue_size, 1, 100_000, "e.g. 64")
        _check_int("capture_backups", self.capture_backups, 0, 100, "rotated capture files kept, e.g. 2")
        _check_int("capture_max_bytes", self.capture_max_bytes, 1, 2**40, "e.g. 16777216 (16 MiB)")
        per_file = self.capture_max_bytes // (self.capture_backups + 1)
        if per_file < MIN_CAPTURE_FILE_BYTES:
            raise ConfigError(
                f"capture_max_bytes={self.capture_max_bytes} split over {self.capture_backups + 1} capture files "
                f"leaves {per_file} bytes per file, under the {MIN_CAPTURE_FILE_BYTES}-byte minimum; raise "
                f"capture_max_bytes to at least {MIN_CAPTURE_FILE_BYTES * (self.capture_backups + 1)} or lower capture_backups"
            )
        if self.capture_path is not None:
            if not isinstance(self.capture_path, (str, os.PathLike)) or not str(self.capture_path).strip():
                raise ConfigError(f"capture_path={self.capture_path!r} must be a file path, e.g. /var/lib/pruneserve/drift.jsonl")
            self.capture_path = str(self.capture_path)
            parent = Path(self.capture_path).parent
            if not parent.is_dir():
                raise ConfigError(
                    f"capture_path {self.capture_path!r}: its folder {str(parent)!r} does not exist; create it or choose another path"
                )
            try:  # a folder, or a file that is not an earlier capture, is never appended to or rotated away
                check_capture_file(self.capture_path, backups=self.capture_backups)
            except OutputError as exc:
                raise ConfigError(str(exc)) from None
        if self.max_sequence_length is not None:
            _check_int("max_sequence_length", self.max_sequence_length, 2, 1_000_000, "e.g. 512, or omit")
        if not self.providers:
            raise ConfigError(f"providers is empty; list at least one of {PROVIDER_NAMES} (e.g. ['cpu'])")
        if len(set(self.providers)) != len(self.providers):
            raise ConfigError(f"providers {self.providers!r} names a provider twice; list each once")
        if self.engine not in ENGINE_NAMES:
            raise ConfigError(f"engine {self.engine!r} is not one of {ENGINE_NAMES}; use 'auto' to let the artifact choose")
        if self.intra_op_spinning not in SPINNING_MODES:
            raise ConfigError(
                f"intra_op_spinning {self.intra_op_spinning!r} is not one of {SPINNING_MODES}; "
                "use 'run' (spin only inside a run) or 'off'"
            )
        if self.openvino_precision not in OPENVINO_PRECISIONS:
            raise ConfigError(
                f"openvino_precision {self.openvino_precision!r} is not one of {OPENVINO_PRECISIONS}; "
                "use 'auto' or 'f32'"
            )
        if not self.length_buckets or any(
            not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in self.length_buckets
        ):
            raise ConfigError(
                f"length_buckets {self.length_buckets!r} must be a non-empty list of positive integers, e.g. [32, 128, 512]"
            )
        self.length_buckets = sorted(set(self.length_buckets))
        for name in (
            "truncate", "isolate_batch_variant", "probe_invariance", "dispatch_when_idle", "tensorrt_fp16", "tensorrt_int8", "metrics",
            "exit_on_error", "http",
        ):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key must be given together (PEM paths), or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key as well")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"{name} {value!r} is not a readable file; give the path of a PEM file")

    def _validate_model_control(self) -> None:
        if self.model_control_mode not in CONTROL_MODES:
            raise ConfigError(
                f"model_control_mode {self.model_control_mode!r} is not one of {CONTROL_MODES}; use 'none' "
                "(load the repository at start), 'explicit' (load/unload requests) or 'poll' (rescan the repository)"
            )
        # Raises ConfigError naming the value and the forms; stored spelled out ("latest" -> "latest:1").
        self.version_policy = str(VersionPolicy.parse(self.version_policy))
        _check_float("repository_poll_secs", self.repository_poll_secs, 0.1, 86_400.0)
        if not isinstance(self.load_models, list) or not all(isinstance(m, str) and m for m in self.load_models):
            raise ConfigError(f"load_models {self.load_models!r} must be a list of model names, or ['*'] for all")
        if self.model_repository is not None:
            if not isinstance(self.model_repository, (str, os.PathLike)) or not str(self.model_repository).strip():
                raise ConfigError(f"model_repository={self.model_repository!r} must be a folder path")
            self.model_repository = str(self.model_repository)
            if not Path(self.model_repository).is_dir():
                raise ConfigError(
                    f"model_repository {self.model_repository!r} is not a folder; create it or give the folder "
                    "that holds <model>/<version>/ artifact folders"
                )
        elif self.model_control_mode != "none":
            raise ConfigError(
                f"model_control_mode {self.model_control_mode!r} needs model_repository (--model-repository DIR), "
                "the folder it loads models from"
            )
        if self.load_models and self.model_control_mode != "explicit":
            raise ConfigError(
                f"load_models {self.load_models!r} applies only to model_control_mode 'explicit' (it is "
                f"{self.model_control_mode!r}, which loads every repository model); drop it or use explicit"
            )

    @property
    def policy(self) -> VersionPolicy:
        """The parsed :attr:`version_policy`."""
        return VersionPolicy.parse(self.version_policy)

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dictionary of every field (YAML/JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServeConfig:
        """Build a config from a mapping; keys may use ``-`` or ``_``; unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"the configuration must be a mapping of field: value, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            close = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            hints = "".join(f"; did you mean {m[0]!r} for {k!r}" for k, m in close.items() if m)
            raise ConfigError(f"unknown configuration keys {unknown}{hints}; valid keys are {sorted(names)}")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> ServeConfig:
        """Read a YAML file of ``field: value`` pairs (safe loader only)."""
        import yaml  # local: only this entry point needs it

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        return cls.from_dict(data)

    # -- derived -------------------------------------------------------------------------
    @property
    def max_queue_delay_s(self) -> float:
        """The queue delay in seconds."""
        return self.max_queue_delay_ms / 1000.0


_PROVIDER_ALIASES = {
    "tensorrtexecutionprovider": "tensorrt",
    "trt": "tensorrt",
    "cudaexecutionprovider": "cuda",
    "gpu": "cuda",
    "cpuexecutionprovider": "cpu",
}


def _provider_short_name(name: Any) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"provider {name!r} must be a string, one of {PROVIDER_NAMES}")
    key = name.strip().lower()
    key = _PROVIDER_ALIASES.get(key, key)
    if key not in PROVIDER_NAMES:
        raise ConfigError(f"provider {name!r} is unknown; use names from {PROVIDER_NAMES}")
    return key


def _check_int(name: str, value: Any, lo: int, hi: int, hint: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{name}={value!r} is invalid: expected an integer in [{lo}, {hi}] ({hint})")


def _check_float(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise ConfigError(f"{name}={value!r} is invalid: expected a number in [{lo}, {hi}]")


__all__ = ["DEFAULT_LENGTH_BUCKETS", "ENGINE_NAMES", "PROVIDER_NAMES", "ServeConfig"]
