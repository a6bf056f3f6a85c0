"""Run the agent as a service: bind, notify systemd, handle signals, drain, exit.

Signals only set events; the main coroutine does the work in named steps:

- start: build the app, load the initial models (cleanup contexts), bind the port,
  then READY=1 and a STATUS line;
- SIGHUP: RELOADING=1, re-read the config file, apply what can change live, report
  what cannot, keep the running config if the file is broken, READY=1;
- SIGTERM/SIGINT: STOPPING=1; stop accepting (readiness turns 503, the listening
  socket closes); drain in-flight requests for up to ``drain_timeout_s``; run the
  cleanup contexts in reverse (flush taps, close the outbox); exit 0. A second
  SIGTERM/SIGINT forces the exit at once (code 1).
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
from pathlib import Path

import structlog
from aiohttp import web

from agent import config as config_module
from agent import logs
from agent.api.services import SERVICES
from agent.app import REGISTRY, build_app, reconfigure
from agent.config import Config
from agent.errors import ConfigError
from agent.systemd import Notifier, watchdog_loop

log = structlog.get_logger(__name__)


class _Signals:
    """Events set by signal handlers; the handlers do nothing else."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.reload = asyncio.Event()
        self.count = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self._on_stop)
        loop.add_signal_handler(signal.SIGINT, self._on_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload.set)

    def _on_stop(self) -> None:
        self.count += 1
        if self.count > 1:
            os._exit(1)  # second signal: the operator insists; no more draining
        self.stop.set()


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    server = config.server
    if server.cert_file is None or server.key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server.cert_file, server.key_file)
    return context


def _status_line(app: web.Application) -> str:
    registry = app[REGISTRY]
    ready = sum(1 for e in registry.models.values() if e.active is not None)
    failed = sum(1 for e in registry.models.values() if e.state == "failed")
    return f"serving {ready} model(s), {failed} failed"


async def serve(config: Config, config_path: Path | None, notifier: Notifier) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    signals = _Signals()
    signals.install(asyncio.get_running_loop())
    app = build_app(config)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None,
        keepalive_timeout=config.server.keepalive_timeout_s,
        shutdown_timeout=config.server.drain_timeout_s,
    )
    # Step 1: load the initial models (the cleanup contexts' startup halves).
    await runner.setup()
    try:
        # Step 2: bind; only then are we ready.
        site = web.TCPSite(runner, config.server.host, config.server.port,
                           ssl_context=_ssl_context(config), backlog=1024)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else config.server.port
        log.info("server_listening", host=config.server.host, port=port,
                 tls=config.server.cert_file is not None, pid=os.getpid())
        notifier.ready()
        notifier.status(_status_line(app))
        watchdog = _start_watchdog(notifier)
        try:
            await _until_stopped(app, signals, config_path, notifier)
        finally:
            if watchdog is not None:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)
        # Step 3: stop accepting and drain (aiohttp waits for handlers up to the timeout).
        notifier.stopping()
        app[SERVICES].accepting = False
        inflight = sum(e.active.leases for e in app[REGISTRY].models.values() if e.active)
        log.info("draining", inflight=inflight, timeout_s=config.server.drain_timeout_s)
    finally:
        # Step 4: close the listener, wait for in-flight requests, then run every
        # component's cleanup in reverse order (watcher, registry, taps, outbox).
        await runner.cleanup()
    log.info("stopped", exit_code=0)
    return 0


def _start_watchdog(notifier: Notifier) -> asyncio.Task[None] | None:
    interval = notifier.watchdog_interval_s()
    if interval is None:
        return None
    return asyncio.get_running_loop().create_task(watchdog_loop(notifier, interval),
                                                  name="watchdog")


async def _until_stopped(
    app: web.Application, signals: _Signals, config_path: Path | None, notifier: Notifier
) -> None:
    while not signals.stop.is_set():
        stop = asyncio.ensure_future(signals.stop.wait())
        reload = asyncio.ensure_future(signals.reload.wait())
        await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
        for fut in (stop, reload):
            fut.cancel()
        if signals.reload.is_set() and not signals.stop.is_set():
            signals.reload.clear()
            await _reload(app, config_path, notifier)


async def _reload(app: web.Application, config_path: Path | None, notifier: Notifier) -> None:
    notifier.reloading()
    try:
        if config_path is None:
            log.info("config_reload_skipped", reason="started without --config; nothing to re-read")
            return
        try:
            new = await asyncio.to_thread(config_module.load, config_path)
        except ConfigError as exc:
            log.warning("config_reload_refused", path=str(config_path),
                      problems=[str(p) for p in exc.problems], keeping="the running config")
            return
        live, restart = reconfigure(app, new)
        logs.configure(new.log.level, new.log.format)
        log.info("config_reloaded", path=str(config_path), applied=live)
        if restart:
            log.warning("config_change_needs_restart", keys=restart,
                        hint="these keys keep their old values until `systemctl restart`")
    finally:
        notifier.ready()
        notifier.status(_status_line(app))


def run(config: Config, config_path: Path | None) -> int:
    """Configure logging and run the service to completion."""
    logs.configure(config.log.level, config.log.format)
    log.info("starting", config=str(config_path) if config_path else "defaults",
             settings=config_module.describe(config))
    return asyncio.run(serve(config, config_path, Notifier.from_env(os.environ)))
