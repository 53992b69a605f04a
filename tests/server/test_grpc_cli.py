"""``pruneserve serve`` flags map one-to-one to ServeConfig; YAML gives the base, flags override."""

from __future__ import annotations

import asyncio
import socket
import sys
import urllib.request
from pathlib import Path

import pytest
from grpc_harness import make_config, serving
from prometheus_client.parser import text_string_to_metric_families

from pruneserve.cli import build_parser
from pruneserve.server.cli import config_from_args, run_serve
from pruneserve.server.client import InferenceClient


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["serve", *argv])


def test_flags_map_to_config_fields(embedding_artifact: Path) -> None:
    flags = (
        "--host 127.0.0.1 --grpc-port 9001 --metrics-host 127.0.0.2 --metrics-port 9002 --max-batch-size 16 "
        "--max-queue-delay-ms 3.5 --max-queue-size 77 --threads 2 --workers 3 --provider cuda,cpu "
        "--engine onnxruntime --max-sequence-length 128 --truncate --length-buckets 32,8 --max-message-bytes 4096 "
        "--grace-seconds 2.5 --shadow-rate 0.25"
    )
    config = config_from_args(parse(str(embedding_artifact), *flags.split()))
    assert config.artifacts == [str(embedding_artifact)]
    assert (config.host, config.grpc_port) == ("127.0.0.1", 9001)
    assert (config.metrics_host, config.metrics_port) == ("127.0.0.2", 9002)
    assert (config.max_batch_size, config.max_queue_delay_ms, config.max_queue_size) == (16, 3.5, 77)
    assert (config.threads, config.workers, config.providers, config.engine) == (2, 3, ["cuda", "cpu"], "onnxruntime")
    assert (config.max_sequence_length, config.truncate, config.length_buckets) == (128, True, [8, 32])
    assert (config.max_message_bytes, config.grace_seconds, config.shadow_rate) == (4096, 2.5, 0.25)
    assert config.dispatch_when_idle  # the default


def test_intra_op_spinning_flag() -> None:
    assert config_from_args(parse("x")).intra_op_spinning == "run"  # the default
    assert config_from_args(parse("x", "--intra-op-spinning", "off")).intra_op_spinning == "off"
    with pytest.raises(SystemExit):
        parse("x", "--intra-op-spinning", "busy")


def test_dispatch_when_idle_flag() -> None:
    assert config_from_args(parse("x", "--no-dispatch-when-idle")).dispatch_when_idle is False
    assert config_from_args(parse("x", "--dispatch-when-idle")).dispatch_when_idle is True


def test_yaml_is_the_base_and_flags_override(embedding_artifact: Path, tmp_path: Path) -> None:
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text(f"artifacts: [{embedding_artifact}]\nmax_batch_size: 16\ngrpc-port: 9100\ntruncate: true\n")
    config = config_from_args(parse("--config", str(yaml_file), "--grpc-port", "0"))
    assert config.artifacts == [str(embedding_artifact)]  # no positional: the file's list stands
    assert (config.max_batch_size, config.grpc_port, config.truncate) == (16, 0, True)
    # Flags not given keep the file's values, not the defaults.
    assert config_from_args(parse("--config", str(yaml_file))).grpc_port == 9100


def test_bad_values_are_refused_with_the_field_named(
    embedding_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_serve(parse(str(embedding_artifact), "--max-batch-size", "0")) == 2
    assert "max_batch_size=0 is invalid" in capsys.readouterr().err
    assert run_serve(parse()) == 2
    assert "at least one ARTIFACT_DIR" in capsys.readouterr().err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max_batch: 3\n")
    assert run_serve(parse("--config", str(bad_yaml))) == 2
    assert "unknown configuration keys ['max_batch']" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_endpoint_serves_request_counters_until_shutdown(embedding_artifact: Path) -> None:
    config = make_config([embedding_artifact], metrics_port=_free_port(), metrics_host="127.0.0.1")
    with serving(config) as srv:
        srv.server.start_metrics_endpoint()
        with InferenceClient(srv.url) as client:
            client.infer_text("tiny-embed", ["hello world"])
        url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        samples = [s for f in text_string_to_metric_families(body) for s in f.samples]
        served = [s for s in samples if s.name == "pruneserve_requests_total" and s.labels.get("outcome") == "success"]
        assert [(s.labels["model"], s.value) for s in served] == [("tiny-embed", 1.0)]
        srv.call(srv.server.stop(1.0))
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=5)


def test_port_in_use_is_a_clear_config_error(embedding_artifact: Path) -> None:
    from pruneserve.server.app import create_server
    from pruneserve.server.errors import ConfigError

    with serving(make_config([embedding_artifact])) as srv:
        taken = make_config([embedding_artifact], grpc_port=srv.port)
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{srv.port}"):
            asyncio.run(create_server(taken))


def test_json_logs_carry_the_request_id_and_structured_fields() -> None:
    import json
    import logging

    from pruneserve.server.cli import JsonLogFormatter
    from pruneserve.server.interceptors import RequestIdLogFilter, bind_request_id

    bind_request_id("req-7")
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("pruneserve.x", logging.ERROR, __file__, 1, "failed %s", ("here",), exc_info)
    record.rpc, record.code = "/inference.GRPCInferenceService/ModelInfer", "INTERNAL"
    RequestIdLogFilter().filter(record)
    entry = json.loads(JsonLogFormatter().format(record))
    assert entry["request_id"] == "req-7" and entry["message"] == "failed here"
    assert (entry["rpc"], entry["code"], entry["level"]) == (
        "/inference.GRPCInferenceService/ModelInfer",
        "INTERNAL",
        "ERROR",
    )
    assert "ValueError: boom" in entry["exception"]
