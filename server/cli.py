"""The server wing's subcommands: ``pruneserve serve`` and ``pruneserve infer``.

``serve`` flags map one-to-one to :class:`~pruneserve.server.config.ServeConfig` fields
(``--max-batch-size`` -> ``max_batch_size``). With ``--config serve.yaml`` the file gives the
base values and flags given on the command line override them. Heavy imports (grpc,
onnxruntime) happen only when a command runs, so ``pruneserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Log format for the server: every line carries the request id of the RPC it belongs to.
SERVE_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _int_csv(value: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of integers") from None


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``serve`` and ``infer``."""
    from pruneserve.engines.ort_settings import SPINNING_MODES
    from pruneserve.server.config import ServeConfig

    defaults = ServeConfig.__dataclass_fields__

    def default(name: str) -> Any:
        f = defaults[name]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    serve = subparsers.add_parser(
        "serve",
        help="serve optimized artifacts over the KServe v2 / Triton gRPC protocol",
        description=(
            "Serve one or more artifacts written by `pruneserve optimize` over gRPC (KServe v2 / Triton "
            "protocol, health checking, reflection) with dynamic batching and Prometheus metrics. SIGTERM "
            "or SIGINT drains gracefully: health turns NOT_SERVING, new requests get UNAVAILABLE, accepted "
            "ones finish within --grace-seconds."
        ),
        # SUPPRESS: only flags actually given override the --config file and the defaults.
        argument_default=argparse.SUPPRESS,
    )
    serve.add_argument("artifacts", nargs="*", metavar="ARTIFACT_DIR", help="artifact directories to serve")
    serve.add_argument(
        "--model-repository", metavar="DIR",
        help="a folder of <model>/<version>/ artifact folders to serve (docs/model-control.md)",
    )  # fmt: skip
    serve.add_argument(
        "--model-control-mode", choices=["none", "explicit", "poll"],
        help="none: load the repository at start; explicit: load/unload by request (--load-model at start); "
             "poll: rescan the repository and roll new versions in without losing a request (default none)",
    )  # fmt: skip
    serve.add_argument(
        "--load-model", dest="load_models", action="append", metavar="NAME",
        help="explicit mode: a repository model to load at start (repeatable; '*' = all)",
    )  # fmt: skip
    serve.add_argument(
        "--repository-poll-secs", type=float,
        help=f"poll mode: seconds between rescans of the repository (default {default('repository_poll_secs')})",
    )  # fmt: skip
    serve.add_argument(
        "--version-policy",
        help=f"versions of each repository model to serve: latest:N | all | specific:1,3 (default {default('version_policy')})",
    )  # fmt: skip
    serve.add_argument("--config", dest="config_file", metavar="YAML", help="read ServeConfig fields from a YAML file")
    serve.add_argument("--host", help=f"gRPC and HTTP listen address (default {default('host')})")
    serve.add_argument("--grpc-port", type=int, help=f"gRPC port, 0 = any free one (default {default('grpc_port')})")
    serve.add_argument(
        "--http-port", type=int,
        help=f"KServe v2 / Triton HTTP and OpenAI-compatible /v1 port, 0 = any free one, named in the log "
             f"(default {default('http_port')}, Triton's)",
    )  # fmt: skip
    serve.add_argument(
        "--http", action=argparse.BooleanOptionalAction,
        help="serve HTTP/REST beside gRPC (default on; --no-http = gRPC only)",
    )  # fmt: skip
    serve.add_argument(
        "--http-read-timeout-s", type=float,
        help=f"most seconds an HTTP request body may take to arrive, else 408 (default {default('http_read_timeout_s')})",
    )  # fmt: skip
    serve.add_argument("--metrics-host", help=f"Prometheus listen address (default {default('metrics_host')})")
    serve.add_argument(
        "--metrics-port", type=int,
        help=f"Prometheus port, 0 = any free one, named in the log (default {default('metrics_port')})",
    )  # fmt: skip
    serve.add_argument(
        "--metrics", action=argparse.BooleanOptionalAction,
        help="serve Prometheus /metrics (default on; --no-metrics = no endpoint)",
    )  # fmt: skip
    serve.add_argument(
        "--exit-on-error", action=argparse.BooleanOptionalAction,
        help="exit with status 1 when no artifact loads, each refusal logged, as Triton's --exit-on-error "
             "(default on). When some load, the refused ones are logged and the rest serve either way. "
             "--no-exit-on-error stays up without models, not ready, until stopped",
    )  # fmt: skip
    serve.add_argument(
        "--max-batch-size", type=int, help=f"most items per engine run (default {default('max_batch_size')})"
    )
    serve.add_argument(
        "--max-queue-delay-ms",
        type=float,
        help=f"longest wait for batch-mates (default {default('max_queue_delay_ms')})",
    )
    serve.add_argument(
        "--dispatch-when-idle", action=argparse.BooleanOptionalAction,
        help="run a request at once when its model is idle instead of waiting --max-queue-delay-ms for "
             "batch-mates; batches still form under load (default on; --no-dispatch-when-idle = Triton's policy)",
    )  # fmt: skip
    serve.add_argument(
        "--max-queue-size",
        type=int,
        help=f"most queued items per model before RESOURCE_EXHAUSTED (default {default('max_queue_size')})",
    )
    serve.add_argument(
        "--threads", type=int, help="ONNX Runtime intra-op threads per session (default: cores / workers)"
    )
    serve.add_argument("--workers", type=int, help=f"engine runs at the same time (default {default('workers')})")
    serve.add_argument(
        "--intra-op-spinning", choices=SPINNING_MODES,
        help="ONNX Runtime intra-op threads waiting for work: off = sleep, run = spin only inside a run, "
             f"always = also after it (default {default('intra_op_spinning')})",
    )  # fmt: skip
    serve.add_argument(
        "--provider", "--providers", dest="providers", type=_csv, metavar="LIST",
        help="execution providers in order of preference, e.g. tensorrt,cuda,cpu (default cpu)",
    )  # fmt: skip
    serve.add_argument("--engine", help=f"auto | onnxruntime | openvino (default {default('engine')})")
    serve.add_argument(
        "--max-sequence-length", type=int, help="longest accepted token sequence (default: the artifact's)"
    )
    serve.add_argument("--truncate", action="store_true", help="truncate over-long texts instead of refusing them")
    serve.add_argument(
        "--isolate-batch-variant", action="store_true",
        help="run artifacts whose manifest says batch_invariant: false (dynamic INT8) one request per "
             "execution, so an answer never depends on its batch-mates (default: batch them)",
    )  # fmt: skip
    serve.add_argument(
        "--probe-invariance", action="store_true",
        help="measure batch invariance at load (a few synthetic batches) when the engine and precision served "
             "were not measured by the optimizer (default: assume it only at the graph's own precision)",
    )  # fmt: skip
    serve.add_argument(
        "--length-buckets", type=_int_csv, metavar="LIST", help="sequence-length bucket bounds, e.g. 32,128,512"
    )
    serve.add_argument(
        "--max-message-bytes", type=int, help=f"largest gRPC message (default {default('max_message_bytes')})"
    )
    serve.add_argument(
        "--grace-seconds", type=float, help=f"shutdown grace for accepted work (default {default('grace_seconds')})"
    )
    serve.add_argument(
        "--max-connection-age-s", type=float, metavar="SECONDS",
        help="close client connections after about this long (calls in flight get --grace-seconds), so "
             "client-side round-robin clients discover pods added by a scale-up (default: never)",
    )  # fmt: skip
    serve.add_argument("--tls-cert", help="PEM server certificate (enables TLS; needs --tls-key)")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", help="PEM CA that client certificates must chain to (mutual TLS)")
    serve.add_argument(
        "--shadow-rate", type=float,
        help="fraction of answered requests also run on the artifact's unpruned reference.onnx to measure live "
             "fidelity (default 0 = off; see docs/live-quality.md)",
    )  # fmt: skip
    serve.add_argument(
        "--shadow-queue-size", type=int,
        help=f"sampled requests that may wait for comparison; more are dropped and counted (default {default('shadow_queue_size')})",
    )  # fmt: skip
    serve.add_argument(
        "--capture-path", metavar="FILE.jsonl",
        help="append the texts of shadowed requests whose fidelity fell under the quality floor to this JSON Lines "
             "file (STORES USER TEXT; default off)",
    )  # fmt: skip
    serve.add_argument(
        "--capture-max-bytes", type=int,
        help=f"most bytes the capture holds on disk, rotated files included (default {default('capture_max_bytes')})",
    )  # fmt: skip
    serve.add_argument(
        "--capture-backups", type=int, help=f"rotated capture files kept (default {default('capture_backups')})"
    )
    serve.add_argument(
        "--log-format", choices=["text", "json"], default="text",
        help="text lines, or one JSON object per line with request_id, rpc, model and code fields (default text)",
    )  # fmt: skip
    serve.set_defaults(func=run_serve)

    infer = subparsers.add_parser(
        "infer",
        help="send texts to a running server and print the outputs as JSON",
        description=(
            "Send one request with the --text items and the lines of each --file to MODEL (one batch, "
            "in that order) and print its outputs as JSON, one row per text; with --ready, only report "
            "whether the server and MODEL are ready (exit 0 when both are). Texts must be UTF-8. "
            "Exit 1 on an RPC error or not ready, 2 on bad arguments or input."
        ),
    )
    infer.add_argument("--model", required=True, help="model name")
    infer.add_argument("--model-version", default="", help="model version (default: the latest)")
    infer.add_argument("--text", action="append", default=[], help="a text to send (repeat for a batch)")
    infer.add_argument(
        "--file", dest="text_files", action="append", default=[], metavar="PATH",
        help="send the texts of PATH, one per line (UTF-8, blank lines skipped); '-' reads standard input; "
             "repeatable",
    )  # fmt: skip
    infer.add_argument("--ready", action="store_true", help="check readiness instead of inferring")
    infer.add_argument("--url", default="localhost:8001", help="server host:port (default localhost:8001)")
    infer.add_argument("--output", action="append", default=[], help="output to return (repeatable; default all)")
    infer.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds, above 0 (default 30)")
    infer.add_argument("--tls-ca", help="PEM CA that signed the server's certificate (enables TLS)")
    infer.add_argument("--tls-cert", help="PEM client certificate, for mutual TLS")
    infer.add_argument("--tls-key", help="PEM key of --tls-cert")
    infer.set_defaults(func=run_infer)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`ServeConfig` for ``serve``'s arguments: YAML file, then flags given."""
    from pruneserve.server.config import ServeConfig

    base: dict[str, Any] = {}
    path = getattr(args, "config_file", None)
    if path:
        import yaml

        ServeConfig.from_yaml(path)  # the file alone must be valid: its errors name the file
        base = dict(yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    if not overrides.get("artifacts"):
        overrides.pop("artifacts", None)  # an empty positional list must not erase the file's
    return ServeConfig.from_dict({**base, **overrides})


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id and structured extras."""

    #: Attributes the server's modules attach through ``extra=`` (see interceptors, dataplane).
    EXTRAS: tuple[str, ...] = ("rpc", "model", "version", "code", "outcome")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        entry.update({k: getattr(record, k) for k in self.EXTRAS if hasattr(record, k)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _install_request_id_logging(log_format: str) -> None:
    from pruneserve.server.interceptors import RequestIdLogFilter

    formatter = JsonLogFormatter() if log_format == "json" else logging.Formatter(SERVE_LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdLogFilter())
        handler.setFormatter(formatter)


def run_serve(args: argparse.Namespace) -> int:
    """``pruneserve serve``: run until SIGTERM/SIGINT; 0 after a graceful shutdown."""
    from pruneserve.server.app import serve
    from pruneserve.server.errors import ServerError

    _install_request_id_logging(getattr(args, "log_format", "text"))
    try:
        config = config_from_args(args)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not config.artifacts and not config.model_repository:
        print(
            "error: give at least one ARTIFACT_DIR, or --model-repository DIR (or `artifacts:` / `model_repository:` "
            "in --config)", file=sys.stderr,
        )
        return 2
    try:
        return asyncio.run(serve(config))
    except ServerError as exc:
        logger.error("cannot serve: %s", exc)
        return 1


#: ``--file`` value that means standard input.
STDIN = "-"


def _read_texts(path: str) -> list[str]:
    """The non-blank lines of ``path`` (``-`` = standard input), strictly UTF-8; ValueError names the line."""
    where = "--file - (standard input)" if path == STDIN else f"--file {path}"
    try:
        data = sys.stdin.buffer.read() if path == STDIN else Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ValueError(f"{where} cannot be read ({reason}); give a text file, one text per line") from None
    texts = []
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{where} line {number} is not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
                "the server takes UTF-8 text: convert the file first, e.g. iconv -f LATIN1 -t UTF-8"
            ) from None
        if text.strip():
            texts.append(text)
    if not texts:
        raise ValueError(f"{where} holds no texts (blank lines are skipped); give one text per line")
    return texts


def _infer_texts(args: argparse.Namespace) -> list[str]:
    """``--text`` items, then every ``--file``'s lines; ValueError names the one that is not UTF-8."""
    from pruneserve.server.client import encode_utf8

    for number, text in enumerate(args.text, start=1):
        encode_utf8(text, f"--text #{number}")
    texts = list(args.text)
    for path in args.text_files:
        texts += _read_texts(path)
    return texts


def run_infer(args: argparse.Namespace) -> int:
    """``pruneserve infer``: one request, outputs printed as JSON; 1 on an RPC error or not ready, 2 on bad input."""
    import math

    import grpc

    from pruneserve.server.client import InferenceClient

    if not (math.isfinite(args.timeout) and args.timeout > 0):
        print(f"error: --timeout {args.timeout:g} must be a positive number of seconds, e.g. 30", file=sys.stderr)
        return 2
    try:
        texts = [] if args.ready else _infer_texts(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.ready and not texts:
        print("error: give at least one --text or --file (or --ready to check readiness)", file=sys.stderr)
        return 2
    try:
        with InferenceClient(
            args.url, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, timeout=args.timeout
        ) as client:
            if args.ready:
                ready = {
                    "server_ready": client.server_ready(),
                    "model_ready": client.model_ready(args.model, args.model_version),
                }
                print(json.dumps({"model": args.model, **ready}))
                return 0 if all(ready.values()) else 1
            outputs = client.infer_text(
                args.model, texts, outputs=args.output, version=args.model_version, timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    payload = {
        "model": args.model,
        "outputs": {
            name: [[_jsonable(v) for v in row] for row in value.reshape(value.shape[0], -1)]
            for name, value in outputs.items()
        },
    }
    json.dump(payload, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value.item() if hasattr(value, "item") else value


__all__ = ["SERVE_LOG_FORMAT", "JsonLogFormatter", "config_from_args", "register", "run_infer", "run_serve"]
