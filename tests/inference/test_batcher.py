"""The dynamic batcher with real onnxruntime sessions on a real thread pool."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import modelgen
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.clock import Clock, SystemClock
from agent.errors import InferenceFailed, Overloaded
from agent.inference.batcher import Batcher, BatchSettings
from agent.inference.session import OrtRunner, SessionSettings

TABULAR = modelgen.tabular_classifier()
X, _ = modelgen.tabular_data("all")
OUTPUTS = ("label", "probabilities")


def runner_for(model: bytes) -> OrtRunner:
    """A real onnxruntime session (built from bytes)."""
    return OrtRunner(model, SessionSettings())


@pytest.fixture(scope="module")
def runner() -> OrtRunner:
    """A real onnxruntime session of the tabular classifier."""
    return runner_for(TABULAR)


@contextmanager
def blocked(executor: ThreadPoolExecutor, workers: int) -> Iterator[threading.Event]:
    """Occupy every thread of the executor until the returned event is set."""
    gate = threading.Event()
    started = threading.Barrier(workers + 1)

    def hold() -> None:
        started.wait()
        gate.wait(10)

    futures = [executor.submit(hold) for _ in range(workers)]
    started.wait(10)
    try:
        yield gate
    finally:
        gate.set()
        for f in futures:
            f.result(10)


@asynccontextmanager
async def make_batcher(
    runner: OrtRunner, busy: bool = False, clock: Clock | None = None, **kw: object
) -> AsyncIterator[tuple[Batcher, ThreadPoolExecutor]]:
    """A started batcher on its own pool; stopped afterwards."""
    settings_ = BatchSettings(**{"workers": 1, "max_delay_ms": 0.0, "inline_max_us": 0.0, **kw})  # type: ignore[arg-type]
    executor = ThreadPoolExecutor(settings_.workers)
    batcher = Batcher(
        runner,
        executor,
        settings_,
        clock or SystemClock(),
        label="tab:1",
        observe=lambda rows, reqs, secs, waits: sizes.append(reqs),
        busy=(lambda: True) if busy else None,
    )
    sizes: list[int] = []
    batcher.observed = sizes  # type: ignore[attr-defined]
    batcher.start()
    try:
        yield batcher, executor
    finally:
        await batcher.stop()
        executor.shutdown(wait=True)


async def infer_together(batcher: Batcher, chunks: list[np.ndarray]) -> list[dict[str, Any]]:
    """Every chunk as its own request, all started in the same turn of the event loop."""
    return await asyncio.wait_for(
        asyncio.gather(*(batcher.infer({"float_input": c}, OUTPUTS) for c in chunks)), 5
    )


class TestResults:
    """Batched answers are the answers each request would get alone."""

    @settings(
        max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(rows=st.lists(st.integers(1, 7), min_size=1, max_size=12), start=st.integers(0, 400))
    async def test_batched_equals_unbatched(
        self, runner: OrtRunner, rows: list[int], start: int
    ) -> None:
        """Whatever the composition, every caller gets exactly its own rows' outputs."""
        async with make_batcher(runner, max_batch_size=16) as (batcher, executor):
            chunks, offset = [], start
            for n in rows:
                chunks.append(X[offset : offset + n].astype(np.float32))
                offset += n
            with blocked(executor, 1):
                tasks = [
                    asyncio.ensure_future(batcher.infer({"float_input": c}, OUTPUTS))
                    for c in chunks
                ]
                await asyncio.sleep(0.01)
            results = await asyncio.gather(*tasks)
            for chunk, got in zip(chunks, results, strict=True):
                want = runner.run({"float_input": chunk}, OUTPUTS)
                np.testing.assert_array_equal(got["label"], want["label"])
                np.testing.assert_allclose(
                    got["probabilities"], want["probabilities"], rtol=1e-5, atol=1e-6
                )
            if len(rows) > 1 and sum(rows) <= 16:
                assert max(batcher.observed) > 1  # type: ignore[attr-defined]

    async def test_requested_outputs_per_caller(self, runner: OrtRunner) -> None:
        """Callers in one batch asking for different outputs each get only theirs."""
        async with make_batcher(runner) as (batcher, executor):
            with blocked(executor, 1):
                a = asyncio.ensure_future(batcher.infer({"float_input": X[:2]}, ("label",)))
                b = asyncio.ensure_future(
                    batcher.infer({"float_input": X[2:5]}, ("probabilities",))
                )
                await asyncio.sleep(0.01)
            got_a, got_b = await asyncio.gather(a, b)
        assert set(got_a) == {"label"}
        assert got_a["label"].shape == (2,)
        assert set(got_b) == {"probabilities"}
        assert got_b["probabilities"].shape == (3, 2)
        assert batcher.observed == [2]  # type: ignore[attr-defined]

    async def test_row_limit_splits_batches(self, runner: OrtRunner) -> None:
        """Rows, not requests, count against max_batch_size."""
        async with make_batcher(runner, max_batch_size=4) as (batcher, executor):
            with blocked(executor, 1):
                tasks = [
                    asyncio.ensure_future(batcher.infer({"float_input": X[:3]}, OUTPUTS))
                    for _ in range(3)
                ]
                await asyncio.sleep(0.01)
            await asyncio.gather(*tasks)
        assert batcher.observed == [1, 1, 1]  # type: ignore[attr-defined]


class TestIsolation:
    """Incompatible or failing requests do not disturb the others."""

    async def test_mixed_shapes_not_merged(self) -> None:
        """Requests whose non-batch dimensions differ run in separate batches."""
        runner = runner_for(modelgen.identity_model("FP32", [None, None]))
        async with make_batcher(runner) as (batcher, executor):
            with blocked(executor, 1):
                a = asyncio.ensure_future(batcher.infer({"x": np.ones((2, 3), np.float32)}, ("y",)))
                b = asyncio.ensure_future(batcher.infer({"x": np.ones((1, 5), np.float32)}, ("y",)))
                c = asyncio.ensure_future(
                    batcher.infer({"x": np.zeros((1, 3), np.float32)}, ("y",))
                )
                await asyncio.sleep(0.01)
            got = await asyncio.gather(a, b, c)
        assert [g["y"].shape for g in got] == [(2, 3), (1, 5), (1, 3)]
        assert sorted(batcher.observed) == [1, 2]  # type: ignore[attr-defined]

    async def test_one_bad_input_fails_only_its_caller(self) -> None:
        """A request that makes onnxruntime fail in a merged batch fails alone."""
        runner = runner_for(modelgen.gather_model())
        async with make_batcher(runner) as (batcher, executor):
            with blocked(executor, 1):
                good = [
                    asyncio.ensure_future(
                        batcher.infer({"idx": np.array([[0], [1]], np.int64)}, ("y",))
                    )
                    for _ in range(3)
                ]
                bad = asyncio.ensure_future(
                    batcher.infer({"idx": np.array([[99]], np.int64)}, ("y",))
                )
                await asyncio.sleep(0.01)
            results = await asyncio.gather(*good, bad, return_exceptions=True)
        assert all(isinstance(r, dict) for r in results[:3])
        assert isinstance(results[3], InferenceFailed)


class TestLimits:
    """A bounded queue, and callers who give up."""

    async def test_queue_full_is_overloaded_with_retry_after(self, runner: OrtRunner) -> None:
        """Beyond max_queue waiting requests, admission fails with Overloaded (503)."""
        async with make_batcher(runner, max_queue=2) as (batcher, executor):
            with blocked(executor, 1):
                first = asyncio.ensure_future(batcher.infer({"float_input": X[:1]}, OUTPUTS))
                await asyncio.sleep(0.01)  # dispatched: occupies the only worker slot
                queued = [
                    asyncio.ensure_future(batcher.infer({"float_input": X[:1]}, OUTPUTS))
                    for _ in range(2)
                ]
                await asyncio.sleep(0.01)
                with pytest.raises(Overloaded) as info:
                    await batcher.infer({"float_input": X[:1]}, OUTPUTS)
            await asyncio.gather(first, *queued)
        assert info.value.status == 503
        assert "Retry-After" in info.value.headers()

    async def test_cancelled_waiter_does_not_poison_batch(self, runner: OrtRunner) -> None:
        """A caller that gives up while queued is skipped; the others get their answers."""
        async with make_batcher(runner) as (batcher, executor):
            with blocked(executor, 1):
                first = asyncio.ensure_future(batcher.infer({"float_input": X[:1]}, OUTPUTS))
                await asyncio.sleep(0.01)
                doomed = asyncio.ensure_future(batcher.infer({"float_input": X[:2]}, OUTPUTS))
                kept = asyncio.ensure_future(batcher.infer({"float_input": X[2:4]}, OUTPUTS))
                await asyncio.sleep(0.01)
                doomed.cancel()
            await first
            got = await kept
            assert doomed.cancelled()
            assert got["label"].shape == (2,)
            assert batcher.queue_depth == 0
            assert batcher.inflight == 0

    async def test_stop_fails_queued_requests_cleanly(self, runner: OrtRunner) -> None:
        """Stopping a batcher answers queued callers with 503 instead of leaving them hanging."""
        executor = ThreadPoolExecutor(1)
        batcher = Batcher(
            runner, executor, BatchSettings(workers=1, inline_max_us=0.0), SystemClock()
        )
        batcher.start()
        with blocked(executor, 1) as gate:
            first = asyncio.ensure_future(batcher.infer({"float_input": X[:1]}, OUTPUTS))
            await asyncio.sleep(0.01)
            queued = asyncio.ensure_future(batcher.infer({"float_input": X[:1]}, OUTPUTS))
            await asyncio.sleep(0.01)
            stopping = asyncio.ensure_future(batcher.stop())
            await asyncio.sleep(0.01)
            gate.set()
            await stopping
        assert isinstance(await first, dict)
        with pytest.raises(Exception, match="unloading"):
            await queued
        executor.shutdown()


class TestInline:
    """Fast models skip the thread hand-off while the batcher is idle."""

    async def test_fast_model_runs_on_the_loop_when_idle(self, runner: OrtRunner) -> None:
        """With every executor thread busy, an idle fast model still answers (inline)."""
        runner.typical_run_s = 1e-5  # as the loader's warm-up would measure it
        async with make_batcher(runner, inline_max_us=1e6) as (batcher, executor):
            with blocked(executor, 1):
                got = await asyncio.wait_for(batcher.infer({"float_input": X[:2]}, OUTPUTS), 5)
        want = runner.run({"float_input": X[:2]}, OUTPUTS)
        np.testing.assert_array_equal(got["label"], want["label"])

    async def test_slow_model_goes_through_the_executor(self, runner: OrtRunner) -> None:
        """A model measured slower than inline_max_us at warm-up never runs on the loop."""
        runner.typical_run_s = 0.5
        async with make_batcher(runner, inline_max_us=150.0) as (batcher, executor):
            with blocked(executor, 1):
                queued = asyncio.ensure_future(batcher.infer({"float_input": X[:1]}, OUTPUTS))
                await asyncio.sleep(0.01)
                assert not queued.done()
            assert (await queued)["label"].shape == (1,)

    async def test_unmeasured_model_never_runs_inline(self, runner: OrtRunner) -> None:
        """Without a warm-up measurement, requests go through the executor."""
        runner.typical_run_s = None
        async with make_batcher(runner, inline_max_us=1e6) as (batcher, executor):
            with blocked(executor, 1):
                queued = asyncio.ensure_future(batcher.infer({"float_input": X[:1]}, OUTPUTS))
                await asyncio.sleep(0.01)
                assert not queued.done()
            assert (await queued)["label"].shape == (1,)

    async def test_a_big_request_to_a_fast_model_goes_to_the_executor(
        self, runner: OrtRunner
    ) -> None:
        """Rows x the one-row time over 4 x inline_max_us: the request does not hold the
        loop; a small one to the same model still runs inline."""
        runner.typical_run_s = 50e-6
        async with make_batcher(runner, inline_max_us=100.0) as (batcher, executor):
            with blocked(executor, 1):
                small = await asyncio.wait_for(batcher.infer({"float_input": X[:7]}, OUTPUTS), 5)
                big = asyncio.ensure_future(batcher.infer({"float_input": X[:9]}, OUTPUTS))
                await asyncio.sleep(0.01)
                assert not big.done()  # 9 x 50 µs > 400 µs: queued for the (busy) executor
            assert (await asyncio.wait_for(big, 5))["label"].shape == (9,)
        assert small["label"].shape == (7,)

    async def test_a_big_request_queued_beside_a_gathered_one_stays_off_the_loop(
        self, runner: OrtRunner
    ) -> None:
        """Under load, the turn's inline batch takes only what was gathered: a too-big
        request queued in the same turn waits for the executor."""
        runner.typical_run_s = 50e-6
        async with make_batcher(runner, busy=True, inline_max_us=100.0, max_batch_size=32) as (
            batcher,
            executor,
        ):
            with blocked(executor, 1):
                small = asyncio.ensure_future(batcher.infer({"float_input": X[:1]}, OUTPUTS))
                big = asyncio.ensure_future(batcher.infer({"float_input": X[:9]}, OUTPUTS))
                assert (await asyncio.wait_for(small, 5))["label"].shape == (1,)
                await asyncio.sleep(0.01)
                assert not big.done()  # not run on the loop with the small one
            assert (await asyncio.wait_for(big, 5))["label"].shape == (9,)

    async def test_under_load_fast_requests_batch_on_the_loop(self, runner: OrtRunner) -> None:
        """While busy, requests reaching a fast model in one loop turn run as one batch."""
        runner.typical_run_s = 1e-5
        async with make_batcher(runner, busy=True, inline_max_us=1e6, max_batch_size=32) as (
            batcher,
            executor,
        ):
            chunks = [X[i : i + 2].astype(np.float32) for i in range(0, 10, 2)]
            with blocked(executor, 1):  # the executor is not needed
                got = await infer_together(batcher, chunks)
        assert batcher.observed == [5]  # type: ignore[attr-defined]
        for chunk, result in zip(chunks, got, strict=True):
            want = runner.run({"float_input": chunk}, OUTPUTS)
            np.testing.assert_array_equal(result["label"], want["label"])

    async def test_a_burst_in_one_loop_turn_batches_without_other_load(
        self, runner: OrtRunner
    ) -> None:
        """Requests that reach the model in one turn of the event loop (the handlers of
        one ``select``'s connections, run back to back) batch even though none sees the
        others in flight: the first runs inline at once, the rest as one batch. A request
        after the burst runs alone and inline again."""
        runner.typical_run_s = 1e-5
        async with make_batcher(runner, inline_max_us=1e6, max_batch_size=32) as (
            batcher,
            executor,
        ):
            chunks = [X[i : i + 2].astype(np.float32) for i in range(0, 10, 2)]
            with blocked(executor, 1):  # the executor is not needed
                got = await infer_together(batcher, chunks)
                await asyncio.sleep(0)
                alone = await asyncio.wait_for(batcher.infer({"float_input": X[:3]}, OUTPUTS), 5)
        assert batcher.observed == [1, 4, 1]  # type: ignore[attr-defined]
        for chunk, result in zip([*chunks, X[:3]], [*got, alone], strict=True):
            want = runner.run({"float_input": chunk}, OUTPUTS)
            np.testing.assert_array_equal(result["label"], want["label"])
