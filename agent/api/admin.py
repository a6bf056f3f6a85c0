"""The /v1 admin API: models and their versions, rollback, rescan, and /metrics.

Thin handlers over the registry; every state change goes through the registry's own
validate-and-swap path. Later components (drift, feedback) add their routes in their
own modules.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from aiohttp import web

from agent import __version__
from agent.api.middleware import json_response
from agent.api.services import SERVICES, Services
from agent.errors import BadRequest, NotFound, Unavailable
from agent.models.registry import ModelEntry

routes = web.RouteTableDef()


async def read_json_object(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The request body as a JSON object; an empty body is ``{}`` when ``optional``."""
    body = await request.read()
    if not body.strip() and optional:
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON ({exc}); send a JSON object") from exc
    if not isinstance(doc, dict):
        raise BadRequest(f"expected a JSON object, got {type(doc).__name__}")
    return doc


def describe_model(services: Services, entry: ModelEntry) -> dict[str, Any]:
    """One model as ``GET /v1/models`` shows it."""
    record = services.registry.records.get(entry.name)
    live = entry.active
    now = services.clock.monotonic()
    return {
        "name": entry.name,
        "state": entry.state,
        "active_version": live.version if live else None,
        "versions": [
            {
                "version": v,
                "sha256": rec.sha256,
                "accepted_at": rec.accepted_at,
                "source": rec.source,
                "active": live is not None and v == live.version,
            }
            for v, rec in sorted(record.versions.items())
        ]
        if record
        else [],
        "pinned": record.pinned if record else False,
        "bad": [{"sha256": sha, "reason": why} for sha, why in record.bad.items()]
        if record
        else [],
        "last_error": entry.last_error,
        "loaded_at": live.loaded_at if live else None,
        "load_s": round(live.load_s, 4) if live else None,
        "probation_remaining_s": round(max(0.0, entry.probation_until - now), 1)
        if entry.probation_until is not None
        else None,
        "requests": live.stats.requests if live else 0,
        "errors": live.stats.errors if live else 0,
        "queue_depth": live.batcher.queue_depth if live else 0,
        "batching": live.runner.signature.batchable and services.config.batching.enabled
        if live
        else None,
        "history": list(record.history) if record else [],
        **{key: fn(entry.name) for key, fn in services.extras.get("model_details", {}).items()},
    }


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """Every model: active version, stored versions, state, errors, probation, history."""
    services = request.app[SERVICES]
    models = [describe_model(services, e) for _, e in sorted(services.registry.models.items())]
    drop_dir = {
        "path": str(services.config.models.dir),
        "error": services.extras.get("drop_dir_error"),
    }
    extra = {key: fn() for key, fn in services.extras.get("status_sections", {}).items()}
    return json_response({"models": models, "drop_dir": drop_dir, **extra})


@routes.get("/v1/models/{name}")
async def get_model(request: web.Request) -> web.Response:
    """One model, as in ``GET /v1/models``."""
    services = request.app[SERVICES]
    entry = services.registry.models.get(request.match_info["name"])
    if entry is None:
        raise NotFound(f'unknown model "{request.match_info["name"]}"; see GET /v1/models')
    return json_response(describe_model(services, entry))


@routes.post("/v1/models/{name}/rollback")
async def rollback(request: web.Request) -> web.Response:
    """Activate an earlier version (default: the previous one) through validate-and-swap."""
    services = request.app[SERVICES]
    doc = await read_json_object(request, optional=True)
    version = doc.get("version")
    if version is not None and (
        not isinstance(version, int) or isinstance(version, bool) or version < 1
    ):
        raise BadRequest(f'"version" must be a positive integer, got {version!r}')
    name = request.match_info["name"]
    live = await services.registry.rollback(name, version, reason="operator rollback")
    services.metrics.rollbacks.labels(name, "operator").inc()
    return json_response({"model": name, "active_version": live.version})


@routes.post("/v1/reload")
async def reload(request: web.Request) -> web.Response:
    """Rescan the drop directory now (catches what file events missed)."""
    services = request.app[SERVICES]
    if services.rescan is None:
        raise NotFound("rescanning is not available in this process")
    return json_response(await services.rescan())


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = request.app[SERVICES].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


@routes.post("/v1/feedback")
async def feedback(request: web.Request) -> web.Response:
    """Ground truth for earlier predictions; answers once the joined records are durable."""
    services = request.app[SERVICES]
    if services.feedback is None:
        raise Unavailable("feedback is not available while the agent starts or stops; retry")
    doc = await read_json_object(request)
    return json_response(await services.feedback.submit(doc))


@routes.get("/v1/models/{name}/drift")
async def drift(request: web.Request) -> web.Response:
    """The drift report of a model's active version (``?window=deploy|current``)."""
    services = request.app[SERVICES]
    query = request.query.get("window", "deploy")
    if query not in ("deploy", "current"):
        raise BadRequest(f"window must be deploy or current, got {query!r}")
    window: Literal["deploy", "current"] = "current" if query == "current" else "deploy"
    if services.drift is None:
        raise NotFound("drift monitoring is off ([drift] enabled = false)")
    return json_response(services.drift.report(request.match_info["name"], window))


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """A minimal OpenAPI 3.1 document: every route and method this agent serves."""
    paths: dict[str, dict[str, Any]] = {}
    for route in request.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if not path or route.method == "HEAD":
            continue
        doc = (getattr(route.handler, "__doc__", None) or "").strip().splitlines()
        paths.setdefault(path, {})[route.method.lower()] = {
            "summary": doc[0] if doc else "",
            "responses": {
                "200": {"description": "OK"},
                "default": {"description": 'Error: {"error": "<what and how to fix>"}'},
            },
        }
    return json_response(
        {
            "openapi": "3.1.0",
            "info": {"title": "edge-agent", "version": __version__},
            "paths": dict(sorted(paths.items())),
        }
    )
