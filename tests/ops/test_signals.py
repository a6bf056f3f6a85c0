"""Signals on the real daemon: SIGTERM drains and exits 0, a second one forces; SIGHUP reloads.

In-flight requests are made deterministic with raw sockets: a request whose body is only
half sent is in the agent's hands (its handler runs) until the test sends the rest.
"""

from __future__ import annotations

import http.client
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import modelgen
import pytest
from ops.daemonproc import (
    Daemon,
    Notify,
    Sections,
    call,
    finish_request,
    infer_doc,
    merged,
    notify_socket,
    running,
    scrape,
    start_request,
    wait_until,
    write_config,
)

INFER = "/v2/models/aff/infer"
IN_FLIGHT = "edge_agent_http_requests_in_flight{}"


@pytest.fixture(scope="module")
def affine() -> bytes:
    """``y = x + 1``."""
    return modelgen.affine_model(1.0, 1.0)


def _wait_in_flight(agent: Daemon, count: int) -> None:
    """Until the agent handles ``count`` requests besides the scrape itself."""
    wait_until(lambda: scrape(agent.url).get(IN_FLIGHT, 0) >= count + 1)


class _Load(threading.Thread):
    """Sequential requests on fresh connections until stopped; records every status."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.statuses: list[int] = []
        self.refused = 0
        self.halt = threading.Event()

    def run(self) -> None:
        for _ in range(5000):
            if self.halt.is_set():
                return
            try:
                self.statuses.append(call(self.url + INFER, "POST", infer_doc([1, 1, 1, 1])).status)
            except (OSError, http.client.HTTPException):
                self.refused += 1  # the listener is closed: not admitted, not our concern


class TestStop:
    def test_sigterm_finishes_admitted_requests_and_exits_0(
        self, tmp_path: Path, affine: bytes
    ) -> None:
        """Requests admitted before SIGTERM complete with 200, under load; the exit code is 0."""
        body = infer_doc([1, 2, 3, 4])
        with running(tmp_path, models={"aff.onnx": affine}) as agent:
            pending = [start_request(agent.url, INFER, body, send=5) for _ in range(4)]
            load = _Load(agent.url)
            try:
                _wait_in_flight(agent, len(pending))
                load.start()
                wait_until(lambda: len(load.statuses) >= 3)
                agent.send(signal.SIGTERM)
                draining = agent.wait_for_event("draining")
                replies = [finish_request(sock, body[5:]) for sock in pending]
                code = agent.wait_exit()
            finally:
                load.halt.set()
                if load.is_alive():
                    load.join(timeout=20)
                for sock in pending:
                    sock.close()
            stopped = agent.wait_for_event("stopped")
        assert draining["inflight"] >= len(pending)
        assert [r.status for r in replies] == [200] * len(pending)
        assert all(r.json()["outputs"][0]["data"] == [2, 3, 4, 5] for r in replies)
        assert set(load.statuses) <= {200}
        assert code == 0
        assert stopped["cancelled"] == 0

    def test_drain_is_bounded_and_counts_what_it_cut_off(
        self, tmp_path: Path, affine: bytes
    ) -> None:
        """A request that never completes is cancelled after drain_timeout_s; the exit is 0."""
        body = infer_doc([1, 2, 3, 4])
        overrides = {"server": {"drain_timeout_s": 0.5}}
        with running(tmp_path, overrides, models={"aff.onnx": affine}) as agent:
            stuck = start_request(agent.url, INFER, body, send=5)
            try:
                _wait_in_flight(agent, 1)
                agent.send(signal.SIGTERM)
                code = agent.wait_exit()
            finally:
                stuck.close()
            stopped = agent.wait_for_event("stopped")
            cancelled = agent.wait_for_event("request_cancelled")
        assert code == 0
        assert stopped["cancelled"] == 1
        assert cancelled["path"] == INFER

    def test_second_sigterm_forces_exit(self, tmp_path: Path, affine: bytes) -> None:
        """While draining waits for a request, a second SIGTERM exits at once with code 1."""
        body = infer_doc([1, 2, 3, 4])
        overrides = {"server": {"drain_timeout_s": 60.0}}
        with running(tmp_path, overrides, models={"aff.onnx": affine}) as agent:
            stuck = start_request(agent.url, INFER, body, send=5)
            try:
                _wait_in_flight(agent, 1)
                agent.send(signal.SIGTERM)
                agent.wait_for_event("draining")
                still_draining = agent.proc.poll() is None
                agent.send(signal.SIGTERM)
                code = agent.wait_exit()
            finally:
                stuck.close()
            forced = agent.wait_for_event("forced_exit")
        assert still_draining
        assert code == 1
        assert forced["signal"] == "SIGTERM"


# -- SIGHUP -----------------------------------------------------------------------------------


@dataclass
class Hup:
    """An agent for the reload tests, and the notify socket that says when a reload is done."""

    agent: Daemon
    notify: Notify

    def reload(self, sections: Sections | None) -> list[dict[str, Any]]:
        """Write ``sections`` (None: leave the file), SIGHUP, wait for READY=1; new log events."""
        if sections is not None:
            write_config(self.agent.config_path, sections)
        seen_events = len(self.agent.events())
        seen_ready = self.notify.drain().count("READY=1")
        self.agent.send(signal.SIGHUP)
        self.notify.wait_for(lambda m: self.notify.messages.count("READY=1") > seen_ready)
        return self.agent.events()[seen_events:]

    def infer(self, token: str, request_id: str = "") -> int:
        """POST one inference request with ``token``; the status."""
        headers = {"Authorization": f"Bearer {token}"}
        if request_id:
            headers["X-Request-ID"] = request_id
        return call(self.agent.url + INFER, "POST", infer_doc([1, 2, 3, 4]), headers).status

    def sections(self, **overrides: dict[str, Any]) -> Sections:
        """The base config with predict token "token-one", plus ``overrides``."""
        return merged(self.agent.root, {"auth": {"predict_tokens": ["token-one"]}, **overrides})


@pytest.fixture(scope="module")
def hup(tmp_path_factory: pytest.TempPathFactory, affine: bytes) -> Iterator[Hup]:
    """One agent for the reload tests; each test writes the config it needs first."""
    root = tmp_path_factory.mktemp("hup")
    overrides = {"auth": {"predict_tokens": ["token-one"]}}
    with (
        notify_socket(tmp_path_factory.mktemp("n")) as notify,
        running(root, overrides, models={"aff.onnx": affine}, notify=notify) as agent,
    ):
        notify.wait_for(lambda m: m == "READY=1")
        yield Hup(agent, notify)


def _event(events: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [e for e in events if e["event"] == name]
    assert found, f"no {name} among {[e['event'] for e in events]}"
    return found[0]


class TestReload:
    def test_new_tokens_take_effect(self, hup: Hup) -> None:
        """After SIGHUP the new predict token works and the old one no longer does."""
        hup.reload(hup.sections())
        events = hup.reload(hup.sections(auth={"predict_tokens": ["token-two"]}))
        assert "auth.predict_tokens" in _event(events, "config_reloaded")["applied"]
        assert hup.infer("token-one") == 401
        assert hup.infer("token-two") == 200

    def test_token_file_is_read_again(self, hup: Hup) -> None:
        """A rotated token file takes effect on SIGHUP, with the config file unchanged."""
        token_file = hup.agent.root / "predict.tokens"
        token_file.write_text("file-token-1\n")
        token_file.chmod(0o600)
        hup.reload(hup.sections(auth={"predict_token_file": token_file}))
        token_file.write_text("file-token-2\n")
        hup.reload(None)
        assert hup.infer("file-token-1") == 401
        assert hup.infer("file-token-2") == 200

    def test_log_level_takes_effect(self, hup: Hup) -> None:
        """At level warning the access log is silent; back at info it logs requests again."""
        hup.reload(hup.sections(log={"level": "warning"}))
        assert hup.infer("token-one", "while-quiet") == 200
        hup.reload(hup.sections())
        assert hup.infer("token-one", "while-loud") == 200
        logged = {e.get("request_id") for e in hup.agent.events() if e["event"] == "request"}
        assert "while-loud" in logged
        assert "while-quiet" not in logged

    def test_broken_config_is_refused_and_the_old_one_kept(self, hup: Hup) -> None:
        """A config file with an error is refused with its key and line; the agent serves on."""
        hup.reload(hup.sections())
        hup.agent.config_path.write_text("[server]\nport = 0\n[auth]\npredict_tokens = 5\n")
        refused = _event(hup.reload(None), "config_reload_refused")
        assert refused["problems"][0].startswith("auth.predict_tokens (line 4)")
        assert hup.infer("token-one") == 200

    def test_unreadable_token_file_is_refused(self, hup: Hup) -> None:
        """A token file that cannot be read refuses the reload and keeps the running tokens."""
        hup.reload(hup.sections())
        missing = hup.agent.root / "absent.tokens"
        events = hup.reload(hup.sections(auth={"predict_token_file": missing}))
        refused = _event(events, "config_reload_refused")
        assert refused["problems"][0].startswith("auth.predict_token_file")
        assert hup.infer("token-one") == 200

    def test_restart_only_keys_are_reported_and_keep_their_value(self, hup: Hup) -> None:
        """A key that cannot change live is named in a warning and keeps its running value."""
        hup.reload(hup.sections())
        events = hup.reload(hup.sections(server={"max_body_bytes": 2048}))
        padded = infer_doc([1, 2, 3, 4]) + b" " * 4096
        headers = {"Authorization": "Bearer token-one"}
        reply = call(hup.agent.url + INFER, "POST", padded, headers)
        assert _event(events, "config_change_needs_restart")["keys"] == ["server.max_body_bytes"]
        assert reply.status == 200
