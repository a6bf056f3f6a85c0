"""The shipper: one background task that sends outbox batches upstream until they are acknowledged.

Responsibilities: send when enough records wait (size) or the oldest has waited
``flush_interval_s`` (age); encode the batch document (SPEC section 10) as msgpack or JSON,
gzip it, and POST it with the batch's ``Idempotency-Key``; ack on 2xx; dead-letter on a 4xx
other than 408/429 and 401/403; otherwise retry the same batch with exponential backoff and
full jitter, honouring ``Retry-After`` on 429/503. Every outcome is logged (``outbox_batch_sent``,
``outbox_send_failed``, ``outbox_dead_letter``) and counted.

It must never raise into its caller, block the event loop (encoding and gzip run in a thread),
or give up: with the upstream down the agent keeps serving and the outbox keeps collecting.
"""

from __future__ import annotations

import asyncio
import base64
import gzip as gzip_lib
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import aiohttp
import msgpack
import orjson
import structlog

from agent import __version__
from agent.clock import Clock
from agent.upstream.outbox import Batch, Outbox

log = structlog.get_logger(__name__)

Format = Literal["msgpack", "json"]
#: 4xx answers that say nothing about the batch itself, so it is sent again later:
#: 408/429 (SPEC), and 401/403 — a wrong or expired token is the agent's configuration, and
#: dead-lettering on it would let one typo discard the whole backlog. The operator fixes
#: the token (SIGHUP) and the backlog ships; the failures are logged and counted meanwhile.
_RETRIED_4XX = frozenset({401, 403, 408, 429})

Outcome = Literal["sent", "http_retry", "rejected", "connection_error", "timeout", "error"]
OUTCOMES: tuple[Outcome, ...] = (
    "sent",
    "http_retry",
    "rejected",
    "connection_error",
    "timeout",
    "error",
)
REASON_BYTES = 512
MAX_RETRY_AFTER_S = 3_600.0
_CONTENT_TYPES: Mapping[str, str] = {"msgpack": "application/msgpack", "json": "application/json"}


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in ``[0, min(cap, base * 2**attempt)]`` (attempt counts from 0)."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 0), 64))
    return rng.uniform(0.0, ceiling)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or HTTP date), else ``None``.

    ``now`` is the wall clock in Unix seconds; a date in the past gives 0.
    """
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode("ascii")
    raise TypeError("cannot encode " + type(obj).__name__ + " as JSON")


def encode_batch(document: Mapping[str, Any], fmt: Format, compress: bool) -> bytes:
    """The batch document as msgpack or JSON bytes (bytes fields become base64 in JSON)."""
    if fmt == "json":
        body = orjson.dumps(document, default=_json_default)
    else:
        packed = msgpack.packb(document, use_bin_type=True)
        assert isinstance(packed, bytes)
        body = packed
    return gzip_lib.compress(body, compresslevel=6) if compress else body


@dataclass(frozen=True, slots=True)
class ShipResult:
    """What one send did; ``retry_in`` is set when the same batch must be sent again later."""

    outcome: Outcome | Literal["empty"]
    batch: str | None = None
    records: int = 0
    status: int | None = None
    retry_in: float | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ShipperStats:
    """Counters and gauges for metrics and status."""

    attempts: int
    outcomes: Mapping[str, int]
    sent_batches: int
    sent_records: int
    sent_bytes: int
    dead_letters: int
    consecutive_failures: int
    last_success_at: float | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    retry_after: str | None
    excerpt: str


class Shipper:
    """Sends the outbox upstream in batches from one background task."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        url: str | None,
        token: str | None,
        agent_id: str,
        clock: Clock,
        rng: random.Random,
        format: Format = "msgpack",
        gzip: bool = True,
        flush_interval_s: float = 5.0,
        max_backoff_s: float = 300.0,
        base_backoff_s: float = 0.5,
        batch_max_records: int = 500,
        batch_max_bytes: int = 1_000_000,
        timeout_s: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        session_factory: Callable[[], aiohttp.ClientSession] = aiohttp.ClientSession,
    ) -> None:
        self._outbox = outbox
        self._url = url
        self._token = token
        self._agent_id = agent_id
        self._clock = clock
        self._rng = rng
        self._format: Format = format
        self._gzip = gzip
        self._flush_interval_s = flush_interval_s
        self._max_backoff_s = max_backoff_s
        self._base_backoff_s = base_backoff_s
        self._max_records = batch_max_records
        self._max_bytes = batch_max_bytes
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._sleep = sleep
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._sent = [0, 0, 0]  # batches, records, wire bytes
        self._failures = 0
        self._last_success_at: float | None = None
        self._last_error: str | None = None

    def update_token(self, token: str | None) -> None:
        """Use a new bearer token from the next send on (SIGHUP)."""
        self._token = token

    def start(self) -> None:
        """Start the background task (no task when no upstream ``url`` is configured)."""
        if self._url is None:
            log.info("upstream_disabled", reason="no [upstream] url; the outbox keeps collecting")
            return
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="upstream-shipper")

    async def stop(self, *, flush_timeout_s: float = 0.0) -> None:
        """Stop the task, then optionally try to send what is left, then close the session."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() neither raises the task's error nor hides a cancellation of stop() itself.
            await asyncio.wait({task})
            _log_end(task)
        try:
            if flush_timeout_s > 0:
                await self.flush(flush_timeout_s)
        finally:
            session, self._session = self._session, None
            if session is not None:
                await session.close()

    async def flush(self, timeout_s: float) -> bool:
        """Send everything now, retrying within ``timeout_s``; True when the outbox is empty."""
        if self._url is None:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                for _ in range(1_000_000):  # bounded by the timeout; the count is a backstop
                    result = await self._ship_guarded()
                    if result.outcome == "empty":
                        return True
                    if result.retry_in is not None:
                        await self._sleep(result.retry_in)
        except TimeoutError:
            pass
        left = self._outbox.stats().total_records
        log.warning("outbox_flush_incomplete", records_left=left, timeout_s=timeout_s)
        return False

    def stats(self) -> ShipperStats:
        """A snapshot of the send counters."""
        return ShipperStats(
            attempts=sum(self._outcomes.values()),
            outcomes=dict(self._outcomes),
            sent_batches=self._sent[0],
            sent_records=self._sent[1],
            sent_bytes=self._sent[2],
            dead_letters=self._outcomes["rejected"],
            consecutive_failures=self._failures,
            last_success_at=self._last_success_at,
            last_error=self._last_error,
        )

    # -- the background loop -------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            emptied = await self._drain_due()
            # After finding nothing to send, always wait: counters that claim otherwise
            # must not turn this loop into a spin.
            await self._idle(wait_even_if_due=emptied)

    async def _drain_due(self) -> bool:
        """Once something is due, send until the outbox is empty (True), retrying as told."""
        draining = False
        while draining or self._due():
            draining = True
            result = await self._ship_guarded()
            if result.outcome == "empty":
                return True
            if result.retry_in is not None:
                await self._sleep(result.retry_in)
        return False

    def _due(self) -> bool:
        stats = self._outbox.stats()
        return (
            stats.pending_batches > 0
            or stats.total_records >= self._max_records
            or stats.total_bytes >= self._max_bytes
            or (stats.total_records > 0 and stats.oldest_age_s >= self._flush_interval_s)
        )

    async def _idle(self, *, wait_even_if_due: bool) -> None:
        """Wait until the oldest record is due, or until new records arrive."""
        event = self._outbox.put_event
        event.clear()
        if self._due() and not wait_even_if_due:
            return
        stats = self._outbox.stats()
        delay = self._flush_interval_s - (stats.oldest_age_s if stats.total_records else 0.0)
        delay = delay if delay > 0 else self._flush_interval_s
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waiter = asyncio.create_task(event.wait())
        try:
            await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waiter.cancel()
            await asyncio.gather(sleeper, waiter, return_exceptions=True)

    # -- one send ------------------------------------------------------------------------

    async def _ship_guarded(self) -> ShipResult:
        """``ship_once`` that turns any unexpected error into a logged retry."""
        try:
            return await self.ship_once()
        except Exception as exc:  # the shipper must never die: it logs, backs off and retries
            delay = self._next_delay(None)
            self._count("error", repr(exc))
            log.exception("outbox_send_failed", reason=repr(exc), outcome="error", retry_in=delay)
            return ShipResult(outcome="error", retry_in=delay, reason=repr(exc))

    async def ship_once(self) -> ShipResult:
        """Lease the oldest batch, send it once, and ack, dead-letter or schedule a retry."""
        async with self._lock:
            batch = await self._outbox.lease_batch(self._max_records, self._max_bytes)
            if batch is None:
                return ShipResult(outcome="empty")
            body = await asyncio.to_thread(self._encode, batch)
            reply = await self._post(batch.key, body)
            if isinstance(reply, _Reply):
                return await self._settle(batch, reply, len(body))
            return self._retry(batch, reply)

    def _encode(self, batch: Batch) -> bytes:
        document = {
            "agent": self._agent_id,
            "batch": batch.key,
            "sent_at": self._clock.wall(),
            "records": list(batch.records),
        }
        return encode_batch(document, self._format, self._gzip)

    async def _post(self, key: str, body: bytes) -> _Reply | tuple[Outcome, str]:
        """POST once; the reply, or the failure outcome and its reason."""
        assert self._url is not None
        if self._session is None:
            self._session = self._session_factory()
        try:
            async with self._session.post(
                self._url,
                data=body,
                headers=self._headers(key),
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                excerpt = await resp.content.read(REASON_BYTES)
                text = excerpt.decode("utf-8", "replace")
                return _Reply(resp.status, resp.headers.get("Retry-After"), text)
        except TimeoutError:
            return "timeout", "no answer within " + str(self._timeout.total) + " s"
        except (aiohttp.ClientError, OSError) as exc:
            return "connection_error", repr(exc)

    def _headers(self, key: str) -> dict[str, str]:
        headers = {
            "Content-Type": _CONTENT_TYPES[self._format],
            "Idempotency-Key": key,
            "User-Agent": "edge-agent/" + __version__,
        }
        if self._gzip:
            headers["Content-Encoding"] = "gzip"
        if self._token:
            headers["Authorization"] = "Bearer " + self._token
        return headers

    async def _settle(self, batch: Batch, reply: _Reply, size: int) -> ShipResult:
        status = reply.status
        if 200 <= status < 300:
            await self._outbox.ack(batch.key)
            self._on_success(len(batch.records), size)
            log.info(
                "outbox_batch_sent",
                batch=batch.key,
                records=len(batch.records),
                bytes=size,
                status=status,
            )
            return ShipResult(
                outcome="sent", batch=batch.key, records=len(batch.records), status=status
            )
        if 400 <= status < 500 and status not in _RETRIED_4XX:
            await self._outbox.dead_letter(batch.key, status, reply.excerpt)
            self._failures = 0
            self._count("rejected", "HTTP " + str(status))
            log.error(
                "outbox_dead_letter",
                batch=batch.key,
                records=len(batch.records),
                status=status,
                reason=reply.excerpt,
            )
            return ShipResult(
                outcome="rejected", batch=batch.key, status=status, reason=reply.excerpt
            )
        retry_after = None
        if status in (429, 503):
            retry_after = parse_retry_after(reply.retry_after, self._clock.wall())
        reason = "HTTP " + str(status) + ": " + reply.excerpt
        return self._retry(batch, ("http_retry", reason), status, retry_after)

    def _retry(
        self,
        batch: Batch,
        failure: tuple[Outcome, str],
        status: int | None = None,
        retry_after: float | None = None,
    ) -> ShipResult:
        outcome, reason = failure
        delay = self._next_delay(retry_after)
        self._count(outcome, reason)
        log.warning(
            "outbox_send_failed",
            batch=batch.key,
            outcome=outcome,
            status=status,
            reason=reason,
            retry_in=delay,
            failures=self._failures,
        )
        return ShipResult(
            outcome=outcome, batch=batch.key, status=status, retry_in=delay, reason=reason
        )

    def _next_delay(self, retry_after: float | None) -> float:
        if retry_after is not None:
            delay = min(retry_after, MAX_RETRY_AFTER_S)
        else:
            delay = backoff_delay(
                self._failures, self._base_backoff_s, self._max_backoff_s, self._rng
            )
        self._failures += 1
        return delay

    def _count(self, outcome: Outcome, reason: str) -> None:
        self._outcomes[outcome] += 1
        if outcome != "sent":
            self._last_error = reason

    def _on_success(self, records: int, size: int) -> None:
        self._count("sent", "")
        self._failures = 0
        self._last_success_at = self._clock.wall()
        self._sent[0] += 1
        self._sent[1] += records
        self._sent[2] += size


def _log_end(task: asyncio.Task[None]) -> None:
    """Say how the background task ended."""
    if task.cancelled():
        log.info("shipper_stopped", how="cancelled")
    elif (exc := task.exception()) is not None:
        log.error("shipper_stopped", how="crashed", error=repr(exc))
    else:
        log.info("shipper_stopped", how="returned")
