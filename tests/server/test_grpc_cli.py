"""``pruneserve serve`` flags map one-to-one to ServeConfig; YAML gives the base, flags override."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_harness import make_config, serving
from prometheus_client.parser import text_string_to_metric_families
from serve_process import ServeProcess  # tests/server/serve_process.py

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


def test_unknown_config_key_error_lists_every_valid_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from pruneserve.server.config import ServeConfig

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max_batch: 3\n")
    assert run_serve(parse("--config", str(bad_yaml))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "characters cut" not in err
    for field in dataclasses.fields(ServeConfig):
        assert f"'{field.name}'" in err, f"{field.name} missing from: {err}"


def test_metrics_and_exit_on_error_flags() -> None:
    assert config_from_args(parse("x")).metrics is True
    assert config_from_args(parse("x", "--no-metrics")).metrics is False
    assert config_from_args(parse("x", "--metrics-port", "0")).metrics_port == 0  # a free port, not off
    assert config_from_args(parse("x")).exit_on_error is True
    assert config_from_args(parse("x", "--no-exit-on-error")).exit_on_error is False


def _serve_cmd(*argv: str) -> list[str]:
    return [
        sys.executable, "-m", "pruneserve.cli", "serve", *argv, "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
        "--metrics-port", "0", "--threads", "1",
    ]  # fmt: skip


def test_serve_exits_when_no_artifact_loads(tmp_path: Path) -> None:
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(_serve_cmd(str(missing), str(empty)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    failed = [line for line in proc.stderr.splitlines() if "model load failed" in line]
    assert len(failed) == 2 and str(missing) in failed[0] and str(empty) in failed[1], proc.stderr
    assert "no model could be loaded" in proc.stderr and "--no-exit-on-error" in proc.stderr
    assert "gRPC listening" not in proc.stderr and "Traceback" not in proc.stderr


def test_no_exit_on_error_keeps_a_server_without_models_up_and_not_ready(tmp_path: Path) -> None:
    proc = ServeProcess([tmp_path / "missing"], "--no-exit-on-error", "--grace-seconds", "1")
    try:
        with InferenceClient(proc.url, timeout=30) as client:  # url waits for "gRPC listening"
            assert client.server_live() and not client.server_ready()
        assert proc.proc.poll() is None, proc.log()
        proc.proc.terminate()
        assert proc.proc.wait(60) == 0, proc.log()
    finally:
        proc.close()


def test_one_bad_artifact_does_not_stop_the_others(embedding_artifact: Path, tmp_path: Path) -> None:
    proc = ServeProcess([tmp_path / "missing", embedding_artifact], "--grace-seconds", "1")
    try:
        with InferenceClient(proc.url, timeout=30) as client:
            assert client.server_ready() and client.model_ready("tiny-embed")
        assert any("model load failed" in line and "missing" in line for line in proc.lines), proc.log()
    finally:
        proc.close()


def test_metrics_port_zero_serves_metrics_on_a_free_port_named_in_the_log(embedding_artifact: Path) -> None:
    proc = ServeProcess([embedding_artifact], "--metrics", "--metrics-host", "127.0.0.1", "--grace-seconds", "1")
    try:
        with InferenceClient(proc.url, timeout=30) as client:
            client.infer_text("tiny-embed", ["hello world"])
        port = int(proc.wait_for(r"metrics at http://127\.0\.0\.1:(\d+)/metrics").group(1))
        assert port != 0
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "pruneserve_requests_total" in body
    finally:
        proc.close()


def test_no_metrics_serves_no_endpoint(embedding_artifact: Path) -> None:
    proc = ServeProcess([embedding_artifact], "--no-metrics", "--grace-seconds", "1")
    try:
        proc.wait_for(r"metrics endpoint off")
        proc.proc.terminate()
        assert proc.proc.wait(60) == 0, proc.log()
    finally:
        proc.close()
    assert not any("metrics at http" in line for line in proc.lines), proc.log()
    with serving(make_config([embedding_artifact], metrics=False)) as srv:
        srv.server.start_metrics_endpoint()
        assert srv.server.metrics_port is None


# -- pruneserve infer ----------------------------------------------------------------------------


def infer(*argv: str) -> int:
    from pruneserve.cli import main

    return main(["infer", *argv])


@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_infer_refuses_a_timeout_that_is_not_positive(timeout: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert infer("--url", "127.0.0.1:1", "--model", "m", "--text", "x", "--timeout", timeout) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --timeout {timeout} ") and err.count("\n") == 1, err


@pytest.fixture
def infer_server(embedding_artifact: Path) -> Iterator[str]:
    with serving(make_config([embedding_artifact])) as srv:
        yield srv.url


def test_infer_refuses_text_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before any connection: nothing listens on port 1.
    latin1 = os.fsdecode(b"caf\xe9")  # how Python hands a non-UTF-8 argv entry to the program
    assert infer("--url", "127.0.0.1:1", "--model", "tiny-embed", "--text", "ok", "--text", latin1) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "--text #2 is not valid UTF-8" in err and "0xe9" in err, err
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"fine\ncaf\xe9\n")
    assert infer("--url", "127.0.0.1:1", "--model", "tiny-embed", "--file", str(texts)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"{texts} line 2 is not valid UTF-8" in err and "0xe9" in err, err


def test_infer_reads_texts_from_a_file_and_stdin(
    infer_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("hello world\n\nthe lazy dog\r\n", encoding="utf-8")  # the blank line is skipped
    assert infer("--url", infer_server, "--model", "tiny-embed", "--text", "first", "--file", str(texts)) == 0
    from_file = json.loads(capsys.readouterr().out)["outputs"]["embedding"]
    assert len(from_file) == 3
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello world\nthe lazy dog\n"), encoding="utf-8"))
    assert infer("--url", infer_server, "--model", "tiny-embed", "--file", "-") == 0
    from_stdin = json.loads(capsys.readouterr().out)["outputs"]["embedding"]
    assert from_stdin == from_file[1:]
    with InferenceClient(infer_server) as client:
        direct = client.infer_text("tiny-embed", ["hello world", "the lazy dog"])["embedding"]
    assert from_stdin == direct.tolist()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert infer("--url", infer_server, "--model", "tiny-embed", "--file", str(empty)) == 2
    assert "holds no texts" in capsys.readouterr().err
    assert infer("--url", infer_server, "--model", "tiny-embed", "--file", str(tmp_path / "nope.txt")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --file ") and "cannot be read" in err, err
