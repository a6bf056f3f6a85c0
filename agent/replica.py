"""A replica process: the V2 data plane on one more core (``[server] processes`` > 1).

Python runs one thread of Python at a time, and an agent request costs more Python
(HTTP, codecs, checks, taps) than a small model costs onnxruntime: one process tops out
at one core. A replica is a second serving process on the same port (``SO_REUSEPORT``:
the kernel spreads new connections over the processes). The primary spawns it
(``edge-agent replica --channel-fd N``) and hands it the running config over a private
socketpair; the replica then

- loads the versions the primary's ``registry.json`` names as active (``Follower``) and
  switches when the primary says its state changed;
- answers the V2 routes itself (infer, metadata, ready, health) through the same
  middleware, codecs and batcher as the primary, except for a model whose active version
  it could not load (``Follower.lagging``): those go to the primary, which serves that
  version, until a retried load succeeds here;
- forwards every other route (admin, feedback, drift, ``/metrics``) to the primary over
  the primary's control socket, so any connection can reach any route;
- ships each answered prediction to the primary, which feeds its side taps (prediction
  log, drift, capture) and probation statistics, plus a snapshot of its counters and
  histograms every second (one scrape of ``/metrics`` shows every process).

It stops on SIGTERM/SIGINT (draining like the primary), on a ``stop`` message, and when
the channel closes: a replica never outlives its primary.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from agent import ipc, logs, loops
from agent.api import v2
from agent.api.fastpath import close_connections, tcp_site
from agent.api.middleware import TRACKER, RequestTracker, edge_middleware
from agent.api.services import MODEL, REQUEST_ID, SERVICES, Services
from agent.app import REGISTRY, read_tokens, reconfigure, running_registry
from agent.clock import SystemClock
from agent.config import Config, EventLoop
from agent.daemon import SWITCH_INTERVAL_S, drain, tls_context
from agent.errors import Unavailable
from agent.events import ModelEvent, PredictionEvent
from agent.metrics import Metrics
from agent.models.follower import Follower, Lag
from agent.models.registry import LiveVersion
from agent.models.store import Store
from agent.replicas import EventTuple
from agent.tensors import Array

log = structlog.get_logger(__name__)

CONTROL = web.AppKey("control", aiohttp.ClientSession)

#: Events (and their tensor bytes) held while the primary is slow to read; beyond either
#: bound new ones are dropped (counted in edge_agent_replica_events_total{outcome="dropped"}).
MAX_PENDING_EVENTS = 20_000
MAX_PENDING_BYTES = 64 * 1024 * 1024
#: How often predictions and failure counts go to the primary.
SHIP_INTERVAL_S = 0.02
#: Seconds a stopping replica may take beyond ``[server] drain_timeout_s`` before it exits hard.
_STOP_GRACE_S = 10.0
#: How often the counters and histograms go to the primary.
METRICS_INTERVAL_S = 1.0
#: Headers that belong to one connection, not to the request or answer being forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


class Uplink:
    """What a replica tells the primary: predictions, version failures, metrics."""

    def __init__(self, writer: asyncio.StreamWriter, metrics: Metrics, registry: Follower) -> None:
        self._writer = writer
        self._metrics = metrics
        self._registry = registry
        # Plain tuples: a slotted dataclass unpickles through __setstate__, which took 7 % of
        # the primary's event loop at 3k req/s in a profile.
        self._events: list[EventTuple] = []
        self._bytes = 0
        # Per live version (not per version number: a version activated again is a new
        # LiveVersion whose count starts at 0), the failures already shipped.
        self._errors_sent: weakref.WeakKeyDictionary[LiveVersion, int] = weakref.WeakKeyDictionary()
        self._shipped = metrics.replica_events.labels("shipped")
        self._dropped = metrics.replica_events.labels("dropped")

    def prediction(self, event: PredictionEvent) -> None:
        """Queue one answered request for the primary's taps (never blocks)."""
        size = _size(event.inputs) + _size(event.outputs)
        if len(self._events) >= MAX_PENDING_EVENTS or self._bytes + size > MAX_PENDING_BYTES:
            self._dropped.inc()
            return
        self._bytes += size
        self._events.append(
            (
                event.id,
                event.model,
                event.version,
                event.ts,
                event.inputs,
                event.outputs,
                event.latency_s,
            )
        )

    async def run(self) -> None:
        """Ship every ``SHIP_INTERVAL_S``, metrics every ``METRICS_INTERVAL_S``."""
        loop = asyncio.get_running_loop()
        next_metrics = loop.time()
        while True:
            await asyncio.sleep(SHIP_INTERVAL_S)
            try:
                await self.flush(metrics=loop.time() >= next_metrics)
            except ipc.ChannelClosed:
                return  # the primary is gone: _Commands.listen stops the replica
            except Exception:  # a bug must not end shipping for good
                log.exception("replica_ship_failed", dropped=len(self._events))
                self._events, self._bytes = [], 0
            if loop.time() >= next_metrics:
                next_metrics = loop.time() + METRICS_INTERVAL_S

    async def flush(self, *, metrics: bool = True) -> None:
        """Send what is queued (and the metrics snapshot)."""
        events, self._events, self._bytes = self._events, [], 0
        failures = self._new_failures()
        if events or failures:
            await ipc.send(self._writer, ("events", events, failures))
            self._shipped.inc(len(events))
        if metrics:
            await ipc.send(self._writer, ("metrics", self._metrics.snapshot()))

    def _new_failures(self) -> list[tuple[str, int, int]]:
        """Requests each active version failed since the last flush (probation counts them).

        Counted from when the version went live in this process: a version rolled back to
        and activated again starts from 0, like the primary's count for it.
        """
        out: list[tuple[str, int, int]] = []
        for entry in self._registry.models.values():
            live = entry.active
            if live is None:
                continue
            errors = live.stats.errors
            new = errors - self._errors_sent.get(live, 0)
            if new > 0:
                out.append((live.name, live.version, new))
                self._errors_sent[live] = errors
        return out


def _size(arrays: dict[str, Array]) -> int:
    """Bytes an event's tensors pickle to, about (BYTES elements by their length)."""
    total = 0
    for a in arrays.values():
        if a.dtype == object:
            total += sum(len(x) if isinstance(x, bytes | str) else 8 for x in a.flat)
        else:
            total += a.nbytes
    return total


async def _forward(request: web.Request) -> web.StreamResponse:
    """Any route a replica does not serve itself: ask the primary, answer what it says."""
    try:
        return await _relay(request)
    except (aiohttp.ClientError, TimeoutError) as exc:
        if request.method in ("GET", "HEAD"):
            raise Unavailable(
                f"{request.path} is served by the agent's primary process, which does not "
                f"answer ({exc.__class__.__name__}); retry in a moment",
                retry_after_s=1,
            ) from exc
        # Not "retry": the primary may have done it (a rollback retried goes one further).
        raise Unavailable(
            f"{request.path} is served by the agent's primary process, which did not answer "
            f"in time ({exc.__class__.__name__}); check GET /v1/models before repeating it"
        ) from exc


async def _relay(request: web.Request) -> web.Response:
    """The primary's answer to ``request`` (raises ``aiohttp.ClientError``, ``TimeoutError``)."""
    session = request.app[CONTROL]
    # aiohttp has inflated a gzip/deflate body already: it goes on as plain bytes.
    body = await request.read() if request.body_exists else None
    headers = CIMultiDict(
        (k, v)
        for k, v in request.headers.items()
        if k.lower() not in _HOP_BY_HOP and k.lower() != "content-encoding"
    )
    headers["X-Request-ID"] = request[REQUEST_ID]  # one id in both processes' logs
    url = URL(f"http://primary{request.raw_path}", encoded=True)
    async with session.request(
        request.method, url, headers=headers, data=body, allow_redirects=False
    ) as reply:
        payload = await reply.read()
        out = CIMultiDict((k, v) for k, v in reply.headers.items() if k.lower() not in _HOP_BY_HOP)
        return web.Response(status=reply.status, body=payload, headers=out)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _unless_lagging(handler: Handler) -> Handler:
    """A V2 model route, answered by the primary while this process cannot serve the
    model's active version (never from another version)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        registry = request.app[REGISTRY]
        name = request.match_info["name"]
        lag = registry.lagging.get(name) if isinstance(registry, Follower) else None
        if lag is None:
            return await handler(request)
        request[MODEL] = name
        try:
            return await _relay(request)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(_lag_message(lag, exc), retry_after_s=1) from exc

    return handle


def _serves(app: web.Application, name: str) -> bool:
    """The fast path may answer this model here (a lagging one goes through aiohttp's
    routes, which forward it to the primary)."""
    registry = app.get(REGISTRY)
    return not (isinstance(registry, Follower) and name in registry.lagging)


def _lag_message(lag: Lag, exc: Exception) -> str:
    return (
        f'this process (a replica) could not load version {lag.version} of model "{lag.model}",'
        f" the active one ({lag.reason}; next attempt within {lag.retry_in_s:g} s), and the "
        f"primary process that serves it meanwhile does not answer "
        f"({exc.__class__.__name__}: is the agent stopping?); retry in a moment. If this "
        "lasts, check the replica_follow_failed lines in the agent's log and that "
        f"store/{lag.sha256}/model.onnx in the state directory holds the bytes of that "
        "sha256 (if it was damaged, delete it and drop the model file again)"
    )


def _v2_routes() -> list[web.RouteDef]:
    """``v2.routes``, the per-model ones wrapped in ``_unless_lagging``."""
    out = []
    for route in v2.routes:
        assert isinstance(route, web.RouteDef)
        handler = route.handler
        if "{name}" in route.path:
            handler = _unless_lagging(handler)
        out.append(web.RouteDef(route.method, route.path, handler, route.kwargs))
    return out


def build_replica_app(
    config: Config, control: str, writer: asyncio.StreamWriter
) -> web.Application:
    """The replica's aiohttp application: V2 routes here, the rest forwarded."""
    app = web.Application(
        client_max_size=config.server.max_body_bytes, middlewares=[edge_middleware]
    )
    app.add_routes(_v2_routes())
    app.router.add_route("*", "/{tail:.*}", _forward)
    app[TRACKER] = RequestTracker()
    app.cleanup_ctx.append(_replica_ctx(config, control, writer))
    return app


def _replica_ctx(config: Config, control: str, writer: asyncio.StreamWriter) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        clock = SystemClock()
        metrics = Metrics()
        store = await asyncio.to_thread(lambda: Store(Path(config.state.dir), owner=False))
        following = running_registry(app, Follower, store, config, clock, metrics, _logged_only)
        async with following as registry:
            uplink = Uplink(writer, metrics, registry)
            app[SERVICES] = Services(
                config=config,
                registry=registry,
                metrics=metrics,
                clock=clock,
                on_prediction=uplink.prediction,
            )
            app[SERVICES].extras["tokens"] = await asyncio.to_thread(read_tokens, config)
            app[SERVICES].extras["uplink"] = uplink
            app[CONTROL] = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=control),
                auto_decompress=False,
                # Long enough for a forwarded rollback that loads a big model.
                timeout=aiohttp.ClientTimeout(total=config.models.max_load_s + 30),
            )
            loop = asyncio.get_running_loop()
            shipping = loop.create_task(uplink.run(), name="uplink")
            follow: asyncio.Task[None] | None = None
            try:
                await registry.restore()
                follow = loop.create_task(registry.follow(), name="follow")
                yield
            finally:
                for task in (follow, shipping):
                    if task is not None:
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                try:
                    await uplink.flush()  # the last predictions and counters reach the taps
                except ipc.ChannelClosed:
                    log.warning("replica_flush_lost", reason="the primary closed the channel")
                except Exception:
                    log.exception("replica_flush_failed")
                await app[CONTROL].close()

    return ctx


def _logged_only(event: ModelEvent) -> None:
    """The registry logged it; the primary emits the events (upstream, metrics)."""


async def serve_replica(fd: int) -> int:
    """Run one replica until told to stop; returns the exit code."""
    reader, writer = await ipc.open_channel(fd)
    try:
        hello: dict[str, Any] = await ipc.receive(reader)
    except ipc.ChannelClosed:
        log.warning("replica_orphaned", action="exiting: the primary stopped before the start")
        return 1
    config: Config = hello["config"]
    logs.configure(config.log.level, config.log.format)
    structlog.contextvars.bind_contextvars(replica=hello["index"])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the primary sends the new config
    app = build_replica_app(config, hello["control"], writer)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        keepalive_timeout=config.server.keepalive_timeout_s,
        shutdown_timeout=min(1.0, config.server.drain_timeout_s),
    )
    listen = asyncio.create_task(_Commands(app, stop).listen(reader), name="channel")
    limit_s = config.server.drain_timeout_s + _STOP_GRACE_S
    backstop = asyncio.create_task(_exit_if_stuck(stop, limit_s), name="backstop")
    site: web.BaseSite | None = None
    try:
        await runner.setup()  # loads the active versions before taking connections
        site = tcp_site(
            runner,
            config.server.host,
            hello["port"],
            fast=config.server.fast_path,
            ssl_context=tls_context(config),
            backlog=1024,
            reuse_port=True,
            handles=lambda name: _serves(app, name),
        )
        await site.start()
        await ipc.send(writer, ("ready", os.getpid()))
        log.info(
            "replica_listening",
            port=hello["port"],
            pid=os.getpid(),
            event_loop=loops.running_kind(),
        )
        await stop.wait()
        app[SERVICES].accepting = False
        await site.stop()
        await drain(app[TRACKER], config.server.drain_timeout_s)
    finally:
        listen.cancel()
        await asyncio.gather(listen, return_exceptions=True)
        await close_connections(
            [site] if site is not None else [], min(1.0, config.server.drain_timeout_s)
        )
        await runner.cleanup()
        writer.close()
        backstop.cancel()
    log.info("replica_stopped", pid=os.getpid())
    return 0


async def _exit_if_stuck(stop: asyncio.Event, limit_s: float) -> None:
    """A replica must never outlive its primary: once told to stop, exit within the
    drain timeout plus a grace, even if something in the shutdown hangs."""
    await stop.wait()
    await asyncio.sleep(limit_s)
    log.error("replica_stop_stuck", limit_s=limit_s, action="exiting now; task stacks follow")
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)
    os._exit(1)


class _Commands:
    """Messages from the primary: sync, config, stop; the end of the channel means stop.

    A sync runs in the follower's own task (``Follower.follow``: a model load can take a
    while; a ``stop`` meanwhile is read at once), and syncs asked for while one runs
    become one more afterwards.
    """

    def __init__(self, app: web.Application, stop: asyncio.Event) -> None:
        self._app = app
        self._stop = stop

    async def listen(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await ipc.receive(reader)
                if message[0] == "stop":
                    break
                try:
                    self._handle(message)
                except Exception:  # one bad message must not end the listening
                    log.exception("replica_message_failed", kind=message[0])
        except ipc.ChannelClosed:
            log.warning("replica_orphaned", action="stopping: the primary process is gone")
        finally:
            self._stop.set()

    def _handle(self, message: tuple[Any, ...]) -> None:
        registry = self._app.get(REGISTRY)
        if message[0] == "sync" and isinstance(registry, Follower):
            registry.request_sync()
        elif message[0] == "config" and SERVICES in self._app:
            new: Config = message[1]
            logs.configure(new.log.level, new.log.format)
            reconfigure(self._app, new)


def run(fd: int, event_loop: EventLoop) -> int:
    """Entry point of ``edge-agent replica`` (on the primary's ``[server] event_loop``)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    return loops.run(event_loop, lambda: serve_replica(fd))
