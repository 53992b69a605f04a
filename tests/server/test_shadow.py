"""Live quality: shadow comparison with the reference model, its metrics, bounds and capture.

Expected fidelities come from :func:`shadow_support.expected_fidelity`, an independent numpy
forward pass of the artifact's two graphs, never from recorded numbers. Flooding is made
deterministic by holding the reference engine on a gate (no sleeps, no timing asserts).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shadow_support import expected_fidelity, make_shadowed_artifact, served_and_reference
from tiny_artifacts import VOCAB, GatedEngine, text_request, tokenize

from pruneserve.engines.measure import cosine_rows
from pruneserve.server.config import ServeConfig
from pruneserve.server.dataplane import DataPlane
from pruneserve.server.errors import ConfigError
from pruneserve.server.metrics import FIDELITY_BUCKETS, Metrics
from pruneserve.server.shadow import CaptureWriter, compare, compare_logits

TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "cats and dogs are good",
    "red blue green",
    "a small model",
    "very fast server",
    "sad dog",
]
MV = {"model": "shadowed", "version": "1"}


@pytest.fixture
def shadowed(tmp_path: Path) -> Callable[..., Path]:
    """``shadowed(**make_shadowed_artifact kwargs) -> Path`` in this test's temp folder."""
    counter = iter(range(1000))

    def make(**kwargs: Any) -> Path:
        return make_shadowed_artifact(tmp_path / f"artifact-{next(counter)}", **kwargs)

    return make


def _config(artifact: Path, **overrides: Any) -> ServeConfig:
    return ServeConfig(artifacts=[str(artifact)], threads=1, shadow_rate=1.0, max_queue_delay_ms=1.0, **overrides)


def _serve_texts(config: ServeConfig, texts: list[str], metrics: Metrics, per_request: int = 2) -> list[np.ndarray]:
    """Send ``texts`` in requests of ``per_request``, wait for every comparison, return the answers."""

    async def main() -> list[np.ndarray]:
        dp = DataPlane(config, metrics)
        await dp.start()
        try:
            answers = []
            for i in range(0, len(texts), per_request):
                response = await dp.infer(text_request("shadowed", texts[i : i + per_request]))
                answers.append(response.outputs[0].data)
            assert dp.shadow is not None
            assert await asyncio.to_thread(dp.shadow.wait_idle, 60), "the shadow comparisons never finished"
            return answers
        finally:
            await dp.stop(5.0)

    return asyncio.run(main())


def _buckets(metrics: Metrics, name: str = "pruneserve_live_fidelity") -> dict[float, float]:
    get = metrics.registry.get_sample_value
    return {le: get(f"{name}_bucket", {**MV, "le": str(le)}) or 0.0 for le in FIDELITY_BUCKETS}


# -- the comparisons ---------------------------------------------------------------------------
def test_cosine_rows_is_clipped_and_handles_zero_rows() -> None:
    a = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    b = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]], dtype=np.float32)
    cos = cosine_rows(a, b)
    assert cos[0] <= 1.0 and cos[0] == pytest.approx(1.0)
    assert cos[1] == 0.0 and cos[2] == pytest.approx(-1.0)


def test_compare_logits_agreement_and_distance() -> None:
    served = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    reference = np.array([[1.0, 2.5, 0.0], [0.0, 4.0, 0.0]])
    agreed, distance = compare_logits(served, reference)
    assert agreed.tolist() == [True, False]
    assert distance.tolist() == pytest.approx([0.5, 4.0])
    result = compare("classification", served, reference)
    assert result.fidelity.tolist() == [1.0, 0.0]


def test_compare_refuses_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="2 rows"):
        compare("embedding", np.ones((2, 4)), np.ones((3, 4)))


# -- end to end through the data plane -----------------------------------------------------------
def test_identical_reference_puts_every_observation_in_the_top_bucket(shadowed) -> None:
    metrics = Metrics()
    _serve_texts(_config(shadowed(damage=0.0)), TEXTS, metrics)
    get = metrics.registry.get_sample_value
    buckets = _buckets(metrics)
    assert get("pruneserve_live_fidelity_count", MV) == len(TEXTS)
    assert buckets[1.0] == len(TEXTS)
    assert buckets[0.999] == 0, "every observation must be in the top bucket (0.999, 1]"
    assert get("pruneserve_live_fidelity_sum", MV) == pytest.approx(len(TEXTS), abs=1e-5)
    assert get("pruneserve_shadow_comparisons_total", {**MV, "outcome": "compared"}) == 4  # 7 texts in 4 requests
    assert get("pruneserve_shadow_comparisons_total", {**MV, "outcome": "dropped"}) is None
    assert get("pruneserve_quality_floor", MV) == pytest.approx(0.95)


def test_damaged_model_shows_the_drop_in_the_histogram(shadowed) -> None:
    artifact = shadowed(damage=0.25)
    expected = expected_fidelity(artifact, TEXTS)
    # Precondition for exact bucket counts: no expected value sits on a bucket boundary.
    assert min(abs(e - b) for e in expected for b in FIDELITY_BUCKETS) > 1e-4
    assert expected.mean() < 0.95, "the damage must take the mean under the floor for this test to mean anything"
    metrics = Metrics()
    answers = _serve_texts(_config(artifact), TEXTS, metrics)
    # Serving itself is unchanged: the answers are the (damaged) served model's.
    served, _ = served_and_reference(artifact, TEXTS)
    np.testing.assert_allclose(np.concatenate(answers), served, atol=1e-5)
    get = metrics.registry.get_sample_value
    assert get("pruneserve_live_fidelity_sum", MV) == pytest.approx(expected.sum(), abs=1e-4)
    buckets = _buckets(metrics)
    for le in FIDELITY_BUCKETS:
        assert buckets[le] == int((expected <= le).sum()), f"bucket le={le}"
    assert buckets[0.999] == int((expected <= 0.999).sum()) > 0


def test_classifier_records_label_agreement_and_logit_distance(shadowed) -> None:
    artifact = shadowed(task="classification", damage=0.5)
    expected = expected_fidelity(artifact, TEXTS, "classification")
    assert 0 < expected.sum() < len(TEXTS), "the damage must change some labels and keep others"
    served, ref = served_and_reference(artifact, TEXTS)
    metrics = Metrics()
    _serve_texts(_config(artifact), TEXTS, metrics)
    get = metrics.registry.get_sample_value
    assert get("pruneserve_live_label_agreement_total", {**MV, "agreed": "true"}) == expected.sum()
    assert get("pruneserve_live_label_agreement_total", {**MV, "agreed": "false"}) == len(TEXTS) - expected.sum()
    assert get("pruneserve_live_fidelity_sum", MV) == pytest.approx(expected.sum())
    assert get("pruneserve_live_logit_distance_count", MV) == len(TEXTS)
    assert get("pruneserve_live_logit_distance_sum", MV) == pytest.approx(np.abs(served - ref).max(1).sum(), abs=1e-4)


def test_flood_drops_and_counts_shadow_work_while_requests_are_served(shadowed) -> None:
    artifact = shadowed(damage=0.25)
    queue_size, flood = 2, 12
    metrics = Metrics()

    async def main() -> None:
        dp = DataPlane(_config(artifact, shadow_queue_size=queue_size), metrics)
        await dp.start()
        rt = dp.repository.get("shadowed")
        assert rt.reference is not None and dp.shadow is not None
        gated = GatedEngine(rt.reference)
        rt.reference = gated
        gated.gate.clear()  # the shadow worker blocks inside its first reference run
        try:
            await dp.infer(text_request("shadowed", ["hello world"]))
            assert await asyncio.to_thread(gated.entered.wait, 30), "the shadow worker never started"
            served, _ = served_and_reference(artifact, ["red blue green"])
            for _ in range(flood):
                response = await dp.infer(text_request("shadowed", ["red blue green"]))
                np.testing.assert_allclose(response.outputs[0].data, served, atol=1e-5)
                assert dp.shadow.pending <= queue_size
            get = metrics.registry.get_sample_value
            assert get("pruneserve_shadow_comparisons_total", {**MV, "outcome": "dropped"}) == flood - queue_size
            assert get("pruneserve_requests_total", {**MV, "outcome": "success", "protocol": "grpc"}) == flood + 1
        finally:
            gated.gate.set()
        assert await asyncio.to_thread(dp.shadow.wait_idle, 30)
        await dp.stop(5.0)

    asyncio.run(main())
    get = metrics.registry.get_sample_value
    # The blocked one and the queue_size queued ones were compared; nothing else was kept.
    assert get("pruneserve_shadow_comparisons_total", {**MV, "outcome": "compared"}) == 1 + queue_size
    assert get("pruneserve_live_fidelity_count", MV) == 1 + queue_size


def test_reference_failures_are_counted_and_do_not_touch_serving(shadowed) -> None:
    artifact = shadowed()
    metrics = Metrics()

    async def main() -> None:
        dp = DataPlane(_config(artifact), metrics)
        await dp.start()
        rt = dp.repository.get("shadowed")
        rt.reference = GatedEngine(rt.reference, poison_id=VOCAB["cats"])  # raises on any batch with "cats"
        try:
            for text in ("cats and dogs are good", "hello world", "cats"):
                response = await dp.infer(text_request("shadowed", [text]))
                assert response.outputs[0].shape == (1, 8)
            assert await asyncio.to_thread(dp.shadow.wait_idle, 30)
        finally:
            await dp.stop(5.0)

    asyncio.run(main())
    get = metrics.registry.get_sample_value
    assert get("pruneserve_shadow_comparisons_total", {**MV, "outcome": "failed"}) == 2
    assert get("pruneserve_shadow_comparisons_total", {**MV, "outcome": "compared"}) == 1
    assert get("pruneserve_requests_total", {**MV, "outcome": "success", "protocol": "grpc"}) == 3


def test_shutdown_drops_queued_shadow_work_without_waiting(shadowed) -> None:
    artifact = shadowed()
    metrics = Metrics()

    async def main() -> None:
        dp = DataPlane(_config(artifact, shadow_queue_size=4), metrics)
        await dp.start()
        rt = dp.repository.get("shadowed")
        gated = GatedEngine(rt.reference)
        rt.reference = gated
        gated.gate.clear()
        for _ in range(3):
            await dp.infer(text_request("shadowed", ["hello"]))
        assert await asyncio.to_thread(gated.entered.wait, 30)
        assert dp.shadow is not None and dp.shadow.pending == 2
        stopping = asyncio.ensure_future(dp.stop(5.0))
        # Release the running comparison only after stop() dropped the waiting samples; releasing
        # it earlier lets the worker take the next sample first (a race seen on a loaded machine).
        for _ in range(3000):
            if metrics.registry.get_sample_value(
                "pruneserve_shadow_comparisons_total", {**MV, "outcome": "dropped"}
            ) == 2:
                break
            await asyncio.sleep(0.01)
        gated.gate.set()  # let the running comparison end so the worker thread exits
        await stopping

    asyncio.run(main())
    get = metrics.registry.get_sample_value
    assert get("pruneserve_shadow_comparisons_total", {**MV, "outcome": "dropped"}) == 2


def test_quality_floor_gauge_is_absent_without_a_floor(shadowed) -> None:
    metrics = Metrics()
    _serve_texts(_config(shadowed(quality_floor=None)), TEXTS[:2], metrics)
    assert metrics.registry.get_sample_value("pruneserve_quality_floor", MV) is None
    assert metrics.registry.get_sample_value("pruneserve_live_fidelity_count", MV) == 2


# -- capture -------------------------------------------------------------------------------------
def test_capture_writes_exactly_the_texts_under_the_floor(shadowed, tmp_path: Path) -> None:
    from pruneserve.optimizer.data import read_examples  # the reader of `pruneserve optimize --data`

    artifact = shadowed(damage=0.25, quality_floor=0.85)
    expected = expected_fidelity(artifact, TEXTS)
    below = [t for t, e in zip(TEXTS, expected) if e < 0.85]
    assert 0 < len(below) < len(TEXTS)
    capture = tmp_path / "drift.jsonl"
    metrics = Metrics()
    _serve_texts(_config(artifact, capture_path=str(capture)), TEXTS, metrics)
    lines = [json.loads(line) for line in capture.read_text(encoding="utf-8").splitlines()]
    assert lines == [{"text": t} for t in below]
    assert stat.S_IMODE(capture.stat().st_mode) == 0o600
    assert [e.text for e in read_examples(capture)] == below
    assert metrics.registry.get_sample_value("pruneserve_shadow_captures_total", MV) == len(below)


def test_capture_is_off_by_default(shadowed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    artifact = shadowed(damage=0.5)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    config = _config(artifact)
    assert config.capture_path is None
    metrics = Metrics()
    _serve_texts(config, TEXTS, metrics)
    assert metrics.registry.get_sample_value("pruneserve_live_fidelity_count", MV) == len(TEXTS)
    assert metrics.registry.get_sample_value("pruneserve_shadow_captures_total", MV) is None
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in artifact.iterdir()) == ["manifest.json", "model.onnx", "reference.onnx", "tokenizer.json"]


def _lines(paths: list[Path]) -> list[str]:
    return [json.loads(line)["text"] for p in paths for line in p.read_text(encoding="utf-8").splitlines()]


def test_capture_writer_respects_its_cap_and_rotates(tmp_path: Path) -> None:
    path = tmp_path / "drift.jsonl"
    writer = CaptureWriter(path, max_bytes=3000, backups=2)
    texts = [f"sentence number {i:04d} with some padding words" for i in range(200)]
    for t in texts:
        assert writer.write([t]) == 1
    files = writer.files()
    assert [p.name for p in files] == ["drift.jsonl", "drift.jsonl.1", "drift.jsonl.2"]
    assert all(p.stat().st_size <= 1000 for p in files)
    assert sum(p.stat().st_size for p in files) <= 3000
    assert not (tmp_path / "drift.jsonl.3").exists()
    kept = _lines(list(reversed(files)))  # oldest file first
    assert kept == texts[-len(kept):], "the files hold the most recent texts, in order"
    assert len(kept) > 2 * len(_lines([path]))


def test_capture_writer_without_backups_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "drift.jsonl"
    writer = CaptureWriter(path, max_bytes=1024, backups=0)
    texts = [f"text {i:03d} " + "x" * 40 for i in range(100)]
    writer.write(texts)
    assert writer.files() == [path]
    assert path.stat().st_size <= 1024
    kept = _lines([path])
    assert kept and kept == texts[-len(kept):]


def test_capture_writer_skips_lines_longer_than_a_file_and_trims_an_old_file(tmp_path: Path) -> None:
    path = tmp_path / "drift.jsonl"
    path.write_text('{"text": "old"}\n' * 200, encoding="utf-8")  # 3200 bytes from an earlier, larger cap
    writer = CaptureWriter(path, max_bytes=2048, backups=1)
    assert writer.write(["y" * 5000, "fits"]) == 1
    assert _lines([path]) == ["fits"]
    assert (tmp_path / "drift.jsonl.1").stat().st_size == 3200  # rotated away, then dropped by the next rotation
    assert writer.write(["z" * 900]) == 1
    assert writer.write(["w" * 900]) == 1
    assert _lines([path]) == ["w" * 900]
    assert sum(p.stat().st_size for p in writer.files()) <= 2048


def test_capture_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "drift.jsonl"
    old = os.umask(0o022)
    try:
        CaptureWriter(path, max_bytes=2048, backups=1).write(["secret user text"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shadow_queue_size": 0}, r"shadow_queue_size=0"),
        ({"capture_max_bytes": 2000, "capture_backups": 2}, r"capture_max_bytes=2000 .* 666 bytes per file"),
        ({"capture_backups": -1}, r"capture_backups=-1"),
        ({"capture_path": "/nonexistent-dir/drift.jsonl"}, r"folder '/nonexistent-dir' does not exist"),
    ],
)
def test_shadow_config_errors_name_the_value_and_the_fix(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServeConfig(**overrides)


def test_capture_path_may_not_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        ServeConfig(capture_path=str(tmp_path), shadow_rate=0.1)


def test_tokenized_requests_are_compared_but_never_captured(shadowed, tmp_path: Path) -> None:
    from pruneserve.server.types import InferInput, InferRequest

    artifact = shadowed(damage=0.5, quality_floor=0.99)
    capture = tmp_path / "drift.jsonl"
    metrics = Metrics()
    ids, mask, types = tokenize(["sad dog"])

    async def main() -> None:
        dp = DataPlane(_config(artifact, capture_path=str(capture)), metrics)
        await dp.start()
        try:
            request = InferRequest(
                model="shadowed",
                version="",
                inputs=[
                    InferInput("input_ids", "INT64", ids.shape, ids),
                    InferInput("attention_mask", "INT64", mask.shape, mask),
                    InferInput("token_type_ids", "INT64", types.shape, types),
                ],
            )
            await dp.infer(request)
            assert await asyncio.to_thread(dp.shadow.wait_idle, 30)
        finally:
            await dp.stop(5.0)

    asyncio.run(main())
    assert metrics.registry.get_sample_value("pruneserve_live_fidelity_count", MV) == 1
    assert not capture.exists()


def test_serve_flags_set_the_shadow_and_capture_fields(tmp_path: Path) -> None:
    from pruneserve.cli import build_parser
    from pruneserve.server.cli import config_from_args

    flags = (
        f"serve x --shadow-rate 0.01 --shadow-queue-size 8 --capture-path {tmp_path / 'drift.jsonl'} "
        "--capture-max-bytes 65536 --capture-backups 3"
    )
    config = config_from_args(build_parser().parse_args(flags.split()))
    assert (config.shadow_rate, config.shadow_queue_size) == (0.01, 8)
    assert (config.capture_path, config.capture_max_bytes, config.capture_backups) == (str(tmp_path / "drift.jsonl"), 65536, 3)
    assert config_from_args(build_parser().parse_args(["serve", "x"])).capture_path is None
