"""Cross-cutting HTTP concerns: request ids, bearer tokens, error rendering, access log.

Every error a handler raises on purpose is an ``AgentError`` and becomes
``{"error": message}`` with its status and headers; aiohttp's own HTTP errors (unknown
route, wrong method, body too large) are rendered the same way; anything else is a
bug: a 500 logged with the request id and traceback. Bodies never crash the agent.
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import orjson
import structlog
from aiohttp import web

from agent.api.services import MODEL, REQUEST_ID, SERVICES, VERSION
from agent.errors import AgentError, Forbidden, Unauthorized

log = structlog.get_logger("edge_agent.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Routes anyone may call, even with auth on: health and metadata for load balancers.
_OPEN_PREFIXES = ("/v2/health/",)
_OPEN_PATHS = frozenset({"/v2", "/v2/", "/metrics", "/openapi.json"})


def error_response(
    status: HTTPStatus | int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The one error shape: ``{"error": message}``."""
    return web.Response(
        status=int(status),
        body=orjson.dumps({"error": message}),
        content_type="application/json",
        headers=headers,
    )


def _is_admin(path: str) -> bool:
    return path.startswith("/v1/")


def _check_auth(request: web.Request) -> None:
    auth = request.app[SERVICES].config.auth
    tokens = request.app[SERVICES].extras.get("tokens")
    predict, admin = tokens if tokens else (auth.predict_tokens, auth.admin_tokens)
    if not predict and not admin:
        return
    path = request.path
    if path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("this route needs 'Authorization: Bearer <token>'")
    is_admin = _matches(token, admin)
    if _is_admin(path):
        if is_admin:
            return
        if _matches(token, predict):
            raise Forbidden("a predict token cannot call admin routes; use an admin token")
        raise Unauthorized("the bearer token is not valid for this route")
    if not (is_admin or _matches(token, predict) or not predict):
        raise Unauthorized("the bearer token is not valid for this route")


def _matches(token: str, tokens: tuple[str, ...]) -> bool:
    given = token.encode()
    found = False
    for candidate in tokens:  # compare with every token: no early exit, constant time each
        found |= hmac.compare_digest(given, candidate.encode())
    return found


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, auth, error rendering and the access log line for every request."""
    start = time.perf_counter()
    request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    try:
        _check_auth(request)
        response = await handler(request)
    except AgentError as exc:
        response = error_response(exc.status, exc.message, exc.headers())
    except web.HTTPException as exc:
        response = _from_http_exception(exc)
    except Exception:
        log.exception(
            "request_failed",
            request_id=request_id,
            path=request.path,
            model=request.get(MODEL),
            version=request.get(VERSION),
        )
        response = error_response(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            f"internal error (request id {request_id}); this is a bug, please report it "
            "with the agent's log line for this request id",
        )
    response.headers.setdefault("X-Request-ID", request.get(REQUEST_ID, request_id))
    if request.app[SERVICES].config.log.access_log:
        log.info(
            "request",
            request_id=request.get(REQUEST_ID, request_id),
            method=request.method,
            path=request.path,
            status=response.status,
            model=request.get(MODEL),
            version=request.get(VERSION),
            duration_ms=round((time.perf_counter() - start) * 1000, 3),
        )
    return response


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
