"""The real daemon (``python -m agent run``) as a subprocess, for the ops tests.

``running()`` writes a config and models under a test directory, starts the agent with
its stderr (JSON lines) in a file, waits for ``server_listening`` and always kills the
process on exit, whatever happened in the test. ``Notify`` is a datagram socket standing
in for systemd's. Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from conftest import render_config
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
#: Upper bound of every wait for the daemon (start-up includes importing onnxruntime).
WAIT_S = 20.0
_POLL_S = 0.02
_ENV_DROPPED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "EDGE_AGENT_URL")

Sections = dict[str, dict[str, Any]]


def base_config(root: Path) -> Sections:
    """A small, fast config: ephemeral port, dirs under ``root``, JSON logs at info."""
    return {
        "server": {"host": "127.0.0.1", "port": 0, "drain_timeout_s": 10.0},
        "models": {
            "dir": root / "models",
            "settle_ms": 50,
            "rescan_s": 5.0,
            "probation_s": 0.0,
            "warmup_runs": 0,
        },
        "state": {"dir": root / "state"},
        "log": {"level": "info", "format": "json"},
    }


def merged(root: Path, overrides: Sections | None = None) -> Sections:
    """``base_config(root)`` with ``overrides`` applied key by key."""
    sections = base_config(root)
    for name, body in (overrides or {}).items():
        sections.setdefault(name, {}).update(body)
    return sections


def write_config(path: Path, sections: Sections) -> Path:
    """Write ``sections`` as TOML to ``path``."""
    path.write_text(render_config(sections))
    return path


def run_to_exit(config: Path) -> subprocess.CompletedProcess[str]:
    """``python -m agent run --config`` that is expected to stop by itself (a refused start)."""
    return subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )


def infer_doc(values: list[float]) -> bytes:
    """A V2 JSON request for the affine test model (input ``x``, FP32 [1, 4])."""
    doc = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": values}]}
    return orjson.dumps(doc)


# -- HTTP ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Status, headers and body of one HTTP exchange."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return orjson.loads(self.body)


def call(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One request on a fresh connection; 4xx and 5xx are returned, not raised."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


def start_request(url: str, path: str, body: bytes, *, send: int) -> socket.socket:
    """Send a POST's head and the first ``send`` bytes of its body; the rest comes later."""
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:send])
    return sock


def finish_request(sock: socket.socket, rest: bytes) -> Reply:
    """Send the rest of the body and read the response; closes the socket."""
    try:
        sock.sendall(rest)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        sock.close()


def scrape(url: str) -> dict[str, float]:
    """``GET /metrics``, parsed: every sample as ``name{label="value",...}`` -> value."""
    reply = call(url + "/metrics")
    assert reply.status == 200, reply.body
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(_POLL_S * 5)


# -- the notify socket -----------------------------------------------------------------------


class Notify:
    """A bound ``AF_UNIX`` datagram socket in systemd's place; keeps every message."""

    def __init__(self, directory: Path, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = "edge-agent-test-" + secrets.token_hex(8)
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            path = directory / "notify.sock"  # short: AF_UNIX paths stop at 107 bytes
            self.sock.bind(str(path))
            self.env_value = str(path)
        self.messages: list[str] = []

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = WAIT_S) -> str:
        """Receive until a message satisfies ``predicate``; return it (all are kept)."""
        for message in self.messages:
            if predicate(message):
                return message
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(message)
            if predicate(message):
                return message
        raise AssertionError(f"no matching notify message within {timeout} s: {self.messages}")

    def drain(self) -> list[str]:
        """Take the messages already queued on the socket, without waiting."""
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        return self.messages

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


@contextlib.contextmanager
def notify_socket(directory: Path, *, abstract: bool = False) -> Iterator[Notify]:
    """A ``Notify`` closed on exit."""
    notify = Notify(directory, abstract=abstract)
    try:
        yield notify
    finally:
        notify.close()


# -- the daemon ------------------------------------------------------------------------------


@dataclass
class Daemon:
    """A running ``python -m agent run``: its process, log file, config and address."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path
    root: Path
    scheme: str = "http"
    port: int = 0
    _parsed: list[dict[str, Any]] = field(default_factory=list)
    _offset: int = 0

    @property
    def url(self) -> str:
        """Base URL of the agent."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line so far, in order (other lines are skipped)."""
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                doc = orjson.loads(line)
                if isinstance(doc, dict):
                    self._parsed.append(doc)
        return list(self._parsed)

    def wait_for_event(
        self, event: str, *, after: int = 0, timeout: float = WAIT_S, **fields: Any
    ) -> dict[str, Any]:
        """The first log event named ``event`` (with ``fields``) at index ``after`` or later."""
        deadline = time.monotonic() + timeout
        while True:
            for doc in self.events()[after:]:
                if doc.get("event") == event and all(doc.get(k) == v for k, v in fields.items()):
                    return doc
            if self.proc.poll() is not None and not self._more_to_read():
                raise AssertionError(
                    f"the agent exited ({self.proc.returncode}) before logging {event}:\n"
                    + self.log_text()[-3000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {event} event within {timeout} s:\n" + self.log_text()[-3000:]
                )
            time.sleep(_POLL_S)

    def _more_to_read(self) -> bool:
        return self.log_path.stat().st_size > self._offset

    def send(self, sig: signal.Signals) -> None:
        """Send a signal to the agent."""
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = WAIT_S) -> int:
        """The exit code, waiting at most ``timeout`` seconds."""
        return self.proc.wait(timeout=timeout)


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROPPED}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


def spawn(config_path: Path, log_path: Path, env: dict[str, str] | None = None) -> Daemon:
    """Start ``python -m agent run --config config_path``; stderr goes to ``log_path``."""
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config_path)],
            cwd=config_path.parent,
            env=_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    return Daemon(proc, log_path, config_path, config_path.parent)


def stop(daemon: Daemon) -> None:
    """Kill the process if it still runs, and reap it (bounded)."""
    if daemon.proc.poll() is None:
        daemon.proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        daemon.proc.wait(timeout=10)


@contextlib.contextmanager
def running(
    root: Path,
    overrides: Sections | None = None,
    *,
    models: dict[str, bytes] | None = None,
    env: dict[str, str] | None = None,
    notify: Notify | None = None,
    drop_mode: int = 0o755,
) -> Iterator[Daemon]:
    """Start the agent on 127.0.0.1:0 with ``models`` in its drop dir; kill it on exit."""
    root.mkdir(parents=True, exist_ok=True)
    sections = merged(root, overrides)
    drop = Path(sections["models"]["dir"])
    drop.mkdir(parents=True, exist_ok=True)
    for rel, content in (models or {}).items():
        target = drop / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    drop.chmod(drop_mode)
    config_path = write_config(root / "agent.toml", sections)
    extra = dict(env or {})
    if notify is not None:
        extra["NOTIFY_SOCKET"] = notify.env_value
    daemon = spawn(config_path, root / "agent.log", extra)
    daemon.scheme = "https" if sections["server"].get("cert_file") else "http"
    try:
        daemon.port = int(daemon.wait_for_event("server_listening")["port"])
        yield daemon
    finally:
        stop(daemon)
