"""The primary's side of ``[server] processes`` > 1: spawn, feed and watch the replicas.

Each replica (``agent/replica.py``) is a child process with a private socketpair to the
primary. Over it the primary sends the running config (at start and after SIGHUP),
``sync`` after every change of its registry, and ``stop``; the replica sends ``ready``,
its answered predictions (fed to the primary's side taps and probation statistics, as
if the primary had answered them) and a snapshot of its counters every second.

A replica that dies is started again after a backoff (1 s, doubling to 30 s, reset
after a minute of good health); its last counters are kept, so the merged counters in
``/metrics`` never go backwards. While replicas are missing the primary keeps serving
alone. The replicas stop before the primary closes its taps: their last predictions
reach the prediction log and the drift sketches.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent import ipc
from agent.config import Config
from agent.events import PredictionEvent
from agent.metrics import Snapshot, add_snapshots
from agent.models.registry import Registry
from agent.tensors import Array

log = structlog.get_logger(__name__)

#: A ``PredictionEvent`` as a replica ships it (its fields, in order).
EventTuple = tuple[str, str, int, float, dict[str, Array], dict[str, Array], float]

_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
#: How long the primary keeps reading a stopped replica's channel for its last messages.
_FINAL_READ_S = 5.0
#: A replica up this long has its restart backoff reset.
_HEALTHY_S = 60.0


@dataclass(eq=False)
class _Replica:
    index: int
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    pid: int | None = None
    ready: bool = False
    snapshot: Snapshot = field(default_factory=list)
    restarts: int = 0


class ReplicaSet:
    """``count`` replica processes serving on ``port`` beside this one."""

    def __init__(
        self,
        count: int,
        *,
        config: Config,
        port: int,
        control: str,
        registry: Registry,
        on_prediction: Callable[[PredictionEvent], None],
    ) -> None:
        self.config = config
        self._port = port
        self._control = control
        self._registry = registry
        self._on_prediction = on_prediction
        self._replicas = [_Replica(i + 1) for i in range(count)]
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        #: Counters of replica runs that ended: merged counters never go backwards.
        self._retired: Snapshot = []

    # -- what the rest of the primary sees -----------------------------------------------

    @property
    def ready_count(self) -> int:
        """Replicas serving now."""
        return sum(r.ready for r in self._replicas)

    def snapshots(self) -> list[Snapshot]:
        """The replicas' counters, for ``Metrics.render``."""
        return [self._retired, *(r.snapshot for r in self._replicas)]

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn every replica (each in its own supervising task)."""
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._supervise(r), name=f"replica-{r.index}") for r in self._replicas
        ]

    async def broadcast(self, message: Any, *, ready_only: bool = True) -> None:
        """Send a message to every replica that is up (a dead one gets the state at start)."""
        for replica in self._replicas:
            if replica.writer is not None and (replica.ready or not ready_only):
                with contextlib.suppress(ipc.ChannelClosed):
                    await ipc.send(replica.writer, message)

    def notify(self, message: Any) -> None:
        """``broadcast`` from synchronous code (registry event hooks)."""
        if not self._stop.is_set():
            task = asyncio.get_running_loop().create_task(self.broadcast(message))
            self._tasks.append(task)
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def stop(self, timeout_s: float) -> None:
        """Ask every replica to drain and exit; kill the ones still there after the timeout."""
        self._stop.set()
        await self.broadcast(("stop",), ready_only=False)
        for replica in self._replicas:  # also heard while a replica is busy loading
            process = replica.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        deadline = time.monotonic() + timeout_s
        for replica in self._replicas:
            process = replica.process
            if process is None or process.returncode is not None:
                continue
            try:
                await asyncio.wait_for(process.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.warning("replica_killed", index=replica.index, pid=replica.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        # Each supervisor reads its channel to the end (the last predictions a replica
        # flushed on its way out) and then returns; cancel only what is still stuck.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=_FINAL_READ_S)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- one replica -----------------------------------------------------------------------

    async def _supervise(self, replica: _Replica) -> None:
        attempt = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                code = await self._run(replica)
            except OSError as exc:
                code = None
                log.error("replica_spawn_failed", index=replica.index, error=str(exc))  # noqa: TRY400 -- the OS error says it all
            if self._stop.is_set():
                return
            if time.monotonic() - started > _HEALTHY_S:
                attempt = 0
            delay = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
            attempt += 1
            replica.restarts += 1
            log.error(
                "replica_exited",
                index=replica.index,
                pid=replica.pid,
                exit_code=code,
                restart_in_s=delay,
                hint="the other processes keep serving; see the replica's log lines above",
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _run(self, replica: _Replica) -> int | None:
        """Spawn the replica, serve its channel until it closes; returns its exit code."""
        ours, theirs = socket.socketpair()
        try:
            replica.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent",
                "replica",
                "--channel-fd",
                str(theirs.fileno()),
                "--event-loop",
                self.config.server.event_loop,
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        replica.pid = replica.process.pid
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=ipc.MAX_FRAME)
        replica.writer = writer
        try:
            hello = {
                "index": replica.index,
                "config": self.config,
                "port": self._port,
                "control": self._control,
            }
            await ipc.send(writer, hello)
            if self._stop.is_set():  # stopped while this one was being spawned
                await ipc.send(writer, ("stop",))
                with contextlib.suppress(ProcessLookupError):
                    replica.process.terminate()
            await self._serve(replica, reader)
        except ipc.ChannelClosed:
            pass
        finally:
            replica.ready = False
            replica.writer = None
            writer.close()
            self._retired = _as_snapshot(add_snapshots([self._retired, replica.snapshot]))
            replica.snapshot = []
        return await replica.process.wait()

    async def _serve(self, replica: _Replica, reader: asyncio.StreamReader) -> None:
        while True:
            message = await ipc.receive(reader)
            kind = message[0]
            if kind == "events":
                self._take(message[1], message[2])
            elif kind == "metrics":
                replica.snapshot = message[1]
            elif kind == "ready":
                replica.ready = True
                log.info("replica_ready", index=replica.index, pid=message[1])
                # The config (SIGHUP) and the registry may have changed while it loaded.
                assert replica.writer is not None
                await ipc.send(replica.writer, ("config", self.config))
                await ipc.send(replica.writer, ("sync",))

    def _take(self, events: list[EventTuple], failures: list[tuple[str, int, int]]) -> None:
        """Predictions a replica answered: probation statistics, then the side taps."""
        models = self._registry.models
        for fields in events:
            event = PredictionEvent(*fields)
            entry = models.get(event.model)
            live = entry.active if entry is not None else None
            if live is not None and live.version == event.version:
                live.stats.record(event.latency_s)
            self._on_prediction(event)
        for model, version, count in failures:
            entry = models.get(model)
            live = entry.active if entry is not None else None
            if live is not None and live.version == version:
                for _ in range(count):
                    live.stats.fail()


def _as_snapshot(
    total: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]],
) -> Snapshot:
    return [
        (family, [(name, labels, value) for (name, labels), value in samples.items()])
        for family, samples in total.items()
    ]
