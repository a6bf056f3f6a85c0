"""The daemon as systemd sees it: notify messages, the watchdog, the drop dir check, slow clients.

Each test runs ``python -m agent run`` as a subprocess with a datagram socket of its own
as ``$NOTIFY_SOCKET`` (a path, or an abstract name) and reads back what the agent sent.
"""

from __future__ import annotations

import http.client
import selectors
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import modelgen
import pytest
from ops.daemonproc import Notify, call, infer_doc, notify_socket, running

#: Bound on how long a slow client may hold a connection in these tests (server side 1 s).
CLOSE_WAIT_S = 10.0


@pytest.fixture(scope="module")
def affine() -> bytes:
    """``y = x + 1`` (offset 1 names version 1)."""
    return modelgen.affine_model(1.0, 1.0)


@pytest.fixture(params=["path", "abstract"])
def notify(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Notify]:
    """systemd's notify socket, bound by the test: a filesystem path or an abstract name."""
    with notify_socket(tmp_path_factory.mktemp("n"), abstract=request.param == "abstract") as n:
        yield n


@pytest.fixture
def notify_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Notify]:
    """A notify socket on a filesystem path."""
    with notify_socket(tmp_path_factory.mktemp("n")) as n:
        yield n


def _kinds(messages: list[str]) -> list[str]:
    return [m.split("=", 1)[0] for m in messages]


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000


class TestNotifyProtocol:
    def test_start_reload_stop_in_order(
        self, tmp_path: Path, notify: Notify, affine: bytes
    ) -> None:
        """READY and STATUS at start, RELOADING then READY on SIGHUP, STOPPING on SIGTERM."""
        with running(tmp_path, models={"aff.onnx": affine}, notify=notify) as agent:
            notify.wait_for(lambda m: m.startswith("STATUS="))
            before_hup = _monotonic_usec()
            agent.send(signal.SIGHUP)
            notify.wait_for(lambda m: notify.messages.count("READY=1") == 2)
            after_ready = _monotonic_usec()
            notify.wait_for(lambda m: _kinds(notify.messages).count("STATUS") == 2)
            agent.send(signal.SIGTERM)
            assert agent.wait_exit() == 0
        messages = notify.drain()
        assert _kinds(messages) == [
            "READY", "STATUS", "RELOADING", "READY", "STATUS", "STOPPING", "STATUS",
        ]  # fmt: skip
        assert messages[1] == "STATUS=serving 1 model(s), 0 failed"
        reloading, monotonic = messages[2].split("\n")
        assert reloading == "RELOADING=1"
        assert before_hup <= int(monotonic.removeprefix("MONOTONIC_USEC=")) <= after_ready

    def test_ready_means_the_initial_models_serve(
        self, tmp_path: Path, notify_path: Notify, affine: bytes
    ) -> None:
        """When READY=1 arrives, the models found in the drop dir at start already answer."""
        with running(tmp_path, models={"aff.onnx": affine}, notify=notify_path) as agent:
            notify_path.wait_for(lambda m: m == "READY=1")
            reply = call(agent.url + "/v2/models/aff/infer", "POST", infer_doc([1, 2, 3, 4]))
        assert reply.status == 200, reply.body
        assert reply.json()["outputs"][0]["data"] == [2, 3, 4, 5]


class TestWatchdog:
    def test_pings_stop_while_the_loop_is_blocked(
        self, tmp_path: Path, notify_path: Notify, affine: bytes
    ) -> None:
        """No WATCHDOG=1 is sent while the debug hook blocks the event loop; pings resume after."""
        env = {"WATCHDOG_USEC": "100000", "EDGE_AGENT_DEBUG_BLOCK_LOOP_ON_SIGUSR1": "1"}
        with running(tmp_path, models={"aff.onnx": affine}, notify=notify_path, env=env) as agent:
            notify_path.wait_for(lambda m: notify_path.messages.count("WATCHDOG=1") >= 2)
            agent.send(signal.SIGUSR1)
            notify_path.wait_for(lambda m: m.startswith("STATUS=debug hook"))
            notify_path.wait_for(lambda m: m.startswith("STATUS=serving"))
            seen = len(notify_path.messages)
            notify_path.wait_for(lambda m: "WATCHDOG=1" in notify_path.messages[seen:])
        messages = notify_path.messages
        blocked = next(i for i, m in enumerate(messages) if m.startswith("STATUS=debug hook"))
        unblocked = next(
            i for i in range(blocked + 1, len(messages)) if messages[i][:7] == "STATUS="
        )
        assert "WATCHDOG=1" in messages[:blocked]
        assert "WATCHDOG=1" not in messages[blocked + 1 : unblocked]
        assert "WATCHDOG=1" in messages[unblocked:]

    def test_no_pings_for_another_watchdog_pid(
        self, tmp_path: Path, notify_path: Notify, affine: bytes
    ) -> None:
        """WATCHDOG_PID naming another process means this one never pings."""
        env = {"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}
        with running(tmp_path, models={"aff.onnx": affine}, notify=notify_path, env=env) as agent:
            notify_path.wait_for(lambda m: m.startswith("STATUS="))
            agent.send(signal.SIGTERM)
            assert agent.wait_exit() == 0
        assert "WATCHDOG=1" not in notify_path.drain()


class TestDropDirCheck:
    def test_world_writable_drop_dir_is_refused_visibly(
        self, tmp_path: Path, notify_path: Notify, affine: bytes
    ) -> None:
        """A drop dir anyone can write to loads nothing and says why: log, STATUS, /v1/models."""
        with running(
            tmp_path, models={"aff.onnx": affine}, notify=notify_path, drop_mode=0o777
        ) as agent:
            status = notify_path.wait_for(lambda m: m.startswith("STATUS="))
            refused = agent.wait_for_event("drop_dir_refused")
            listing = call(agent.url + "/v1/models").json()
            ready = call(agent.url + "/v2/models/aff/ready")
        assert "DROP DIR REFUSED" in status
        assert "chmod o-w" in status
        assert "writable by every user" in refused["reason"]
        assert "writable by every user" in listing["drop_dir"]["error"]
        assert ready.status == 404


# -- slow and half-open clients ---------------------------------------------------------------


@pytest.fixture(scope="module")
def patient_agent(tmp_path_factory: pytest.TempPathFactory, affine: bytes) -> Iterator[str]:
    """An agent that gives a client 1 s to send a request's head and body; yields its URL."""
    root = tmp_path_factory.mktemp("slow")
    overrides = {"server": {"keepalive_timeout_s": 1.0}}
    with running(root, overrides, models={"aff.onnx": affine}) as agent:
        yield agent.url


def _connect(url: str) -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WAIT_S)


def _wait_all_closed(socks: list[socket.socket], trickle: bool) -> int:
    """Keep trickling a byte into each socket until the server closes it; count the closed."""
    open_socks = set(socks)
    deadline = time.monotonic() + CLOSE_WAIT_S
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while open_socks and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if _closed_by_peer(sock):
                    open_socks.discard(sock)
                    selector.unregister(sock)
            for sock in list(open_socks) if trickle else ():
                try:
                    sock.send(b"a")
                except OSError:
                    open_socks.discard(sock)
                    selector.unregister(sock)
    return len(socks) - len(open_socks)


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except OSError:
        return True


class TestSlowClients:
    def test_slowloris_headers_are_cut_off_and_others_served(self, patient_agent: str) -> None:
        """Clients trickling header bytes, or silent, are closed; the agent keeps serving others."""
        trickling = [_connect(patient_agent) for _ in range(20)]
        silent = [_connect(patient_agent) for _ in range(20)]
        try:
            for sock in trickling:
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: edge\r\nX-Slow: a")
            served = call(patient_agent + "/v2/models/aff/infer", "POST", infer_doc([0, 0, 0, 0]))
            closed = _wait_all_closed(trickling, trickle=True) + _wait_all_closed(silent, False)
        finally:
            for sock in trickling + silent:
                sock.close()
        assert served.status == 200
        assert closed == len(trickling) + len(silent)

    def test_slow_body_gets_408(self, patient_agent: str) -> None:
        """A body that stops arriving is answered 408 with the setting to look at."""
        body = infer_doc([1, 2, 3, 4])
        sock = _connect(patient_agent)
        try:
            head = (
                "POST /v2/models/aff/infer HTTP/1.1\r\nHost: edge\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body[:10])
            served = call(patient_agent + "/v2/models/aff/infer", "POST", body)
            response = http.client.HTTPResponse(sock)
            response.begin()
            error = response.read()
        finally:
            sock.close()
        assert served.status == 200
        assert response.status == 408
        assert b"keepalive_timeout_s" in error


class TestEventLoop:
    @pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
    def test_each_loop_serves_fast_and_handed_over_requests(
        self, tmp_path: Path, affine: bytes, kind: str
    ) -> None:
        """[server] event_loop picks the loop (the listening line names the one running);
        on each, one kept-alive connection carries fast-path inferences, a request handed
        over to aiohttp, and an inference again, and SIGTERM stops the agent cleanly."""
        with running(
            tmp_path, {"server": {"event_loop": kind}}, models={"aff.onnx": affine}
        ) as agent:
            assert agent.wait_for_event("server_listening")["event_loop"] == kind
            conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=CLOSE_WAIT_S)
            answers = []
            try:
                for method, path, body in (
                    ("POST", "/v2/models/aff/infer", infer_doc([1, 2, 3, 4])),
                    ("GET", "/v2/models/aff", None),
                    ("POST", "/v2/models/aff/infer", infer_doc([0, 0, 0, 5])),
                ):
                    conn.request(
                        method, path, body=body, headers={"Content-Type": "application/json"}
                    )
                    response = conn.getresponse()
                    answers.append((response.status, response.read()))
                    assert conn.sock is not None  # http.client would reopen a closed one
            finally:
                conn.close()
            assert [status for status, _ in answers] == [200, 200, 200]
            assert b"[2.0,3.0,4.0,5.0]" in answers[0][1]
            assert b'"name":"aff"' in answers[1][1]
            assert b"[1.0,1.0,1.0,6.0]" in answers[2][1]
            agent.send(signal.SIGTERM)
            assert agent.wait_exit() == 0
