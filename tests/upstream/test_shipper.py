"""The shipper against the real reference collector on 127.0.0.1: batches, retries, dead letters."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import load_collector
from structlog.testing import capture_logs

from agent.clock import ManualClock
from agent.upstream.outbox import Kind, Outbox, OutboxRecord
from agent.upstream.shipper import Shipper, backoff_delay, parse_retry_after

TOKEN = "s3cret"
AGENT = "edge-test-1"


class Upstream:
    """The running collector and a client to query and steer it."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.batches_url = url + "/v1/batches"
        self._http = http
        self._auth = {"Authorization": "Bearer " + TOKEN}

    async def fail(self, status: int, count: int, **extra: Any) -> None:
        """Make the next ``count`` batch POSTs answer ``status``."""
        body = {"status": status, "count": count, **extra}
        async with self._http.post(self.url + "/v1/_fail", json=body, headers=self._auth) as r:
            assert r.status == 200

    async def records(self, kind: str = "") -> list[dict[str, Any]]:
        """Every stored record (with agent and batch), oldest first."""
        params = {"limit": "10000", **({"kind": kind} if kind else {})}
        async with self._http.get(self.url + "/v1/records", params=params, headers=self._auth) as r:
            assert r.status == 200
            return list((await r.json())["records"])


class FakeSleep:
    """An async sleep that records each delay and moves the manual clock instead of waiting."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.clock.advance(seconds)
        await asyncio.sleep(0.001)


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[Upstream]:
    """The reference collector on an ephemeral port, with one accepted token."""
    collector = load_collector()
    runner, url = await collector.start_collector(tmp_path / "collector.db", [TOKEN])
    async with aiohttp.ClientSession() as http:
        yield Upstream(url, http)
    await runner.cleanup()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def outbox(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db", max_bytes=50_000_000, clock=clock)
    await box.open()
    yield box
    await box.close()


MakeShipper = Callable[..., Shipper]


@pytest.fixture
async def make_shipper(
    upstream: Upstream, clock: ManualClock
) -> AsyncIterator[Callable[..., Shipper]]:
    """Shippers pointed at the collector with a fake sleep; all are stopped at teardown."""
    made: list[Shipper] = []

    def make(outbox: Outbox, **kw: Any) -> Shipper:
        options: dict[str, Any] = {
            "url": upstream.batches_url,
            "token": TOKEN,
            "agent_id": AGENT,
            "clock": clock,
            "rng": random.Random(7),
            "sleep": FakeSleep(clock),
            "timeout_s": 5.0,
            **kw,
        }
        shipper = Shipper(outbox, **options)
        made.append(shipper)
        return shipper

    yield make
    for shipper in made:
        await shipper.stop()


def records(n: int, kind: Kind = "feedback", start: int = 0) -> list[OutboxRecord]:
    return [
        OutboxRecord(kind, 1_800_000_000.0 + i, "iris", 2, {"seq": i, "label": i % 3})
        for i in range(start, start + n)
    ]


async def wait_until(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    """Poll ``check`` every 20 ms for at most ``seconds``."""
    for _ in range(int(seconds / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met within " + str(seconds) + " s")


class TestBackoff:
    def test_full_jitter_within_bounds(self) -> None:
        """Each delay lies in [0, min(cap, base * 2**attempt)]."""
        rng = random.Random(1)
        for attempt in range(40):
            delay = backoff_delay(attempt, 0.5, 60.0, rng)
            assert 0.0 <= delay <= min(60.0, 0.5 * 2**attempt)

    def test_huge_attempt_is_capped(self) -> None:
        """An attempt count far past the cap neither overflows nor exceeds the cap."""
        assert 0.0 <= backoff_delay(10_000, 0.5, 30.0, random.Random(2)) <= 30.0

    def test_retry_after_seconds(self) -> None:
        """A delta-seconds Retry-After is read as seconds."""
        assert parse_retry_after("7", 0.0) == 7.0

    def test_retry_after_http_date(self) -> None:
        """An HTTP-date Retry-After is read relative to now."""
        now = 1_800_000_000.0
        assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == pytest.approx(30.0)

    @pytest.mark.parametrize("value", [None, "", "soon", "nan", "-"])
    def test_retry_after_garbage(self, value: str | None) -> None:
        """An unreadable Retry-After is ignored."""
        assert parse_retry_after(value, 0.0) is None

    async def test_retries_back_off_within_bounds(
        self, make_shipper: MakeShipper, outbox: Outbox, upstream: Upstream
    ) -> None:
        """Against five 500s, each delay is within its full-jitter bound, then the batch lands."""
        await upstream.fail(500, 5)
        await outbox.put_many(records(3))
        shipper = make_shipper(outbox, base_backoff_s=0.5, max_backoff_s=4.0)
        assert await shipper.flush(10.0)
        delays = shipper._sleep.delays  # type: ignore[attr-defined]
        assert len(delays) == 5
        for attempt, delay in enumerate(delays):
            assert 0.0 <= delay <= min(4.0, 0.5 * 2**attempt)
        assert len(await upstream.records()) == 3
        assert shipper.stats().outcomes["http_retry"] == 5


class TestSending:
    @pytest.mark.parametrize(("fmt", "gzip"), [("msgpack", True), ("json", False), ("json", True)])
    async def test_batch_lands_with_its_fields(
        self, make_shipper: MakeShipper, outbox: Outbox, upstream: Upstream, fmt: str, gzip: bool
    ) -> None:
        """Records arrive with kind, ts, model, version and payload, under our agent id."""
        await outbox.put_many(records(2) + records(1, "drift", start=2))
        shipper = make_shipper(outbox, format=fmt, gzip=gzip)
        with capture_logs() as logs:
            assert await shipper.flush(10.0)
        stored = await upstream.records()
        assert [s["record"] for s in stored] == [
            {
                "kind": "feedback",
                "ts": 1_800_000_000.0,
                "model": "iris",
                "version": 2,
                "seq": 0,
                "label": 0,
            },
            {
                "kind": "feedback",
                "ts": 1_800_000_001.0,
                "model": "iris",
                "version": 2,
                "seq": 1,
                "label": 1,
            },
            {
                "kind": "drift",
                "ts": 1_800_000_002.0,
                "model": "iris",
                "version": 2,
                "seq": 2,
                "label": 2,
            },
        ]
        assert {s["agent"] for s in stored} == {AGENT}
        assert outbox.stats().total_records == 0
        assert [e["records"] for e in logs if e["event"] == "outbox_batch_sent"] == [3]

    async def test_batches_split_by_record_count(
        self, make_shipper: MakeShipper, outbox: Outbox, upstream: Upstream
    ) -> None:
        """batch_max_records splits the outbox into batches with distinct keys."""
        await outbox.put_many(records(7))
        shipper = make_shipper(outbox, batch_max_records=3)
        assert await shipper.flush(10.0)
        stored = await upstream.records()
        assert [s["record"]["seq"] for s in stored] == list(range(7))
        assert len({s["batch"] for s in stored}) == 3
        assert shipper.stats().sent_batches == 3

    async def test_retry_after_is_honoured(
        self, make_shipper: MakeShipper, outbox: Outbox, upstream: Upstream
    ) -> None:
        """A 503 with Retry-After: 7 waits exactly 7 s before the resend."""
        await upstream.fail(503, 1, retry_after=7)
        await outbox.put_many(records(1))
        shipper = make_shipper(outbox)
        assert await shipper.flush(10.0)
        assert shipper._sleep.delays == [7.0]  # type: ignore[attr-defined]
        assert len(await upstream.records()) == 1

    async def test_retry_after_date_is_honoured(
        self, make_shipper: MakeShipper, outbox: Outbox, upstream: Upstream, clock: ManualClock
    ) -> None:
        """A 429 with an HTTP-date Retry-After waits until that date on our wall clock."""
        await upstream.fail(429, 1, retry_after=formatdate(clock.wall() + 12, usegmt=True))
        await outbox.put_many(records(1))
        shipper = make_shipper(outbox)
        assert await shipper.flush(10.0)
        assert shipper._sleep.delays == [pytest.approx(12.0)]  # type: ignore[attr-defined]

    async def test_400_is_dead_lettered_and_later_batches_go(
        self, make_shipper: MakeShipper, outbox: Outbox, upstream: Upstream
    ) -> None:
        """A 400 moves its batch to dead letters with the reason; the next batch is still sent."""
        await upstream.fail(400, 1)
        await outbox.put_many(records(4))
        shipper = make_shipper(outbox, batch_max_records=2)
        with capture_logs() as logs:
            assert await shipper.flush(10.0)
        assert [s["record"]["seq"] for s in await upstream.records()] == [2, 3]
        letters = await outbox.dead_letters()
        assert sorted(d["record"]["seq"] for d in letters) == [0, 1]
        assert {d["status"] for d in letters} == {400}
        assert all("injected failure" in d["reason"] for d in letters)
        dead = [e for e in logs if e["event"] == "outbox_dead_letter"]
        assert len(dead) == 1
        assert dead[0]["status"] == 400
        assert shipper.stats().dead_letters == 1

    async def test_same_key_after_reopen_mid_batch(
        self, make_shipper: MakeShipper, tmp_path: Path, clock: ManualClock, upstream: Upstream
    ) -> None:
        """A batch leased before a crash is sent after restart under the key it was given."""
        path = tmp_path / "crash.db"
        first = Outbox(path, max_bytes=1_000_000, clock=clock)
        await first.open()
        await first.put_many(records(3))
        leased = await first.lease_batch(100, 1_000_000)
        assert leased is not None
        await first.close()  # crash: never acked
        second = Outbox(path, max_bytes=1_000_000, clock=clock)
        await second.open()
        try:
            assert await make_shipper(second).flush(10.0)
        finally:
            await second.close()
        assert {s["batch"] for s in await upstream.records()} == {leased.key}

    async def test_reply_lost_then_crash_stores_once(
        self, make_shipper: MakeShipper, tmp_path: Path, clock: ManualClock, upstream: Upstream
    ) -> None:
        """Sent and stored, reply lost, process dies: the resend is a duplicate, stored once."""
        await upstream.fail(503, 1, after_store=True, retry_after=0)
        path = tmp_path / "lost.db"
        first = Outbox(path, max_bytes=1_000_000, clock=clock)
        await first.open()
        await first.put_many(records(3))
        result = await make_shipper(first).ship_once()
        assert (result.outcome, result.status) == ("http_retry", 503)
        await first.close()
        second = Outbox(path, max_bytes=1_000_000, clock=clock)
        await second.open()
        try:
            assert await make_shipper(second).flush(10.0)
            assert second.stats().total_records == 0
        finally:
            await second.close()
        assert [s["record"]["seq"] for s in await upstream.records()] == [0, 1, 2]


class TestUpstreamDown:
    async def test_connection_refused_is_a_logged_retry(
        self, outbox: Outbox, clock: ManualClock
    ) -> None:
        """With nothing listening, a send is counted and logged as a retry; records stay."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        shipper = Shipper(
            outbox,
            url="http://127.0.0.1:" + str(port) + "/v1/batches",
            token=None,
            agent_id=AGENT,
            clock=clock,
            rng=random.Random(3),
            sleep=FakeSleep(clock),
        )
        await outbox.put_many(records(2))
        try:
            with capture_logs() as logs:
                result = await shipper.ship_once()
        finally:
            await shipper.stop()
        assert result.outcome == "connection_error"
        assert result.retry_in is not None
        assert [e["outcome"] for e in logs if e["event"] == "outbox_send_failed"] == [
            "connection_error"
        ]
        assert outbox.stats().total_records == 2

    async def test_slow_upstream_times_out_and_retries(
        self, outbox: Outbox, clock: ManualClock
    ) -> None:
        """An upstream that never answers within timeout_s counts as a timeout, to retry."""
        release = asyncio.Event()

        async def hang(request: web.Request) -> web.Response:
            await release.wait()
            return web.Response()

        app = web.Application()
        app.router.add_post("/v1/batches", hang)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        shipper = Shipper(
            outbox,
            url="http://" + host + ":" + str(port) + "/v1/batches",
            token=None,
            agent_id=AGENT,
            clock=clock,
            rng=random.Random(3),
            timeout_s=0.2,
        )
        await outbox.put_many(records(1))
        try:
            result = await shipper.ship_once()
        finally:
            release.set()
            await shipper.stop()
            await runner.cleanup()
        assert result.outcome == "timeout"
        assert shipper.stats().outcomes["timeout"] == 1

    async def test_without_url_the_outbox_keeps_collecting(
        self, outbox: Outbox, clock: ManualClock
    ) -> None:
        """With no upstream url, start() runs no task and records stay in the outbox."""
        shipper = Shipper(
            outbox, url=None, token=None, agent_id=AGENT, clock=clock, rng=random.Random(1)
        )
        shipper.start()
        await outbox.put_many(records(2))
        assert not await shipper.flush(1.0)
        await shipper.stop()
        assert outbox.stats().total_records == 2


class TestBackgroundTask:
    async def test_sends_when_the_oldest_record_is_due(
        self, make_shipper: MakeShipper, outbox: Outbox, upstream: Upstream
    ) -> None:
        """The task sends a lone record once it has waited flush_interval_s, and stops cleanly."""
        shipper = make_shipper(outbox, flush_interval_s=5.0)
        shipper.start()
        await outbox.put_many(records(1))

        async def landed() -> bool:
            return len(await upstream.records()) == 1

        await wait_until(landed)
        with capture_logs() as logs:
            await shipper.stop()
        assert [e.get("how") for e in logs if e["event"] == "shipper_stopped"] == ["cancelled"]

    async def test_sends_when_a_batch_is_full(
        self, make_shipper: MakeShipper, outbox: Outbox, upstream: Upstream
    ) -> None:
        """With an hour-long interval and real sleep, a full batch is sent at once."""
        shipper = make_shipper(
            outbox, flush_interval_s=3_600.0, batch_max_records=5, sleep=asyncio.sleep
        )
        shipper.start()
        await outbox.put_many(records(5))

        async def landed() -> bool:
            return len(await upstream.records()) == 5

        await wait_until(landed)
        await outbox.put_many(records(1, start=5))
        await asyncio.sleep(0.2)
        assert len(await upstream.records()) == 5  # a lone record waits for its interval

    async def test_keeps_retrying_through_an_outage(
        self, make_shipper: MakeShipper, outbox: Outbox, upstream: Upstream
    ) -> None:
        """Through ten 503s the task keeps retrying and delivers everything afterwards."""
        await upstream.fail(503, 10)
        shipper = make_shipper(outbox, flush_interval_s=1.0)
        shipper.start()
        await outbox.put_many(records(4))

        async def landed() -> bool:
            return len(await upstream.records()) == 4

        await wait_until(landed)
        assert shipper.stats().outcomes["http_retry"] == 10

    async def test_stop_flushes_what_is_left(
        self, make_shipper: MakeShipper, outbox: Outbox, upstream: Upstream
    ) -> None:
        """stop(flush_timeout_s=...) sends the records still waiting."""
        shipper = make_shipper(outbox, flush_interval_s=3_600.0, sleep=asyncio.sleep)
        shipper.start()
        await outbox.put_many(records(3))
        await shipper.stop(flush_timeout_s=10.0)
        assert len(await upstream.records()) == 3
