"""Prometheus metrics: exact names, private registries, and values that match the traffic sent."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
from tiny_artifacts import gate_model, text_request, tokenize, wait_for_pending, wait_until_running

from pruneserve.server.config import ServeConfig
from pruneserve.server.dataplane import DataPlane
from pruneserve.server.errors import InvalidArgumentError, NotFoundError
from pruneserve.server.metrics import DURATION_BUCKETS, UNKNOWN_MODEL, Metrics, start_http_server

#: The public contract (deploy/ alerts and dashboards, docs/metrics.md).
EXPECTED_FAMILIES = {
    "pruneserve_requests": "counter",
    "pruneserve_inferences": "counter",
    "pruneserve_executions": "counter",
    "pruneserve_request_duration_seconds": "histogram",
    "pruneserve_queue_duration_seconds": "histogram",
    "pruneserve_compute_duration_seconds": "histogram",
    "pruneserve_batch_size": "histogram",
    "pruneserve_pending_requests": "gauge",
    "pruneserve_tokens": "counter",
    "pruneserve_padded_tokens": "counter",
    "pruneserve_model": "info",
    "pruneserve_model_ready": "gauge",
    "pruneserve_provider_fallback": "counter",
    "pruneserve_model_load_failures": "counter",
    "pruneserve_live_fidelity": "histogram",
    "pruneserve_shadow_comparisons": "counter",
    "pruneserve_quality_floor": "gauge",
    "pruneserve_live_label_agreement": "counter",
    "pruneserve_live_logit_distance": "histogram",
    "pruneserve_shadow_captures": "counter",
}


def test_every_metric_has_its_contract_name_and_type() -> None:
    families = {m.name: m.type for m in Metrics().registry.collect()}
    assert {k: v for k, v in families.items() if k.startswith("pruneserve_")} == EXPECTED_FAMILIES
    # prometheus-client's own collectors ride on the same private registry and endpoint.
    assert "python_info" in families and ("process_cpu_seconds" in families) == Path("/proc/self/stat").exists()


def test_registries_are_private() -> None:
    a, b = Metrics(), Metrics()
    a.observe_request("m", "1", "success", 0.01)
    assert a.registry.get_sample_value("pruneserve_requests_total", {"model": "m", "version": "1", "outcome": "success", "protocol": "grpc"}) == 1
    assert b.registry.get_sample_value("pruneserve_requests_total", {"model": "m", "version": "1", "outcome": "success", "protocol": "grpc"}) is None


def test_duration_buckets_span_100us_to_10s() -> None:
    assert DURATION_BUCKETS[0] == pytest.approx(1e-4) and DURATION_BUCKETS[-1] == pytest.approx(10.0)
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)


def test_pending_gauge_sums_versions() -> None:
    m = Metrics()
    m.set_pending("m", 3, "1")
    m.set_pending("m", 4, "2")
    assert m.registry.get_sample_value("pruneserve_pending_requests", {"model": "m"}) == 7
    m.set_pending("m", 0, "1")
    assert m.registry.get_sample_value("pruneserve_pending_requests", {"model": "m"}) == 4


def test_values_match_the_requests_made(embedding_artifact: Path, classifier_artifact: Path) -> None:
    metrics = Metrics()
    texts = ["hello world", "cats", "the quick brown fox", "red"]
    config = ServeConfig(artifacts=[str(embedding_artifact), str(classifier_artifact)], threads=1, workers=1)

    async def main():
        dp = DataPlane(config, metrics)
        await dp.start()
        get = metrics.registry.get_sample_value
        assert get("pruneserve_model_ready", {"model": "tiny-embed", "version": "1"}) == 1
        # Four single-text requests batched together behind a held worker, plus a two-text request.
        engine = gate_model(dp, "tiny-embed")
        engine.gate.clear()
        first = asyncio.ensure_future(dp.infer(text_request("tiny-embed", ["blue green", "sad dog"])))
        await wait_until_running(engine)
        tasks = [asyncio.ensure_future(dp.infer(text_request("tiny-embed", [t]))) for t in texts]
        await wait_for_pending(dp, "tiny-embed", len(texts))
        assert get("pruneserve_pending_requests", {"model": "tiny-embed"}) == len(texts)
        engine.gate.set()
        await asyncio.gather(first, *tasks)
        assert get("pruneserve_pending_requests", {"model": "tiny-embed"}) == 0
        with pytest.raises(InvalidArgumentError):
            await dp.infer(text_request("tiny-embed", ["x"], outputs=["nope"]))
        with pytest.raises(NotFoundError):
            await dp.infer(text_request("no-such-model", ["x"]))
        await dp.infer(text_request("tiny-cls", ["happy"]))
        stats = dp.model_statistics("tiny-embed")[0]
        await dp.stop(5)
        return stats

    stats = asyncio.run(main())
    get = metrics.registry.get_sample_value
    embed = {"model": "tiny-embed", "version": "1"}
    by_request = {**embed, "protocol": "grpc"}  # the request metrics also carry the protocol
    assert get("pruneserve_requests_total", {**by_request, "outcome": "success"}) == 5
    assert get("pruneserve_requests_total", {**by_request, "outcome": "invalid_argument"}) == 1
    assert get("pruneserve_requests_total", {"model": UNKNOWN_MODEL, "version": "", "outcome": "not_found", "protocol": "grpc"}) == 1
    assert get("pruneserve_requests_total", {"model": "tiny-cls", "version": "1", "outcome": "success", "protocol": "grpc"}) == 1
    assert get("pruneserve_request_duration_seconds_count", by_request) == 6
    assert get("pruneserve_inferences_total", embed) == 2 + len(texts)
    assert get("pruneserve_executions_total", embed) == 2 == stats.execution_count
    assert get("pruneserve_batch_size_count", embed) == 2
    assert get("pruneserve_batch_size_sum", embed) == 2 + len(texts)
    assert get("pruneserve_batch_size_bucket", {**embed, "le": "2.0"}) == 1  # the two-text request ran alone
    assert get("pruneserve_queue_duration_seconds_count", embed) == 5
    assert get("pruneserve_compute_duration_seconds_count", embed) == 2
    _, mask_a, _ = tokenize(["blue green", "sad dog"])
    real = int(mask_a.sum()) + sum(int(tokenize([t])[1].sum()) for t in texts)
    assert get("pruneserve_tokens_total", embed) == real
    _, mask_b, _ = tokenize(texts)
    assert get("pruneserve_padded_tokens_total", embed) == mask_a.size + mask_b.size
    assert get("pruneserve_model_ready", embed) == 0  # after stop
    assert stats.success.count == 5 and stats.fail.count == 1 and stats.inference_count == 6


def test_metrics_http_endpoint_serves_the_registry() -> None:
    m = Metrics()
    m.observe_request("tiny", "1", "success", 0.002)
    server, thread = start_http_server("127.0.0.1", 0, m.registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert 'pruneserve_requests_total{model="tiny",outcome="success",protocol="grpc",version="1"} 1.0' in body
    assert "pruneserve_request_duration_seconds_bucket" in body
