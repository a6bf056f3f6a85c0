"""sd_notify datagrams, read back from a real AF_UNIX socket (a path, and an abstract name)."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from agent.errors import AgentError
from agent.systemd import Notifier, watchdog_loop

RECV_TIMEOUT_S = 5.0


@pytest.fixture(params=["path", "abstract"])
def listener(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket standing in for the service manager, and its $NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(RECV_TIMEOUT_S)
    if request.param == "path":
        # tmp_path_factory gives a short directory: AF_UNIX paths stop at 107 bytes.
        path = tmp_path_factory.mktemp("n") / "notify.sock"
        sock.bind(str(path))
        env_value = str(path)
    else:
        name = "edge-agent-test-" + secrets.token_hex(8)
        sock.bind("\0" + name)
        env_value = "@" + name
    with sock:
        yield env_value, sock


def _notifier(env_value: str, **extra: str) -> Notifier:
    return Notifier.from_env({"NOTIFY_SOCKET": env_value, **extra})


class TestFromEnv:
    def test_without_notify_socket_is_a_noop(self) -> None:
        """With no NOTIFY_SOCKET every call returns quietly and nothing is enabled."""
        notifier = Notifier.from_env({})
        with structlog.testing.capture_logs() as logs:
            notifier.ready()
            notifier.status("x")
            notifier.reloading()
            notifier.stopping()
            notifier.watchdog()
        assert not notifier.enabled
        assert logs == []

    def test_with_notify_socket_is_enabled(self, listener: tuple[str, socket.socket]) -> None:
        """A NOTIFY_SOCKET (path or @abstract) enables the notifier."""
        assert _notifier(listener[0]).enabled


class TestMessages:
    def test_ready(self, listener: tuple[str, socket.socket]) -> None:
        """ready() sends exactly READY=1."""
        env_value, sock = listener
        _notifier(env_value).ready()
        assert sock.recv(4096) == b"READY=1"

    def test_status(self, listener: tuple[str, socket.socket]) -> None:
        """status() sends STATUS= with the text."""
        env_value, sock = listener
        _notifier(env_value).status("serving 3 models")
        assert sock.recv(4096) == b"STATUS=serving 3 models"

    def test_status_cannot_inject_assignments(self, listener: tuple[str, socket.socket]) -> None:
        """A newline in the status text cannot start another assignment."""
        env_value, sock = listener
        _notifier(env_value).status("model x\nREADY=1")
        assert sock.recv(4096) == b"STATUS=model x READY=1"

    def test_stopping(self, listener: tuple[str, socket.socket]) -> None:
        """stopping() sends exactly STOPPING=1."""
        env_value, sock = listener
        _notifier(env_value).stopping()
        assert sock.recv(4096) == b"STOPPING=1"

    def test_watchdog(self, listener: tuple[str, socket.socket]) -> None:
        """watchdog() sends exactly WATCHDOG=1."""
        env_value, sock = listener
        _notifier(env_value).watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"

    def test_reloading(self, listener: tuple[str, socket.socket]) -> None:
        """reloading() sends RELOADING=1 and the CLOCK_MONOTONIC time in µs, in one datagram."""
        env_value, sock = listener
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000
        _notifier(env_value).reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000
        first, second = sock.recv(4096).decode().split("\n")
        key, _, value = second.partition("=")
        assert first == "RELOADING=1"
        assert key == "MONOTONIC_USEC"
        assert before <= int(value) <= after


class TestWatchdogInterval:
    def test_unset(self) -> None:
        """Without WATCHDOG_USEC there is no watchdog."""
        assert Notifier.from_env({"NOTIFY_SOCKET": "@x"}).watchdog_interval_s() is None

    def test_half_of_watchdog_usec(self) -> None:
        """The ping interval is half of WATCHDOG_USEC, in seconds."""
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"})
        assert notifier.watchdog_interval_s() == 15.0

    def test_watchdog_pid_is_this_process(self) -> None:
        """WATCHDOG_PID naming this process keeps the watchdog on."""
        env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
        assert Notifier.from_env(env).watchdog_interval_s() == 2.0

    def test_watchdog_pid_is_another_process(self) -> None:
        """WATCHDOG_PID naming another process turns the watchdog off for this one."""
        env = {
            "NOTIFY_SOCKET": "@x",
            "WATCHDOG_USEC": "4000000",
            "WATCHDOG_PID": str(os.getpid() + 1),
        }
        assert Notifier.from_env(env).watchdog_interval_s() is None

    @pytest.mark.parametrize("raw", ["", "0", "-5", "soon", "1.5"])
    def test_invalid_watchdog_usec(self, raw: str) -> None:
        """A WATCHDOG_USEC that is not a positive integer means no watchdog."""
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": raw})
        assert notifier.watchdog_interval_s() is None


class TestSendFailures:
    def test_missing_socket_does_not_raise(self, tmp_path: Path) -> None:
        """Sending to a socket that does not exist logs a warning and returns."""
        notifier = _notifier(str(tmp_path / "absent.sock"))
        with structlog.testing.capture_logs() as logs:
            notifier.ready()
        assert [(e["event"], e["log_level"]) for e in logs] == [("sd_notify_failed", "warning")]
        assert logs[0]["message"] == "READY=1"

    def test_warns_only_once(self, tmp_path: Path) -> None:
        """Repeated failures warn once, then log at debug level."""
        notifier = _notifier(str(tmp_path / "absent.sock"))
        with structlog.testing.capture_logs() as logs:
            notifier.watchdog()
            notifier.watchdog()
            notifier.status("x")
        assert [e["log_level"] for e in logs] == ["warning", "debug", "debug"]


class TestWatchdogLoop:
    async def test_pings_repeatedly(self, listener: tuple[str, socket.socket]) -> None:
        """The loop sends WATCHDOG=1 again and again while it runs."""
        env_value, sock = listener
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(watchdog_loop(_notifier(env_value), 0.01))
        try:
            for _ in range(2):
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), RECV_TIMEOUT_S)
                assert data == b"WATCHDOG=1"
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    async def test_stops_when_cancelled(self, listener: tuple[str, socket.socket]) -> None:
        """Cancelling the task ends the loop."""
        env_value, sock = listener
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(watchdog_loop(_notifier(env_value), 0.01))
        await asyncio.wait_for(loop.sock_recv(sock, 4096), RECV_TIMEOUT_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    async def test_rejects_a_non_positive_interval(self) -> None:
        """An interval of zero is a caller bug, reported with the fix."""
        with pytest.raises(AgentError, match="watchdog_interval_s"):
            await watchdog_loop(Notifier.from_env({}), 0)
