"""The fast path: inference requests answered straight off the socket, the rest by aiohttp.

aiohttp's web layer (request and response objects, header multidicts, the router, the
middleware chain, the payload writer) costs about 150 µs of Python per request on a
2-core edge server: more than a small model's whole inference, and as much as
everything the agent itself does per request. ``FastSite`` listens like
``web.TCPSite``, but every connection starts with a small protocol that recognizes the
one request that matters for throughput::

    POST /v2/models/{name}[/versions/{version}]/infer HTTP/1.1
    Content-Length: <digits>, and no Transfer-Encoding, Content-Encoding, Expect or Upgrade

and answers it with ``v2.answer``, the code aiohttp's handler runs too (decode, lease,
batch, taps, metrics, encode), with the same error bodies, ``X-Request-ID``, request
tracking and access log line. At the first request it does not recognize (another
route or method, a header it is not sure of, a body over ``[server] max_body_bytes``,
a malformed head, a missing or wrong bearer token, a model a replica cannot serve), and
for every request while the agent stops, it hands the connection over to aiohttp's own
protocol, with the bytes already received, for good. So every other route, every
error aiohttp reports about malformed HTTP, and every HTTP feature (chunked bodies,
gzip, ``Expect: 100-continue``) keep aiohttp's behaviour: the fast path only narrows.

Connections behave as aiohttp's do: keep-alive until ``[server] keepalive_timeout_s``
of idleness; pipelined requests answered in order; ``Connection: close`` honoured;
reading paused while the client does not read its answers or has sent more than one
largest request ahead. A head must arrive within ``keepalive_timeout_s`` of its first
byte (else the connection closes, as aiohttp's do) and a body within that time of its
head (else 408, as the middleware answers). ``[server] fast_path = false`` turns all of
this off.

This module knows HTTP/1.1 connections (``request_head`` reads the heads), nothing about
models.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from ssl import SSLContext
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from agent.api import v2
from agent.api.middleware import (
    TRACKER,
    authorize,
    error_body,
    internal_error,
    slow_body_message,
)
from agent.api.request_head import HEADER_LENGTH, MAX_HEAD, Head, parse_head
from agent.api.services import SERVICES, Services
from agent.errors import AgentError

log = structlog.get_logger("edge_agent.access")

_REASONS = {int(s): s.phrase for s in HTTPStatus}


class FastSite(web.BaseSite):
    """A TCP site whose connections take the fast path for inference (module docstring).

    ``handles(model)``: False sends that model's requests through aiohttp (a replica's
    lagging models, which its aiohttp routes forward to the primary).
    """

    __slots__ = ("_conns", "_handles", "_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        ssl_context: SSLContext | None = None,
        backlog: int = 128,
        reuse_port: bool = False,
        handles: Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._handles = handles
        self._conns: set[_Connection] = set()

    @property
    def name(self) -> str:
        """The site's URL, as aiohttp's sites name themselves."""
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        """Listen; every connection starts on the fast path."""
        await super().start()
        runner = self._runner
        assert isinstance(runner, web.AppRunner)
        assert runner.server is not None
        shared = _Shared(runner.app, runner.server, self._handles, self._conns)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(shared),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_port=self._reuse_port or None,
        )

    @property
    def connections(self) -> list[_Connection]:
        """The connections still on the fast path."""
        return list(self._conns)


class _Shared:
    """What every connection of a site reads: the app's services, aiohttp's protocol
    factory (for the hand-over), and the site's set of live connections."""

    __slots__ = ("app", "conns", "handles", "protocols", "services")

    def __init__(
        self,
        app: web.Application,
        protocols: web.Server,
        handles: Callable[[str], bool] | None,
        conns: set[_Connection],
    ) -> None:
        self.app = app
        self.services = app[SERVICES]
        self.protocols = protocols
        self.handles = handles
        self.conns = conns


class _Connection(asyncio.Protocol):
    """One client connection, on the fast path until it is handed to aiohttp.

    Deadlines, all ``[server] keepalive_timeout_s`` as in aiohttp: an idle connection
    closes that long after its last answer; a request head must arrive within that time
    of its first byte (else the connection closes); a body within that time of its head
    (else 408). A request counts as in flight (``RequestTracker``) from its head on, so
    the drain at shutdown waits for bodies still arriving.
    """

    def __init__(self, shared: _Shared) -> None:
        self._shared = shared
        self._loop = asyncio.get_running_loop()
        self._tracker = shared.app.get(TRACKER)
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._head: tuple[Head, int] | None = None  # parsed and tracked; its body is due
        self._task: asyncio.Task[None] | None = None
        self._serving: Head | None = None  # the head of the request the task answers
        self._tracked = False  # this connection's request counts in the RequestTracker
        self._closing = False  # close once the running request is answered
        self._writable = True
        self._reading = True
        self._gone = False  # closed, lost or handed over
        self._active = self._loop.time()  # the last answer (or the connection's start)
        self._since = self._active  # the first byte of the request now arriving
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack like them.
        self._transport = cast(asyncio.Transport, transport)
        self._shared.conns.add(self)
        self._arm(self._keepalive_s())

    def data_received(self, data: bytes) -> None:
        if not self._buf:
            self._since = self._loop.time()
        self._buf += data
        if self._task is None:
            self._advance()
        if self._reading and not self._gone and len(self._buf) > self._backlog_limit():
            self._pause_reading()  # busy, or the client does not read its answers

    def eof_received(self) -> bool | None:
        return None  # as aiohttp: the transport closes; a running request still finishes

    def connection_lost(self, exc: BaseException | None) -> None:
        self._retire()

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests too, or it
        # could pipeline up to the backlog limit (max_body_bytes) into our memory.
        self._writable = False
        if self._reading and not self._gone and self._transport is not None:
            self._pause_reading()

    def resume_writing(self) -> None:
        self._writable = True
        if self._task is None and not self._gone:
            self._advance()

    # --- requests --------------------------------------------------------------------------

    def _advance(self) -> None:
        """Start the next request if it is all here; hand over what is not ours."""
        if self._gone or not self._writable:
            return
        if not self._reading and len(self._buf) <= self._backlog_limit():
            self._resume_reading()
        if self._head is None and not self._take_head():
            return
        assert self._head is not None
        head, start = self._head
        end = start + head.length
        if len(self._buf) < end:
            return  # the body is still arriving
        if self._shared.handles is not None and not self._shared.handles(head.name):
            self._hand_over("lagging")  # became so while the body arrived; head still here
            return
        body = bytes(self._buf[start:end])
        del self._buf[:end]
        self._head = None
        self._since = self._loop.time()  # for a pipelined request already in the buffer
        self._serving = head
        self._task = self._loop.create_task(self._serve(head, body))
        self._task.add_done_callback(self._served)

    def _take_head(self) -> bool:
        """Parse the next head when it is all here; False while it is not (or not ours)."""
        end = self._buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            if len(self._buf) >= MAX_HEAD + 4:  # no room left for the blank line
                self._hand_over("head_too_long")
            return False  # the head is still arriving
        head = parse_head(bytes(self._buf[:end]))
        reason = self._refusal(head)
        if reason is not None:
            self._hand_over(reason)
            return False
        assert head is not None
        self._head = (head, end + 4)
        self._since = self._loop.time()  # the body's deadline runs from here
        if self._tracker is not None:
            self._tracker.enter()
            self._tracked = True
        return True

    def _untrack(self, *, cancelled: bool = False) -> None:
        """The tracked request ended (exactly once, whichever way)."""
        if self._tracked and self._tracker is not None:
            self._tracker.leave(cancelled=cancelled)
        self._tracked = False

    def _refusal(self, head: Head | None) -> str | None:
        """Why aiohttp must answer this request (a ``handovers`` reason), or None."""
        services = self._shared.services
        if head is None:
            return "request"
        if not services.accepting:
            return "stopping"
        if head.length > services.config.server.max_body_bytes:
            return "too_large"
        if self._shared.handles is not None and not self._shared.handles(head.name):
            return "lagging"
        try:  # before the body, as the middleware: aiohttp answers 401/403 and skips it
            authorize(services, head.path, head.authorization)
        except AgentError:
            return "unauthorized"
        return None

    async def _serve(self, head: Head, body: bytes) -> None:
        start = time.perf_counter()
        services = self._shared.services
        call = v2.InferCall(
            name=head.name,
            version=None,
            body=body,
            content_type=head.content_type,
            header_length=head.header_length,
            accept=head.accept,
            request_id=head.request_id or services.new_request_id(),
        )
        status, payload, headers = await _respond(services, head, call)
        self._untrack()
        if services.config.log.access_log:  # before the answer, as the middleware does
            _access_log(head, call.request_id, call.served, status, start)
        self._closing = head.close or not services.accepting
        self._answer(status, payload, headers, call.request_id, close=self._closing)

    def _served(self, task: asyncio.Task[None]) -> None:
        """The request's task ended: answered, cancelled (shutdown; perhaps before it
        started), or failed (a bug). The tracker is left in every case."""
        self._task = None
        head, self._serving = self._serving, None
        if task.cancelled():
            if self._tracked and head is not None:
                log.warning(
                    "request_cancelled",
                    **_log_fields(head, head.request_id),
                    reason="shutdown drain timed out",
                )
            self._untrack(cancelled=True)
            self._close()
            return
        exc = task.exception()
        if exc is not None:  # _respond answers every failure: this is a bug in this module
            log.error("fast_path_failed", exc_info=exc)
            self._untrack()
            self._abort()
            return
        if self._closing:
            self._close()
        else:
            self._advance()

    def _answer(
        self, status: int, body: bytes, headers: list[str], request_id: str, *, close: bool
    ) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # the client left; its request was still counted and tapped
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}",
            *headers,
            f"Content-Length: {len(body)}",
            f"X-Request-ID: {request_id}",
            f"Date: {_http_date()}",
            f"Server: {SERVER_SOFTWARE}",
        ]
        if close:
            lines.append("Connection: close")
        lines.append("\r\n")
        try:
            transport.write("\r\n".join(lines).encode() + body)
        except Exception:  # a bug, not the client: log it, and end the connection
            log.exception("response_failed", request_id=request_id)
            transport.abort()
        self._active = self._loop.time()

    # --- the connection's life -------------------------------------------------------------

    def _hand_over(self, reason: str) -> None:
        """Give the connection, and what it sent so far, to aiohttp for good."""
        transport = self._transport
        assert transport is not None
        self._retire()
        self._shared.services.metrics.handovers.labels(reason).inc()
        protocol = self._shared.protocols()
        if not self._reading:
            transport.resume_reading()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            protocol.data_received(data)

    def _retire(self, *, cancelled: bool = False) -> None:
        """Off the fast path for good (closed, lost, or handed over)."""
        if self._gone:
            return
        self._gone = True
        self._shared.conns.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._head is not None:  # a body that will not come now
            if cancelled:
                head = self._head[0]
                log.warning(
                    "request_cancelled",
                    **_log_fields(head, head.request_id),
                    reason="shutdown: the body had not arrived",
                )
            self._head = None
            self._untrack(cancelled=cancelled)

    def _close(self) -> None:
        self._retire()
        if self._transport is not None:
            self._transport.close()

    def _abort(self) -> None:
        """Close at once, dropping unsent answers: a close would wait to flush them, and a
        client that does not read would hold the socket for as long as it stays."""
        self._retire()
        if self._transport is not None:
            self._transport.abort()

    @property
    def writable(self) -> bool:
        """False while the transport has paused writing (the client is not reading)."""
        return self._writable

    @property
    def reading(self) -> bool:
        """False while reading is paused (answers backed up, or a full backlog)."""
        return self._reading

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The request being answered, if any."""
        return self._task

    def abandon(self) -> None:
        """Shutdown: cancel the request running (its task closes the connection when it
        ends) or arriving, and close."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            return
        self._retire(cancelled=True)
        if self._transport is not None:
            self._transport.close()

    def _keepalive_s(self) -> float:
        return self._shared.services.config.server.keepalive_timeout_s

    def _arm(self, delay_s: float) -> None:
        self._timer = self._loop.call_later(max(delay_s, 0.01), self._on_timer)

    def _on_timer(self) -> None:
        """A deadline (class docstring) may have passed: close, answer 408, or wait on."""
        self._timer = None
        if self._gone:
            return
        limit = self._keepalive_s()
        if self._task is not None:
            self._arm(limit)
            return
        if not self._writable and self._loop.time() - self._active >= limit:
            self._abort()  # the client has not read its answers for that long
            return
        waited = self._loop.time() - (self._since if self._buf or self._head else self._active)
        if waited < limit:
            self._arm(limit - waited)
        elif self._head is not None:
            self._too_slow(self._head[0], limit)
        else:
            self._close()  # idle, or a head that never completed (as aiohttp does)

    def _too_slow(self, head: Head, limit: float) -> None:
        services = self._shared.services
        request_id = head.request_id or services.new_request_id()
        if services.config.log.access_log:
            _access_log(head, request_id, None, 408, time.perf_counter())
        self._answer(408, error_body(slow_body_message(limit)), [_JSON], request_id, close=True)
        self._close()

    def _backlog_limit(self) -> int:
        """Bytes buffered beyond which reading pauses: more than one largest request."""
        return self._shared.services.config.server.max_body_bytes + MAX_HEAD + 4

    def _pause_reading(self) -> None:
        assert self._transport is not None
        self._transport.pause_reading()
        self._reading = False

    def _resume_reading(self) -> None:
        assert self._transport is not None
        self._transport.resume_reading()
        self._reading = True


async def _respond(
    services: Services, head: Head, call: v2.InferCall
) -> tuple[int, bytes, list[str]]:
    """(status, body, header lines) of the answer; failures answered as the middleware does."""
    try:
        call.version = v2.version_arg(head.version)
        reply = await v2.answer(services, call)
    except AgentError as exc:
        headers = [f"{k}: {v}" for k, v in exc.headers().items()]
        return int(exc.status), error_body(exc.message), [_JSON, *headers]
    except Exception:
        log.exception("request_failed", **_log_fields(head, call.request_id, call.served))
        return 500, error_body(internal_error(call.request_id)), [_JSON]
    headers = [f"Content-Type: {reply.content_type}"]
    if reply.header_length is not None:
        headers.append(f"{HEADER_LENGTH}: {reply.header_length}")
    return 200, reply.body, headers


_JSON = "Content-Type: application/json"


def _log_fields(head: Head, request_id: str | None, version: int | None = None) -> dict[str, Any]:
    """The fields every log line about a request carries (as the middleware's)."""
    return {"request_id": request_id, "path": head.path, "model": head.name, "version": version}


def _access_log(
    head: Head, request_id: str, version: int | None, status: int, start: float
) -> None:
    """The access log line, as the middleware writes it."""
    log.info(
        "request",
        **_log_fields(head, request_id, version),
        method="POST",
        status=status,
        duration_ms=round((time.perf_counter() - start) * 1000, 3),
    )


_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]


def tcp_site(
    runner: web.AppRunner,
    host: str,
    port: int,
    *,
    fast: bool,
    ssl_context: SSLContext | None = None,
    backlog: int = 128,
    reuse_port: bool = False,
    handles: Callable[[str], bool] | None = None,
) -> web.BaseSite:
    """The agent's listening site: ``FastSite``, or aiohttp's own with ``fast = False``
    (``[server] fast_path``)."""
    if fast:
        return FastSite(
            runner,
            host,
            port,
            ssl_context=ssl_context,
            backlog=backlog,
            reuse_port=reuse_port,
            handles=handles,
        )
    return web.TCPSite(
        runner, host, port, ssl_context=ssl_context, backlog=backlog, reuse_port=reuse_port
    )


async def close_connections(sites: list[web.BaseSite], grace_s: float) -> None:
    """At shutdown, before ``runner.cleanup()`` (which closes aiohttp's connections the
    same way): close the fast path's idle connections, give the requests still running
    ``grace_s`` to finish (the drain has waited already), then cancel them."""
    conns = [c for site in sites if isinstance(site, FastSite) for c in site.connections]
    running = [c.task for c in conns if c.task is not None]
    for conn in conns:
        if conn.task is None:
            conn.abandon()
    if running:
        await asyncio.wait(running, timeout=grace_s)
    for conn in conns:
        conn.abandon()
