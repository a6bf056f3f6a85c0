"""Conservation: every acknowledged feedback reaches the collector, across kill -9 and outages.

The agent runs as ``python -m agent run`` and is SIGKILLed at seeded random moments (while
feedback requests are in flight, right after they were answered, and after a few sends)
and restarted on the same state dir. Meanwhile the reference collector is up, stopped,
answering 503 with Retry-After, and storing batches but losing its replies (so the agent
resends the same Idempotency-Key). Each feedback id the API acknowledged is an obligation;
at the end every obligation is in the collector exactly once, with its label, and no id
that was never predicted appears.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import load_collector, render_config
from feedback.kit import (
    CLASSES,
    ROOT,
    breast_cancer_data,
    breast_cancer_files,
    infer_doc,
)

SEED = 20_261_126
AGENT_ID = "conservation"
TOKEN = "conservation-token"
PER_ROUND = 24  # predictions per round, each then given feedback
CHUNK = 4  # feedback records per request (plus one foreign id each)
START_TIMEOUT_S = 30.0
DELIVERY_TIMEOUT_S = 30.0

#: (collector state while the agent runs, when the agent is killed): "during" = while
#: feedback requests are in flight, "before" = just after they were answered (before the
#: shipper is due), "sending" = some hundreds of ms later, while small batches drain.
ROUNDS = [
    ("up", "during"),
    ("up", "sending"),
    ("down", "sending"),
    ("503", "sending"),
    ("lost_reply", "before"),
]


@dataclass
class Ledger:
    """What the test knows: ids predicted, obligations (acknowledged feedback), foreign ids."""

    predicted: set[str] = field(default_factory=set)
    obligations: dict[str, str] = field(default_factory=dict)  # id -> expected class name
    foreign: set[str] = field(default_factory=set)
    unacknowledged: set[str] = field(default_factory=set)


class Collector:
    """The reference collector in this process, stoppable and restartable on one port."""

    def __init__(self, db: Path, http: aiohttp.ClientSession) -> None:
        self.db = db
        self.http = http
        self.port = 0
        self.runner: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        if self.runner is None:
            runner, url = await load_collector().start_collector(self.db, (TOKEN,), port=self.port)
            self.runner, self.port = runner, int(url.rsplit(":", 1)[1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def fail(self, **spec: Any) -> None:
        """Inject failures for the next batch POSTs (``count`` 0 clears them)."""
        async with self.http.post(self.url + "/v1/_fail", json=spec, headers=self._auth) as r:
            assert r.status == 200

    async def feedback(self) -> list[dict[str, Any]]:
        """Every stored feedback record of our agent, oldest first (paged)."""
        out: list[dict[str, Any]] = []
        after = 0
        for _ in range(100):
            query = {"kind": "feedback", "agent": AGENT_ID, "limit": "10000", "after": str(after)}
            async with self.http.get(
                self.url + "/v1/records", params=query, headers=self._auth
            ) as r:
                page = (await r.json())["records"]
            if not page:
                return out
            out.extend(page)
            after = page[-1]["seq"]
        raise AssertionError("more than 100 pages of records")

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": "Bearer " + TOKEN}


@dataclass
class Daemon:
    """One run of ``python -m agent run``."""

    proc: asyncio.subprocess.Process
    url: str
    log: Path


class Runs:
    """Starts the agent on one config and state dir; every run ends at teardown."""

    def __init__(self, root: Path, collector_port: int) -> None:
        self.root = root
        self.config = root / "agent.toml"
        self.count = 0
        self.live: list[asyncio.subprocess.Process] = []
        models = root / "models"
        models.mkdir(mode=0o755)
        models.chmod(0o755)
        for name, src in breast_cancer_files().items():
            assert isinstance(src, Path)
            (models / name).write_bytes(src.read_bytes())
        sections = {
            "server": {"host": "127.0.0.1", "port": 0, "drain_timeout_s": 2.0},
            "models": {"dir": models, "settle_ms": 100, "probation_s": 0.0},
            "state": {"dir": root / "state"},
            "upstream": {
                "url": f"http://127.0.0.1:{collector_port}/v1/batches",
                "token": TOKEN,
                "agent_id": AGENT_ID,
                "flush_interval_s": 0.2,
                "max_backoff_s": 0.5,
                "batch_max_records": 4,  # many small batches: kills land between and in sends
                "timeout_s": 2.0,
            },
            "log": {"level": "info", "format": "json"},
        }
        self.config.write_text(render_config(sections))

    async def start(self) -> Daemon:
        self.count += 1
        log = self.root / f"run{self.count}.log"
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "agent", "run", "--config", str(self.config)),
                cwd=ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
            )
        self.live.append(proc)
        port = await _listening_port(proc, log)
        return Daemon(proc, f"http://127.0.0.1:{port}", log)

    async def kill(self, daemon: Daemon) -> None:
        os.kill(daemon.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(daemon.proc.wait(), 10)

    async def close(self) -> None:
        for proc in self.live:
            if proc.returncode is None:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 10)


async def _listening_port(proc: asyncio.subprocess.Process, log: Path) -> int:
    """The port from the ``server_listening`` line on stderr (bounded wait)."""
    for _ in range(int(START_TIMEOUT_S / 0.05)):
        for line in log.read_text(errors="replace").splitlines():
            if '"server_listening"' in line:
                return int(json.loads(line)["port"])
        assert proc.returncode is None, "agent exited early:\n" + log.read_text(errors="replace")
        await asyncio.sleep(0.05)
    raise AssertionError(f"agent did not listen within {START_TIMEOUT_S} s")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for the agent runs and the collector."""
    async with aiohttp.ClientSession() as session:
        yield session


async def predict(http: aiohttp.ClientSession, daemon: Daemon, ids: list[str]) -> list[str]:
    """One prediction per id; returns the ids the agent answered."""
    rows, _ = breast_cancer_data()
    answered = []
    for rid in ids:
        row = rows[int(rid.rsplit("-", 1)[1]) % len(rows)][None, :]
        url = daemon.url + "/v2/models/breast_cancer/infer"
        async with http.post(url, json=infer_doc(rid, row)) as resp:
            assert resp.status == 200, await resp.text()
            answered.append(rid)
    return answered


async def send_feedback(
    http: aiohttp.ClientSession, daemon: Daemon, ids: list[str], ledger: Ledger, tag: str
) -> None:
    """Feedback in chunks (labels by index or by name, one foreign id each); records acks.

    Stops quietly at the first connection error: the agent may be killed meanwhile.
    """
    _, labels = breast_cancer_data()
    for n, start in enumerate(range(0, len(ids), CHUNK)):
        chunk = ids[start : start + CHUNK]
        foreign = f"foreign-{tag}-{n}"
        ledger.foreign.add(foreign)
        truth = {rid: int(labels[int(rid.rsplit("-", 1)[1]) % len(labels)]) for rid in chunk}
        records: list[dict[str, Any]] = [
            {"id": rid, "label": k if i % 2 else CLASSES[k]}
            for i, (rid, k) in enumerate(truth.items())
        ]
        records.append({"id": foreign, "label": 0})
        ledger.unacknowledged.update(chunk)
        try:
            async with http.post(daemon.url + "/v1/feedback", json={"feedback": records}) as resp:
                assert resp.status == 200, await resp.text()
                answer = await resp.json()
        except aiohttp.ClientError:
            return
        assert answer["accepted"] == len(chunk)
        assert foreign in answer["unknown_ids"]
        for rid in chunk:
            ledger.obligations[rid] = CLASSES[truth[rid]]
            ledger.unacknowledged.discard(rid)


async def steer(collector: Collector, state: str) -> None:
    """Put the collector in ``state`` for the next run of the agent."""
    if state == "down":
        await collector.stop()
        return
    await collector.start()
    if state == "503":
        await collector.fail(status=503, count=2, retry_after=0.1)
    elif state == "lost_reply":
        await collector.fail(status=503, count=2, retry_after=0.1, after_store=True)
    else:
        await collector.fail(status=503, count=0)


async def one_round(
    http: aiohttp.ClientSession, runs: Runs, ledger: Ledger, rng: random.Random, r: int
) -> None:
    """Start the agent, predict, send feedback, and kill the agent at the chosen moment."""
    daemon = await runs.start()
    ids = [f"r{r}-{i}" for i in range(r * PER_ROUND, (r + 1) * PER_ROUND)]
    ledger.predicted.update(await predict(http, daemon, ids))
    moment = ROUNDS[r][1]
    task = asyncio.create_task(send_feedback(http, daemon, ids, ledger, str(r)))
    if moment == "during":
        await asyncio.sleep(rng.uniform(0.005, 0.04))
    else:
        await task
        await asyncio.sleep(rng.uniform(0.0, 0.02) if moment == "before" else rng.uniform(0.2, 0.8))
    await runs.kill(daemon)
    await task


def resent_batches(logs: list[Path]) -> int:
    """Batches the agent sent again after a failed attempt (same key), over every run."""
    failed, sent = set(), set()
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            doc = json.loads(line)
            if doc.get("event") == "outbox_send_failed" and doc.get("batch"):
                failed.add(doc["batch"])
            elif doc.get("event") == "outbox_batch_sent":
                sent.add(doc["batch"])
    return len(failed & sent)


class TestConservation:
    async def test_acknowledged_feedback_survives_kills_and_outages(
        self, http: aiohttp.ClientSession, tmp_path: Path
    ) -> None:
        """After kill -9s and collector outages, every acknowledged id arrives once, labelled."""
        rng = random.Random(SEED)
        collector = Collector(tmp_path / "collector.db", http)
        await collector.start()
        runs = Runs(tmp_path, collector.port)
        ledger = Ledger()
        try:
            for r, (state, _) in enumerate(ROUNDS):
                await steer(collector, state)
                await one_round(http, runs, ledger, rng, r)
            await steer(collector, "up")
            final = await runs.start()
            delivered = await _wait_delivered(collector, ledger)
            final.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(final.proc.wait(), 20) == 0
        finally:
            await runs.close()
            await collector.stop()

        ids = Counter(d["record"]["id"] for d in delivered)
        duplicates = {i: n for i, n in ids.items() if n > 1}
        labels = {d["record"]["id"]: d["record"]["label"] for d in delivered}
        missing = set(ledger.obligations) - set(ids)
        print(
            "\nconservation:",
            f"kills={len(ROUNDS)}",
            f"predicted={len(ledger.predicted)}",
            f"obligations={len(ledger.obligations)}",
            f"delivered={len(set(ledger.obligations) & set(ids))}",
            f"delivered_unacknowledged={len(set(ids) - set(ledger.obligations))}",
            f"duplicate_ids={len(duplicates)}",
            f"resent_batches={resent_batches(sorted(tmp_path.glob('run*.log')))}",
        )
        assert not missing, f"{len(missing)} acknowledged ids never arrived: {sorted(missing)[:10]}"
        assert not duplicates, f"ids stored under different batch keys: {duplicates}"
        assert {i: labels[i] for i in ledger.obligations} == ledger.obligations
        assert set(ids) <= ledger.predicted  # nothing foreign, nothing invented
        assert not set(ids) & ledger.foreign
        assert len(ledger.obligations) >= PER_ROUND  # the test exercised something


async def _wait_delivered(collector: Collector, ledger: Ledger) -> list[dict[str, Any]]:
    """Poll the collector until every obligation is stored (bounded); returns what it holds."""
    delivered: list[dict[str, Any]] = []
    for _ in range(int(DELIVERY_TIMEOUT_S / 0.2)):
        delivered = await collector.feedback()
        if set(ledger.obligations) <= {d["record"]["id"] for d in delivered}:
            return delivered
        await asyncio.sleep(0.2)
    return delivered
