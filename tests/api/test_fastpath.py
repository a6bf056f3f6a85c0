"""The fast path (agent/api/fastpath.py) on real servers, over raw sockets.

Two agents serve the same model: one with ``[server] fast_path = true`` (the default),
one with it off (aiohttp serves everything). The same bytes must get the same answer
from both; what the fast path does not serve must reach aiohttp with nothing lost; and
its connections must keep aiohttp's rules (keep-alive, deadlines, pipelining, close).
Every test runs on both event loops ``[server] event_loop`` offers: the standard
library's and uvloop, whose transports are another implementation of the same API.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import modelgen
import msgpack
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from conftest import Agent, MakeAgent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api.request_head import MAX_HEAD, parse_head
from agent.api.services import SERVICES

#: Each test runs on both loops (tests/conftest.py, pytest_asyncio_loop_factories).
pytestmark = pytest.mark.both_loops

ROWS = modelgen.tabular_data("test")[0][:4].astype(np.float32)
PATH = "/v2/models/tab/infer"
#: Answer headers that carry meaning (Date and Server vary by nature).
MEANINGFUL = ("content-type", "inference-header-content-length", "x-request-id", "retry-after")


@dataclass
class Answer:
    """One HTTP response as read off the socket."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return orjson.loads(self.body)

    def meaning(self) -> tuple[int, dict[str, str], bytes]:
        """What must not differ between the two paths."""
        kept = {k: v for k, v in self.headers.items() if k in MEANINGFUL}
        return self.status, kept, self.body


def json_body(rows: np.ndarray = ROWS, **extra: Any) -> bytes:
    """A V2 JSON request for the tabular model."""
    tensor = {"name": "float_input", "shape": list(rows.shape), "datatype": "FP32"}
    return orjson.dumps({"inputs": [{**tensor, "data": rows.ravel().tolist()}], **extra})


def binary_body(rows: np.ndarray = ROWS) -> tuple[bytes, int]:
    """A binary-extension request as tritonclient builds it: (body, JSON header length)."""
    tensor = triton.InferInput("float_input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=True)
    outputs = [triton.InferRequestedOutput(n, binary_data=True) for n in ("label", "probabilities")]
    body, length = triton.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
    return body, length


def msgpack_body(rows: np.ndarray = ROWS) -> bytes:
    """A msgpack request with raw little-endian data."""
    tensor = {"name": "float_input", "shape": list(rows.shape), "datatype": "FP32"}
    return msgpack.packb({"inputs": [{**tensor, "data": rows.tobytes()}]})


def request(
    body: bytes,
    headers: list[tuple[str, str]] | None = None,
    *,
    path: str = PATH,
    method: str = "POST",
    length: bool = True,
) -> bytes:
    """The bytes of one HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_request(request_id: str = "r1", **kw: Any) -> bytes:
    """A fast-path JSON inference request with an X-Request-ID."""
    headers = [("Content-Type", "application/json"), ("X-Request-ID", request_id)]
    return request(json_body(), headers, **kw)


class Conn:
    """A raw keep-alive connection: write bytes, read whole answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        """Write and flush."""
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, timeout: float = 10) -> Answer:
        """Read one response (interim 1xx answers skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                head = await self.reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ")[1])
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                if status >= 200:
                    break
            if "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            else:
                body = await self.reader.read()
        return Answer(status, headers, body)

    async def closed(self, timeout: float = 10) -> bool:
        """True when the server closes the connection (EOF, or a reset when it closed with
        bytes unread) within ``timeout``; False if it is still open then."""
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.read() == b""
        except ConnectionError:
            return True
        except TimeoutError:
            return False


@asynccontextmanager
async def connect(agent: Agent) -> AsyncIterator[Conn]:
    """A raw TCP connection to the agent."""
    port = int(agent.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield Conn(reader, writer)
    finally:
        writer.close()


async def exchange(agent: Agent, data: bytes) -> Answer:
    """Send one request on a fresh connection; its answer."""
    async with connect(agent) as conn:
        await conn.send(data)
        return await conn.answer()


def handovers(agent: Agent) -> float:
    """Connections the agent's fast path handed to aiohttp so far (its metric)."""
    metric = agent.app[SERVICES].metrics.handovers
    return sum(child.sum for child in metric._children.values())


@pytest.fixture
async def pair(make_agent: MakeAgent, models: dict[str, bytes]) -> tuple[Agent, Agent]:
    """(fast path on, fast path off), serving the same model."""
    files: dict[str, bytes | Any] = {"tab.onnx": models["tabular"]}
    fast = await make_agent(files)
    slow = await make_agent(files, {"server": {"fast_path": False}})
    return fast, slow


# --- the same answers ------------------------------------------------------------------------

FORMATS = ("json", "binary", "msgpack")
BROKEN = (
    "none",
    "shape",
    "datatype",
    "syntax",
    "header_length",
    "unknown_model",
    "bad_version",
    "missing_version",
    "id_in_body",
)


def variant(fmt: str, broken: str, accept: str, case: str, rid: str) -> bytes:
    """One request of the differential test, valid or broken one way."""
    path = {
        "unknown_model": "/v2/models/nope/infer",
        "bad_version": "/v2/models/tab/versions/0/infer",
        "missing_version": "/v2/models/tab/versions/7/infer",
    }.get(broken, PATH)
    rows = ROWS[:, :29] if broken == "shape" else ROWS
    headers: list[tuple[str, str]] = []
    if fmt == "binary":
        body, length = binary_body(rows)
        if broken == "header_length":
            length = len(body) + 5
        headers.append(("Inference-Header-Content-Length", str(length)))
    elif fmt == "msgpack":
        body = msgpack_body(rows)
        headers.append(("Content-Type", "application/msgpack"))
    else:
        extra = {"id": "from-the-body"} if broken == "id_in_body" else {}
        body = json_body(rows, **extra)
        headers.append(("Content-Type", "application/json; charset=utf-8"))
    if broken == "datatype":
        body = body.replace(b"FP32", b"FP16", 1)
    if broken == "syntax":
        body = body[: len(body) // 2]
    if accept:
        headers.append(("Accept", accept))
    headers.append(("X-Request-ID", rid))
    headers.append(("User-Agent", "edge-agent-tests/1"))
    change = {"lower": str.lower, "upper": str.upper, "as is": lambda s: s}[case]
    return request(body, [(change(k), v) for k, v in headers], path=path)


class TestSameAnswers:
    @settings(
        max_examples=40,
        deadline=None,
        # The same test runs once per event loop (pytestmark): by design, not by accident.
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.differing_executors,
        ],
    )
    @given(
        fmt=st.sampled_from(FORMATS),
        broken=st.sampled_from(BROKEN),
        accept=st.sampled_from(["", "application/json", "application/msgpack", "*/*"]),
        case=st.sampled_from(["lower", "upper", "as is"]),
        rid=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12),
    )
    async def test_fast_and_aiohttp_answer_alike(
        self, pair: tuple[Agent, Agent], fmt: str, broken: str, accept: str, case: str, rid: str
    ) -> None:
        """Status, body and meaningful headers are the same whichever path answers, and
        the fast path answered without handing anything to aiohttp."""
        fast, slow = pair
        data = variant(fmt, broken, accept, case, rid)
        before = handovers(fast)
        got, want = await exchange(fast, data), await exchange(slow, data)
        assert got.meaning() == want.meaning()
        assert handovers(fast) == before
        if broken == "none":
            assert got.status == 200

    async def test_results_match_onnxruntime(
        self, pair: tuple[Agent, Agent], models: dict[str, bytes]
    ) -> None:
        """The fast path's binary answer decodes (tritonclient) to onnxruntime's outputs."""
        fast, _ = pair
        body, length = binary_body()
        answer = await exchange(
            fast, request(body, [("Inference-Header-Content-Length", str(length))])
        )
        assert answer.status == 200
        result = triton.InferResult.from_response_body(
            answer.body, header_length=int(answer.headers["inference-header-content-length"])
        )
        import onnxruntime as ort

        session = ort.InferenceSession(models["tabular"], providers=["CPUExecutionProvider"])
        label, proba = session.run(["label", "probabilities"], {"float_input": ROWS})
        np.testing.assert_array_equal(result.as_numpy("label"), label)
        np.testing.assert_allclose(result.as_numpy("probabilities"), proba, rtol=1e-6)


# --- what the fast path leaves to aiohttp ----------------------------------------------------


class TestHandOver:
    async def test_chunked_body_goes_to_aiohttp_and_is_served(self, pair: tuple[Agent, Agent]):
        """Transfer-Encoding: chunked is aiohttp's; the request is answered, not lost."""
        fast, _ = pair
        body = json_body()
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        headers = [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]
        before = handovers(fast)
        answer = await exchange(fast, request(chunked, headers, length=False))
        assert answer.status == 200
        assert handovers(fast) == before + 1

    async def test_gzip_body_goes_to_aiohttp_and_is_served(self, pair: tuple[Agent, Agent]):
        """A compressed body is inflated by aiohttp and answered."""
        fast, _ = pair
        headers = [("Content-Type", "application/json"), ("Content-Encoding", "gzip")]
        answer = await exchange(fast, request(gzip.compress(json_body()), headers))
        assert answer.status == 200
        assert answer.json()["outputs"][0]["name"] == "label"

    async def test_malformed_head_gets_aiohttps_400(self, pair: tuple[Agent, Agent]) -> None:
        """A header name with a space is not parsed by the fast path: aiohttp refuses it."""
        fast, slow = pair
        data = request(json_body(), [("Bad Header", "x")])
        got, want = await exchange(fast, data), await exchange(slow, data)
        assert got.status == want.status == 400

    @pytest.mark.parametrize(
        "headers",
        [
            [("Content-Type", "application/json"), ("X-Odd", "a\x01b")],
            [("Content-Type", "application/json"), ("X-Long", "a" * 9000)],
        ],
        ids=["control character", "header line over 8190 bytes"],
    )
    async def test_heads_aiohttp_refuses_are_refused_by_aiohttp(
        self, pair: tuple[Agent, Agent], headers: list[tuple[str, str]]
    ) -> None:
        """A head aiohttp answers 400 is not served by the fast path either."""
        fast, slow = pair
        data = request(json_body(), headers)
        got, want = await exchange(fast, data), await exchange(slow, data)
        assert got.status == want.status == 400

    async def test_absurd_content_length_is_aiohttps_to_refuse(
        self, pair: tuple[Agent, Agent]
    ) -> None:
        """A 5000-digit Content-Length is neither parsed (it would raise) nor served."""
        fast, slow = pair
        data = request(b"{}", [("Content-Length", "1" * 5000)], length=False)
        before = handovers(fast)
        got, want = await exchange(fast, data), await exchange(slow, data)
        assert got.status == want.status == 400
        assert handovers(fast) == before + 1

    async def test_a_head_at_the_size_limit_still_gets_its_body(
        self, make_agent: MakeAgent, models: dict[str, bytes]
    ) -> None:
        """The largest head and body the fast path takes, arriving in two parts (cut in the
        body, or in the head's blank line): served by the fast path at once (reading is
        not left paused until the 30 s deadline)."""
        agent = await make_agent(
            {"tab.onnx": models["tabular"]},
            {"server": {"max_body_bytes": 1024, "keepalive_timeout_s": 30}},
        )
        body = json_body(ROWS[:1])
        body += b" " * (1024 - len(body))  # the largest body allowed (JSON allows the blanks)

        bare = request(body, [("Content-Type", "application/json")]).index(b"\r\n\r\n")
        # Three pad headers: each line must stay under aiohttp's 8190 bytes.
        rest = MAX_HEAD - bare - 2 * len("\r\nX-PadN: ") - 2 * 6000 - len("\r\nX-PadN: ")
        pads = [("X-Pad1", "p" * 6000), ("X-Pad2", "p" * 6000), ("X-Pad3", "p" * rest)]
        data = request(body, [("Content-Type", "application/json"), *pads])
        assert data.index(b"\r\n\r\n") == MAX_HEAD  # the largest head the fast path takes
        before = handovers(agent)
        answers = []
        for cut in (len(data) - 1, MAX_HEAD + 2):  # in the body; in the head's blank line
            async with connect(agent) as conn:
                await conn.send(data[:cut])
                await asyncio.sleep(0.05)
                await conn.send(data[cut:])
                answers.append(await conn.answer(timeout=10))
        assert [a.status for a in answers] == [200, 200]
        assert handovers(agent) == before

    async def test_body_over_the_limit_gets_413(
        self, make_agent: MakeAgent, models: dict[str, bytes]
    ):
        """A declared body over max_body_bytes is aiohttp's 413, with the setting named."""
        agent = await make_agent(
            {"tab.onnx": models["tabular"]}, {"server": {"max_body_bytes": 1024}}
        )
        answer = await exchange(agent, json_request())
        assert answer.status == 413
        assert "max_body_bytes" in answer.json()["error"]

    async def test_other_routes_after_fast_requests_on_one_connection(
        self, pair: tuple[Agent, Agent]
    ) -> None:
        """Pipelined: two fast requests, a GET, then an inference again, all in one write;
        answered in order, the connection handed over once."""
        fast, _ = pair
        before = handovers(fast)
        ready = request(b"", path="/v2/health/ready", method="GET", length=False)
        async with connect(fast) as conn:
            await conn.send(json_request("a") + json_request("b") + ready + json_request("c"))
            answers = [await conn.answer() for _ in range(4)]
        assert [a.status for a in answers] == [200, 200, 200, 200]
        assert [a.headers["x-request-id"] for a in (answers[0], answers[1], answers[3])] == [
            "a",
            "b",
            "c",
        ]
        assert answers[2].json() == {"ready": True}
        assert handovers(fast) == before + 1

    async def test_a_stopping_agent_answers_with_connection_close(
        self, pair: tuple[Agent, Agent]
    ) -> None:
        """While the agent stops, a request on a kept-alive connection is answered by
        aiohttp's middleware with Connection: close, and the connection ends."""
        fast, _ = pair
        async with connect(fast) as conn:
            await conn.send(json_request("before"))
            assert (await conn.answer()).status == 200
            fast.app[SERVICES].accepting = False
            try:
                await conn.send(json_request("during"))
                answer = await conn.answer()
                assert await conn.closed()
            finally:
                fast.app[SERVICES].accepting = True
        assert answer.status == 200
        assert answer.headers["connection"].lower() == "close"


# --- the connection's rules -----------------------------------------------------------------


#: 4096 x 64 values per request: 1 MiB of msgpack in, about 1 MB of JSON out.
WIDE = 64
WIDE_REQUESTS = 16  # 16 MB of answers: several times the kernel's socket buffers


def _wide_request(request_id: str) -> bytes:
    rows = np.arange(4096 * WIDE, dtype=np.float32).reshape(4096, WIDE) % 7
    doc = {
        "inputs": [{"name": "x", "shape": [4096, WIDE], "datatype": "FP32", "data": rows.tobytes()}]
    }
    headers = [
        ("Content-Type", "application/msgpack"),
        ("Accept", "application/json"),
        ("X-Request-ID", request_id),
    ]
    return request(msgpack.packb(doc), headers, path="/v2/models/wide/infer")


async def _slow_reader(agent: Agent) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose receive buffer is tiny, so unread answers back up at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(agent.url.rsplit(":", 1)[1])))
    sock.setblocking(False)
    return await asyncio.open_connection(sock=sock, limit=1 << 20)


async def _until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


@pytest.fixture
async def wide(make_agent: MakeAgent) -> Agent:
    return await make_agent({"wide.onnx": modelgen.affine_model(1.0, 1.0, features=WIDE)})


class TestConnection:
    async def test_split_delivery_is_reassembled(self, pair: tuple[Agent, Agent]) -> None:
        """A request arriving a few bytes at a time is served by the fast path."""
        fast, _ = pair
        data = json_request("split")
        before = handovers(fast)
        async with connect(fast) as conn:
            for i in range(0, len(data), 97):
                await conn.send(data[i : i + 97])
                await asyncio.sleep(0.001)
            answer = await conn.answer()
        assert answer.status == 200
        assert answer.headers["x-request-id"] == "split"
        assert handovers(fast) == before

    async def test_many_pipelined_requests_answered_in_order(
        self, pair: tuple[Agent, Agent]
    ) -> None:
        """100 requests in one write come back in order, each with its own id."""
        fast, _ = pair
        async with connect(fast) as conn:
            await conn.send(b"".join(json_request(f"p{i}") for i in range(100)))
            answers = [await conn.answer() for _ in range(100)]
        assert [a.headers["x-request-id"] for a in answers] == [f"p{i}" for i in range(100)]
        assert {a.status for a in answers} == {200}

    async def test_connection_close_is_honoured(self, pair: tuple[Agent, Agent]) -> None:
        """``Connection: close``: the answer says so and the server closes."""
        fast, _ = pair
        headers = [("Content-Type", "application/json"), ("Connection", "close")]
        async with connect(fast) as conn:
            await conn.send(request(json_body(), headers))
            answer = await conn.answer()
            assert await conn.closed()
        assert answer.status == 200
        assert answer.headers["connection"] == "close"

    async def test_idle_connection_closes_after_keepalive_timeout(
        self, make_agent: MakeAgent, models: dict[str, bytes]
    ) -> None:
        """After an answer, a connection idle for keepalive_timeout_s is closed."""
        agent = await make_agent(
            {"tab.onnx": models["tabular"]}, {"server": {"keepalive_timeout_s": 0.3}}
        )
        async with connect(agent) as conn:
            await conn.send(json_request())
            assert (await conn.answer()).status == 200
            assert await conn.closed(timeout=5)

    async def test_a_client_not_reading_its_answers_is_not_read_either(self, wide: Agent) -> None:
        """Pipelined requests whose answers the client leaves unread: once the answers back
        up (the transport pauses writing), the agent stops reading requests too, so they
        wait in the client rather than in the agent's memory; when the client reads,
        every answer arrives, in order, and reading resumes."""
        reader, writer = await _slow_reader(wide)
        conn = Conn(reader, writer)
        try:
            writer.write(b"".join(_wide_request(f"w{i}") for i in range(WIDE_REQUESTS)))
            await _until(lambda: any(not c.writable for c in wide.site.connections))
            (paused,) = wide.site.connections
            reading_while_paused = paused.reading
            answers = [await conn.answer(timeout=30) for _ in range(WIDE_REQUESTS)]
            reading_after = paused.reading
        finally:
            writer.close()
            await writer.wait_closed()
        assert reading_while_paused is False  # without the pause it reads on, to 64 MiB
        assert reading_after is True
        ids = [a.headers["x-request-id"] for a in answers]
        assert ids == [f"w{i}" for i in range(WIDE_REQUESTS)]
        assert {a.status for a in answers} == {200}
        assert answers[-1].json()["outputs"][0]["data"][:3] == [1.0, 2.0, 3.0]

    async def test_a_client_that_never_reads_is_closed_after_the_keepalive_timeout(
        self, make_agent: MakeAgent
    ) -> None:
        """Answers left unread for keepalive_timeout_s: the agent closes the connection."""
        agent = await make_agent(
            {"wide.onnx": modelgen.affine_model(1.0, 1.0, features=WIDE)},
            {"server": {"keepalive_timeout_s": 0.5}},
        )
        _, writer = await _slow_reader(agent)
        try:
            writer.write(b"".join(_wide_request(f"n{i}") for i in range(WIDE_REQUESTS)))
            await _until(lambda: any(not c.writable for c in agent.site.connections))
            await _until(lambda: not agent.site.connections)  # FastSite's open connections
        finally:
            writer.transport.abort()  # ours still holds unsent requests: drop them now
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def test_trickled_head_is_cut_off(
        self, make_agent: MakeAgent, models: dict[str, bytes]
    ) -> None:
        """A head still arriving keepalive_timeout_s after its first byte: closed, unanswered."""
        agent = await make_agent(
            {"tab.onnx": models["tabular"]}, {"server": {"keepalive_timeout_s": 0.3}}
        )
        async with connect(agent) as conn:
            await conn.send(b"POST /v2/models/tab/infer HTTP/1.1\r\n")
            for _ in range(20):  # a byte every 0.05 s keeps the connection busy, not idle
                await asyncio.sleep(0.05)
                try:
                    await conn.send(b"X")
                except ConnectionError:
                    break
            assert await conn.closed(timeout=5)

    async def test_stalled_body_gets_408(
        self, make_agent: MakeAgent, models: dict[str, bytes]
    ) -> None:
        """A body that stops arriving is answered 408 naming the setting, then closed."""
        agent = await make_agent(
            {"tab.onnx": models["tabular"]}, {"server": {"keepalive_timeout_s": 0.3}}
        )
        data = json_request("slow")
        async with connect(agent) as conn:
            await conn.send(data[:-10])
            answer = await conn.answer()
            assert await conn.closed()
        assert answer.status == 408
        assert "keepalive_timeout_s" in answer.json()["error"]
        assert answer.headers["x-request-id"] == "slow"

    async def test_bearer_tokens_are_checked(
        self, make_agent: MakeAgent, models: dict[str, bytes]
    ) -> None:
        """With predict tokens set: none is 401 with WWW-Authenticate, a good one is served
        by the fast path, a wrong one is 401."""
        agent = await make_agent(
            {"tab.onnx": models["tabular"]}, {"auth": {"predict_tokens": ["t-good"]}}
        )
        base = [("Content-Type", "application/json")]
        none = await exchange(agent, request(json_body(), base))
        good = await exchange(
            agent, request(json_body(), [*base, ("Authorization", "Bearer t-good")])
        )
        bad = await exchange(
            agent, request(json_body(), [*base, ("Authorization", "Bearer t-bad")])
        )
        assert (none.status, good.status, bad.status) == (401, 200, 401)
        assert none.headers["www-authenticate"].startswith("Bearer")
        # Refused at the head, before any body is read: aiohttp's middleware answers those.
        assert handovers(agent) == 2


class TestParseHead:
    """The recognizer only narrows: what it is unsure of is refused (handed over)."""

    HEAD = (
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 12"
    )

    def test_a_plain_request_is_recognized(self) -> None:
        """The common head: model, length and media type read."""
        head = parse_head(self.HEAD)
        assert head is not None
        assert (head.name, head.version, head.length, head.content_type) == (
            "m",
            None,
            12,
            "application/json",
        )

    @pytest.mark.parametrize(
        "change",
        [
            (b"POST /v2/models/m/infer HTTP/1.1", b"POST /v2/models/m/infer HTTP/1.0"),
            (b"POST /v2/models/m/infer", b"PUT /v2/models/m/infer"),
            (b"/v2/models/m/infer", b"/v2/models/m/infer?x=1"),
            (b"/v2/models/m/infer", b"/v2/models/%6d/infer"),
            (b"/v2/models/m/infer", b"/v2/models/../infer"),
            (b"/v2/models/m/infer", b"/v2/models/m/ready"),
            (b"Content-Length: 12", b"Content-Length: +12"),
            (b"Content-Length: 12", b"Content-Length: 12\r\nContent-Length: 12"),
            (b"Content-Length: 12", b"Content-Length: 12\r\nTransfer-Encoding: chunked"),
            (b"Content-Length: 12", b"Content-Length: 12\r\nExpect: 100-continue"),
            (b"Content-Length: 12", b"Content-Length: 12\r\nContent-Encoding: gzip"),
            (b"Content-Length: 12", b"Content-Length: 12\r\nConnection: Upgrade"),
            (b"Content-Length: 12", b"Content-Length: 12\r\n folded"),
            (b"Content-Length: 12", b"Content-Length: 12\nX-Bare: lf"),
            (b"Host: x", b"Ho st: x"),
            (b"Content-Type: application/json", b"Content-Type: text/csv"),
            (b"Host: x", b"Host: x\r\nX-Request-ID: caf\xe9"),  # aiohttp reads UTF-8
            (b"Host: x", b"Host: x\r\nX-Request-ID: a\x01b"),
            (b"Content-Length: 12", b"X-No-Length: 12"),
        ],
    )
    def test_anything_unsure_is_refused(self, change: tuple[bytes, bytes]) -> None:
        """Each of these goes to aiohttp, which has the last word on it."""
        assert self.HEAD.count(change[0]) == 1
        assert parse_head(self.HEAD.replace(*change)) is None

    @given(st.binary(max_size=300))
    def test_arbitrary_bytes_never_raise(self, data: bytes) -> None:
        """Garbage is refused (None) or read; it never raises."""
        head = parse_head(data)
        assert head is None or head.length >= 0

    @given(
        name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True),
        version=st.none() | st.integers(1, 10**6),
        length=st.integers(0, 10**9),
        rid=st.from_regex(r"[!-~]{1,20}", fullmatch=True),
    )
    def test_fields_are_read_back(
        self, name: str, version: int | None, length: int, rid: str
    ) -> None:
        """Model, version, length and request id come back as written."""
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
        data = (f"POST {path} HTTP/1.1\r\nx-request-id: {rid}\r\ncontent-length: {length}").encode()
        head = parse_head(data)
        assert head is not None
        assert (head.name, head.version, head.length, head.request_id) == (
            name,
            str(version) if version else None,
            length,
            rid,
        )
