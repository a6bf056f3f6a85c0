"""The go-live checks for one stored model version, run off the event loop.

``prepare`` builds the onnxruntime session, checks the signature against the active
version, runs QA (the manifest's test vectors, else a smoke inference on a synthetic
input of the declared shape) and warms up, all on a bounded load executor and within
``max_load_s``. It returns a ready ``OrtRunner`` or raises ``ModelLoadError`` naming the
step that failed. It must not touch the registry: swapping is the registry's job.
"""

from __future__ import annotations

import asyncio
import time
import zipfile
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import AgentError, ModelLoadError
from agent.inference.session import OrtRunner, SessionSettings
from agent.inference.signature import ModelSignature
from agent.models.store import Bundle
from agent.tensors import V2_TO_NUMPY, Array, TensorSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSettings:
    """How versions are loaded; ``[models]`` in the config, overridden by the manifest."""

    session: SessionSettings
    max_load_s: float = 60.0
    warmup_runs: int = 3


async def prepare(
    bundle: Bundle,
    settings: LoadSettings,
    executor: Executor,
    active: ModelSignature | None,
) -> OrtRunner:
    """Build, check, QA and warm up a version within its time budget.

    The budget starts when the work starts on the executor, not while it waits behind
    another model's load. On a timeout the work is abandoned (a thread cannot be
    stopped): ``ModelLoadError`` with step ``timeout``; the caller decides whether the
    executor is still usable.
    """
    manifest = bundle.manifest
    budget = manifest.max_load_s if manifest and manifest.max_load_s else settings.max_load_s
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    def job() -> OrtRunner:
        loop.call_soon_threadsafe(started.set)
        return _build(bundle, settings, active)

    work = loop.run_in_executor(executor, job)
    await _until_started(work, started)
    try:
        return await asyncio.wait_for(work, budget)
    except TimeoutError:
        raise ModelLoadError(
            "timeout",
            f"loading, QA and warm-up took longer than max_load_s = {budget:g} s; raise "
            "[validation] max_load_s in the manifest or [models] max_load_s in the config",
        ) from None


async def _until_started(work: asyncio.Future[OrtRunner], started: asyncio.Event) -> None:
    waiter = asyncio.ensure_future(started.wait())
    either: set[asyncio.Future[Any]] = {work, waiter}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)


def _build(bundle: Bundle, settings: LoadSettings, active: ModelSignature | None) -> OrtRunner:
    try:
        return _build_checked(bundle, settings, active)
    except AgentError:
        raise
    except Exception as exc:
        # Anything else is still this version's fault: refuse it, never crash the deploy.
        raise ModelLoadError("load", f"unexpected failure: {_why(exc)}") from exc


def _build_checked(
    bundle: Bundle, settings: LoadSettings, active: ModelSignature | None
) -> OrtRunner:
    runner = OrtRunner(bundle.model_path, settings.session)
    manifest = bundle.manifest
    if active is not None and not (manifest and manifest.signature_change):
        problems = runner.signature.compatible_with(active)
        if problems:
            raise ModelLoadError(
                "signature",
                "; ".join(problems)
                + " (compared with the active version; if the change is intended, set "
                "[rollout] signature_change = true in the manifest)",
            )
    if manifest and manifest.test_vectors:
        _run_test_vectors(runner, bundle, manifest.rtol, manifest.atol)
    else:
        _smoke(runner)
    warmups = manifest.warmup_runs if manifest and manifest.warmup_runs is not None else None
    _warm_up(
        runner,
        settings.warmup_runs if warmups is None else warmups,
        own_thread=settings.session.intra_op_threads == 1,
    )
    return runner


def synthetic_inputs(signature: ModelSignature, rows: int = 1) -> dict[str, Array]:
    """An input of the declared shapes (dynamic dims = ``rows`` first, 1 elsewhere)."""
    return {spec.name: _synthetic(spec, rows) for spec in signature.inputs}


def _synthetic(spec: TensorSpec, rows: int) -> Array:
    shape = [d if d >= 0 else (rows if i == 0 else 1) for i, d in enumerate(spec.shape)]
    if spec.datatype == "BYTES":
        return np.full(shape, b"edge agent smoke test", dtype=object)
    return np.zeros(shape, dtype=V2_TO_NUMPY[spec.datatype])


def _smoke(runner: OrtRunner) -> None:
    try:
        runner.run(synthetic_inputs(runner.signature), runner.signature.output_names)
    except Exception as exc:
        raise ModelLoadError(
            "qa",
            f"smoke inference on a synthetic input of the declared shape failed: {_why(exc)}; "
            "give the manifest [validation] test_vectors if the model needs realistic input",
        ) from exc


#: Warm runs timed after the warm-up (at most, and within a budget), for models whose
#: runs are short enough.
_MEASURED_RUNS = 50
_MEASURE_BUDGET_S = 0.02
_MEASURE_BELOW_S = 0.01


def _warm_up(runner: OrtRunner, runs: int, *, own_thread: bool = True) -> None:
    """Run ``runs`` times, then measure: the fastest of the warm runs becomes
    ``runner.typical_run_s`` (the batcher decides from it whether the model is fast enough
    to run inline). The first runs of a session are cold (a small MLP: 800, 150, 60 µs,
    then 30 µs), so they only warm. With ``own_thread`` (``intra_op_threads`` = 1,
    onnxruntime computes on the calling thread) a run costs this thread's CPU time, which
    other processes loading at the same moment do not inflate; else its wall time. A model
    slower than ``_MEASURE_BELOW_S`` per run is measured by its last warm-up run alone, to
    keep its load short."""
    inputs = synthetic_inputs(runner.signature)
    clock = time.thread_time if own_thread else time.perf_counter

    def timed() -> float:
        start = clock()
        try:
            runner.run(inputs, runner.signature.output_names)
        except Exception as exc:
            raise ModelLoadError("warmup", _why(exc)) from exc
        return clock() - start

    last = 0.0
    for _ in range(max(runs, 1)):
        last = timed()
    best, spent = last, 0.0
    if last < _MEASURE_BELOW_S:
        # Up to _MEASURED_RUNS more, within _MEASURE_BUDGET_S: a new session's first few
        # dozen runs still allocate (a 13 µs MLP measured 100 µs over its runs 4 to 8
        # once, 19 µs another time); the fastest run is the model's cost.
        for _ in range(_MEASURED_RUNS):
            took = timed()
            best, spent = min(best, took), spent + took
            if spent > _MEASURE_BUDGET_S:
                break
    runner.typical_run_s = best


def _run_test_vectors(runner: OrtRunner, bundle: Bundle, rtol: float, atol: float) -> None:
    vectors = _read_vectors(bundle)
    inputs = {s.name: vectors[s.name] for s in runner.signature.inputs if s.name in vectors}
    missing = [s.name for s in runner.signature.inputs if s.name not in vectors]
    expected = {
        k.removeprefix("expected/"): v for k, v in vectors.items() if k.startswith("expected/")
    }
    if missing or not expected:
        raise ModelLoadError(
            "qa",
            f"test vectors must hold every input ({', '.join(missing) or 'ok'} missing) and at "
            "least one 'expected/<output>' array",
        )
    try:
        got = runner.run(inputs, tuple(expected))
    except Exception as exc:
        raise ModelLoadError("qa", f"the model failed on its test vectors: {_why(exc)}") from exc
    for name, want in expected.items():
        _compare(name, got[name], want, rtol, atol)


def _read_vectors(bundle: Bundle) -> dict[str, Array]:
    vectors = bundle.manifest.test_vectors if bundle.manifest else None
    path = bundle.dir / (vectors or "")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelLoadError("qa", f"cannot read test vectors {path.name}: {exc}") from exc


def _compare(name: str, got: Array, want: Array, rtol: float, atol: float) -> None:
    if got.shape != want.shape:
        raise ModelLoadError(
            "qa",
            f'output "{name}": shape {list(got.shape)}, test vectors expect {list(want.shape)}',
        )
    if got.dtype.kind in "fc":
        close = np.isclose(got, want.astype(got.dtype), rtol=rtol, atol=atol)
    else:
        close = got == want.astype(got.dtype)
    if not bool(np.all(close)):
        bad = int(np.size(close) - np.count_nonzero(close))
        raise ModelLoadError(
            "qa",
            f'output "{name}": {bad} of {close.size} values differ from the test vectors '
            f"beyond rtol={rtol:g}, atol={atol:g}",
        )


def _why(exc: BaseException) -> str:
    text: Any = exc.message if isinstance(exc, AgentError) else str(exc)
    return str(text).strip().splitlines()[0][:500] if str(text).strip() else type(exc).__name__
