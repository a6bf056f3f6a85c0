"""Watch the drop directory and hand settled model files to the event loop.

A watchdog (inotify) thread only notes changed paths and wakes the loop; the
decisions happen on the loop:

- a rename into the folder (``mv``, ``edge-agent deploy``, rsync's final rename, a
  version folder moved in whole) is acted on at once: the writer is done;
- any other write waits until size and mtime have been stable for ``settle_ms``, so a
  slow ``cp`` or ``scp`` is never loaded half-written;
- hidden and temporary names are ignored (see ``dropdir.IGNORED_PATTERNS``);
- a periodic rescan (and ``rescan()`` for ``POST /v1/reload``) catches what events
  missed: network filesystems, events lost while starting, a lost inotify watch;
- when no file of a model has been left for ``settle_ms`` (so ``rm x; cp y x`` is a
  replacement, not a removal), ``on_remove`` is called for it.

The watcher never loads anything itself: ``on_ready`` (the registry's deploy) does,
in a task the watcher owns. Nothing that happens to one file stops the watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
#: What happened to a path: moved in (the writer is done), written, or gone.
Change = Literal["arrived", "changed", "gone"]


@dataclass(slots=True)
class _Pending:
    candidate: Candidate
    fingerprint: Fingerprint | None
    stable_since: float
    fast: bool


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's thread: forward paths to the loop, nothing else."""

    def __init__(self, loop: asyncio.AbstractEventLoop, notice: Callable[[Path, Change], None]):
        self._loop = loop
        self._notice = notice

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):
            return
        if kind == "moved":  # from or to outside the tree, one side is empty
            self._post(event.dest_path, "arrived")
            self._post(event.src_path, "gone")
        else:
            self._post(event.src_path, "gone" if kind == "deleted" else "changed")

    def _post(self, raw: bytes | str, change: Change) -> None:
        if not raw:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed while we were stopping
            self._loop.call_soon_threadsafe(self._notice, Path(os.fsdecode(raw)), change)


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
        self._absent: dict[str, float] = {}  # model name -> when its files were first missed
        self._rescan_due = False
        self._wakeup = asyncio.Event()
        self._observer: BaseObserver | None = None
        self._inode: int | None = None  # of the watched folder: a replaced folder is re-watched
        self._task: asyncio.Task[None] | None = None
        self._deploys: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        """Start the inotify thread and the settle loop (the initial scan is separate)."""
        self._watch()
        self._rescan_due = True  # catch what changed between the initial load and now
        self._task = asyncio.get_running_loop().create_task(self._run(), name="watcher")

    def _watch(self) -> None:
        try:
            observer = _new_observer()
            observer.schedule(
                _Handler(asyncio.get_running_loop(), self._notice), str(self.root), recursive=True
            )
            observer.daemon = True
            observer.start()
            self._inode = _inode(self.root)
        except OSError as exc:  # inotify limits, a vanished folder: rescans still work
            log.warning(
                "drop_dir_watch_failed",
                root=str(self.root),
                reason=str(exc),
                rescan_s=self._rescan_s,
            )
            return
        self._observer = observer

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
        """Deploy every settled model in the drop dir now (start-up: before READY).

        Files modified within ``settle_ms`` may still be being written: the load waits
        once for ``settle_ms``; a file that changed meanwhile is queued and settles like
        any other write once the watcher runs.
        """
        candidates = await asyncio.to_thread(scan, self.root)
        before = {c.model_path: _fingerprint(c.model_path) for c in candidates}
        now = self._clock.wall()
        if any(fp is None or now - fp[1] / 1e9 < self._settle_s for fp in before.values()):
            await asyncio.sleep(self._settle_s)
        ready: list[Candidate] = []
        for c in candidates:
            fingerprint = _fingerprint(c.model_path)
            if fingerprint is None or fingerprint != before[c.model_path]:
                self._queue(c, fast=False)
                continue
            self._seen[c.model_path] = fingerprint
            self._names.add(c.name)
            ready.append(c)
        await asyncio.gather(*(self._guarded(c) for c in ready))

    async def rescan(self) -> dict[str, object]:
        """Compare the folder with what we saw; queue changes, act on removals."""
        candidates = await asyncio.to_thread(scan, self.root)
        queued = []
        for c in candidates:
            if c.model_path in self._pending:
                continue  # settling already: a rescan is not a sign of writing
            if self._seen.get(c.model_path) != _fingerprint(c.model_path):
                self._queue(c, fast=False)
                queued.append(str(c.model_path.relative_to(self.root)))
        removed = await self._removed({c.name for c in candidates} | self._pending_names())
        return {
            "queued": queued,
            "settling": sorted(str(p.relative_to(self.root)) for p in self._pending),
            "removed": removed,
            "removing": sorted(self._absent),
            "models_in_dir": len({c.name for c in candidates}),
        }

    # -- the loop ------------------------------------------------------------------------

    def _notice(self, path: Path, change: Change) -> None:
        if change == "gone":
            self._rescan_due = True  # something left: look for removed models
            self._wakeup.set()
        if is_ignored(path):
            return
        candidate = candidate_for(self.root, path)
        if candidate is None:
            if change == "arrived":
                self._rescan_due = True  # a whole model folder moved in: look inside
                self._wakeup.set()
            return
        model = candidate.model_path
        fast = change == "arrived" and (path == model or path in model.parents)
        self._queue(candidate, fast=fast)

    def _queue(self, candidate: Candidate, *, fast: bool) -> None:
        current = self._pending.get(candidate.model_path)
        now = self._clock.monotonic()
        if current is None:
            self._pending[candidate.model_path] = _Pending(candidate, None, now, fast)
        else:
            current.stable_since = now  # an event: the writer is still at work
            current.fast = current.fast or fast
        self._wakeup.set()

    async def _run(self) -> None:
        next_rescan = self._clock.monotonic() + self._rescan_s
        while True:
            await self._sleep()
            try:
                await self._settle()
                if self._rescan_due or self._absent or self._clock.monotonic() >= next_rescan:
                    self._rescan_due = False
                    next_rescan = self._clock.monotonic() + self._rescan_s
                    await self._ensure_watching()
                    await self.rescan()
            except Exception:  # one bad step must never stop the watcher
                log.exception("watcher_step_failed", root=str(self.root))

    async def _sleep(self) -> None:
        busy = self._pending or self._absent
        timeout = min(max(self._settle_s / 4, 0.02), 0.25) if busy else 1.0
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _settle(self) -> None:
        now = self._clock.monotonic()
        for path, pending in list(self._pending.items()):
            fingerprint = _fingerprint(path)
            if fingerprint is None:
                del self._pending[path]  # gone again (a temp file renamed away, a delete)
                self._rescan_due = True
                continue
            if fingerprint != pending.fingerprint:
                pending.fingerprint, pending.stable_since = fingerprint, now
                if not pending.fast:
                    continue
            if pending.fast or now - pending.stable_since >= self._settle_s:
                del self._pending[path]
                self._seen[path] = fingerprint
                self._names.add(pending.candidate.name)
                self._absent.pop(pending.candidate.name, None)
                # Look again: a manifest may have arrived after the model file.
                self._deploy(candidate_for(self.root, path) or pending.candidate)

    async def _ensure_watching(self) -> None:
        """Watch again when the thread died or the folder was replaced (new inode)."""
        observer = self._observer
        if observer is not None and observer.is_alive() and self._inode == _inode(self.root):
            return
        if observer is not None:
            log.warning("drop_dir_watch_lost", root=str(self.root), action="watching again")
            self._observer = None
            observer.stop()
            await asyncio.to_thread(observer.join, 5)
        if self.root.is_dir():
            self._watch()

    def _deploy(self, candidate: Candidate) -> None:
        log.info("model_file_settled", model=candidate.name, path=str(candidate.model_path))
        task = asyncio.get_running_loop().create_task(
            self._guarded(candidate), name=f"deploy:{candidate.name}"
        )
        self._deploys.add(task)
        task.add_done_callback(self._deploys.discard)

    async def _guarded(self, candidate: Candidate) -> object:
        try:
            return await self._on_ready(candidate)
        except Exception:  # a crash in one deploy must not stop the others
            log.exception("deploy_crashed", model=candidate.name)
            return None

    def _pending_names(self) -> set[str]:
        return {p.candidate.name for p in self._pending.values()}

    async def _removed(self, present: set[str]) -> list[str]:
        """Names absent for ``settle_ms`` are removed; returns the ones removed now."""
        now = self._clock.monotonic()
        for path in [p for p in self._seen if _fingerprint(p) is None]:
            del self._seen[path]
        for name in present:
            self._absent.pop(name, None)
        for name in self._names - present:
            self._absent.setdefault(name, now)
        due = sorted(n for n, since in self._absent.items() if now - since >= self._settle_s)
        for name in due:  # all bookkeeping before the first await: rescans may overlap
            del self._absent[name]
            self._names.discard(name)
        for name in due:
            log.info("model_files_removed", model=name)
            if self._on_remove is not None:
                await self._on_remove(name)
        return due


def _new_observer() -> BaseObserver:
    """inotify reporting moves from outside the tree as moves (``mv /tmp/m.onnx dir/``).

    The plain inotify observer reports those as "created", which would make them wait
    for ``settle_ms``. Other platforms get watchdog's default observer.
    """
    try:
        from watchdog.observers.inotify import InotifyObserver  # Linux only
    except (ImportError, OSError):
        return Observer()
    return InotifyObserver(generate_full_events=True)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _fingerprint(path: Path) -> Fingerprint | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


__all__ = ["Change", "Watcher"]
