"""Dynamic batching: batching across requests, length buckets, back-pressure, deadlines, isolation.

Batching is made deterministic without timing: a :class:`GatedEngine` holds the single
worker busy on a first request while the others queue, then the gate opens and the queued
requests run together. Assertions are on what the engine computed, never on durations.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_artifacts import (
    MAX_LEN,
    VOCAB,
    WORDS,
    gate_model,
    reference_forward,
    text_request,
    tokenize,
    wait_for_pending,
    wait_until_running,
)

from pruneserve.server.config import ServeConfig
from pruneserve.server.dataplane import DataPlane
from pruneserve.server.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    ServerError,
    UnavailableError,
)
from pruneserve.server.metrics import Metrics
from pruneserve.engines import Engine


def _config(*artifacts: Path, **kw: object) -> ServeConfig:
    kw.setdefault("threads", 1)
    kw.setdefault("workers", 1)
    kw.setdefault("max_queue_delay_ms", 1.0)
    return ServeConfig(artifacts=[str(a) for a in artifacts], **kw)  # type: ignore[arg-type]


async def _hold_worker(dp: DataPlane, model: str = "tiny-embed"):
    """Close the gate and start one request that occupies the only worker; returns (engine, task)."""
    engine = gate_model(dp, model)
    engine.gate.clear()
    first = asyncio.ensure_future(dp.infer(text_request(model, ["hello"])))
    await wait_until_running(engine)
    return engine, first


def test_concurrent_requests_share_one_execution(embedding_artifact: Path, run_dataplane) -> None:
    texts = ["hello world", "cats and dogs", "the lazy dog", "red", "a very small model", "text", "blue green", "sad"]

    async def scenario(dp: DataPlane):
        engine, first = await _hold_worker(dp)
        tasks = [asyncio.ensure_future(dp.infer(text_request("tiny-embed", [t], rid=f"r{i}"))) for i, t in enumerate(texts)]
        await wait_for_pending(dp, "tiny-embed", len(texts))
        engine.gate.set()
        await first
        responses = await asyncio.gather(*tasks)
        return engine.batch_sizes, responses, dp.model_statistics("tiny-embed")[0]

    sizes, responses, stats = run_dataplane(_config(embedding_artifact), scenario)
    assert sizes == [1, len(texts)]
    assert stats.execution_count == 2 and stats.inference_count == len(texts) + 1
    assert stats.execution_count < stats.inference_count
    # Each caller gets its own row, and the request id back.
    for i, (t, r) in enumerate(zip(texts, responses)):
        ids, mask, types = tokenize([t])
        np.testing.assert_allclose(r.outputs[0].data, reference_forward(embedding_artifact / "model.onnx", ids, mask, types), atol=1e-5)
        assert r.id == f"r{i}"


def test_length_buckets_keep_short_texts_apart_from_long(embedding_artifact: Path, run_dataplane) -> None:
    short = ["hello", "cats", "red dog"]
    long = [" ".join(["the quick brown fox"] * 3 + [w]) for w in ("a", "an", "big")]

    async def scenario(dp: DataPlane):
        engine, first = await _hold_worker(dp)
        tasks = [asyncio.ensure_future(dp.infer(text_request("tiny-embed", [t]))) for t in short + long]
        await wait_for_pending(dp, "tiny-embed", len(tasks))
        engine.gate.set()
        await asyncio.gather(first, *tasks)
        return engine.runs[1:]

    runs = run_dataplane(_config(embedding_artifact, length_buckets=[8, MAX_LEN]), scenario)
    assert sorted(r["input_ids"].shape[0] for r in runs) == [3, 3]
    widths = sorted(r["input_ids"].shape[1] for r in runs)
    assert widths[0] <= 8 < widths[1]  # the short texts were not padded to the long ones


def test_full_queue_is_refused_at_once(embedding_artifact: Path, run_dataplane) -> None:
    metrics = Metrics()

    async def scenario(dp: DataPlane):
        engine, first = await _hold_worker(dp)
        queued = [asyncio.ensure_future(dp.infer(text_request("tiny-embed", [t]))) for t in ("cats", "dogs")]
        await wait_for_pending(dp, "tiny-embed", 2)
        with pytest.raises(ResourceExhaustedError, match=r"2 requests queued \(max_queue_size 2\)"):
            await dp.infer(text_request("tiny-embed", ["one too many"]))
        engine.gate.set()
        await asyncio.gather(first, *queued)

    run_dataplane(_config(embedding_artifact, max_queue_size=2), scenario, metrics)
    get = metrics.registry.get_sample_value
    assert get("pruneserve_requests_total", {"model": "tiny-embed", "version": "1", "protocol": "grpc", "outcome": "resource_exhausted"}) == 1
    assert get("pruneserve_requests_total", {"model": "tiny-embed", "version": "1", "protocol": "grpc", "outcome": "success"}) == 3


def test_expired_queued_work_is_dropped_not_computed(embedding_artifact: Path, run_dataplane) -> None:
    green = VOCAB["green"]

    async def scenario(dp: DataPlane):
        engine, first = await _hold_worker(dp)
        later = asyncio.ensure_future(dp.infer(text_request("tiny-embed", ["cats"])))
        with pytest.raises(DeadlineExceededError, match="deadline passed"):
            # Long enough that a stalled machine cannot make it pass before arrival (a different refusal).
            await dp.infer(text_request("tiny-embed", ["green green green"]), deadline=time.monotonic() + 0.5)
        # A deadline that has already passed is refused on arrival.
        with pytest.raises(DeadlineExceededError, match="had passed when it arrived"):
            await dp.infer(text_request("tiny-embed", ["green"]), deadline=time.monotonic() - 1)
        engine.gate.set()
        await asyncio.gather(first, later)
        return engine.runs, dp.model_statistics("tiny-embed")[0]

    runs, stats = run_dataplane(_config(embedding_artifact), scenario)
    assert not any((r["input_ids"] == green).any() for r in runs)
    assert [r["input_ids"].shape[0] for r in runs] == [1, 1]
    assert stats.fail.count == 2 and stats.success.count == 2


def test_cancelled_caller_is_dropped_not_computed(embedding_artifact: Path, run_dataplane) -> None:
    green = VOCAB["green"]

    async def scenario(dp: DataPlane):
        engine, first = await _hold_worker(dp)
        stay = asyncio.ensure_future(dp.infer(text_request("tiny-embed", ["cats"])))
        await wait_for_pending(dp, "tiny-embed", 1)
        gone = asyncio.ensure_future(dp.infer(text_request("tiny-embed", ["green"])))
        await wait_for_pending(dp, "tiny-embed", 2)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        engine.gate.set()
        await asyncio.gather(first, stay)
        return engine.runs

    runs = run_dataplane(_config(embedding_artifact), scenario)
    assert not any((r["input_ids"] == green).any() for r in runs)


def test_invalid_request_does_not_fail_batch_mates(embedding_artifact: Path, run_dataplane) -> None:
    good = ["hello world", "cats", "the lazy dog"]

    async def scenario(dp: DataPlane):
        engine, first = await _hold_worker(dp)
        bad_utf8 = text_request("tiny-embed", ["x"])
        bad_utf8.inputs[0].data = np.array([[b"\xc3\x28"]], dtype=object)
        too_long = text_request("tiny-embed", [" ".join(["word"] * (MAX_LEN + 1))])
        tasks = [asyncio.ensure_future(dp.infer(text_request("tiny-embed", [t]))) for t in good]
        bad = [asyncio.ensure_future(dp.infer(r)) for r in (bad_utf8, too_long)]
        await wait_for_pending(dp, "tiny-embed", len(good))
        engine.gate.set()
        results = await asyncio.gather(first, *tasks, *bad, return_exceptions=True)
        return engine.batch_sizes, results

    sizes, results = run_dataplane(_config(embedding_artifact), scenario)
    assert sizes == [1, 3]
    assert all(r.outputs[0].data.shape == (1, 8) for r in results[:4])
    assert all(isinstance(r, InvalidArgumentError) for r in results[4:])


def test_failed_batch_is_retried_per_request(embedding_artifact: Path, run_dataplane) -> None:
    poison = VOCAB["red"]

    async def scenario(dp: DataPlane):
        rt = dp.repository.get("tiny-embed")
        engine, first = await _hold_worker(dp)
        engine.poison_id = poison
        texts = ["hello world", "red red", "cats", "dogs"]
        tasks = [asyncio.ensure_future(dp.infer(text_request("tiny-embed", [t]))) for t in texts]
        await wait_for_pending(dp, "tiny-embed", len(texts))
        engine.gate.set()
        results = await asyncio.gather(first, *tasks, return_exceptions=True)
        assert rt.engine is engine
        return engine.batch_sizes, results

    sizes, results = run_dataplane(_config(embedding_artifact), scenario)
    assert sizes == [1, 4, 1, 1, 1, 1]  # the batch failed, then each request ran alone
    ok = [r for i, r in enumerate(results) if i != 2]
    assert all(r.outputs[0].data.shape == (1, 8) for r in ok)
    err = results[2]
    assert isinstance(err, ServerError) and err.code == "INTERNAL"
    assert "Traceback" not in str(err) and "poisoned" not in str(err)


@pytest.mark.parametrize(("engine", "seed"), [("onnxruntime", 0), ("onnxruntime", 1), ("onnxruntime", 2), ("openvino", 0)])
def test_batch_invariance_fp32(embedding_artifact: Path, run_dataplane, engine: str, seed: int) -> None:
    if engine == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    rng = random.Random(seed)
    target = "the quick brown fox jumps over the lazy dog"
    others = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, MAX_LEN - 2))) for _ in range(7)]

    async def scenario(dp: DataPlane):
        alone = await dp.infer(text_request("tiny-embed", [target]))
        engine, first = await _hold_worker(dp)
        tasks = [asyncio.ensure_future(dp.infer(text_request("tiny-embed", [t]))) for t in [*others[:3], target, *others[3:]]]
        await wait_for_pending(dp, "tiny-embed", len(tasks))
        engine.gate.set()
        await first
        batched = await asyncio.gather(*tasks)
        return alone, batched[3], engine.batch_sizes

    # One bucket wide enough for everything: padding differs from the lone run.
    alone, batched, sizes = run_dataplane(_config(embedding_artifact, length_buckets=[MAX_LEN], engine=engine), scenario)
    assert sizes[-1] == 8
    assert np.abs(alone.outputs[0].data - batched.outputs[0].data).max() <= 1e-5


def test_batch_variant_artifact_can_be_isolated(artifact_factory, run_dataplane) -> None:
    path = artifact_factory(name="tiny-embed", batch_invariant=False)

    def sizes_for(isolate: bool) -> list[int]:
        async def scenario(dp: DataPlane):
            engine, first = await _hold_worker(dp)
            tasks = [asyncio.ensure_future(dp.infer(text_request("tiny-embed", [t]))) for t in ("a", "cats", "dogs")]
            await wait_for_pending(dp, "tiny-embed", 3)
            engine.gate.set()
            await asyncio.gather(first, *tasks)
            assert dp.model_config("tiny-embed").parameters["isolate_batch_variant"] == str(isolate).lower()
            return engine.batch_sizes

        return run_dataplane(_config(path, isolate_batch_variant=isolate), scenario)

    assert sizes_for(isolate=True) == [1, 1, 1, 1]
    assert sizes_for(isolate=False) == [1, 3]


def test_request_larger_than_max_batch_is_refused(embedding_artifact: Path, run_dataplane) -> None:
    async def scenario(dp: DataPlane):
        with pytest.raises(InvalidArgumentError, match="max_batch_size is 2"):
            await dp.infer(text_request("tiny-embed", ["a", "b", "c"]))
        r = await dp.infer(text_request("tiny-embed", ["a", "b"]))
        assert r.outputs[0].data.shape == (2, 8)

    run_dataplane(_config(embedding_artifact, max_batch_size=2), scenario)


def test_batches_never_exceed_max_batch_size(embedding_artifact: Path, run_dataplane) -> None:
    async def scenario(dp: DataPlane):
        engine, first = await _hold_worker(dp)
        tasks = [asyncio.ensure_future(dp.infer(text_request("tiny-embed", ["cats", "dogs"]))) for _ in range(5)]
        await wait_for_pending(dp, "tiny-embed", 5)
        engine.gate.set()
        await asyncio.gather(first, *tasks)
        return engine.batch_sizes

    sizes = run_dataplane(_config(embedding_artifact, max_batch_size=4), scenario)
    assert sizes == [1, 4, 4, 2]  # requests stay whole: 2+2, 2+2, 2


def test_stop_finishes_accepted_work_and_refuses_new(embedding_artifact: Path) -> None:
    async def main():
        dp = DataPlane(_config(embedding_artifact))
        await dp.start()
        engine, first = await _hold_worker(dp)
        queued = asyncio.ensure_future(dp.infer(text_request("tiny-embed", ["cats"])))
        await wait_for_pending(dp, "tiny-embed", 1)
        stopping = asyncio.ensure_future(dp.stop(grace=30))
        await asyncio.sleep(0)
        assert not dp.ready() and dp.live()
        with pytest.raises(UnavailableError, match="not accepting requests"):
            await dp.infer(text_request("tiny-embed", ["late"]))
        engine.gate.set()
        done = await asyncio.gather(first, queued)
        await stopping
        return done, dp.live()

    done, live = asyncio.run(main())
    assert [r.outputs[0].data.shape for r in done] == [(1, 8), (1, 8)]
    assert not live


def test_stop_after_grace_answers_leftovers_unavailable(embedding_artifact: Path) -> None:
    async def main():
        dp = DataPlane(_config(embedding_artifact))
        await dp.start()
        engine, first = await _hold_worker(dp)
        queued = asyncio.ensure_future(dp.infer(text_request("tiny-embed", ["cats"])))
        await wait_for_pending(dp, "tiny-embed", 1)
        await dp.stop(grace=0.01)
        results = await asyncio.gather(first, queued, return_exceptions=True)
        engine.gate.set()  # let the abandoned engine thread end
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, UnavailableError) for r in results)


# -- dispatch when idle ------------------------------------------------------------------------
#: A queue delay no test waits out: a request that waited for it would show ~10 s in the queue.
LONG_DELAY_MS = 10_000.0


def test_idle_batcher_dispatches_a_lone_request_without_the_queue_delay(embedding_artifact: Path, run_dataplane) -> None:
    async def scenario(dp: DataPlane):
        r = await dp.infer(text_request("tiny-embed", ["hello"]))
        return r, dp.batcher("tiny-embed"), dp.model_statistics("tiny-embed")[0]

    response, batcher, stats = run_dataplane(_config(embedding_artifact, max_queue_delay_ms=LONG_DELAY_MS), scenario)
    assert response.outputs[0].data.shape == (1, 8)
    assert batcher.dispatch_when_idle and batcher.idle_dispatches == 1
    # Queue time is what the batcher recorded: far under the delay it did not wait out.
    assert stats.queue.count == 1 and stats.queue.ns < LONG_DELAY_MS * 1e6 / 2


def test_without_idle_dispatch_a_lone_request_waits_the_queue_delay(embedding_artifact: Path, run_dataplane) -> None:
    delay_ms = 50.0

    async def scenario(dp: DataPlane):
        await dp.infer(text_request("tiny-embed", ["hello"]))
        return dp.batcher("tiny-embed"), dp.model_statistics("tiny-embed")[0], dp.model_config("tiny-embed")

    batcher, stats, config = run_dataplane(
        _config(embedding_artifact, max_queue_delay_ms=delay_ms, dispatch_when_idle=False), scenario
    )
    assert not batcher.dispatch_when_idle and batcher.idle_dispatches == 0
    assert config.parameters["dispatch_when_idle"] == "false"
    # The scheduler cannot take the batch before its head has waited the delay (a lower bound).
    assert stats.queue.count == 1 and stats.queue.ns >= delay_ms * 1e6


def test_requests_queued_during_a_run_leave_together_when_it_ends(embedding_artifact: Path, run_dataplane) -> None:
    texts = ["hello world", "cats and dogs", "the lazy dog", "red", "text", "blue green"]

    async def scenario(dp: DataPlane):
        engine, first = await _hold_worker(dp)
        tasks = [asyncio.ensure_future(dp.infer(text_request("tiny-embed", [t]))) for t in texts]
        await wait_for_pending(dp, "tiny-embed", len(texts))
        engine.gate.set()
        await asyncio.gather(first, *tasks)
        return engine.batch_sizes, dp.batcher("tiny-embed"), dp.model_statistics("tiny-embed")[0]

    sizes, batcher, stats = run_dataplane(_config(embedding_artifact, max_queue_delay_ms=LONG_DELAY_MS), scenario)
    # One lone run, then everyone who queued during it, in one batch and without the delay.
    assert sizes == [1, len(texts)]
    assert batcher.idle_dispatches == 2
    assert stats.queue.count == len(texts) + 1 and stats.queue.ns < LONG_DELAY_MS * 1e6 / 2


def test_a_request_to_an_idle_model_runs_from_its_own_task(embedding_artifact: Path, run_dataplane) -> None:
    """Only a request that finds nothing queued or executing skips the scheduler; the rest queue."""

    async def scenario(dp: DataPlane):
        await dp.infer(text_request("tiny-embed", ["hello"]))
        batcher = dp.batcher("tiny-embed")
        after_one = batcher.runs_alone
        engine, first = await _hold_worker(dp)
        assert not batcher.can_run_alone()  # executing: the next request must queue
        queued = asyncio.ensure_future(dp.infer(text_request("tiny-embed", ["cats"])))
        await wait_for_pending(dp, "tiny-embed", 1)
        engine.gate.set()
        await asyncio.gather(first, queued)
        assert batcher.can_run_alone()
        return after_one, batcher, dp.model_statistics("tiny-embed")[0]

    metrics = Metrics()
    after_one, batcher, stats = run_dataplane(_config(embedding_artifact, max_queue_delay_ms=LONG_DELAY_MS), scenario, metrics)
    assert after_one == 1
    assert batcher.runs_alone == 2 and batcher.idle_dispatches == 3  # "cats" went through the scheduler
    # Run alone or batched, every request is counted the same way.
    assert stats.queue.count == 3 and stats.execution_count == 3 and stats.success.count == 3
    assert _counter(metrics, "pruneserve_queue_duration_seconds_count") == 3
    assert _counter(metrics, "pruneserve_executions_total") == 3


def test_pending_gauge_exists_at_zero_before_anything_queues(embedding_artifact: Path, run_dataplane) -> None:
    """Requests that run alone never queue; the autoscaler's pending series must exist anyway."""

    async def scenario(dp: DataPlane):
        before = metrics.registry.get_sample_value("pruneserve_pending_requests", {"model": "tiny-embed"})
        await dp.infer(text_request("tiny-embed", ["hello"]))
        return before, dp.batcher("tiny-embed").runs_alone

    metrics = Metrics()
    before, alone = run_dataplane(_config(embedding_artifact), scenario, metrics)
    assert before == 0 and alone == 1
    assert metrics.registry.get_sample_value("pruneserve_pending_requests", {"model": "tiny-embed"}) == 0


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_lone_run_keeps_its_worker_after_its_caller_leaves(embedding_artifact: Path, run_dataplane, how: str) -> None:
    """The engine cannot be stopped mid-run: the worker stays taken until the run really ends,
    so the next request queues instead of running beside it (``workers`` is 1)."""

    async def scenario(dp: DataPlane):
        engine = gate_model(dp, "tiny-embed")
        engine.gate.clear()
        batcher = dp.batcher("tiny-embed")
        if how == "deadline":
            # The deadline must pass only once the run holds the worker, however slow the machine.
            left = asyncio.ensure_future(dp.infer(text_request("tiny-embed", ["hello"]), deadline=time.monotonic() + 1.0))
            await wait_until_running(engine)
            with pytest.raises(DeadlineExceededError):
                await left
        else:
            left = asyncio.ensure_future(dp.infer(text_request("tiny-embed", ["hello"])))
            await wait_until_running(engine)
            left.cancel()
            with pytest.raises(asyncio.CancelledError):
                await left
        # Before Python 3.11 a request with a deadline takes the scheduler's path.
        assert batcher.runs_alone == (1 if how == "cancel" or sys.version_info >= (3, 11) else 0)
        assert not batcher.can_run_alone()
        later = asyncio.ensure_future(dp.infer(text_request("tiny-embed", ["cats"])))
        await wait_for_pending(dp, "tiny-embed", 1)
        assert len(engine.runs) == 1  # still only the abandoned run
        engine.gate.set()
        answer = await later
        return answer, engine.batch_sizes, batcher.can_run_alone()

    answer, sizes, free_again = run_dataplane(_config(embedding_artifact, max_queue_delay_ms=1.0), scenario)
    assert answer.outputs[0].data.shape == (1, 8)
    assert sizes == [1, 1] and free_again


class _SlowEngine(Engine):
    """A real engine that takes at least ``seconds`` per run (sleeping in the worker thread)."""

    name = "slow"

    def __init__(self, inner: Engine, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds

    @property
    def providers(self) -> list[str]:
        return self.inner.providers

    @property
    def requested_providers(self) -> list[str]:
        return self.inner.requested_providers

    def run(self, feeds, outputs=None):  # type: ignore[no-untyped-def]
        time.sleep(self.seconds)
        return self.inner.run(feeds, outputs)


def test_batches_form_under_concurrent_load_with_idle_dispatch(embedding_artifact: Path, run_dataplane) -> None:
    clients, per_client = 12, 6

    async def client(dp: DataPlane, k: int) -> None:
        for i in range(per_client):
            await dp.infer(text_request("tiny-embed", [WORDS[(k + i) % len(WORDS)]]))

    async def scenario(dp: DataPlane):
        rt = dp.repository.get("tiny-embed")
        rt.engine = _SlowEngine(rt.engine, 0.005)
        await asyncio.gather(*(client(dp, k) for k in range(clients)))
        return dp.model_statistics("tiny-embed")[0], dp.batcher("tiny-embed")

    metrics = Metrics()
    stats, batcher = run_dataplane(_config(embedding_artifact, max_queue_delay_ms=LONG_DELAY_MS), scenario, metrics)
    assert stats.inference_count == clients * per_client
    # Requests that arrive while a run executes share the next one: mean batch size > 1.
    assert stats.execution_count < stats.inference_count
    assert batcher.idle_dispatches == stats.execution_count  # none waited for the delay
    assert _counter(metrics, "pruneserve_executions_total") == stats.execution_count
    assert _counter(metrics, "pruneserve_inferences_total") == clients * per_client


def _counter(metrics: Metrics, name: str) -> float:
    return sum(s.value for m in metrics.registry.collect() for s in m.samples if s.name == name)
