"""The request heads the fast path serves: a strict recognizer, not an HTTP parser.

``parse_head`` reads the request line and headers of one request (without the blank
line) and returns what the fast path needs, or None for anything it is not sure of:
another route or method, a header it reads twice, a header aiohttp would refuse, a
Content-Length it would not take. None means "aiohttp's parser decides", so this module
only ever narrows what is served outside aiohttp (``fastpath``). Pure functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The inference requests' extra header (the binary extension's JSON header length).
HEADER_LENGTH = "Inference-Header-Content-Length"

#: A request head longer than this is not ours.
MAX_HEAD = 16_384
#: aiohttp's own limits (``max_line_size``, ``max_field_size``, ``max_headers``): a head
#: over them is aiohttp's to refuse.
_MAX_LINE = 8190
_MAX_HEADERS = 128
#: Control characters (a tab is allowed in values): aiohttp refuses them anywhere.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: Content-Length digits: more is not a length a server takes (and not an int Python
#: converts without a limit).
_MAX_DIGITS = 18
_ROUTE = re.compile(r"/v2/models/([A-Za-z0-9][A-Za-z0-9_.-]*)(?:/versions/([0-9]+))?/infer")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Media types the fast path decodes; aiohttp reads any other (odd) Content-Type its way.
_MEDIA = frozenset(
    {"application/json", "application/octet-stream", "application/msgpack", "application/x-msgpack"}
)
#: Headers the fast path reads: a second copy of any of them goes to aiohttp.
_READ = frozenset(
    {
        "content-length",
        "content-type",
        "content-encoding",
        "accept",
        "authorization",
        "x-request-id",
        "connection",
        HEADER_LENGTH.lower(),
    }
)
_HEADER_LENGTH = HEADER_LENGTH.lower()
#: Headers that ask for what only aiohttp does (chunked bodies, 100-continue, upgrades).
_REFUSED = frozenset({"transfer-encoding", "expect", "upgrade"})


@dataclass(slots=True)
class Head:
    """What the fast path needs from a request head it serves."""

    path: str
    name: str
    version: str | None
    length: int
    content_type: str
    header_length: str | None
    accept: str
    authorization: str
    request_id: str | None
    close: bool


def parse_head(head: bytes) -> Head | None:
    """The head (request line and headers, without the blank line) of a request the fast
    path serves, or None when aiohttp should have it."""
    if _CONTROL.search(head.replace(b"\r\n", b"")):
        return None  # a bare CR or LF, a NUL...: aiohttp's parser refuses them
    lines = head.decode("latin-1").split("\r\n")
    if len(lines) > _MAX_HEADERS + 1 or max(map(len, lines)) > _MAX_LINE:
        return None
    method, _, rest = lines[0].partition(" ")
    target, _, protocol = rest.partition(" ")
    route = _route(target) if method == "POST" and protocol == "HTTP/1.1" else None
    if route is None:
        return None
    fields = _fields(lines)
    if fields is None:
        return None
    length = fields.get("content-length", "")
    media = fields.get("content-type", "application/octet-stream").partition(";")[0]
    media = media.strip().lower()
    connection = fields.get("connection", "").lower()
    tokens = {t.strip() for t in connection.split(",")} if connection else set()
    if not (length.isascii() and length.isdigit()) or len(length) > _MAX_DIGITS:
        return None
    if media not in _MEDIA:
        return None
    if fields.get("content-encoding", "identity").lower() not in ("", "identity"):
        return None
    if "upgrade" in tokens:
        return None
    return Head(
        path=target,
        name=route[0],
        version=route[1],
        length=int(length),
        content_type=media,
        header_length=fields.get(_HEADER_LENGTH),
        accept=fields.get("accept", ""),
        authorization=fields.get("authorization", ""),
        request_id=fields.get("x-request-id") or None,
        close="close" in tokens,
    )


def _route(target: str) -> tuple[str, str | None] | None:
    """(model, version text) of an inference route written plainly, else None.

    Model names are the drop folder's (a letter or digit, then letters, digits, ``_.-``);
    a version is digits (``v2.version_arg`` answers any other text with a 404).
    """
    match = _ROUTE.fullmatch(target)
    if match is None:
        return None
    return match[1], match[2]


def _fields(lines: list[str]) -> dict[str, str] | None:
    """The headers the fast path reads, or None when one of them needs aiohttp."""
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        key = name.lower()  # Latin-1 letters never lower to ASCII: read names are tokens
        if key in _READ and colon:
            value = value.strip(" \t")
            if key in fields or not (value.isascii() and value.isprintable()):
                return None  # a second copy, or bytes aiohttp may read otherwise
            fields[key] = value
        elif key in _REFUSED or not colon or not _TOKEN.fullmatch(name):
            return None  # also obsolete line folding (a line starting with a space)
    return fields
