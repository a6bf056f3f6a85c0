"""Run the agent as a service: bind, notify systemd, handle signals, drain, exit.

Signals only set events; the main coroutine does the work in named steps:

- preflight (before anything loads): the TLS files and token files must be readable, else
  a ``ConfigError`` naming the key (exit 2); the soft open-files limit is raised to the
  hard one, so a crowd of slow clients runs out of patience before we run out of fds;
- start: build the app, load the initial models (cleanup contexts), bind the port,
  start the replica processes when ``[server] processes`` > 1 (``replicas.py``; they
  join the port when their models are loaded), then ``READY=1`` and a ``STATUS=``
  line; ``WATCHDOG=1`` every half ``$WATCHDOG_USEC``
  from the event loop (a blocked loop stops the pings, and systemd restarts us);
- SIGHUP: ``RELOADING=1``, re-read the config file (and token files), apply what can
  change live (``app.LIVE_PREFIXES``), log plainly what needs a restart (those keys keep
  their running values), keep the running config if the file is broken, ``READY=1``;
- SIGTERM/SIGINT: ``STOPPING=1``; stop accepting (readiness turns 503, the listening
  socket closes, responses carry ``Connection: close``); the replicas are told to stop
  and drain alongside; drain: wait up to
  ``[server] drain_timeout_s`` for the requests already admitted, including those whose
  body is still arriving; then close idle connections, cancel what is left after a short
  grace (logged and counted), run the cleanup contexts in reverse (watcher, registry,
  taps, shipper flush, outbox close) and exit 0. A second SIGTERM/SIGINT exits at once
  with code 1, even if the event loop is stuck.

Test hook, off by default: with ``EDGE_AGENT_DEBUG_BLOCK_LOOP_ON_SIGUSR1=<seconds>`` in
the environment, SIGUSR1 blocks the event loop with ``time.sleep`` for that long (and
says so in ``STATUS=``), to show that the watchdog pings stop when the loop is stuck.
Without the variable SIGUSR1 keeps its default action. Never set it in production.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import math
import os
import resource
import signal
import ssl
import stat
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import IO, Any

import orjson
import structlog
from aiohttp import web

from agent import config as config_module
from agent import logs, loops
from agent.api.fastpath import close_connections, tcp_site
from agent.api.middleware import TRACKER, RequestTracker
from agent.api.services import SERVICES
from agent.app import LIVE_PREFIXES, REGISTRY, build_app, reconfigure
from agent.config import Config
from agent.errors import ConfigError, ConfigProblem
from agent.replicas import ReplicaSet
from agent.systemd import Notifier, watchdog_loop

log = structlog.get_logger(__name__)

SWITCH_INTERVAL_S = 0.0005

#: Seconds SIGUSR1 blocks the event loop for (test hook; unset = SIGUSR1 untouched).
DEBUG_BLOCK_ENV = "EDGE_AGENT_DEBUG_BLOCK_LOOP_ON_SIGUSR1"
_DEBUG_BLOCK_MAX_S = 600.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_FORCED_EXIT_CODE = 1
_CANCEL_GRACE_S = 1.0
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
#: The primary's socket for the routes replicas forward (in the state directory).
CONTROL_SOCKET = "control.sock"
#: Held (flock) by the running agent: one agent per state dir.
LOCK_FILE = "agent.lock"
_MAX_UNIX_PATH = 107


# -- signals ---------------------------------------------------------------------------------


class _Signals:
    """Events set by signal handlers; the handlers do nothing else.

    After the first SIGTERM/SIGINT, both are re-installed as plain ``signal.signal``
    handlers that exit at once: those run in the main thread between bytecodes, so the
    second signal works even while the event loop is blocked (e.g. joining a thread).
    """

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.reload = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(
        self, loop: asyncio.AbstractEventLoop, on_usr1: Callable[[], None] | None = None
    ) -> None:
        self._loop = loop
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload.set)
        if on_usr1 is not None:
            loop.add_signal_handler(signal.SIGUSR1, on_usr1)

    def uninstall(self) -> None:
        """Give every signal back its default action."""
        if self._loop is not None:
            for sig in (signal.SIGHUP, signal.SIGUSR1, *_STOP_SIGNALS):
                self._loop.remove_signal_handler(sig)
        for sig in _STOP_SIGNALS:
            signal.signal(
                sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler
            )

    def _on_stop(self, sig: signal.Signals) -> None:
        log.info("signal_received", signal=sig.name, action="stop; send it again to force")
        self.stop.set()
        assert self._loop is not None
        for other in _STOP_SIGNALS:
            self._loop.remove_signal_handler(other)
            signal.signal(other, _force_exit)


def _force_exit(signum: int, frame: FrameType | None) -> None:
    """Second SIGTERM/SIGINT: the operator insists; no more draining."""
    # os.write, not the logger: this may interrupt the logger in the middle of a line.
    line = {"event": "forced_exit", "level": "warning", "signal": signal.Signals(signum).name}
    os.write(2, orjson.dumps({**line, "exit_code": _FORCED_EXIT_CODE}) + b"\n")
    os._exit(_FORCED_EXIT_CODE)


def _debug_block_seconds(environ: Mapping[str, str]) -> float | None:
    """The test hook's blocking time from the environment, or None when it is off."""
    raw = environ.get(DEBUG_BLOCK_ENV, "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= _DEBUG_BLOCK_MAX_S:
        log.warning(
            "debug_hook_ignored",
            variable=DEBUG_BLOCK_ENV,
            value=raw,
            expected=f"seconds, > 0 and <= {_DEBUG_BLOCK_MAX_S:g}",
        )
        return None
    return seconds


def _block_loop_hook(
    seconds: float, notifier: Notifier, app: web.Application
) -> Callable[[], None]:
    """The SIGUSR1 test hook: block the event loop on purpose (see the module docstring)."""

    def block() -> None:
        log.warning("debug_loop_blocking", seconds=seconds, variable=DEBUG_BLOCK_ENV)
        notifier.status(f"debug hook: event loop blocked for {seconds:g} s (SIGUSR1)")
        time.sleep(seconds)  # blocking on purpose: that is the whole point of this hook
        notifier.status(_status_line(app))
        log.warning("debug_loop_unblocked", seconds=seconds)

    return block


# -- preflight -------------------------------------------------------------------------------


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The TLS context for ``[server] cert_file``/``key_file``, or None for plain HTTP.

    Raises:
        ConfigError: when the files cannot be read or do not hold a matching pair.
    """
    server = config.server
    if server.cert_file is None or server.key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(server.cert_file, server.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise _startup_error(
            config,
            "server.cert_file",
            f"cannot load the certificate {server.cert_file} with the key {server.key_file} "
            f"({exc}); check both paths, that the agent's user can read them, and that the "
            "key belongs to the certificate (both PEM)",
        ) from exc
    return context


def _token_file_problems(config: Config) -> list[ConfigProblem]:
    """Read each token file once, so a missing file is a clear problem, not a traceback."""
    auth = config.auth
    problems: list[ConfigProblem] = []
    for key, path in (
        ("auth.predict_token_file", auth.predict_token_file),
        ("auth.admin_token_file", auth.admin_token_file),
        ("upstream.token_file", config.upstream.token_file),
    ):
        if path is None:
            continue
        try:
            path.read_text(encoding="utf-8")
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problems.append(
                ConfigProblem(
                    key,
                    0,
                    f"cannot read the token file {path} ({reason}); check the path and that "
                    "the agent's user can read it (one token per line, UTF-8)",
                )
            )
            continue
        if mode & stat.S_IROTH:
            log.warning("token_file_readable_by_others", key=key, path=str(path), fix="chmod o-r")
    return problems


def _preflight(config: Config) -> ssl.SSLContext | None:
    """Check what must be readable before loading anything; the TLS context, if any.

    Raises:
        ConfigError: with every TLS, token file and event loop problem found.
    """
    problems = loops.problems(config) + _token_file_problems(config)
    context = None
    try:
        context = tls_context(config)
    except ConfigError as exc:
        problems = exc.problems + problems
    if problems:
        raise ConfigError(str(config.source) if config.source else "<config>", problems)
    return context


def _startup_error(config: Config, key: str, message: str) -> ConfigError:
    source = str(config.source) if config.source else "<config>"
    return ConfigError(source, [ConfigProblem(key, 0, message)])


def _lock_state_dir(config: Config) -> IO[bytes]:
    """One agent per state dir: two would both deploy, write ``registry.json`` and prune
    the store (and with ``SO_REUSEPORT`` the port alone no longer stops a second one).

    Raises:
        ConfigError: when another process holds the lock (the CLI exits 2).
    """
    state = Path(config.state.dir)
    state.mkdir(parents=True, exist_ok=True)
    lock = (state / LOCK_FILE).open("a+b")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.close()
        raise _startup_error(
            config,
            "state.dir",
            f"another edge-agent is running with the state dir {state} ({exc.strerror}); "
            "stop it first, or give this one its own [state] dir",
        ) from exc
    return lock


def _raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: each client costs an fd (we use epoll)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("open_files_limit_unchanged", soft=soft, hard=hard, error=str(exc))
        return
    log.debug("open_files_limit_raised", soft=hard, was=soft)


# -- status and warnings ---------------------------------------------------------------------


def _status_line(app: web.Application) -> str:
    """The one-line ``STATUS=`` summary (``systemctl status`` shows it)."""
    if REGISTRY not in app:
        return "starting"
    models = app[REGISTRY].models.values()
    ready = sum(1 for e in models if e.active is not None)
    failed = sum(1 for e in models if e.state == "failed")
    line = f"serving {ready} model(s), {failed} failed"
    refused = app[SERVICES].extras.get("drop_dir_error")
    if refused:
        line += f"; DROP DIR REFUSED: {refused}"
    return line


def _warn_about_auth(app: web.Application) -> None:
    """Say so when the auth settings are probably not what the operator meant."""
    services = app[SERVICES]
    predict, admin = services.extras.get("tokens") or ((), ())
    host = services.config.server.host
    if predict and not admin:
        log.warning(
            "auth_admin_routes_open",
            hint="predict tokens are set but no admin token: /v1 routes need no token; "
            "set [auth] admin_tokens or admin_token_file",
        )
    if not predict and not admin and host not in _LOOPBACK:
        log.warning(
            "auth_off_on_network",
            host=host,
            hint="anyone who reaches this address can predict and deploy; "
            "set [auth] tokens or bind to 127.0.0.1",
        )


# -- the service -----------------------------------------------------------------------------


async def serve(
    config: Config,
    config_path: Path | None,
    notifier: Notifier,
    *,
    ssl_context: ssl.SSLContext | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    app = build_app(config)
    tracker = RequestTracker()
    app[TRACKER] = tracker  # set before start-up: the app is frozen afterwards
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        keepalive_timeout=config.server.keepalive_timeout_s,
        # The drain (step 4) has waited already; this is the grace before cancelling.
        shutdown_timeout=min(_CANCEL_GRACE_S, config.server.drain_timeout_s),
    )
    signals = _Signals()
    block_s = _debug_block_seconds(os.environ if environ is None else environ)
    hook = _block_loop_hook(block_s, notifier, app) if block_s is not None else None
    signals.install(asyncio.get_running_loop(), hook)
    if hook is not None:
        log.warning("debug_hook_enabled", variable=DEBUG_BLOCK_ENV, seconds=block_s)
    stopped: list[web.BaseSite] = []
    try:
        # Step 1: load the initial models (the cleanup contexts' startup halves).
        await runner.setup()
        _export_tracker(app, tracker)
        # Step 2: bind; only then are we ready. A stop asked for during loading skips it.
        if not signals.stop.is_set():
            if not await _bind(runner, config, ssl_context):
                return 1
            await _start_replicas(app, runner, config)
            await _run_until_stopped(app, signals, config_path, notifier)
        # Step 3: stop accepting: readiness turns 503, the listening socket closes, and
        # responses carry "Connection: close" so keep-alive clients go elsewhere.
        notifier.stopping()
        app[SERVICES].accepting = False
        replicas_stopped = _stop_replicas(app, config)
        for site in list(runner.sites):
            await site.stop()
            stopped.append(site)
        # Step 4: drain: wait for the requests already admitted, bodies still arriving
        # included (aiohttp's own shutdown stops reading them, so it comes after); the
        # replicas drain theirs meanwhile and hand over their last predictions.
        notifier.status(f"stopping: draining {tracker.active} request(s)")
        await drain(tracker, config.server.drain_timeout_s)
        await replicas_stopped
    finally:
        # Step 5: close idle connections, cancel what the drain left (after a short
        # grace), and run every component's cleanup in reverse order (watcher,
        # registry, taps, shipper flush, outbox close).
        await close_connections(
            [*stopped, *runner.sites], min(_CANCEL_GRACE_S, config.server.drain_timeout_s)
        )
        await runner.cleanup()
        signals.uninstall()
    log.info("stopped", cancelled=tracker.cancelled, exit_code=0)
    return 0


async def _start_replicas(
    app: web.Application, runner: web.AppRunner, config: Config
) -> ReplicaSet | None:
    """``[server] processes`` - 1 replicas on our port, and the control socket they use."""
    count = config.server.serving_processes() - 1
    if count < 1:
        return None
    services = app[SERVICES]
    port = runner.addresses[0][1]
    control = await asyncio.to_thread(lambda: Path(config.state.dir).resolve() / CONTROL_SOCKET)
    if len(str(control)) > _MAX_UNIX_PATH:
        log.error(
            "replicas_not_started",
            reason=f"the control socket path {control} is longer than a Unix socket allows",
            fix="use a shorter [state] dir, or [server] processes = 1",
        )
        return None
    try:
        await _listen_on_control(runner, control)
    except OSError as exc:
        log.error(  # noqa: TRY400 -- the OS error says it all
            "replicas_not_started",
            reason=f"cannot listen on the control socket {control}: {exc}",
            fix="check the [state] dir's file system and permissions; serving alone meanwhile",
        )
        return None
    replicas = ReplicaSet(
        count,
        config=config,
        port=port,
        control=str(control),
        registry=app[REGISTRY],
        on_prediction=lambda event: services.on_prediction(event),
    )
    services.extras["replicas"] = replicas
    services.extras.setdefault("model_event_hooks", []).append(
        lambda event: replicas.notify(("sync",))
    )
    services.metrics.peers = replicas.snapshots
    services.metrics.gauge(
        "edge_agent_replicas_ready",
        "Replica processes serving now ([server] processes - 1 when all are up).",
        (),
        lambda: [((), float(replicas.ready_count))],
    )
    replicas.start()
    log.info("replicas_starting", count=count, port=port, control=str(control))
    return replicas


async def _listen_on_control(runner: web.AppRunner, control: Path) -> None:
    """The Unix socket replicas forward to: owner-only from its creation."""
    await asyncio.to_thread(control.unlink, missing_ok=True)
    site = web.UnixSite(runner, str(control))
    umask = os.umask(0o077)
    try:
        await site.start()
    finally:
        os.umask(umask)


def _stop_replicas(app: web.Application, config: Config) -> asyncio.Task[None]:
    """Tell the replicas to drain and exit (a task: the primary drains meanwhile)."""
    replicas = app[SERVICES].extras.get("replicas")

    async def stop() -> None:
        if isinstance(replicas, ReplicaSet):
            await replicas.stop(config.server.drain_timeout_s + _CANCEL_GRACE_S + 5)

    return asyncio.get_running_loop().create_task(stop(), name="stop-replicas")


async def drain(tracker: RequestTracker, timeout_s: float) -> None:
    """Wait until no request is being handled, or ``timeout_s`` has passed."""
    log.info("draining", inflight=tracker.active, timeout_s=timeout_s)
    if not await tracker.wait_idle(timeout_s):
        log.warning("drain_timed_out", inflight=tracker.active, timeout_s=timeout_s)


def _export_tracker(app: web.Application, tracker: RequestTracker) -> None:
    app[SERVICES].metrics.gauge(
        "edge_agent_http_requests_in_flight",
        "HTTP requests being handled now, all routes.",
        (),
        lambda: [((), float(tracker.active))],
    )


async def _bind(runner: web.AppRunner, config: Config, context: ssl.SSLContext | None) -> bool:
    """Listen on ``[server] host``/``port``; False (logged) when the address is taken."""
    host, port = config.server.host, config.server.port
    site = tcp_site(
        runner,
        host,
        port,
        fast=config.server.fast_path,
        ssl_context=context,
        backlog=1024,
        reuse_port=config.server.serving_processes() > 1,  # the replicas bind the same port
    )
    try:
        await site.start()
    except OSError as exc:
        log.error(  # noqa: TRY400 -- the OS error says it all; a traceback adds noise
            "bind_failed",
            host=host,
            port=port,
            error=str(exc),
            fix="stop the process using this address or change [server] host/port",
        )
        return False
    bound = runner.addresses[0][1] if runner.addresses else port
    log.info(
        "server_listening",
        host=host,
        port=bound,
        tls=context is not None,
        pid=os.getpid(),
        event_loop=loops.running_kind(),
    )
    return True


async def _run_until_stopped(
    app: web.Application, signals: _Signals, config_path: Path | None, notifier: Notifier
) -> None:
    """READY=1, then serve (reloading on SIGHUP) until a stop signal; the watchdog runs here."""
    _warn_about_auth(app)
    notifier.ready()
    notifier.status(_status_line(app))
    watchdog = _start_watchdog(notifier)
    try:
        await _until_stopped(app, signals, config_path, notifier)
    finally:
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)


def _start_watchdog(notifier: Notifier) -> asyncio.Task[None] | None:
    interval = notifier.watchdog_interval_s()
    if interval is None:
        return None
    log.info("watchdog_started", interval_s=interval)
    return asyncio.get_running_loop().create_task(
        watchdog_loop(notifier, interval), name="watchdog"
    )


async def _until_stopped(
    app: web.Application, signals: _Signals, config_path: Path | None, notifier: Notifier
) -> None:
    while not signals.stop.is_set():
        stop = asyncio.ensure_future(signals.stop.wait())
        reload = asyncio.ensure_future(signals.reload.wait())
        await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
        for fut in (stop, reload):
            fut.cancel()
        await asyncio.gather(stop, reload, return_exceptions=True)
        if signals.reload.is_set() and not signals.stop.is_set():
            signals.reload.clear()
            await _reload(app, config_path, notifier)


# -- SIGHUP ----------------------------------------------------------------------------------


async def _reload(app: web.Application, config_path: Path | None, notifier: Notifier) -> None:
    """RELOADING=1, apply the config file, READY=1 (also when the file was refused)."""
    notifier.reloading()
    try:
        await _apply_config_file(app, config_path)
        replicas = app[SERVICES].extras.get("replicas")
        if isinstance(replicas, ReplicaSet):
            replicas.config = app[SERVICES].config  # what a restarted replica gets
            await replicas.broadcast(("config", app[SERVICES].config))
    finally:
        notifier.ready()
        notifier.status(_status_line(app))


async def _apply_config_file(app: web.Application, config_path: Path | None) -> None:
    if config_path is None:
        log.info("config_reload_skipped", reason="started without --config; nothing to re-read")
        return
    old = app[SERVICES].config
    try:
        new = await asyncio.to_thread(_read_config, config_path)
        restart = [k for k in config_module.diff(old, new) if not k.startswith(LIVE_PREFIXES)]
        effective = _keep_running_values(old, new, restart)
        # reconfigure reads the token files again before it changes anything: a file that
        # vanished since _read_config still leaves the running config whole.
        live, _ = reconfigure(app, effective)
    except (ConfigError, OSError) as exc:
        problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
        log.warning(
            "config_reload_refused",
            path=str(config_path),
            problems=[str(p) for p in problems],
            keeping="the running config",
        )
        return
    logs.configure(effective.log.level, effective.log.format)
    log.info("config_reloaded", path=str(config_path), applied=live)
    if restart:
        log.warning(
            "config_change_needs_restart",
            keys=restart,
            hint="these keys keep their running values until `systemctl restart edge-agent`",
        )
    _warn_about_auth(app)


def _read_config(path: Path) -> Config:
    """The config file and its token files, checked as at start (raises ``ConfigError``)."""
    new = config_module.load(path)
    problems = _token_file_problems(new)
    if problems:
        raise ConfigError(str(path), problems)
    return new


def _keep_running_values(old: Config, new: Config, keys: list[str]) -> Config:
    """``new`` with the ``keys`` (``section.key``) that cannot change live set back to ``old``.

    So the running config (``services.config``) always says what is really in effect.
    """
    sections: dict[str, dict[str, Any]] = {}
    for key in keys:
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = getattr(getattr(old, section), name)
    replaced = {
        section: dataclasses.replace(getattr(new, section), **values)
        for section, values in sections.items()
    }
    return dataclasses.replace(new, **replaced)


# -- entry point -----------------------------------------------------------------------------


def run(config: Config, config_path: Path | None) -> int:
    """Configure logging, check what must be readable, and run the service to completion.

    Raises:
        ConfigError: when a TLS or token file cannot be used (the CLI exits 2).
    """
    logs.configure(config.log.level, config.log.format)
    # onnxruntime releases the GIL while it computes; getting it back waits for whichever
    # thread holds it to be told to let go, every switch interval (5 ms by default). Side
    # threads (drift sketches, SQLite) would add up to that to a 50 µs inference.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    log.info(
        "starting",
        config=str(config_path) if config_path else "defaults",
        settings=config_module.describe(config),
    )
    context = _preflight(config)
    lock = _lock_state_dir(config)  # held until the process exits
    _raise_open_files_limit()
    notifier = Notifier.from_env(os.environ)
    try:
        return loops.run(
            config.server.event_loop,
            lambda: serve(config, config_path, notifier, ssl_context=context),
        )
    finally:
        lock.close()
