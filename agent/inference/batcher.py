"""Per-version dynamic batching in front of a ``ModelRunner``, bounded at every step.

A ``Batcher`` admits requests into a bounded queue (beyond ``max_queue``: ``Overloaded``),
and one dispatcher task turns the queue into runs on a bounded executor:

- adaptive: when a worker slot is free and nothing is running, the oldest request
  runs at once, alone or with whatever is already queued: at low load nobody waits
  for company. While runs are in flight, requests queue up and leave together,
  up to ``max_batch_size`` rows; ``max_delay_ms`` (from the first queued request,
  monotonic clock) bounds how long a batch waits to fill while another one runs.
- only requests whose inputs agree in dtype and in every dimension but the first
  are merged; each caller gets exactly its rows and its requested outputs back.
- a failed batch of several requests is retried one request at a time, so one
  caller's poisonous input fails only that caller.
- a caller that gives up (cancelled) is skipped if still queued; if it is already
  running, its rows are computed and dropped.
- inline: while idle, a model whose runs take less than ``inline_max_us`` (measured by
  the loader's warm-up, ``typical_run_s``) runs on the event loop itself: for such
  models the hand-off to a thread, and the GIL hand-back, cost more than the inference (a
  30-feature MLP takes about 40 µs). Under load, the requests that reach the model in
  one turn of the event loop run together as one batch at the start of the next turn,
  still on the loop. Load is either other HTTP requests in flight (``busy``) or an
  arrival burst: a request that is not the first to reach the model in this turn (the
  event loop runs, back to back, the handlers of every connection whose request arrived
  in one ``select``, and each inline run would finish before the next handler starts, so
  none of them sees the others in flight). The first request of a turn runs inline at
  once: at concurrency 1 nothing waits. Slower models go through the queue and the
  executor.

Models whose inputs or outputs do not all have a dynamic first dimension are never
batched: each request runs alone (still bounded by the queue and the executor).
This module must not know about HTTP or the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from agent.clock import Clock
from agent.errors import AgentError, InferenceFailed, Overloaded, Unavailable
from agent.inference.session import ModelRunner
from agent.tensors import Array

log = structlog.get_logger(__name__)

Outputs = dict[str, Array]

#: A request runs inline only while its size (elements, against the warm-up's input) x
#: the model's warm-up time stays under this many times ``inline_max_us``: a big request
#: to a fast model must not hold the loop.
_INLINE_ROWS_FACTOR = 4
#: Called after each run with (rows, requests, seconds in onnxruntime, each request's queue wait).
RunObserver = Callable[[int, int, float, list[float]], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchSettings:
    """Knobs from ``[batching]``."""

    enabled: bool = True
    max_batch_size: int = 32
    max_delay_ms: float = 2.0
    max_queue: int = 1024
    workers: int = 2
    inline_max_us: float = 150.0


@dataclass(eq=False, slots=True)
class _Item:
    inputs: dict[str, Array]
    outputs: tuple[str, ...]
    rows: int
    key: tuple[Any, ...]
    arrival: float
    future: asyncio.Future[Outputs]
    queued_s: float = field(default=0.0)


def _merge_key(inputs: dict[str, Array]) -> tuple[Any, ...]:
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in inputs.items())


class Batcher:
    """Admits, batches and runs the requests of one model version."""

    def __init__(
        self,
        runner: ModelRunner,
        executor: Executor,
        settings: BatchSettings,
        clock: Clock,
        *,
        label: str = "",
        observe: RunObserver | None = None,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self._runner = runner
        self._executor = executor
        self._settings = settings
        self._clock = clock
        self._label = label
        self._observe = observe
        self._busy = busy
        self._gathered: list[_Item] = []
        # A request reached the model earlier in this turn of the event loop.
        self._turn_open = False
        self._batching = settings.enabled and runner.signature.batchable
        self._pending: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._inflight = 0
        self._runs: set[asyncio.Future[Any]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Elements of the warm-up's synthetic input (dynamic dimensions 1): the size the
        # inline cost (the runner's typical_run_s) was measured at.
        self._warm_elements = max(
            1, sum(math.prod(max(d, 1) for d in spec.shape) for spec in runner.signature.inputs)
        )

    @property
    def queue_depth(self) -> int:
        """Requests admitted but not yet running."""
        return len(self._pending)

    @property
    def inflight(self) -> int:
        """Runs currently on the executor."""
        return self._inflight

    def update(self, settings: BatchSettings) -> None:
        """Apply new limits (SIGHUP); running batches finish under the old ones."""
        self._settings = settings
        self._batching = settings.enabled and self._runner.signature.batchable

    def start(self) -> None:
        """Start the dispatcher task (owned here, stopped by ``stop``)."""
        self._task = asyncio.get_running_loop().create_task(
            self._dispatch(), name=f"batcher:{self._label}"
        )

    async def stop(self) -> None:
        """Refuse new work, fail what is queued, wait for running batches."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(
                    Unavailable(f"model {self._label} is unloading; retry", retry_after_s=1)
                )
        if self._runs:
            await asyncio.gather(*self._runs, return_exceptions=True)

    async def infer(self, inputs: dict[str, Array], outputs: tuple[str, ...]) -> Outputs:
        """Run one request (possibly batched with others) and return its outputs."""
        if self._closed:
            raise Unavailable(f"model {self._label} is unloading; retry", retry_after_s=1)
        if len(self._pending) >= self._settings.max_queue:
            raise Overloaded(
                f"model {self._label}: {len(self._pending)} requests queued "
                f"(batching.max_queue = {self._settings.max_queue}); retry later or add capacity",
                retry_after_s=1,
            )
        first = next(iter(inputs.values()), None)
        rows = int(first.shape[0]) if first is not None and first.ndim else 1
        if self._runs_inline(inputs):
            if self._first_in_turn() and not self._gathered and not self._loaded():
                return self._run_inline(inputs, outputs, rows)
            return await self._gather_inline(inputs, outputs, rows)
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        key = _merge_key(inputs) if self._batching else (id(future),)
        self._pending.append(_Item(inputs, outputs, rows, key, self._clock.monotonic(), future))
        self._wakeup.set()
        return await future

    def _runs_inline(self, inputs: dict[str, Array]) -> bool:
        """Idle, and the model is so fast that a thread hand-off would cost more than it.

        The loader's warm-up measured the model (``typical_run_s``: the load thread's CPU
        time of its fastest warm one-row run). Run times measured later on the event loop
        are not used: under load they mix in the GIL waits and the bookkeeping of
        everything else the loop does (a 13 µs MLP measured 200-300 µs there). A request
        larger than the warm-up's input (more rows, a longer sequence, a bigger image:
        elements compared) is assumed to cost in proportion, and goes to the executor
        beyond ``_INLINE_ROWS_FACTOR`` x ``inline_max_us``.
        """
        if self._pending or self._inflight or self._closed:
            return False
        cost = self._runner.typical_run_s
        if cost is None:
            return False
        limit_s = self._settings.inline_max_us / 1e6
        if cost >= limit_s:
            return False
        size = sum(a.size for a in inputs.values()) / self._warm_elements
        return size * cost < _INLINE_ROWS_FACTOR * limit_s

    def _first_in_turn(self) -> bool:
        """True for the first request to reach the model in this turn of the event loop.

        The first marks the turn; the mark is cleared by a callback queued behind the
        handlers already ready to run, so it outlives exactly the current burst.
        """
        if self._turn_open:
            return False
        self._turn_open = True
        asyncio.get_running_loop().call_soon(self._close_turn)
        return True

    def _close_turn(self) -> None:
        self._turn_open = False

    def _loaded(self) -> bool:
        return self._busy is not None and self._busy()

    def _run_inline(self, inputs: dict[str, Array], outputs: tuple[str, ...], rows: int) -> Outputs:
        start = self._clock.monotonic()
        try:
            result = self._runner.run(inputs, outputs)
        except AgentError:
            raise
        except Exception as exc:
            raise InferenceFailed(f"model {self._label} failed on this input: {exc}") from exc
        finally:
            elapsed = self._clock.monotonic() - start
            if self._observe is not None:
                self._observe(rows, 1, elapsed, [0.0])
        return result

    async def _gather_inline(
        self, inputs: dict[str, Array], outputs: tuple[str, ...], rows: int
    ) -> Outputs:
        """Under load: the requests that reach a fast model in one turn of the event loop
        run together, as one batch, at the start of the next turn (still on the loop)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outputs] = loop.create_future()
        key = _merge_key(inputs) if self._batching else (id(future),)
        if not self._gathered:
            loop.call_soon(self._run_gathered)
        self._gathered.append(_Item(inputs, outputs, rows, key, self._clock.monotonic(), future))
        return await future

    def _run_gathered(self) -> None:
        # Only what was gathered: a request queued meanwhile (too big to run inline) stays
        # in the queue for the executor.
        queued, self._pending = self._pending, deque(self._gathered)
        self._gathered = []
        try:
            while self._pending:
                batch = self._take(self._pending[0].key)
                if batch:
                    self._complete(batch, *self._run_batch(batch))
        finally:
            self._pending = queued

    async def _dispatch(self) -> None:
        while True:
            await self._wait_for_work()
            first = self._pending[0]
            if self._inflight and self._batching and self._settings.max_delay_ms > 0:
                await self._wait_to_fill(first)
            batch = self._take(first.key)
            if batch:
                self._launch(batch)

    async def _wait_for_work(self) -> None:
        """Until something is queued and a worker slot is free."""
        while not self._pending or self._inflight >= self._settings.workers:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _wait_to_fill(self, first: _Item) -> None:
        deadline = first.arrival + self._settings.max_delay_ms / 1000
        while self._compatible_rows(first.key) < self._settings.max_batch_size:
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0 or self._inflight == 0:
                return
            self._wakeup.clear()
            # A timeout is not the deadline: uvloop's timers round to whole milliseconds,
            # so the loop re-reads the clock (agent/loops.py).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _compatible_rows(self, key: tuple[Any, ...]) -> int:
        return sum(item.rows for item in self._pending if item.key == key)

    def _take(self, key: tuple[Any, ...]) -> list[_Item]:
        """Pop the compatible requests that fit in one batch, skipping abandoned ones."""
        batch: list[_Item] = []
        rows = 0
        kept: deque[_Item] = deque()
        limit = self._settings.max_batch_size if self._batching else 1
        now = self._clock.monotonic()
        while self._pending:
            item = self._pending.popleft()
            if item.future.done():
                continue  # the caller went away while queued
            fits = item.key == key and (not batch or rows + item.rows <= limit)
            if fits and len(batch) < limit:
                item.queued_s = now - item.arrival
                batch.append(item)
                rows += item.rows
            else:
                kept.append(item)
        self._pending = kept
        return batch

    def _launch(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        self._inflight += 1
        run = loop.run_in_executor(self._executor, self._run_batch, batch)
        self._runs.add(run)
        run.add_done_callback(lambda fut: self._finished(fut, batch))

    def _run_batch(self, batch: list[_Item]) -> tuple[list[Outputs | BaseException], float]:
        """Executor side: run the batch (on failure, each request alone); returns the
        results and the seconds it took (observed on the loop, where metrics live)."""
        start = self._clock.monotonic()
        try:
            results: list[Outputs | BaseException] = list(self._run_merged(batch))
        except Exception as exc:  # noqa: BLE001 -- every failure is handed to its callers
            alone = len(batch) == 1
            results = [exc] if alone else [self._run_alone(item) for item in batch]
        return results, self._clock.monotonic() - start

    def _run_alone(self, item: _Item) -> Outputs | BaseException:
        try:
            return self._runner.run(item.inputs, item.outputs)
        except Exception as exc:  # noqa: BLE001 -- handed to the caller
            return exc

    def _run_merged(self, batch: list[_Item]) -> list[Outputs]:
        if len(batch) == 1:
            item = batch[0]
            return [self._runner.run(item.inputs, item.outputs)]
        wanted = tuple(dict.fromkeys(name for item in batch for name in item.outputs))
        names = batch[0].inputs.keys()
        merged = {n: np.concatenate([item.inputs[n] for item in batch]) for n in names}
        produced = self._runner.run(merged, wanted)
        total = sum(item.rows for item in batch)
        for name, array in produced.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise InferenceFailed(
                    f'output "{name}" has shape {list(array.shape)} for a batch of {total} rows; '
                    "set [batching] enabled = false for this model's shape"
                )
        out: list[Outputs] = []
        start = 0
        for item in batch:
            end = start + item.rows
            out.append({n: produced[n][start:end] for n in item.outputs})
            start = end
        return out

    def _finished(
        self, run: asyncio.Future[tuple[list[Outputs | BaseException], float]], batch: list[_Item]
    ) -> None:
        self._runs.discard(run)
        self._inflight -= 1
        self._wakeup.set()
        if run.cancelled():
            self._deliver(batch, [Unavailable("run cancelled")] * len(batch))
        elif (exc := run.exception()) is not None:
            self._deliver(batch, [exc] * len(batch))
        else:
            self._complete(batch, *run.result())

    def _complete(
        self, batch: list[_Item], results: list[Outputs | BaseException], elapsed: float
    ) -> None:
        """A batch ran: observe it (on the loop, where the metrics live), then answer."""
        if self._observe is not None:
            waits = [i.queued_s for i in batch]
            self._observe(sum(i.rows for i in batch), len(batch), elapsed, waits)
        self._deliver(batch, results)

    def _deliver(self, batch: list[_Item], results: list[Outputs | BaseException]) -> None:
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(_as_agent_error(result, self._label))
            else:
                item.future.set_result(result)


def _as_agent_error(exc: BaseException, label: str) -> BaseException:
    if isinstance(exc, AgentError):
        return exc
    return InferenceFailed(f"model {label} failed on this input: {exc}")
