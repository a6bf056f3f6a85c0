"""Watch the drop directory and hand settled model files to the event loop.

A watchdog (inotify) thread only notes changed paths and wakes the loop; the
decisions happen on the loop:

- a rename into the folder (``mv``, ``edge-agent deploy``, rsync's final rename) is
  acted on at once: the writer is done;
- any other write waits until size and mtime have been stable for ``settle_ms``, so a
  slow ``cp`` or ``scp`` is never loaded half-written;
- hidden and temporary names are ignored (see ``dropdir.IGNORED_PATTERNS``);
- a periodic rescan (and ``rescan()`` for ``POST /v1/reload``) catches what events
  missed: network filesystems, events lost while starting;
- when no file of a model is left, ``on_remove`` is called for it.

The watcher never loads anything itself: ``on_ready`` (the registry's deploy) does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from agent.clock import Clock
from agent.models.dropdir import Candidate, candidate_for, is_ignored, scan

log = structlog.get_logger(__name__)

OnReady = Callable[[Candidate], Awaitable[object]]
OnRemove = Callable[[str], Awaitable[None]]
Fingerprint = tuple[int, int]  # size, mtime_ns


@dataclass(slots=True)
class _Pending:
    candidate: Candidate
    fingerprint: Fingerprint | None
    stable_since: float
    fast: bool


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's thread: forward paths to the loop, nothing else."""

    def __init__(self, loop: asyncio.AbstractEventLoop, notice: Callable[[Path, bool], None]):
        self._loop = loop
        self._notice = notice

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "closed"):
            return
        renamed = event.event_type == "moved"
        path = event.dest_path if renamed else event.src_path
        for p in {path, event.src_path}:
            if p:
                self._loop.call_soon_threadsafe(self._notice, Path(os.fsdecode(p)), renamed)


class Watcher:
    """Turns drop-directory changes into deploy and remove calls."""

    def __init__(
        self,
        root: Path,
        *,
        settle_ms: int,
        rescan_s: float,
        clock: Clock,
        on_ready: OnReady,
        on_remove: OnRemove | None,
    ) -> None:
        self.root = root
        self._settle_s = settle_ms / 1000
        self._rescan_s = rescan_s
        self._clock = clock
        self._on_ready = on_ready
        self._on_remove = on_remove
        self._pending: dict[Path, _Pending] = {}
        self._seen: dict[Path, Fingerprint] = {}
        self._names: set[str] = set()
        self._removal_check = False
        self._wakeup = asyncio.Event()
        self._observer: BaseObserver | None = None
        self._task: asyncio.Task[None] | None = None
        self._deploys: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        """Start the inotify thread and the settle loop (the initial scan is separate)."""
        loop = asyncio.get_running_loop()
        observer = Observer()
        observer.schedule(_Handler(loop, self._notice), str(self.root), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self._task = loop.create_task(self._run(), name="watcher")

    async def stop(self) -> None:
        """Stop the thread and the loop; wait for deploys already started."""
        if self._observer is not None:
            observer, self._observer = self._observer, None
            observer.stop()
            await asyncio.to_thread(observer.join, 5)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._deploys:
            await asyncio.gather(*self._deploys, return_exceptions=True)
        log.info("watcher_stopped", root=str(self.root))

    async def initial_load(self) -> None:
        """Deploy every model in the drop dir now (start-up: before READY)."""
        candidates = await asyncio.to_thread(scan, self.root)
        for c in candidates:
            self._seen[c.model_path] = _fingerprint(c.model_path) or (0, 0)
            self._names.add(c.name)
        await asyncio.gather(*(self._on_ready(c) for c in candidates))

    async def rescan(self) -> dict[str, object]:
        """Compare the folder with what we saw; queue changes, report removals."""
        candidates = await asyncio.to_thread(scan, self.root)
        queued = []
        for c in candidates:
            if self._seen.get(c.model_path) != _fingerprint(c.model_path):
                self._queue(c, fast=False)
                queued.append(c.model_path.name)
        removed = await self._removed({c.name for c in candidates})
        return {"queued": queued, "removed": removed, "models_in_dir": len(candidates)}

    # -- the loop ------------------------------------------------------------------------

    def _notice(self, path: Path, fast: bool) -> None:
        if is_ignored(path):
            return
        candidate = candidate_for(self.root, path)
        if candidate is not None:
            self._queue(candidate, fast=fast and path == candidate.model_path)
        elif path.parent == self.root or path.parent.parent == self.root:
            self._wakeup.set()  # a directory went away: let the loop look for removals
            self._removal_check = True

    def _queue(self, candidate: Candidate, *, fast: bool) -> None:
        current = self._pending.get(candidate.model_path)
        self._pending[candidate.model_path] = _Pending(
            candidate, current.fingerprint if current else None,
            self._clock.monotonic(), fast or bool(current and current.fast),
        )
        self._wakeup.set()

    async def _run(self) -> None:
        next_rescan = self._clock.monotonic() + self._rescan_s
        while True:
            timeout = min(max(self._settle_s / 4, 0.02), 0.25) if self._pending else 1.0
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            await self._settle()
            if self._removal_check or self._clock.monotonic() >= next_rescan:
                self._removal_check = False
                try:
                    await self.rescan()
                except OSError as exc:
                    log.warning("rescan_failed", root=str(self.root), reason=str(exc))
                next_rescan = self._clock.monotonic() + self._rescan_s

    async def _settle(self) -> None:
        now = self._clock.monotonic()
        for path, pending in list(self._pending.items()):
            fingerprint = _fingerprint(path)
            if fingerprint is None:
                del self._pending[path]  # gone again (a temp file renamed away, a delete)
                self._removal_check = True
                continue
            if fingerprint != pending.fingerprint:
                pending.fingerprint, pending.stable_since = fingerprint, now
                if not pending.fast:
                    continue
            if pending.fast or now - pending.stable_since >= self._settle_s:
                del self._pending[path]
                self._seen[path] = fingerprint
                self._names.add(pending.candidate.name)
                self._deploy(pending.candidate)

    def _deploy(self, candidate: Candidate) -> None:
        log.info("model_file_settled", model=candidate.name, path=str(candidate.model_path))
        task = asyncio.get_running_loop().create_task(self._guarded(candidate))
        self._deploys.add(task)
        task.add_done_callback(self._deploys.discard)

    async def _guarded(self, candidate: Candidate) -> object:
        try:
            return await self._on_ready(candidate)
        except Exception:
            log.exception("deploy_crashed", model=candidate.name)
            return None

    async def _removed(self, present: set[str]) -> list[str]:
        gone = sorted(self._names - present)
        for path in [p for p in self._seen if not p.exists()]:
            del self._seen[path]
        for name in gone:
            self._names.discard(name)
            log.info("model_files_removed", model=name)
            if self._on_remove is not None:
                await self._on_remove(name)
        return gone


def _fingerprint(path: Path) -> Fingerprint | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)
