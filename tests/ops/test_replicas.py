"""``[server] processes = 2``: the primary daemon and one replica process on the same port.

Every test runs the real daemon (``python -m agent run``) with a real affine model
(``y = x + version``, so each answer names the version that computed it). The kernel
spreads *connections* over the processes bound with SO_REUSEPORT, so every request goes
on a fresh connection; which process answered is read from the JSON log (a replica's
lines carry ``"replica": 1``). The in-process tests run a real replica app (its
``Follower`` and ``Uplink``) beside a real in-process primary on the same state dir, with
the test holding the primary's end of the channel. The unit tests at the end cover the
pieces the processes share: merged metrics (``Metrics.snapshot``/``render`` with ``peers``)
and the framed channel (``agent.ipc``).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import signal
import socket
import sqlite3
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, closing, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import modelgen
import numpy as np
import orjson
import pytest
from aiohttp import web
from conftest import Agent, wait_for
from models import kit
from ops.daemonproc import (
    WAIT_S,
    Daemon,
    Reply,
    call,
    finish_request,
    run_to_exit,
    running,
    scrape,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from agent import ipc
from agent.app import REGISTRY
from agent.cli import deploy_files
from agent.events import PredictionEvent
from agent.metrics import Metrics, add_snapshots
from agent.models.follower import Follower, retry_delay_s
from agent.replica import build_replica_app

INFER = "/v2/models/aff/infer"
TWO_PROCESSES = {"server": {"processes": 2}}
READY = "edge_agent_replicas_ready{}"
SHIPPED = 'edge_agent_replica_events_total{outcome="shipped"}'
DROPPED = 'edge_agent_replica_events_total{outcome="dropped"}'
#: Requests in a row, each on its own connection, that must agree before a wait ends.
IN_A_ROW = 40


def affine(version: int) -> bytes:
    """``y = x + version``, with ``version`` as the ONNX model version."""
    return modelgen.affine_model(1.0, float(version), model_version=version)


@pytest.fixture(scope="module")
def v1() -> bytes:
    """Version 1 of model ``aff``."""
    return affine(1)


# -- helpers ---------------------------------------------------------------------------------


def infer(
    url: str,
    values: list[float] | None = None,
    rid: str | None = None,
    shape: list[int] | None = None,
) -> Reply:
    """One V2 JSON request for ``aff`` on a fresh connection."""
    data = values if values is not None else [0.0, 0.0, 0.0, 0.0]
    doc: dict[str, Any] = {
        "inputs": [
            {"name": "x", "shape": shape or [1, len(data)], "datatype": "FP32", "data": data}
        ]
    }
    if rid is not None:
        doc["id"] = rid
    return call(url + INFER, "POST", orjson.dumps(doc))


def ok_infer(url: str, rid: str | None = None, version: int = 1) -> Reply:
    """A request that must answer 200 with ``x + version`` from ``version``."""
    reply = infer(url, [1.0, 2.0, 3.0, 4.0], rid)
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["model_version"] == str(version), body
    assert body["outputs"][0]["data"] == [v + version for v in (1.0, 2.0, 3.0, 4.0)]
    if rid is not None:
        assert body["id"] == rid
    return reply


def start(
    root: Path, models: dict[str, bytes], event_loop: str | None = None
) -> AbstractContextManager[Daemon]:
    """``running`` with two processes (on the default event loop unless ``event_loop``)."""
    sections = TWO_PROCESSES
    if event_loop is not None:
        sections = {**sections, "server": {**sections["server"], "event_loop": event_loop}}
    return running(root, sections, models=models)


def wait_replica_ready(agent: Daemon, after: int = 0) -> dict[str, Any]:
    """The next ``replica_ready`` event at or after log index ``after``, once the gauge says 1."""
    event = agent.wait_for_event("replica_ready", after=after, index=1)
    wait_until(lambda: scrape(agent.url).get(READY) == 1)
    return event


def requests_total(samples: dict[str, float], code: str | None = None) -> float:
    """``edge_agent_requests_total`` for model ``aff`` (every version), one code or all."""
    return sum(
        value
        for key, value in samples.items()
        if key.startswith("edge_agent_requests_total{")
        and 'model="aff"' in key
        and (code is None or f'code="{code}"' in key)
    )


def requests_logged(agent: Daemon, *, replica: bool, path: str = INFER) -> list[dict[str, Any]]:
    """``request`` log lines for ``path`` written by the replica (or by the primary)."""
    return [
        e
        for e in agent.events()
        if e.get("event") == "request" and e.get("path") == path and ("replica" in e) == replica
    ]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@contextmanager
def reaped(pid: int) -> Iterator[None]:
    """Kill ``pid`` on exit if it still runs (a replica that outlived its test)."""
    try:
        yield
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def all_answer(url: str, status: int, version: int | None = None) -> bool:
    """``IN_A_ROW`` requests on fresh connections all answer ``status`` (from ``version``)."""
    for _ in range(IN_A_ROW):
        reply = infer(url)
        if reply.status != status:
            return False
        if version is not None:
            body = reply.json()
            if (
                body["model_version"] != str(version)
                or body["outputs"][0]["data"] != [float(version)] * 4
            ):
                return False
    return True


def hold_request(url: str, rid: str) -> tuple[socket.socket, bytes]:
    """A request admitted by its process (``100 Continue`` received), its body not yet sent."""
    body = orjson.dumps(
        {"id": rid, "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]}
    )
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=WAIT_S)
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    )
    sock.sendall(head.encode())
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(4096)
        if not chunk:
            sock.close()
            raise AssertionError(f"connection closed before 100 Continue: {got!r}")
        got += chunk
    assert got.startswith(b"HTTP/1.1 100"), got
    return sock, body


def hold_requests(url: str, *, on_replica: int) -> dict[str, tuple[socket.socket, bytes]]:
    """Held requests until ``on_replica`` of them are the replica's: the primary's in-flight
    gauge counts its own (and the scrape, forwarded or not), so the rest are the replica's."""
    held: dict[str, tuple[socket.socket, bytes]] = {}
    try:
        while True:
            assert len(held) < 40, "the kernel never gave the replica a connection"
            rid = f"held-{len(held)}"
            held[rid] = hold_request(url, rid)
            primary = scrape(url)["edge_agent_http_requests_in_flight{}"] - 1
            if len(held) - primary >= on_replica:
                return held
    except BaseException:
        for sock, _ in held.values():
            sock.close()
        raise


def stored(root: Path, data: bytes) -> Path:
    """The store's copy of ``data`` in the agent under ``root`` (content-addressed)."""
    return root / "state" / "store" / hashlib.sha256(data).hexdigest() / "model.onnx"


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block (it reads nothing, loads nothing), SIGCONT after.

    Send no HTTP request meanwhile: a connection the kernel gives the paused process waits.
    """
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def replica_answers(agent: Daemon, after: int, path: str) -> tuple[list[str], list[str]]:
    """Request ids the replica logged for ``path`` since log index ``after``: those it
    handed to the primary (which logged the same id) and those it answered itself."""
    events = agent.events()[after:]
    by_primary = {
        e["request_id"] for e in events if e.get("event") == "request" and "replica" not in e
    }
    by_replica = [
        e["request_id"]
        for e in events
        if e.get("event") == "request" and e.get("path") == path and "replica" in e
    ]
    handed = [rid for rid in by_replica if rid in by_primary]
    return handed, [rid for rid in by_replica if rid not in by_primary]


def all_answer_v2_routes(url: str, version: int) -> bool:
    """Infer, model metadata and model ready answer 200 (infer from ``version``) on
    ``IN_A_ROW`` fresh connections each."""
    if not all_answer(url, 200, version=version):
        return False
    for path in ("/v2/models/aff", "/v2/models/aff/ready"):
        for _ in range(IN_A_ROW):
            reply = call(url + path)
            if reply.status != 200 or reply.json()["name"] != "aff":
                return False
    return True


def logged_ids(state: Path) -> set[str]:
    """Every id in the prediction log (read after the agent exited)."""
    with closing(sqlite3.connect(f"file:{state / 'predictions.db'}?mode=ro", uri=True)) as db:
        return {row[0] for row in db.execute("SELECT id FROM predictions")}


# -- the daemon with a replica ---------------------------------------------------------------


class TestServing:
    @pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
    def test_both_processes_serve_and_metrics_add_up(
        self, tmp_path: Path, v1: bytes, event_loop: str
    ) -> None:
        """Infer on either process; forwarded routes answer; one /metrics counts every
        request; the replica runs on the primary's event loop."""
        with start(tmp_path, {"aff.onnx": v1}, event_loop) as agent:
            ready = wait_replica_ready(agent)
            listening = agent.wait_for_event("replica_listening")
            ids = set()
            for i in range(60):
                values = [float(i), 1.0, -2.5, 0.25]
                reply = infer(agent.url, values)
                assert reply.status == 200, reply.body
                body = reply.json()
                ids.add(body["id"])
                assert body["model_version"] == "1"
                assert body["outputs"][0]["data"] == [v + 1.0 for v in values]
            for _ in range(20):
                bad = infer(agent.url, [1.0, 2.0, 3.0], shape=[1, 3])
                assert bad.status == 400, bad.body
                message = bad.json()["error"]
                assert isinstance(message, str)
                assert "shape" in message
            for _ in range(20):
                listed = call(agent.url + "/v1/models")
                assert listed.status == 200, listed.body
                assert "aff" in listed.body.decode()
            # Exact totals once the replica's snapshot arrived, and still exact a snapshot later.
            wait_until(lambda: requests_total(scrape(agent.url)) == 80)
            time.sleep(1.2)
            samples = scrape(agent.url)
            by_replica = requests_logged(agent, replica=True)
        assert ready["pid"] != agent.proc.pid
        assert len(ids) == 60  # generated ids (feedback keys) are unique across processes
        assert listening["replica"] == 1
        assert listening["pid"] == ready["pid"]
        assert listening["event_loop"] == event_loop
        assert requests_total(samples, "200") == 60
        assert requests_total(samples, "400") == 20
        assert samples[READY] == 1
        served = [e for e in by_replica if e["status"] == 200]
        assert 0 < len(served) < 60  # both processes answered some
        assert samples[SHIPPED] == len(served)
        assert samples[DROPPED] == 0
        assert any(e["status"] == 400 for e in by_replica)
        assert requests_logged(agent, replica=True, path="/v1/models")  # forwarded ones

    def test_a_second_agent_on_the_same_state_dir_is_refused(
        self, tmp_path: Path, v1: bytes
    ) -> None:
        """SO_REUSEPORT would let it share the port: the state dir's lock stops it first."""
        with start(tmp_path, {"aff.onnx": v1}) as agent:
            wait_replica_ready(agent)
            second = run_to_exit(agent.config_path)
            ok_infer(agent.url, "still-served")  # the first one keeps serving
        assert second.returncode == 2, second.stderr
        assert "another edge-agent is running with the state dir" in second.stderr

    def test_feedback_joins_predictions_a_replica_served(self, tmp_path: Path, v1: bytes) -> None:
        """Every id answered by either process is found by POST /v1/feedback."""
        ids = [f"fb-{i}" for i in range(40)]
        with start(tmp_path, {"aff.onnx": v1}) as agent:
            wait_replica_ready(agent)
            for rid in ids:
                ok_infer(agent.url, rid)
            by_replica = [e["request_id"] for e in requests_logged(agent, replica=True)]
            # The shipped counter goes up once the events are on the channel; the snapshot
            # that reports it follows them on the same channel.
            wait_until(lambda: scrape(agent.url).get(SHIPPED, 0) >= len(by_replica))
            answers = []
            for rid in ids:  # fresh connections: some are forwarded by the replica
                doc = {"feedback": [{"id": rid, "value": 2.0}]}
                gzipped = {"Content-Encoding": "gzip"}  # inflated once, by the receiver
                reply = call(
                    agent.url + "/v1/feedback", "POST", gzip.compress(orjson.dumps(doc)), gzipped
                )
                assert reply.status == 200, reply.body
                answers.append(reply.json())
            samples = scrape(agent.url)
            forwarded = requests_logged(agent, replica=True, path="/v1/feedback")
        assert set(by_replica) & set(ids)
        assert forwarded  # 40 connections: the kernel gave the replica some
        assert [a["accepted"] for a in answers] == [1] * 40
        assert all(a["unknown"] == 0 and a["unknown_ids"] == [] for a in answers)
        assert samples['edge_agent_feedback_records{outcome="accepted"}'] == 40


class TestRegistryChanges:
    def test_deploy_rollback_and_unload_reach_the_replica(self, tmp_path: Path, v1: bytes) -> None:
        """Each registry change ends with every connection answering the same way."""
        staging = tmp_path / "staging"
        staging.mkdir()
        with start(tmp_path / "agent", {"aff.onnx": v1}) as agent:
            wait_replica_ready(agent)
            assert all_answer(agent.url, 200, version=1)
            (staging / "model.onnx").write_bytes(affine(2))
            deploy_files(staging / "model.onnx", tmp_path / "agent" / "models", "aff", None, None)
            wait_until(lambda: all_answer(agent.url, 200, version=2))
            followed = agent.wait_for_event("model_swapped", replica=1, version=2)
            back = call(agent.url + "/v1/models/aff/rollback", "POST", b"{}")
            assert back.status == 200, back.body
            assert back.json()["active_version"] == 1
            wait_until(lambda: all_answer(agent.url, 200, version=1))
            (tmp_path / "agent" / "models" / "aff.onnx").unlink()
            wait_until(lambda: all_answer(agent.url, 404))
            unloaded = agent.wait_for_event("model_unloaded", replica=1)
            assert scrape(agent.url)[READY] == 1
        assert followed["how"] == "followed"
        assert followed["previous"] == 1
        assert unloaded["model"] == "aff"


class TestFollowFailures:
    """A replica that cannot load the version the primary serves never answers from another
    version: it hands that model's V2 routes to the primary and retries the load."""

    def test_failed_load_of_a_new_version_is_forwarded_until_the_store_is_repaired(
        self, tmp_path: Path, v1: bytes
    ) -> None:
        """v2's stored file is damaged after the primary loaded it and before the (paused)
        replica does: every answer still comes from v2, the replica's through the primary;
        once the file is repaired the replica's retry loads v2 and it answers itself."""
        root, v2 = tmp_path / "agent", affine(2)
        staging = tmp_path / "staging"
        staging.mkdir()
        (staging / "model.onnx").write_bytes(v2)
        with start(root, {"aff.onnx": v1}) as agent:
            replica = wait_replica_ready(agent)["pid"]
            with reaped(replica):
                assert all_answer(agent.url, 200, version=1)
                mark = len(agent.events())
                with paused(replica):
                    deploy_files(staging / "model.onnx", root / "models", "aff", None, None)
                    swapped = agent.wait_for_event("model_swapped", after=mark, version=2)
                    stored(root, v2).write_bytes(b"damaged after the primary loaded it")
                failed = agent.wait_for_event("replica_follow_failed", after=mark, replica=1)
                during = len(agent.events())
                assert all_answer_v2_routes(agent.url, version=2)
                handed = {p: replica_answers(agent, during, p) for p in _MODEL_ROUTES}
                stored(root, v2).write_bytes(v2)  # repaired
                recovered = agent.wait_for_event(
                    "replica_follow_recovered", after=during, replica=1
                )
                after = len(agent.events())
                assert all_answer_v2_routes(agent.url, version=2)
                own = replica_answers(agent, after, INFER)
        assert "replica" not in swapped  # the primary's swap (the replica was paused)
        assert (failed["level"], failed["model"], failed["version"]) == ("warning", "aff", 2)
        assert failed["retry_in_s"] == 1.0
        assert failed["retired"] == 1
        assert "session" in failed["reason"] or "load" in failed["reason"], failed["reason"]
        for path, (forwarded, answered) in handed.items():
            assert forwarded, f"the kernel gave the replica no {path} request"
            assert answered == [], f"the replica answered {path} itself while it lagged"
        assert (recovered["model"], recovered["version"]) == ("aff", 2)
        assert recovered["attempts"] >= 1
        forwarded, answered = own
        assert forwarded == []
        assert answered  # serving v2 itself again

    def test_replica_restarted_on_a_damaged_store_forwards_until_a_new_version(
        self, tmp_path: Path, v1: bytes
    ) -> None:
        """A replica restarted after v1's stored file was damaged cannot load v1: it starts
        anyway and hands ``aff`` to the primary (still on v1 in memory); the deploy of a good
        v2 makes it load and serve v2 itself at once."""
        root = tmp_path / "agent"
        with start(root, {"aff.onnx": v1}) as agent:
            first = wait_replica_ready(agent)["pid"]
            with reaped(first):
                stored(root, v1).write_bytes(b"damaged while v1 serves")
                mark = len(agent.events())
                os.kill(first, signal.SIGKILL)
                second = wait_replica_ready(agent, after=mark)["pid"]
            with reaped(second):
                failed = agent.wait_for_event("replica_follow_failed", after=mark, replica=1)
                during = len(agent.events())
                assert all_answer_v2_routes(agent.url, version=1)
                forwarded, answered = replica_answers(agent, during, INFER)
                deployed = len(agent.events())
                kit.deploy(root / "models", affine(2))
                recovered = agent.wait_for_event(
                    "replica_follow_recovered", after=deployed, replica=1
                )
                after = len(agent.events())
                assert all_answer_v2_routes(agent.url, version=2)
                own = replica_answers(agent, after, INFER)
        assert (failed["version"], failed["retired"]) == (1, None)
        assert forwarded
        assert answered == []
        assert (recovered["version"], recovered["failed_version"]) == (2, 1)
        assert own[0] == []
        assert own[1]


_MODEL_ROUTES = (INFER, "/v2/models/aff", "/v2/models/aff/ready")


class TestProcessLife:
    def test_killed_replica_comes_back_and_sigterm_stops_both(
        self, tmp_path: Path, v1: bytes
    ) -> None:
        """kill -9 of the replica: a new one, counters never go back; SIGTERM: both drain and
        stop, exit 0, and every prediction answered (during the drain too) is in the log."""
        with start(tmp_path, {"aff.onnx": v1}) as agent:
            first = wait_replica_ready(agent)
            with reaped(first["pid"]):
                for _ in range(30):
                    ok_infer(agent.url)
                wait_until(lambda: requests_total(scrape(agent.url)) == 30)
                mark = len(agent.events())
                os.kill(first["pid"], signal.SIGKILL)
                exited = agent.wait_for_event("replica_exited", after=mark, index=1)
                for _ in range(10):  # the primary serves alone, or with the new replica
                    ok_infer(agent.url)
                second = wait_replica_ready(agent, after=mark)
            with reaped(second["pid"]):
                for _ in range(40):
                    ok_infer(agent.url)
                wait_until(lambda: requests_total(scrape(agent.url)) == 80)
                ids = [f"last-{i}" for i in range(20)]
                for rid in ids:
                    ok_infer(agent.url, rid)
                mark = len(agent.events())
                held = hold_requests(agent.url, on_replica=2)
                try:
                    agent.send(signal.SIGTERM)
                    draining = agent.wait_for_event("draining", after=mark, replica=1)
                    replies = {
                        rid: finish_request(sock, body) for rid, (sock, body) in held.items()
                    }
                    code = agent.wait_exit()
                finally:
                    for sock, _ in held.values():
                        sock.close()
                wait_until(lambda: not alive(second["pid"]))
                stopped = agent.wait_for_event("replica_stopped", after=mark, replica=1)
                held_by_replica = [
                    e for e in requests_logged(agent, replica=True) if e["request_id"] in held
                ]
        assert exited["pid"] == first["pid"]
        assert exited["exit_code"] == -signal.SIGKILL
        assert second["pid"] != first["pid"]
        assert code == 0
        assert stopped["pid"] == second["pid"]
        assert draining["inflight"] >= 2
        assert {rid: r.status for rid, r in replies.items()} == dict.fromkeys(held, 200)
        assert len(held_by_replica) >= 2  # answered by the replica while it drained
        assert set(ids) | set(held) <= logged_ids(tmp_path / "state")

    def test_sigterm_while_the_replica_starts(self, tmp_path: Path, v1: bytes) -> None:
        """SIGTERM before the replica is ready: it is told to stop too, not left serving
        after the primary stopped and then killed at the deadline."""
        overrides = {"server": {"processes": 2, "drain_timeout_s": 0.5}}
        with running(tmp_path, overrides, models={"aff.onnx": v1}) as agent:
            agent.wait_for_event("replicas_starting")
            agent.send(signal.SIGTERM)
            code = agent.wait_exit()
            agent.wait_for_event("stopped")
            events = agent.events()
        assert code == 0
        killed = [e for e in events if e.get("event") == "replica_killed"]
        assert killed == [], killed

    def test_replica_stops_when_the_primary_is_killed(self, tmp_path: Path, v1: bytes) -> None:
        """kill -9 of the primary closes the channel: the replica stops by itself."""
        with start(tmp_path, {"aff.onnx": v1}) as agent:
            replica = wait_replica_ready(agent)["pid"]
            with reaped(replica):
                assert alive(replica)
                agent.proc.kill()
                agent.wait_exit()
                wait_until(lambda: not alive(replica))
                orphaned = agent.wait_for_event("replica_orphaned", replica=1)
        assert orphaned["level"] == "warning"


# -- in-process: a replica app beside an in-process primary ---------------------------------


class Shipped:
    """The primary's end of a replica's channel: what the replica shipped so far."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.failures: Counter[tuple[str, int]] = Counter()
        self.ids: set[str] = set()
        self.task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                message = await ipc.receive(reader)
            except ipc.ChannelClosed:
                return
            if message[0] == "events":
                self.ids.update(fields[0] for fields in message[1])
                for model, version, count in message[2]:
                    self.failures[(model, version)] += count


class Replica:
    """A replica app served on 127.0.0.1:0: its URL, its ``Follower``, what it shipped."""

    def __init__(self, url: str, registry: Follower, shipped: Shipped) -> None:
        self.url = url
        self.registry = registry
        self.shipped = shipped

    def serving(self) -> int | None:
        """The version of ``aff`` this process serves (None: none)."""
        entry = self.registry.models.get("aff")
        return entry.active.version if entry is not None and entry.active is not None else None

    async def follow(self, version: int) -> None:
        """What a ``sync`` message does; wait until ``version`` serves here."""
        self.registry.request_sync()
        await wait_for(lambda: self.serving() == version)


@asynccontextmanager
async def replica_beside(primary: Agent) -> AsyncIterator[Replica]:
    """A real replica app on ``primary``'s config and state dir. Its control socket does
    not exist: nothing can be forwarded (as while the primary stops)."""
    ours, theirs = socket.socketpair()
    reader, our_writer = await asyncio.open_unix_connection(sock=ours, limit=ipc.MAX_FRAME)
    _, writer = await asyncio.open_unix_connection(sock=theirs)
    shipped = Shipped(reader)
    control = str(primary.root / "no-primary.sock")
    app = build_replica_app(primary.config, control, writer)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2)
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        registry = app[REGISTRY]
        assert isinstance(registry, Follower)
        yield Replica(f"http://127.0.0.1:{runner.addresses[0][1]}", registry, shipped)
    finally:
        await runner.cleanup()
        writer.close()
        our_writer.close()
        await asyncio.wait_for(shipped.task, WAIT_S)
        await asyncio.gather(writer.wait_closed(), our_writer.wait_closed())


async def post(client: aiohttp.ClientSession, url: str, doc: dict[str, Any]) -> tuple[int, Any]:
    """POST JSON; status and decoded body."""
    async with client.post(url, json=doc) as resp:
        return resp.status, await resp.json(content_type=None)


async def fail_then_ship(primary: Agent, replica: Replica, failures: int, rid: str) -> None:
    """``failures`` requests the version fails (2 rows to a one-row model) on the replica,
    then one it answers (id ``rid``); returns once ``rid`` reached the primary's end: the
    failures were counted before it, so they were shipped with it or before."""
    for _ in range(failures):
        status, body = await post(primary.client, replica.url + INFER, kit.rows(2))
        assert status == 500, body
    status, body = await post(primary.client, replica.url + INFER, {**kit.rows(1), "id": rid})
    assert status == 200, body
    await wait_for(lambda: rid in replica.shipped.ids)


class TestReplicaInProcess:
    async def test_errors_shipped_count_from_when_the_version_went_live_again(
        self, tmp_path: Path
    ) -> None:
        """v1 fails 3 requests on the replica, v2 goes live, v1 is rolled back to and fails 2:
        the replica ships 3, then 2 (what the fresh v1 failed, as the primary's probation
        counts it), not 0 because the old v1 once shipped 3."""
        fragile = {"aff.onnx": kit.reshape_to_one_row(1)}
        async with kit.running(tmp_path / "a", fragile) as primary, replica_beside(primary) as rep:
            await rep.follow(version=1)
            await fail_then_ship(primary, rep, failures=3, rid="mark-1")
            first = dict(rep.shipped.failures)
            kit.deploy(primary.models_dir, kit.reshape_to_one_row(2))
            await kit.wait_active(primary, 2)
            await rep.follow(version=2)
            url = f"{primary.url}/v1/models/aff/rollback"
            assert await post(primary.client, url, {"version": 1}) == (
                200,
                {"model": "aff", "active_version": 1},
            )
            await rep.follow(version=1)
            await fail_then_ship(primary, rep, failures=2, rid="mark-2")
            total = dict(rep.shipped.failures)
        assert first == {("aff", 1): 3}
        assert total == {("aff", 1): 3 + 2}

    async def test_no_old_version_and_no_primary_to_ask_is_a_503_with_retry_after(
        self, tmp_path: Path
    ) -> None:
        """v2's stored file is damaged after the primary loaded it: the replica retires v1 and
        cannot forward (no control socket), so aff's V2 routes answer 503 with Retry-After
        and a message naming version 2 and what to check; retries back off 1 s, 2 s; once
        the file is repaired a retry loads v2."""
        v2 = kit.affine(2)
        async with (
            kit.running(tmp_path / "a", {"aff.onnx": kit.affine(1)}) as primary,
            replica_beside(primary) as rep,
        ):
            await rep.follow(version=1)
            kit.deploy(primary.models_dir, v2)
            await kit.wait_active(primary, 2)
            damaged = stored(primary.root, v2)
            damaged.write_bytes(b"damaged after the primary loaded it")
            rep.registry.request_sync()
            await wait_for(lambda: "aff" in rep.registry.lagging)
            first = rep.registry.lagging["aff"]
            replies = []
            for method, path in [
                ("POST", INFER),
                ("POST", "/v2/models/aff/versions/1/infer"),
                ("GET", "/v2/models/aff"),
                ("GET", "/v2/models/aff/ready"),
            ]:
                async with primary.client.request(method, rep.url + path, json=kit.rows(1)) as r:
                    replies.append((r.status, r.headers.get("Retry-After"), await r.json()))
            await wait_for(lambda: rep.registry.lagging["aff"].attempts == 2, timeout=WAIT_S)
            second = rep.registry.lagging["aff"]
            damaged.write_bytes(v2)
            await wait_for(lambda: "aff" not in rep.registry.lagging, timeout=WAIT_S)
            status, body = await post(primary.client, rep.url + INFER, kit.rows(1))
            serving = rep.serving()
        assert (first.version, first.attempts, first.retry_in_s) == (2, 1, 1.0)
        assert (second.version, second.attempts, second.retry_in_s) == (2, 2, 2.0)
        sha = hashlib.sha256(v2).hexdigest()
        for code, retry_after, doc in replies:
            assert (code, retry_after) == (503, "1"), doc
            assert 'could not load version 2 of model "aff"' in doc["error"]
            assert f"store/{sha}/model.onnx" in doc["error"]
        assert (status, body["model_version"]) == (200, "2")
        assert serving == 2

    def test_retries_back_off_from_1_s_doubling_to_30_s(self) -> None:
        """The wait after the n-th failed load in a row."""
        assert [retry_delay_s(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]


# -- unit: merged metrics ---------------------------------------------------------------------


def _families(text: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def _values(family: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


def _bucket(model: str, version: str, le: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    labels = (("le", le), ("model", model), ("version", version))
    return ("edge_agent_request_duration_seconds_bucket", labels)


class TestMergedMetrics:
    @staticmethod
    def _pair() -> tuple[Metrics, Metrics]:
        first, second = Metrics(), Metrics()
        first.requests.labels("m", "1", "200").inc(3)
        second.requests.labels("m", "1", "200").inc(4)
        second.requests.labels("m", "2", "500").inc(2)  # a label set only the second has
        first.request_seconds.labels("m", "1").observe(0.003)
        second.request_seconds.labels("m", "1").observe(0.003)
        second.request_seconds.labels("m", "1").observe(0.3)
        second.request_seconds.labels("m", "2").observe(0.0001)
        first.replica_events.labels("shipped").inc(0)
        second.replica_events.labels("shipped").inc(5)
        first.inflight = 2
        second.inflight = 5
        return first, second

    def test_counters_and_histograms_are_summed_gauges_are_not(self) -> None:
        """The primary's render adds a peer's counters and buckets; its gauges stay its own."""
        first, second = self._pair()
        first.peers = lambda: [second.snapshot()]
        text = first.render()
        families = _families(text)
        requests = _values(families["edge_agent_requests"])
        seconds = _values(families["edge_agent_request_duration_seconds"])
        events = _values(families["edge_agent_replica_events"])
        inflight = _values(families["edge_agent_inflight_requests"])
        mv1 = (("code", "200"), ("model", "m"), ("version", "1"))
        mv2 = (("code", "500"), ("model", "m"), ("version", "2"))
        assert requests[("edge_agent_requests_total", mv1)] == 7
        assert requests[("edge_agent_requests_total", mv2)] == 2
        assert seconds[_bucket("m", "1", "0.0002")] == 0
        assert seconds[_bucket("m", "1", "0.005")] == 2
        assert seconds[_bucket("m", "1", "0.5")] == 3
        assert seconds[_bucket("m", "1", "+Inf")] == 3
        m1 = (("model", "m"), ("version", "1"))
        assert seconds[("edge_agent_request_duration_seconds_count", m1)] == 3
        assert seconds[("edge_agent_request_duration_seconds_sum", m1)] == pytest.approx(0.306)
        m2 = (("model", "m"), ("version", "2"))
        assert seconds[_bucket("m", "2", "0.0002")] == 1
        assert seconds[_bucket("m", "2", "+Inf")] == 1
        assert seconds[("edge_agent_request_duration_seconds_count", m2)] == 1
        assert events[("edge_agent_replica_events_total", (("outcome", "shipped"),))] == 5
        assert inflight == {("edge_agent_inflight_requests", ()): 2}
        # One TYPE line per family, and every histogram's buckets climb to its count.
        types = [
            line.split()[2] for line in text.decode().splitlines() if line.startswith("# TYPE")
        ]
        assert len(types) == len(set(types))
        for family in families.values():
            if family.type == "histogram":
                self._check_histogram(family)

    @staticmethod
    def _check_histogram(family: Any) -> None:
        buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        counts: dict[tuple[tuple[str, str], ...], float] = {}
        for s in family.samples:
            rest = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            if s.name.endswith("_bucket"):
                buckets.setdefault(rest, []).append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                counts[rest] = s.value
        for labels, series in buckets.items():
            values = [v for _, v in sorted(series)]
            assert values == sorted(values), (family.name, labels)
            assert values[-1] == counts[labels], (family.name, labels)

    def test_render_is_repeatable_and_snapshots_stay_own(self) -> None:
        """Rendering twice gives the same sums; the primary's snapshot holds only its own."""
        first, second = self._pair()
        first.peers = lambda: [second.snapshot(), second.snapshot()]
        once = _values(_families(first.render())["edge_agent_requests"])
        twice = _values(_families(first.render())["edge_agent_requests"])
        mv1 = (("code", "200"), ("model", "m"), ("version", "1"))
        assert once == twice
        assert once[("edge_agent_requests_total", mv1)] == 3 + 4 + 4
        own = add_snapshots([first.snapshot()])
        assert own["edge_agent_requests"][("edge_agent_requests_total", mv1)] == 3
        mv2 = (("code", "500"), ("model", "m"), ("version", "2"))
        assert ("edge_agent_requests_total", mv2) not in own["edge_agent_requests"]
        assert "edge_agent_inflight_requests" not in own  # gauges are not shipped
        assert not any(name.endswith("_created") for samples in own.values() for name, _ in samples)
        first.peers = list
        alone = _values(_families(first.render())["edge_agent_requests"])
        assert alone[("edge_agent_requests_total", mv1)] == 3


# -- unit: the channel ----------------------------------------------------------------------


def _event(rid: str) -> PredictionEvent:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    return PredictionEvent(
        rid,
        "aff",
        2,
        1700000000.5,
        {"x": x, "t": np.array([b"a", b"bc"], dtype=object)},
        {"y": x + 2, "k": np.arange(3, dtype=np.int64)},
        0.001,
    )


def _same_event(got: PredictionEvent, want: PredictionEvent) -> None:
    assert (got.id, got.model, got.version, got.ts, got.latency_s) == (
        want.id,
        want.model,
        want.version,
        want.ts,
        want.latency_s,
    )
    for name in ("inputs", "outputs"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype
            assert np.array_equal(a[key], b[key])


class TestChannel:
    async def test_messages_round_trip_through_a_stream(self) -> None:
        """Frames fed to a StreamReader come back whole and in order; then the end is reported."""
        message = ("events", [_event("a"), _event("b")], [("aff", 2, 3)])
        reader = asyncio.StreamReader()
        reader.feed_data(ipc.encode(message) + ipc.encode(("sync",)))
        reader.feed_eof()
        kind, events, failures = await ipc.receive(reader)
        assert kind == "events"
        assert failures == [("aff", 2, 3)]
        for got, want in zip(events, message[1], strict=True):
            _same_event(got, want)
        assert await ipc.receive(reader) == ("sync",)
        with pytest.raises(ipc.ChannelClosed):
            await ipc.receive(reader)

    @pytest.mark.parametrize("keep", [2, 4, 10, -1], ids=["head", "no-body", "body", "last-byte"])
    async def test_truncated_stream_is_a_closed_channel(self, keep: int) -> None:
        """A stream that ends inside a frame raises ChannelClosed, not a pickle error."""
        frame = ipc.encode(("metrics", Metrics().snapshot()))
        reader = asyncio.StreamReader()
        reader.feed_data(frame[:keep])
        reader.feed_eof()
        with pytest.raises(ipc.ChannelClosed):
            await ipc.receive(reader)

    async def test_oversized_frame_is_a_corrupt_channel(self) -> None:
        """A length prefix beyond MAX_FRAME is refused before anything is read or unpickled."""
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack("<I", ipc.MAX_FRAME + 1) + b"\x80")
        with pytest.raises(ipc.ChannelClosed, match="corrupt"):
            await asyncio.wait_for(ipc.receive(reader), WAIT_S)

    async def test_send_and_receive_over_a_socketpair(self) -> None:
        """``send`` / ``open_channel`` / ``receive`` on a real socketpair, a big array included."""
        ours, theirs = socket.socketpair()
        _, writer = await asyncio.open_unix_connection(sock=ours)
        their_reader, their_writer = await ipc.open_channel(theirs.detach())
        try:
            big = np.random.default_rng(0).random((512, 512))  # 2 MB: more than a socket buffer
            sending = asyncio.ensure_future(ipc.send(writer, ("config", big)))
            kind, got = await asyncio.wait_for(ipc.receive(their_reader), WAIT_S)
            await asyncio.wait_for(sending, WAIT_S)
            assert kind == "config"
            assert np.array_equal(got, big)
            writer.close()
            await writer.wait_closed()
            with pytest.raises(ipc.ChannelClosed):
                await asyncio.wait_for(ipc.receive(their_reader), WAIT_S)
            with pytest.raises(ipc.ChannelClosed):
                await ipc.send(writer, ("stop",))
        finally:
            writer.close()
            their_writer.close()
            await asyncio.gather(writer.wait_closed(), their_writer.wait_closed())
