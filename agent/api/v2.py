"""KServe V2 / Open Inference Protocol REST handlers: decode, lease, infer, encode, emit.

Handlers are thin: codecs turn bytes into ``InferRequest``; the registry hands out a
leased version; its batcher runs the request; the response is encoded in the format
the client reads; a ``PredictionEvent`` goes to the side taps. The request ``id`` (or
a fresh one) is in every answer: it is the key for feedback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web

from agent import __version__
from agent.api import codec_binary, codec_json, codec_msgpack
from agent.api.middleware import json_response
from agent.api.request_head import HEADER_LENGTH
from agent.api.services import MODEL, REQUEST_ID, SERVICES, VERSION, Services
from agent.errors import AgentError, BadRequest, InferenceFailed, NotFound, UnsupportedMediaType
from agent.events import PredictionEvent
from agent.models.registry import LiveVersion
from agent.tensors import Array, InferRequest, InferResponse, binary_outputs

_MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack"})
#: Read as JSON. curl -d sends x-www-form-urlencoded; aiohttp defaults to octet-stream.
_JSON_TYPES = frozenset(
    {
        "application/json",
        "application/octet-stream",
        "text/plain",
        "application/x-www-form-urlencoded",
    }
)
_ENCODINGS = frozenset({"", "identity", "gzip", "deflate", "x-gzip"})

routes = web.RouteTableDef()


@dataclass(slots=True)
class InferCall:
    """One inference request as either HTTP path hands it over (aiohttp's handler below,
    or ``fastpath``): the route's arguments, the headers that matter, and the body.

    ``answer`` fills in ``request_id`` (the body's ``id`` wins over the header's) and
    ``served`` (the version that answered) as soon as it knows them, for the access log
    and the ``X-Request-ID`` header, error answers included.
    """

    name: str
    version: int | None
    body: bytes
    content_type: str  # the media type, lower case, without parameters
    header_length: str | None  # Inference-Header-Content-Length
    accept: str
    request_id: str
    served: int | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful inference answer, encoded."""

    body: bytes
    content_type: str
    header_length: int | None  # the binary extension's JSON header length


# Registered first: aiohttp tries the resources under /v2/models in registration order, and
# inference is nearly every request (the innermost decorator registers first).
@routes.post("/v2/models/{name}/versions/{version}/infer")
@routes.post("/v2/models/{name}/infer")
async def infer(request: web.Request) -> web.Response:
    """Run one inference request in whatever wire format it came in."""
    services = request.app[SERVICES]
    name = request.match_info["name"]
    request[MODEL] = name
    call = InferCall(
        name=name,
        version=version_arg(request.match_info.get("version")),
        body=await _read_body(request),
        content_type=request.content_type,
        header_length=request.headers.get(HEADER_LENGTH),
        accept=request.headers.get("Accept", ""),
        request_id=request[REQUEST_ID],
    )
    try:
        reply = await answer(services, call)
    finally:
        request[REQUEST_ID] = call.request_id
        if call.served is not None:
            request[VERSION] = call.served
    headers = {HEADER_LENGTH: str(reply.header_length)} if reply.header_length is not None else None
    return web.Response(body=reply.body, content_type=reply.content_type, headers=headers)


async def answer(services: Services, call: InferCall) -> Reply:
    """Decode, lease, run, count, tap and encode one inference request.

    Raises ``AgentError`` for whatever the client must change (or retry), with the
    message that says so.
    """
    start = time.perf_counter()
    decoded, reply_as = _decode(call, services.config.server.max_elements)
    if decoded.id:
        call.request_id = decoded.id
    with services.registry.lease(call.name, call.version) as live:
        call.served = live.version
        outputs = await _run(services, live, decoded)
        latency = time.perf_counter() - start
        live.stats.record(latency)
    ok, seconds = _ok_metrics(services, call.name, live.version)
    ok.inc()
    seconds.observe(latency)
    response = InferResponse(
        model_name=call.name,
        model_version=str(live.version),
        id=call.request_id,
        outputs=outputs,
        binary=binary_outputs(decoded, list(outputs)) if reply_as != "msgpack" else frozenset(),
    )
    services.on_prediction(
        PredictionEvent(
            call.request_id,
            call.name,
            live.version,
            services.clock.wall(),
            decoded.inputs,
            outputs,
            latency,
        )
    )
    return _encode(response, _reply_format(call.accept, reply_as))


@routes.get("/v2")
async def server_metadata(request: web.Request) -> web.Response:
    """Server name, version and protocol extensions."""
    return json_response(
        {
            "name": "edge-agent",
            "version": __version__,
            "extensions": ["binary_tensor_data", "msgpack", "model_repository"],
        }
    )


@routes.get("/v2/health/live")
async def live(request: web.Request) -> web.Response:
    """The process answers: it is alive."""
    return json_response({"live": True})


@routes.get("/v2/health/ready")
async def ready(request: web.Request) -> web.Response:
    """Ready when accepting and every known model has a serving version."""
    services = request.app[SERVICES]
    if services.accepting and services.registry.ready():
        return json_response({"ready": True})
    return json_response(
        {
            "ready": False,
            "error": "not ready: starting, stopping or a model has no "
            "serving version (see GET /v1/models)",
        },
        status=503,
    )


def version_arg(text: str | None) -> int | None:
    """The ``{version}`` of a route: None for the active version, else a positive integer."""
    if text is None or text == "":
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise NotFound(f"version must be a positive integer, got {text!r}")
    return int(text)


@routes.get("/v2/models/{name}")
@routes.get("/v2/models/{name}/versions/{version}")
async def model_metadata(request: web.Request) -> web.Response:
    """Inputs and outputs of the active (or named) version."""
    services = request.app[SERVICES]
    name = request.match_info["name"]
    with services.registry.lease(name, version_arg(request.match_info.get("version"))) as live:
        record = services.registry.records.get(name)
        sig = live.runner.signature
        return json_response(
            {
                "name": name,
                "versions": [str(v) for v in sorted(record.versions)] if record else [],
                "platform": "onnxruntime_onnx",
                "inputs": [
                    {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                    for s in sig.inputs
                ],
                "outputs": [
                    {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                    for s in sig.outputs
                ],
            }
        )


@routes.get("/v2/models/{name}/ready")
@routes.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: web.Request) -> web.Response:
    """200 when the model (version) can take requests now."""
    services = request.app[SERVICES]
    name = request.match_info["name"]
    with services.registry.lease(name, version_arg(request.match_info.get("version"))):
        return json_response({"name": name, "ready": True})


async def _run(services: Services, live: LiveVersion, decoded: InferRequest) -> dict[str, Array]:
    """Check the request against the version and run it; count the version's failures.

    Probation counts two kinds of failure against a version: live requests its signature
    rejects (a new version that refuses what clients send is unhealthy) and onnxruntime
    failing on an input. Client mistakes that any version would refuse (too many rows,
    text that is not UTF-8) are counted as 4xx but not held against the version.
    """
    try:
        try:
            live.runner.signature.check(decoded, live.name)
        except BadRequest:
            live.stats.fail()
            raise
        _check_rows(decoded, services.config.server.max_rows)
        wanted = (
            tuple(o.name for o in decoded.outputs)
            if decoded.outputs is not None
            else live.runner.signature.output_names
        )
        services.metrics.inflight += 1
        try:
            return await live.batcher.infer(decoded.inputs, wanted)
        except InferenceFailed:
            live.stats.fail()
            raise
        finally:
            services.metrics.inflight -= 1
    except AgentError as exc:
        services.metrics.requests.labels(live.name, str(live.version), str(int(exc.status))).inc()
        raise


def _check_rows(decoded: InferRequest, limit: int) -> None:
    rows = decoded.rows()
    if rows > limit:
        raise BadRequest(
            f"the request has {rows} rows; at most {limit} per request ([server] max_rows): "
            "split it into several requests"
        )


async def _read_body(request: web.Request) -> bytes:
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in _ENCODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send identity, gzip or deflate"
        )
    try:
        return await request.read()  # aiohttp inflates gzip/deflate within client_max_size
    except web.HTTPRequestEntityTooLarge:
        raise
    except Exception as exc:
        raise BadRequest(f"cannot read the request body ({exc}); check Content-Encoding") from exc


def _decode(call: InferCall, max_elements: int) -> tuple[InferRequest, str]:
    """Decode by the rules of SPEC section 4; returns the request and its wire format."""
    body, header = call.body, call.header_length
    if header is not None:
        length = codec_binary.parse_header_length(header)
        return codec_binary.decode_request(body, length, max_elements=max_elements), "binary"
    ctype = call.content_type
    if ctype in _MSGPACK_TYPES:
        return codec_msgpack.decode_request(body, max_elements=max_elements), "msgpack"
    if ctype in _JSON_TYPES or ctype.endswith("+json") or not ctype:
        return codec_json.decode_request(body, max_elements=max_elements), "json"
    raise UnsupportedMediaType(
        f"Content-Type {ctype!r} is not supported; send application/json, application/msgpack, "
        f"or the binary extension with the {HEADER_LENGTH} header"
    )


def _reply_format(accept: str, decoded_as: str) -> str:
    if "msgpack" in accept:
        return "msgpack"
    if "application/json" in accept and decoded_as == "msgpack":
        return "json"
    return decoded_as


def _encode(response: InferResponse, fmt: str) -> Reply:
    if fmt == "msgpack":
        return Reply(codec_msgpack.encode_response(response), "application/msgpack", None)
    body, header_length = codec_binary.encode_response(response)
    if header_length is None:
        return Reply(body, "application/json", None)
    return Reply(body, "application/octet-stream", header_length)


def _ok_metrics(services: Services, model: str, version: int) -> tuple[Any, Any]:
    """The success counter and latency histogram of a version, looked up once."""
    cache: dict[tuple[str, int], tuple[Any, Any]] = services.extras.setdefault("ok_metrics", {})
    pair = cache.get((model, version))
    if pair is None:
        if len(cache) > 256:  # versions come and go: keep the cache bounded
            cache.clear()
        m = services.metrics
        pair = (
            m.requests.labels(model, str(version), "200"),
            m.request_seconds.labels(model, str(version)),
        )
        cache[(model, version)] = pair
    return pair


__all__ = ["HTTPStatus", "routes"]
