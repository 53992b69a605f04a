"""Model control: the repository layout, version policies, load/unload, and rollover without loss.

Every server here loads real tiny artifacts from a ``<name>/<version>/`` repository; versions
differ in their weights (``seed``), so an answer shows which version computed it, and the
response's ``model_version`` says which version the server thinks it used. Nothing waits on
wall-clock time for an assertion: tests wait for a condition, with a deadline for failure.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from grpc_harness import ServerThread, make_config, serving
from tiny_artifacts import gate_model, make_artifact, reference_forward, running, text_request, tokenize, wait_until_running
from tritonclient.utils import InferenceServerException

from pruneserve.server.dataplane import DataPlane
from pruneserve.server.errors import ConfigError, NotFoundError
from pruneserve.server.metrics import Metrics
from pruneserve.server.types import READY, UNAVAILABLE, RepositoryEntry
from pruneserve.server.versions import VersionPolicy, scan_repository

MODEL = "minilm"
TEXTS = ["hello world", "the quick brown fox"]
#: Each version's weights: an answer says which version computed it.
SEEDS = {1: 11, 2: 12, 3: 13}
#: How long a condition may take before the test fails (never a timing assertion).
DEADLINE_S = 60.0


# -- building repositories -----------------------------------------------------------------
def add_version(repo: Path, version: int, *, name: str = MODEL, tamper: bool = False, **spec: Any) -> Path:
    """Write ``repo/name/version`` as an operator should: assembled under a hidden name, then renamed in."""
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".incoming-{version}"
    make_artifact(staging, name=name, version=version, seed=SEEDS.get(version, version), **spec)
    if tamper:  # same size, one byte changed: only the sha256 check can tell
        graph = staging / "model.onnx"
        data = bytearray(graph.read_bytes())
        data[-1] ^= 0xFF
        graph.write_bytes(bytes(data))
    final = model_dir / str(version)
    staging.rename(final)
    return final


def expected_embedding(folder: Path) -> np.ndarray:
    """What the graph in ``folder`` computes for :data:`TEXTS` (an independent numpy forward)."""
    ids, mask, types = tokenize(TEXTS)
    return reference_forward(folder / "model.onnx", ids, mask, types)


@pytest.fixture(scope="module")
def three_versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding ``minilm`` versions 1, 2 and 3. Do not modify."""
    repo = tmp_path_factory.mktemp("repo3")
    for v in (1, 2, 3):
        add_version(repo, v)
    return repo


def repo_config(repo: Path, mode: str = "none", **overrides: Any) -> Any:
    return make_config([], model_repository=str(repo), model_control_mode=mode, **overrides)


def wait_for(condition: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def info_versions(metrics: Metrics, name: str) -> set[str]:
    """The versions of ``name`` that ``pruneserve_model_info`` describes."""
    return {
        s.labels["version"]
        for family in metrics.registry.collect()
        if family.name == "pruneserve_model"
        for s in family.samples
        if s.name == "pruneserve_model_info" and s.labels.get("model") == name
    }


def index_of(entries: list[RepositoryEntry], name: str = MODEL) -> dict[str, tuple[str, str]]:
    return {e.version: (e.state, e.reason) for e in entries if e.name == name}


# -- layout and policy -------------------------------------------------------------------------
def test_scan_repository_reads_only_numbered_version_folders(tmp_path: Path) -> None:
    for folder in ("m/1", "m/2", "m/10", "m/01", "m/0", "m/x", "m/.3", "n", ".hidden/1"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "m" / "4").write_text("a file, not a folder")
    (tmp_path / "README").write_text("not a model")
    found = scan_repository(tmp_path)
    assert sorted(found) == ["m", "n"]
    assert found["m"] == {1: tmp_path / "m/1", 2: tmp_path / "m/2", 10: tmp_path / "m/10"}
    assert found["n"] == {}


@pytest.mark.parametrize(
    ("text", "on_disk", "candidates", "limit"),
    [
        ("latest:1", [1, 3, 2], [3, 2, 1], 1),
        ("latest:2", [2, 1], [2, 1], 2),
        ("all", [1, 3], [3, 1], None),
        ("specific:1,3", [1, 2, 3, 4], [3, 1], None),
        ("specific:5", [1, 2], [], None),
    ],
)
def test_version_policy_candidates(text: str, on_disk: list[int], candidates: list[int], limit: int | None) -> None:
    policy = VersionPolicy.parse(text)
    assert policy.candidates(on_disk) == candidates and policy.limit == limit
    assert VersionPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize("text", ["latest:-1", "latest:x", "all:2", "specific", "specific:a", "oldest"])
def test_version_policy_refuses_other_forms(text: str) -> None:
    with pytest.raises(ConfigError, match=rf"version_policy {text!r} is invalid; use 'latest:N'.*'all'.*'specific:1,3'"):
        VersionPolicy.parse(text)


@pytest.mark.parametrize(
    ("policy", "served"),
    [("latest:1", ["3"]), ("latest:2", ["2", "3"]), ("all", ["1", "2", "3"]), ("specific:1,3", ["1", "3"])],
)
def test_none_mode_serves_what_the_policy_selects(three_versions: Path, policy: str, served: list[str]) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        async with running(repo_config(three_versions, version_policy=policy), metrics) as dp:
            assert dp.repository.versions(MODEL) == served
            latest = await dp.infer(text_request(MODEL, TEXTS))
            assert latest.version == served[-1]  # no version named: the highest ready one
            np.testing.assert_allclose(latest.outputs[0].data, expected_embedding(three_versions / MODEL / served[-1]), rtol=1e-4, atol=1e-5)
            for version in served:
                answer = await dp.infer(text_request(MODEL, TEXTS, version=version))
                assert answer.version == version
                np.testing.assert_allclose(answer.outputs[0].data, expected_embedding(three_versions / MODEL / version), rtol=1e-4, atol=1e-5)
            index = index_of(dp.repository_index())
            assert {v for v, (state, _) in index.items() if state == READY} == set(served)
            for version in {"1", "2", "3"} - set(served):
                assert index[version] == (UNAVAILABLE, f"not selected by the version policy {policy}")
            assert [e.version for e in dp.repository_index(ready_only=True)] == served
            # Metrics and statistics per loaded version.
            assert info_versions(metrics, MODEL) == set(served)
            for version in served:
                assert metrics.registry.get_sample_value("pruneserve_model_ready", {"model": MODEL, "version": version}) == 1
            assert [s.version for s in dp.model_statistics(MODEL)] == served

    asyncio.run(scenario())


# -- explicit mode over both transports ----------------------------------------------------------
class Client:
    """The calls these tests make, over tritonclient.grpc or tritonclient.http unchanged."""

    def __init__(self, server: ServerThread, protocol: str) -> None:
        self.protocol = protocol
        if protocol == "grpc":
            self.module: Any = tgrpc
            self.raw: Any = tgrpc.InferenceServerClient(server.url)
        else:
            self.module = thttp
            self.raw = thttp.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")

    def index(self) -> dict[tuple[str, str], tuple[str, str]]:
        if self.protocol == "grpc":
            rows = self.raw.get_model_repository_index(as_json=True).get("models", [])
        else:
            rows = self.raw.get_model_repository_index()
        return {(r["name"], r.get("version", "")): (r.get("state", ""), r.get("reason", "")) for r in rows}

    def infer(self, model: str = MODEL) -> tuple[str, np.ndarray]:
        """``(model_version, embedding)`` of one request for :data:`TEXTS`."""
        t = self.module.InferInput("text", [len(TEXTS), 1], "BYTES")
        t.set_data_from_numpy(np.array([s.encode() for s in TEXTS], dtype=object).reshape(-1, 1))
        result = self.raw.infer(model, [t])
        response = result.get_response(as_json=True) if self.protocol == "grpc" else result.get_response()
        return response["model_version"], result.as_numpy("embedding")

    def close(self) -> None:
        self.raw.close()


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory: pytest.TempPathFactory, classifier_artifact: Path) -> Iterator[ServerThread]:
    """Explicit mode over a repository with ``minilm`` v1 (not loaded at start), beside the
    command-line artifact ``tiny-cls``."""
    repo = tmp_path_factory.mktemp("explicit")
    add_version(repo, 1)
    config = make_config([classifier_artifact], model_repository=str(repo), model_control_mode="explicit")
    with serving(config) as srv:
        yield srv


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_explicit_load_and_unload(explicit_server: ServerThread, protocol: str) -> None:
    client = Client(explicit_server, protocol)
    try:
        assert client.index()[(MODEL, "1")] == (UNAVAILABLE, "unloaded")
        assert client.index()[("tiny-cls", "1")] == (READY, "")
        assert not client.raw.is_model_ready(MODEL)
        client.raw.load_model(MODEL)
        assert client.raw.is_model_ready(MODEL) and client.raw.is_model_ready(MODEL, "1")
        version, embedding = client.infer()
        assert version == "1"
        folder = Path(explicit_server.config.model_repository or "") / MODEL / "1"
        np.testing.assert_allclose(embedding, expected_embedding(folder), rtol=1e-4, atol=1e-5)
        assert client.index()[(MODEL, "1")] == (READY, "")
        client.raw.load_model(MODEL)  # loading a loaded model keeps it serving
        assert client.infer()[0] == "1"

        client.raw.unload_model(MODEL)
        assert not client.raw.is_model_ready(MODEL)
        assert client.index()[(MODEL, "1")] == (UNAVAILABLE, "unloaded")
        with pytest.raises(InferenceServerException, match="not served here"):
            client.infer()
        assert explicit_server.server.dataplane.ready()  # tiny-cls still serves
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_explicit_refusals_name_the_problem(explicit_server: ServerThread, protocol: str) -> None:
    client = Client(explicit_server, protocol)
    codes = {
        "grpc": ("StatusCode.FAILED_PRECONDITION", "StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT"),
        "http": ("400", "404", "400"),
    }[protocol]
    try:
        with pytest.raises(InferenceServerException, match="served from an artifact folder given on the command line") as err:
            client.raw.unload_model("tiny-cls")
        assert err.value.status() == codes[0]
        assert client.raw.is_model_ready("tiny-cls")
        with pytest.raises(InferenceServerException, match="no model folder 'nope'; available: \\['minilm'\\]") as err:
            client.raw.load_model("nope")
        assert err.value.status() == codes[1]
        with pytest.raises(InferenceServerException, match="load parameters \\['config'\\] are not supported") as err:
            client.raw.load_model(MODEL, config='{"max_batch_size": 4}')
        assert err.value.status() == codes[2]
    finally:
        client.close()


def test_none_mode_refuses_load_and_unload(three_versions: Path) -> None:
    with serving(repo_config(three_versions)) as srv:
        for protocol, status in (("grpc", "StatusCode.FAILED_PRECONDITION"), ("http", "400")):
            client = Client(srv, protocol)
            try:
                for call in (client.raw.load_model, client.raw.unload_model):
                    with pytest.raises(InferenceServerException, match="model control mode is 'none'.*--model-control-mode explicit") as err:
                        call(MODEL)
                    assert err.value.status() == status
                assert client.raw.is_model_ready(MODEL, "3")
                assert client.index()[(MODEL, "3")] == (READY, "")
            finally:
                client.close()


def test_explicit_mode_loads_load_model_at_start(three_versions: Path) -> None:
    async def scenario() -> None:
        config = repo_config(three_versions, "explicit", load_models=["*"], version_policy="latest:2")
        async with running(config) as dp:
            assert dp.repository.versions(MODEL) == ["2", "3"] and dp.ready()
        async with running(repo_config(three_versions, "explicit")) as dp:
            assert dp.model_names() == [] and not dp.ready() and not dp.expects_models

    asyncio.run(scenario())


def test_unloading_the_last_version_finishes_what_it_accepted(three_versions: Path) -> None:
    async def scenario() -> None:
        async with running(repo_config(three_versions, "explicit", load_models=[MODEL], workers=1)) as dp:
            engine = gate_model(dp, MODEL)
            engine.gate.clear()
            try:
                accepted = [asyncio.ensure_future(dp.infer(text_request(MODEL, [t]))) for t in ("hello", "world", "cat")]
                await wait_until_running(engine)
                unloading = asyncio.ensure_future(dp.unload_model(MODEL))
                for _ in range(5000):  # until the unload has taken the model out of service
                    if not dp.model_ready(MODEL):
                        break
                    await asyncio.sleep(0.002)
                assert not dp.model_ready(MODEL) and not dp.ready()
                with pytest.raises(NotFoundError):
                    await dp.infer(text_request(MODEL, ["late"]))
                assert not unloading.done() and not any(task.done() for task in accepted)
                engine.gate.set()
                answers = await asyncio.wait_for(asyncio.gather(*accepted), DEADLINE_S)
                assert [a.version for a in answers] == ["3", "3", "3"]
                await asyncio.wait_for(unloading, DEADLINE_S)
                assert dp.repository.versions(MODEL) == [] and dp.model_statistics() == []
                assert index_of(dp.repository_index())["3"] == (UNAVAILABLE, "unloaded")
            finally:
                engine.gate.set()  # never leave a worker blocked, even when an assertion failed

    asyncio.run(scenario())


# -- a bad version never replaces a good one --------------------------------------------------------
def test_a_tampered_version_never_replaces_the_serving_one(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    v1 = add_version(repo, 1)
    metrics = Metrics()
    config = repo_config(repo, "poll", repository_poll_secs=0.1)

    async def scenario() -> None:
        async with running(config, metrics) as dp:
            assert dp.repository.versions(MODEL) == ["1"]
            await asyncio.to_thread(add_version, repo, 2, tamper=True)
            await _until(lambda: "sha256" in index_of(dp.repository_index()).get("2", ("", ""))[1], "v2 refused")
            state, reason = index_of(dp.repository_index())["2"]
            assert state == UNAVAILABLE and str(repo) not in reason  # the cause, without the server's paths
            polls = dp.control.polls
            await _until(lambda: dp.control.polls >= polls + 3, "three more rescans")
            # Refused once: an unchanged folder is not retried, logged or counted again.
            assert metrics.registry.get_sample_value("pruneserve_model_load_failures_total", {"reason": "integrity"}) == 1
            assert dp.repository.versions(MODEL) == ["1"] and dp.model_ready(MODEL, "1")
            answer = await dp.infer(text_request(MODEL, TEXTS))
            assert answer.version == "1"
            np.testing.assert_allclose(answer.outputs[0].data, expected_embedding(v1), rtol=1e-4, atol=1e-5)
            # A repaired version 2 is tried again and rolls in.
            await asyncio.to_thread(shutil.rmtree, repo / MODEL / "2")
            await asyncio.to_thread(add_version, repo, 2)
            await _until(lambda: dp.repository.versions(MODEL) == ["2"], "the repaired v2 to replace v1")
            assert (await dp.infer(text_request(MODEL, TEXTS))).version == "2"
            assert index_of(dp.repository_index())["1"] == (UNAVAILABLE, "not selected by the version policy latest:1")

    asyncio.run(scenario())


async def _until(condition: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- rollover under load ---------------------------------------------------------------------------
class LoadLoop(threading.Thread):
    """Sends requests back to back over one protocol until stopped; records every outcome."""

    def __init__(self, server: ServerThread, protocol: str) -> None:
        super().__init__(name=f"load-{protocol}", daemon=True)
        self.client = Client(server, protocol)
        self.stop = threading.Event()
        self.versions: list[str] = []
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    version, embedding = self.client.infer()
                    assert embedding.shape == (len(TEXTS), 8)
                    self.versions.append(version)
                except Exception as exc:  # every failure is a lost request: recorded, asserted empty
                    self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.client.close()


def test_rollover_under_load_loses_no_request(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    add_version(repo, 1)
    config = repo_config(repo, "poll", repository_poll_secs=0.2, workers=2, max_queue_delay_ms=1.0)
    with serving(config) as srv:
        dp: DataPlane = srv.server.dataplane
        loops = [LoadLoop(srv, protocol) for protocol in ("grpc", "grpc", "http", "http")]
        for loop in loops:
            loop.start()
        try:
            wait_for(lambda: all(len(loop.versions) >= 5 for loop in loops), "every client to be answered by v1")
            v2 = add_version(repo, 2)  # copied in while the clients send
            wait_for(lambda: dp.repository.versions(MODEL) == ["2"], "v2 to replace v1")
            seen = [len(loop.versions) for loop in loops]
            wait_for(lambda: all(len(lp.versions) >= n + 5 for lp, n in zip(loops, seen)), "answers after the rollover")
        finally:
            for loop in loops:
                loop.stop.set()
            for loop in loops:
                loop.join(DEADLINE_S)
        for loop in loops:
            assert loop.errors == [], f"{loop.name} lost requests: {loop.errors[:3]}"
            first_v2 = loop.versions.index("2")
            assert set(loop.versions[:first_v2]) == {"1"} and set(loop.versions[first_v2:]) == {"2"}, loop.name
        http, grpc_client = Client(srv, "http"), Client(srv, "grpc")
        index = {k: v for k, v in http.index().items() if k[0] == MODEL}
        assert index == {(MODEL, "1"): (UNAVAILABLE, "not selected by the version policy latest:1"), (MODEL, "2"): (READY, "")}
        assert info_versions(dp.metrics, MODEL) == {"2"}
        assert dp.metrics.registry.get_sample_value("pruneserve_model_ready", {"model": MODEL, "version": "1"}) == 0
        assert [s.version for s in dp.model_statistics(MODEL)] == ["2"]
        np.testing.assert_allclose(grpc_client.infer()[1], expected_embedding(v2), rtol=1e-4, atol=1e-5)
        http.close()
        grpc_client.close()


def test_http_repository_routes_speak_triton_json(three_versions: Path) -> None:
    with serving(repo_config(three_versions)) as srv:
        base = f"http://127.0.0.1:{srv.server.http_port}"

        def post(path: str, body: bytes) -> tuple[int, Any]:
            import json

            req = urllib.request.Request(base + path, data=body, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return resp.status, json.loads(resp.read() or b"null")
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        status, rows = post("/v2/repository/index", b'{"ready": true}')
        assert status == 200 and rows == [{"name": MODEL, "version": "3", "state": "READY", "reason": ""}]
        status, rows = post("/v2/repository/index", b"")
        assert status == 200 and [r["version"] for r in rows] == ["1", "2", "3"]
        assert post("/v2/repository/index", b'{"ready": "yes"}') == (400, {"error": "'ready' must be true or false, got 'yes'"})
        status, body = post(f"/v2/repository/models/{MODEL}/load", b"{}")
        assert status == 400 and "--model-control-mode explicit" in body["error"]
        assert "model_repository" in srv.server.dataplane.server_metadata()["extensions"]
