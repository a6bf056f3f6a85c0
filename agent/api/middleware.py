"""Cross-cutting HTTP concerns: request ids, bearer tokens, body deadline, errors, access log.

Every error a handler raises on purpose is an ``AgentError`` and becomes
``{"error": message}`` with its status and headers; aiohttp's own HTTP errors (unknown
route, wrong method, body too large) are rendered the same way; anything else is a
bug: a 500 logged with the request id and traceback. Bodies never crash the agent.

Auth: ``[auth] predict_tokens`` guard the V2 routes and ``admin_tokens`` the ``/v1``
routes; each kind is off while it has no token (list and file both empty). Admin tokens
may call every route; a predict token on an admin route is a 403. Health, server
metadata and ``/metrics`` stay open. Tokens are compared in constant time and never
logged, not even when wrong.

While the agent stops (``Services.accepting`` is False) every response carries
``Connection: close``, so keep-alive clients leave and the drain ends.

Slow clients: aiohttp closes a connection whose request head has not arrived within
``[server] keepalive_timeout_s``; this middleware gives the body the same deadline
(408 and the connection closed), so a client trickling bytes holds no handler forever.

This module must not know about models or inference beyond the request keys it logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import orjson
import structlog
from aiohttp import web

from agent.api.services import MODEL, REQUEST_ID, SERVICES, VERSION, Services
from agent.errors import AgentError, BadRequest, Forbidden, Unauthorized

log = structlog.get_logger("edge_agent.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Routes anyone may call, even with auth on: health and metadata for load balancers.
_OPEN_PREFIXES = ("/v2/health/",)
_OPEN_PATHS = frozenset({"/v2", "/v2/", "/metrics", "/openapi.json"})
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})


class RequestTracker:
    """Counts the requests being handled now, and those cut off by a shutdown."""

    def __init__(self) -> None:
        self.active = 0
        self.cancelled = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        """A request starts."""
        self.active += 1
        self._idle.clear()

    def leave(self, *, cancelled: bool = False) -> None:
        """A request ends (``cancelled``: cut off by the shutdown)."""
        self.active -= 1
        self.cancelled += cancelled
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is being handled; False if ``timeout_s`` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


#: Set by the daemon before start-up; the middleware counts requests into it when present.
TRACKER = web.AppKey("request_tracker", RequestTracker)


def json_response(doc: object, status: int = 200) -> web.Response:
    """A JSON response (orjson)."""
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


def error_response(
    status: HTTPStatus | int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The one error shape: ``{"error": message}``."""
    return web.Response(
        status=int(status),
        body=error_body(message),
        content_type="application/json",
        headers=headers,
    )


def error_body(message: str) -> bytes:
    """The body of every error answer, whichever HTTP path renders it."""
    return orjson.dumps({"error": message})


def internal_error(request_id: str) -> str:
    """The message of a 500: the bug is in the log under this request id."""
    return (
        f"internal error (request id {request_id}); this is a bug, please report "
        "it with the agent's log line for this request id"
    )


# -- auth ------------------------------------------------------------------------------------


def _tokens(services: Services) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(predict, admin) tokens: those read from the config and token files at (re)load."""
    tokens = services.extras.get("tokens")
    if tokens:
        return tokens[0], tokens[1]
    auth = services.config.auth
    return auth.predict_tokens, auth.admin_tokens


def _is_admin(path: str) -> bool:
    return path.startswith("/v1/")


def _is_open(path: str) -> bool:
    return path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES)


def _bearer(authorization: str) -> str:
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("this route needs the header 'Authorization: Bearer <token>'")
    return token


def _digest(token: str) -> bytes:
    # Equal-length digests make compare_digest's time independent of the token lengths.
    return hashlib.sha256(token.encode()).digest()


def _matches(token: str, tokens: tuple[str, ...]) -> bool:
    """True when ``token`` is one of ``tokens``; compares with all of them, no early exit."""
    given = _digest(token)
    found = False
    for candidate in tokens:
        found |= hmac.compare_digest(given, _digest(candidate))
    return found


def check_auth(request: web.Request, services: Services) -> None:
    """Raise ``Unauthorized`` (401) or ``Forbidden`` (403) unless the request may proceed."""
    predict, admin = _tokens(services)
    if predict or admin:  # else auth is off
        authorize(services, request.path, request.headers.get("Authorization", ""))


def authorize(services: Services, path: str, authorization: str) -> None:
    """``check_auth`` for a path and its ``Authorization`` header (the fast path's way in)."""
    predict, admin = _tokens(services)
    if not (predict or admin) or _is_open(path):
        return
    admin_route = _is_admin(path)
    if not (admin if admin_route else predict):
        return  # this kind of auth is off
    token = _bearer(authorization)
    if _matches(token, admin if admin_route else predict + admin):
        return
    if admin_route and _matches(token, predict):
        raise Forbidden("a predict token cannot call admin routes (/v1/...); use an admin token")
    raise Unauthorized("the bearer token is not valid for this route; check the token")


# -- body deadline ---------------------------------------------------------------------------


async def _read_body(request: web.Request, timeout_s: float) -> web.Response | None:
    """Read the whole body within ``timeout_s`` (handlers then get it from the cache).

    Returns a 408 response when the client is too slow, None when the body is in.
    """
    if request.method in _BODYLESS or not request.body_exists:
        return None
    if request.content.is_eof():
        return None  # the whole body is already here: no deadline to watch
    try:
        async with asyncio.timeout(timeout_s):
            await request.read()
    except TimeoutError:
        response = error_response(HTTPStatus.REQUEST_TIMEOUT, slow_body_message(timeout_s))
        response.force_close()  # the rest of the body may still be on its way
        return response
    except web.HTTPException:
        raise  # 413 from client_max_size: rendered by the caller
    except Exception as exc:
        raise BadRequest(
            f"cannot read the request body ({exc}); check Content-Encoding and Content-Length"
        ) from exc
    return None


def slow_body_message(timeout_s: float) -> str:
    """The 408's message: the body did not come in time."""
    return (
        f"the request body did not arrive within {timeout_s:g} s "
        "([server] keepalive_timeout_s); send the whole body at once"
    )


# -- the middleware --------------------------------------------------------------------------


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, auth, body deadline, error rendering and the access log line."""
    start = time.perf_counter()
    app = request.app
    services = app[SERVICES]
    request[REQUEST_ID] = request.headers.get("X-Request-ID") or services.new_request_id()
    tracker = app.get(TRACKER)
    if tracker is not None:
        tracker.enter()
    cancelled = False
    try:
        response = await _handle(request, handler, services)
    except asyncio.CancelledError:
        # Only a shutdown past [server] drain_timeout_s cancels handlers.
        cancelled = True
        log.warning("request_cancelled", **_fields(request), reason="shutdown drain timed out")
        raise
    finally:
        if tracker is not None:
            tracker.leave(cancelled=cancelled)
    response.headers.setdefault("X-Request-ID", request[REQUEST_ID])
    if not services.accepting:
        response.force_close()  # stopping: this connection takes no further request
    if services.config.log.access_log:
        log.info(
            "request",
            **_fields(request),
            method=request.method,
            status=response.status,
            duration_ms=round((time.perf_counter() - start) * 1000, 3),
        )
    return response


async def _handle(request: web.Request, handler: Handler, services: Services) -> web.StreamResponse:
    """Run the handler; every failure becomes an ``{"error": ...}`` response."""
    try:
        check_auth(request, services)
        timeout_s = services.config.server.keepalive_timeout_s
        too_slow = await _read_body(request, timeout_s)
        if too_slow is not None:
            return too_slow
        return await handler(request)
    except AgentError as exc:
        return error_response(exc.status, exc.message, exc.headers())
    except web.HTTPException as exc:
        return _from_http_exception(exc)
    except Exception:
        log.exception("request_failed", **_fields(request))
        return error_response(HTTPStatus.INTERNAL_SERVER_ERROR, internal_error(request[REQUEST_ID]))


def _fields(request: web.Request) -> dict[str, object]:
    """The fields every log line about a request carries."""
    return {
        "request_id": request[REQUEST_ID],
        "path": request.path,
        "model": request.get(MODEL),
        "version": request.get(VERSION),
    }


def _from_http_exception(exc: web.HTTPException) -> web.Response:
    if exc.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
        message = (
            f"request body is larger than [server] max_body_bytes; {exc.text}; "
            "send fewer rows per request or raise the limit"
        )
    elif exc.status == HTTPStatus.NOT_FOUND:
        message = "no such route; see GET /openapi.json for the routes this agent serves"
    elif exc.status == HTTPStatus.METHOD_NOT_ALLOWED:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        message = f"method not allowed here; allowed: {allowed}"
    else:
        message = exc.text or exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    return error_response(exc.status, message, headers)
