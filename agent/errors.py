"""Every error edge-agent raises on purpose, each with the HTTP status it maps to.

This module must not import the web framework: statuses come from ``http.HTTPStatus``
and one middleware (``api.middleware``) renders them as ``{"error": message}``.

A body over ``[server] max_body_bytes`` is refused by aiohttp itself (413) and rendered
in the same shape by the middleware. The tree::

    AgentError (500: a bug, logged with the request id)
    ├── BadRequest (400)            malformed body, wrong shape, dtype or name
    ├── Unauthorized (401)          missing or wrong bearer token
    ├── Forbidden (403)             a predict token on an admin route
    ├── NotFound (404)              unknown model, version or route
    ├── UnsupportedMediaType (415)  a Content-Type we cannot decode
    ├── Unavailable (503)           not ready, draining, or overloaded (Retry-After)
    │   └── Overloaded (503)        a batch queue is full
    ├── InferenceFailed (500)       onnxruntime failed while running a model on this input
    ├── ModelLoadError (422)        a model version refused by the go-live pipeline
    └── ConfigError (not served)    the config file has problems; carries them all
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import ClassVar


class AgentError(Exception):
    """Base class: the message says what is wrong, the value, and how to fix it."""

    status: ClassVar[HTTPStatus] = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        """Extra response headers this error asks for (e.g. Retry-After)."""
        return {}


class BadRequest(AgentError):
    """The request cannot be served as sent; the client must change it."""

    status = HTTPStatus.BAD_REQUEST


class Unauthorized(AgentError):
    """No valid bearer token for this route."""

    status = HTTPStatus.UNAUTHORIZED

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="edge-agent"'}


class Forbidden(AgentError):
    """A valid token, but not for this route."""

    status = HTTPStatus.FORBIDDEN


class NotFound(AgentError):
    """Unknown model, version or route."""

    status = HTTPStatus.NOT_FOUND


class UnsupportedMediaType(AgentError):
    """The body's Content-Type or Content-Encoding is not one we read."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class Unavailable(AgentError):
    """Try again later: not ready, draining, or overloaded."""

    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class Overloaded(Unavailable):
    """A bounded queue is full; the request was not admitted."""


class InferenceFailed(AgentError):
    """onnxruntime raised while running the model: a fault of the model (counted by probation)."""


class ModelLoadError(AgentError):
    """A model version failed a step of the go-live pipeline.

    ``step`` names the step (``store``, ``session``, ``signature``, ``qa``,
    ``warmup``, ``sha256``, ``manifest``) so operators can tell at a glance.
    """

    status = HTTPStatus.UNPROCESSABLE_ENTITY

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.reason = message


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a config file: the dotted key, its line (0 if unknown), what is wrong."""

    key: str
    line: int
    message: str

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        return f"{self.key}{where}: {self.message}"


class ConfigError(AgentError):
    """The config file has one or more problems; all are reported at once."""

    def __init__(self, path: str, problems: list[ConfigProblem]) -> None:
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s)\n{lines}")
        self.path = path
        self.problems = problems
