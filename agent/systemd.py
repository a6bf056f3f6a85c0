"""Talk to the service manager: the sd_notify datagram protocol, in a few lines of our own.

One responsibility: turn "ready", "status", "reloading", "stopping" and "watchdog" into
``KEY=VALUE`` datagrams on ``$NOTIFY_SOCKET`` (see ``man sd_notify``), plus the watchdog
ping loop. Without ``$NOTIFY_SOCKET`` (not started by systemd) every call is a no-op.

This module must not decide *when* to notify (that is ``daemon.py``'s job), must never
raise into its caller (a lost datagram must not take serving down), and must never block
the event loop: the socket is non-blocking, so a stuck service manager costs a warning,
not a stall. No python-systemd dependency: the protocol is one ``sendto``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping

import structlog

from agent.errors import AgentError

__all__ = ["Notifier", "watchdog_loop"]

_USEC_PER_S = 1_000_000


def _socket_address(raw: str) -> str | None:
    """Map ``$NOTIFY_SOCKET`` to an ``AF_UNIX`` address: ``@name`` is abstract (a NUL first)."""
    if not raw:
        return None
    if raw.startswith("@"):
        return "\0" + raw[1:]
    return raw


def _positive_int(raw: str | None) -> int | None:
    """Parse a positive decimal integer from the environment, or None when absent or invalid."""
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value > 0 else None


class Notifier:
    """Sends sd_notify messages to the service manager; a no-op when not under systemd.

    Build it with ``Notifier.from_env(os.environ)``. Every method returns None and never
    raises: a failed send is logged once as a warning (``sd_notify_failed``), later
    failures at debug level, so a broken socket cannot flood the journal.
    """

    __slots__ = ("_address", "_log", "_warned", "_watchdog_pid", "_watchdog_usec")

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        """Build a notifier; ``from_env`` is the usual way.

        Args:
            address: the ``AF_UNIX`` address (abstract names start with NUL), or None to do nothing.
            watchdog_usec: ``$WATCHDOG_USEC``, the manager's watchdog timeout, if any.
            watchdog_pid: ``$WATCHDOG_PID``, the only process the watchdog is meant for, if set.
        """
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._warned = False
        self._log = structlog.get_logger(__name__)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from ``environ``."""
        return cls(
            _socket_address(environ.get("NOTIFY_SOCKET", "")),
            watchdog_usec=_positive_int(environ.get("WATCHDOG_USEC")),
            watchdog_pid=_positive_int(environ.get("WATCHDOG_PID")),
        )

    @property
    def enabled(self) -> bool:
        """True when a notify socket was given (the process runs under a service manager)."""
        return self._address is not None

    def ready(self) -> None:
        """Tell the manager start-up is complete (``READY=1``): the initial models are loaded."""
        self._send("READY=1")

    def status(self, text: str) -> None:
        """Set the one-line status shown by ``systemctl status`` (``STATUS=...``)."""
        # A newline would start a new assignment (e.g. a model name "x\nREADY=1").
        self._send("STATUS=" + " ".join(text.splitlines()))

    def reloading(self) -> None:
        """Tell the manager a reload started (``RELOADING=1`` with ``MONOTONIC_USEC``); send
        ``ready()`` when it is done."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000
        self._send("RELOADING=1", "MONOTONIC_USEC=" + str(now_usec))

    def stopping(self) -> None:
        """Tell the manager shutdown began (``STOPPING=1``): draining, then exit."""
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """Ping the manager's watchdog (``WATCHDOG=1``)."""
        self._send("WATCHDOG=1")

    def watchdog_interval_s(self) -> float | None:
        """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None when the
        watchdog is off or ``WATCHDOG_PID`` names another process."""
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / _USEC_PER_S

    def _send(self, *assignments: str) -> None:
        """Send ``assignments`` as one newline-separated datagram; log, never raise, on failure."""
        if self._address is None:
            return
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            self._report_failure(assignments[0], exc)

    def _report_failure(self, first: str, exc: OSError) -> None:
        """Warn about the first failed send only; keep later ones at debug level."""
        level = self._log.debug if self._warned else self._log.warning
        self._warned = True
        level(
            "sd_notify_failed",
            socket=self._address.replace("\0", "@") if self._address else None,
            message=first,
            error=str(exc),
            fix="check $NOTIFY_SOCKET and that the service manager is running",
        )


async def watchdog_loop(notifier: Notifier, interval: float) -> None:
    """Ping the watchdog every ``interval`` seconds until cancelled.

    The pings come from the event loop on purpose: if the loop is blocked, the pings
    stop and systemd restarts the agent. The caller owns the task (start, cancel, await).
    """
    if interval <= 0:
        raise AgentError(
            f"watchdog interval must be > 0 seconds, got {interval}; "
            "pass Notifier.watchdog_interval_s() and skip the loop when it is None"
        )
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)
