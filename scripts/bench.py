"""Benchmark edge-agent against the physical limit and a minimal server, in one run.

    .venv/bin/python scripts/bench.py            # about 4 minutes on 2 cores
    .venv/bin/python scripts/bench.py --quick    # about 30 s smoke run

What it does, in order:

1. writes three models into a temp drop dir (``bench_models.py``: a 30-feature MLP, a small
   CNN on 3x64x64 images, the text example) and pre-encodes one batch-1 request per model
   and wire format (JSON, binary extension, msgpack);
2. starts a *minimal server* (``--minimal-server``: one aiohttp process whose handler
   decodes V2 with orjson/msgpack and numpy and calls ``session.run`` inline), the agent
   (``python -m agent run``, defaults) and the agent with batching off, all at once, and
   drives every cell (model, format, concurrency) against each of them in turn, in 1 s
   rounds that rotate between the servers: background load on a shared machine then hits
   all of them alike, and the ratios stay meaningful. Around each round it reads the CPU
   time of the server, of the load generator and of the whole machine (``/proc``), so a
   cell disturbed by other processes shows it ("other cores");
3. measures the agent while a new tabular version is deployed every 0.5 s (and the CNN's
   p99 meanwhile), one setting at a time against the default agent (access log; drift
   sketches, when the drift monitor is running), idle and loaded RSS, and the records per
   second the outbox accepts durably;
4. measures onnxruntime in-process on the same rows, at batch 1 and at the mean batch sizes
   the batcher formed (``edge_agent_batch_rows`` from ``/metrics``): the physical limit;
5. prints the report (markdown) on stdout; progress goes to stderr.

The load generator is ``wrk`` (installed with apt-get when missing and possible) with a
small Lua script; without it, a lean aiohttp client in a subprocess (``--load-gen``).
Numbers are ratios from one run on one machine: never use them as timed assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models

ROOT: Final = Path(__file__).resolve().parents[1]
HEADER: Final = "Inference-Header-Content-Length"
FORMATS: Final = ("json", "binary", "msgpack")
MODELS: Final = ("tabular", "cnn", "sentiment")
CTYPES: Final = {
    "json": "application/json",
    "binary": "application/octet-stream",
    "msgpack": "application/msgpack",
}
SWAP_EVERY_S: Final = 0.5
ROUND_S: Final = 1  # wrk takes whole seconds
MB: Final = 1024.0
TICK: Final = os.sysconf("SC_CLK_TCK")


def note(message: str) -> None:
    """Progress on stderr; the report goes to stdout."""
    print(message, file=sys.stderr, flush=True)


# --- plan and results ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """What to run and for how long."""

    rounds: int  # 1 s rounds per server and cell
    models: tuple[str, ...]
    formats: tuple[str, ...]
    concurrency: tuple[int, ...]
    batching_off: bool
    warm_up: bool
    swap_seconds: int
    variant_cells: int
    outbox_seconds: float
    ort_seconds: float
    python_load: bool

    @staticmethod
    def from_args(args: argparse.Namespace) -> Plan:
        if args.quick:
            return Plan(
                1,
                ("tabular", "cnn"),
                ("json", "binary"),
                (1, 32),
                False,
                False,
                2,
                1,
                0.3,
                0.2,
                args.python_load,
            )
        return Plan(
            args.seconds, MODELS, FORMATS, (1, 32), True, True, 5, 5, 1.5, 0.6, args.python_load
        )


@dataclass(frozen=True, slots=True)
class Request:
    """One pre-encoded batch-1 request: the body file and the headers that go with it."""

    model: str
    fmt: str
    body: Path
    header_length: int | None


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What a load generator measured."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @staticmethod
    def combine(rounds: Sequence[LoadResult]) -> LoadResult:
        """Rounds of one cell: counts add up; p50 is the median round's, p99 the worst's."""
        return LoadResult(
            sum(r.requests for r in rounds),
            sum(r.errors for r in rounds),
            sum(r.seconds for r in rounds),
            statistics.median(r.p50_ms for r in rounds),
            max(r.p99_ms for r in rounds),
        )


@dataclass(frozen=True, slots=True)
class Cpu:
    """CPU seconds spent during some wall time: by the server, the load generator, the rest."""

    server: float = 0.0
    client: float = 0.0
    other: float = 0.0
    wall: float = 0.0

    def __add__(self, more: Cpu) -> Cpu:
        return Cpu(
            self.server + more.server,
            self.client + more.client,
            self.other + more.other,
            self.wall + more.wall,
        )

    def cores(self, what: str) -> float:
        return float(getattr(self, what)) / self.wall if self.wall else 0.0


@dataclass(slots=True)
class Cell:
    """One measured combination of server, model, wire format, concurrency and batching."""

    server: str  # "minimal", "agent", or a variant name
    model: str
    fmt: str
    concurrency: int
    batching: bool
    rounds: list[LoadResult] = field(default_factory=list)
    cpu: Cpu = field(default_factory=Cpu)
    timing: dict[str, float] = field(default_factory=dict)  # agent only, see TIMINGS

    @property
    def mean_batch(self) -> float | None:
        return self.timing.get("batch")

    @property
    def result(self) -> LoadResult:
        return LoadResult.combine(self.rounds)


# --- request bodies --------------------------------------------------------------------------


def encode_requests(
    models: list[bench_models.BenchModel], out: Path
) -> dict[tuple[str, str], Request]:
    """Every model's batch-1 request in every wire format, written to files for wrk."""
    from agent.api import codec_binary, codec_json, codec_msgpack
    from agent.tensors import InferRequest

    out.mkdir(parents=True, exist_ok=True)
    requests: dict[tuple[str, str], Request] = {}
    for model in models:
        wire = _as_wire(model.rows)
        plain = InferRequest(inputs={model.input_name: wire})
        binary = InferRequest(inputs={model.input_name: wire}, binary_output=True)
        encoded: dict[str, tuple[bytes, int | None]] = {
            "json": (codec_json.encode_request(plain), None),
            "binary": codec_binary.encode_request(binary, binary_inputs=True),
            "msgpack": (codec_msgpack.encode_request(plain, raw=True), None),
        }
        for fmt, (body, header_length) in encoded.items():
            path = out / f"{model.name}.{fmt}.body"
            path.write_bytes(body)
            requests[model.name, fmt] = Request(model.name, fmt, path, header_length)
    return requests


def _as_wire(rows: Any) -> Any:
    """BYTES tensors travel as ``bytes`` elements."""
    if rows.dtype == object:
        out = np.empty(rows.shape, dtype=object)
        out[...] = [str(x).encode() for x in rows.ravel()]
        return out
    return rows


def headers_for(request: Request) -> dict[str, str]:
    """The HTTP headers a request of this wire format carries."""
    headers = {"Content-Type": CTYPES[request.fmt]}
    if request.header_length is not None:
        headers[HEADER] = str(request.header_length)
    return headers


# --- the load generators ---------------------------------------------------------------------

_WRK_LUA: Final = r"""
wrk.method = "POST"
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CTYPE")
local h = os.getenv("BENCH_HEADER_LENGTH")
if h ~= nil and h ~= "" then wrk.headers["Inference-Header-Content-Length"] = h end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "errors": %d, "seconds": %.6f, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, e.connect + e.read + e.write + e.status + e.timeout,
    summary.duration / 1e6, latency:percentile(50), latency:percentile(99)))
end
"""


def find_wrk(allow_install: bool) -> str | None:
    """The wrk binary; installed with apt-get when missing (as root, unless told not to)."""
    found = shutil.which("wrk")
    if found or not allow_install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    note("wrk is missing: apt-get install -y wrk ...")

    def apt(*args: str) -> bool:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        done = subprocess.run(
            ["apt-get", *args], env=env, capture_output=True, check=False, timeout=300
        )
        return done.returncode == 0

    if not apt("install", "-y", "-qq", "wrk") and apt("update", "-qq"):
        apt("install", "-y", "-qq", "wrk")
    return shutil.which("wrk")


class LoadGen:
    """Starts one load run as a subprocess (wrk, or this script's ``--load-gen``)."""

    def __init__(self, wrk: str | None, work: Path) -> None:
        self.wrk = wrk
        self._lua = work / "bench.lua"
        self._lua.write_text(_WRK_LUA)

    def start(
        self, url: str, request: Request, concurrency: int, seconds: int
    ) -> subprocess.Popen[str]:
        endpoint = f"{url}/v2/models/{request.model}/infer"
        if self.wrk is None:
            spec = {
                "url": endpoint,
                "body": str(request.body),
                "headers": headers_for(request),
                "concurrency": concurrency,
                "seconds": seconds,
            }
            cmd = [sys.executable, __file__, "--load-gen", json.dumps(spec)]
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        env = dict(
            os.environ,
            BENCH_BODY=str(request.body),
            BENCH_CTYPE=CTYPES[request.fmt],
            BENCH_HEADER_LENGTH=str(request.header_length or ""),
        )
        cmd = [
            self.wrk,
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            str(self._lua),
            endpoint,
        ]
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    @staticmethod
    def finish(proc: subprocess.Popen[str], seconds: int) -> LoadResult:
        out, err = proc.communicate(timeout=seconds + 30)
        for line in out.splitlines():
            if line.startswith("BENCH_RESULT "):
                doc = json.loads(line.removeprefix("BENCH_RESULT "))
                return LoadResult(
                    doc["requests"],
                    doc["errors"],
                    doc["seconds"],
                    doc["p50_us"] / 1000,
                    doc["p99_us"] / 1000,
                )
        raise RuntimeError(f"the load generator printed no result: {out[-500:]} {err[-500:]}")

    def run(self, url: str, request: Request, concurrency: int, seconds: int) -> LoadResult:
        return self.finish(self.start(url, request, concurrency, seconds), seconds)


def load_gen_main(spec_text: str) -> int:
    """``--load-gen SPEC``: the Python fallback generator; prints one BENCH_RESULT line."""
    spec = json.loads(spec_text)
    result = asyncio.run(_python_load(spec, Path(spec["body"]).read_bytes()))
    doc = {
        "requests": result.requests,
        "errors": result.errors,
        "seconds": result.seconds,
        "p50_us": int(result.p50_ms * 1000),
        "p99_us": int(result.p99_ms * 1000),
    }
    print("BENCH_RESULT " + json.dumps(doc), flush=True)
    return 0


async def _python_load(spec: dict[str, Any], body: bytes) -> LoadResult:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    cap = 2_000_000  # a request-count cap on top of the duration
    connector = aiohttp.TCPConnector(limit=spec["concurrency"])
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        deadline = start + spec["seconds"]

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline and len(latencies) + errors < cap:
                sent = time.perf_counter()
                try:
                    async with session.post(
                        spec["url"], data=body, headers=spec["headers"]
                    ) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except Exception:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
        elapsed = time.perf_counter() - start
    p50, p99 = (np.percentile(latencies, [50, 99]) * 1000) if latencies else (0.0, 0.0)
    return LoadResult(len(latencies) + errors, errors, elapsed, float(p50), float(p99))


# --- the minimal server ----------------------------------------------------------------------


def minimal_server_main(models_dir: str) -> int:
    """``--minimal-server DIR``: the reference server; prints its port, serves until SIGTERM."""
    from aiohttp import web

    app = _minimal_app(Path(models_dir))

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        print(json.dumps({"port": runner.addresses[0][1]}), flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())
    return 0


_V2_DTYPES: Final = {
    "FP32": np.float32,
    "FP64": np.float64,
    "INT64": np.int64,
    "INT32": np.int32,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


def ort_session(path: Path, threads: int = 1) -> Any:
    """A session built the way the agent builds its own (1 thread each, no spinning)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _minimal_app(models_dir: Path) -> Any:
    import msgpack
    import orjson
    from aiohttp import web

    sessions = {p.stem: ort_session(p) for p in sorted(models_dir.glob("*.onnx"))}
    outputs = {name: [o.name for o in s.get_outputs()] for name, s in sessions.items()}

    async def infer(request: web.Request) -> Any:
        name = request.match_info["name"]
        body = await request.read()
        header = request.headers.get(HEADER)
        if header is not None:
            inputs, fmt = _minimal_binary(body, int(header), orjson.loads), "binary"
        elif request.content_type == "application/msgpack":
            inputs, fmt = _minimal_tensors(msgpack.unpackb(body)), "msgpack"
        else:
            inputs, fmt = _minimal_tensors(orjson.loads(body)), "json"
        results = sessions[name].run(outputs[name], inputs)
        return _minimal_reply(name, dict(zip(outputs[name], results, strict=True)), fmt)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v2/models/{name}/infer", infer)
    return app


def _minimal_array(tensor: dict[str, Any], data: Any) -> Any:
    shape = tensor["shape"]
    if tensor["datatype"] == "BYTES":
        items = [x.decode() if isinstance(x, bytes) else x for x in data]
        return np.array(items, dtype=object).reshape(shape)
    dtype = _V2_DTYPES[tensor["datatype"]]
    if isinstance(data, bytes):
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    return np.asarray(data, dtype=dtype).reshape(shape)


def _minimal_tensors(doc: dict[str, Any]) -> dict[str, Any]:
    return {t["name"]: _minimal_array(t, t["data"]) for t in doc["inputs"]}


def _minimal_binary(body: bytes, length: int, loads: Callable[[bytes], Any]) -> dict[str, Any]:
    doc = loads(body[:length])
    offset = length
    inputs = {}
    for tensor in doc["inputs"]:
        size = tensor["parameters"]["binary_data_size"]
        raw = body[offset : offset + size]
        offset += size
        if tensor["datatype"] == "BYTES":
            items, pos = [], 0
            while pos < len(raw):
                n = int.from_bytes(raw[pos : pos + 4], "little")
                items.append(raw[pos + 4 : pos + 4 + n])
                pos += 4 + n
            inputs[tensor["name"]] = _minimal_array(tensor, items)
        else:
            inputs[tensor["name"]] = _minimal_array(tensor, raw)
    return inputs


_NUMPY_V2: Final = {np.dtype(t): n for n, t in _V2_DTYPES.items()}


def _minimal_reply(name: str, results: dict[str, Any], fmt: str) -> Any:
    import msgpack
    import orjson
    from aiohttp import web

    def head(out: str, array: Any) -> dict[str, Any]:
        return {
            "name": out,
            "datatype": _NUMPY_V2.get(array.dtype, "BYTES"),
            "shape": list(array.shape),
        }

    if fmt == "json":
        outputs = [head(k, v) | {"data": v.ravel()} for k, v in results.items()]
        body = orjson.dumps(
            {"model_name": name, "outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY
        )
        return web.Response(body=body, content_type="application/json")
    raw = {k: v.tobytes() for k, v in results.items()}
    if fmt == "msgpack":
        outputs = [head(k, v) | {"data": raw[k]} for k, v in results.items()]
        return web.Response(
            body=msgpack.packb({"model_name": name, "outputs": outputs}),
            content_type="application/msgpack",
        )
    outputs = [
        head(k, v) | {"parameters": {"binary_data_size": len(raw[k])}} for k, v in results.items()
    ]
    header = orjson.dumps({"model_name": name, "outputs": outputs})
    return web.Response(
        body=header + b"".join(raw.values()),
        content_type="application/octet-stream",
        headers={HEADER: str(len(header))},
    )


# --- server processes ------------------------------------------------------------------------


def _http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@dataclass
class Server:
    """A server process we started: its URL and PID; ``stop`` ends it (by its PID only)."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path | None = None
    batching: bool = True
    is_agent: bool = True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def pids(self) -> list[int]:
        """The server's process and its children (the agent's replica processes)."""
        pids = [self.proc.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            pids += [int(p) for p in children.split()]
        return pids

    def rss_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MB, summed over the server's processes."""
        values = {"VmRSS": 0.0, "VmHWM": 0.0}
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    key, _, rest = line.partition(":")
                    if key in values:
                        values[key] += int(rest.split()[0]) / MB
        return values["VmRSS"], values["VmHWM"]

    def metrics(self) -> str:
        return _http("GET", self.url + "/metrics")[2].decode()

    def cpu_s(self) -> float:
        """CPU seconds used so far by the server's processes (every thread)."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / TICK
        return total


def start_minimal(models_dir: Path) -> Server:
    """The minimal reference server as a subprocess."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--minimal-server", str(models_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        raise RuntimeError("the minimal server exited before printing its port")
    port = json.loads(line)["port"]
    return Server("minimal", proc, f"http://127.0.0.1:{port}", is_agent=False)


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str | Path):
            return json.dumps(str(v))
        return repr(v)

    return "\n".join(
        f"[{s}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in body.items())
        for s, body in sections.items()
    )


def agent_settings(overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The bench's agent config: defaults, plus port 0, JSON logs and no access log."""
    sections: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "log": {"level": "info", "format": "json", "access_log": False},
    }
    for section, body in (overrides or {}).items():
        sections.setdefault(section, {}).update(body)
    return sections


def start_agent(
    name: str, work: Path, models_src: Path, overrides: dict[str, dict[str, Any]] | None = None
) -> Server:
    """``python -m agent run`` on a copy of ``models_src``, until it is listening and ready."""
    home = work / name
    shutil.copytree(models_src, home / "models")
    sections = agent_settings(overrides)
    sections.setdefault("models", {})["dir"] = home / "models"
    sections.setdefault("state", {})["dir"] = home / "state"
    config = home / "agent.toml"
    config.write_text(_toml(sections))
    log = home / "agent.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=sink,
            cwd=ROOT,
        )
    batching = bool(sections.get("batching", {}).get("enabled", True))
    server = Server(name, proc, "", log, batching=batching)
    try:
        server.url = f"http://127.0.0.1:{_wait_listening(proc, log)}"
        _wait_ready(server.url)
        _wait_replicas(server.url, int(sections["server"].get("processes", 1)) - 1)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_replicas(url: str, count: int, timeout_s: float = 60) -> None:
    """Until ``count`` replica processes serve (``edge_agent_replicas_ready``)."""
    deadline = time.monotonic() + timeout_s
    while count > 0:
        status, _, body = _http("GET", url + "/metrics")
        if status == 200 and metric_sum(body.decode(), "edge_agent_replicas_ready") >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} replica(s) not ready after {timeout_s} s")
        time.sleep(0.2)


def _wait_listening(proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                event = json.loads(line)
                if event.get("event") == "server_listening":
                    return int(event["port"])
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited ({proc.returncode}): {log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"no server_listening line within {timeout_s} s; see {log}")


def _wait_ready(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if _http("GET", url + "/v2/health/ready")[0] == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not become ready within {timeout_s} s")


# --- correctness and metrics -----------------------------------------------------------------


def check_answer(url: str, request: Request, expected_label: Any) -> str | None:
    """None when the server answers this request with the in-process label; else why not."""
    from agent.api import codec_binary, codec_json, codec_msgpack

    status, headers, body = _http(
        "POST",
        f"{url}/v2/models/{request.model}/infer",
        request.body.read_bytes(),
        headers_for(request),
    )
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    if request.fmt == "msgpack":
        response = codec_msgpack.decode_response(body)
    elif HEADER in headers:
        response = codec_binary.decode_response(body, int(headers[HEADER]))
    else:
        response = codec_json.decode_response(body)
    label = response.outputs.get("label")
    if label is None or not np.array_equal(np.asarray(label), expected_label):
        return f"label {label} differs from in-process {expected_label}"
    return None


_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})?\s+(\S+)$")


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels`` (all versions together)."""
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


#: Histograms read around each agent cell: rows per run, time in the handler, time queued
#: for a batch, time of a batch on the executor (onnxruntime plus the thread's own overhead).
TIMINGS: Final = {
    "batch": "edge_agent_batch_rows",
    "handler_s": "edge_agent_request_duration_seconds",
    "queued_s": "edge_agent_queue_duration_seconds",
    "run_s": "edge_agent_compute_duration_seconds",
}


def agent_counters(server: Server, model: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of every ``TIMINGS`` histogram of ``model``, all versions together."""
    text = server.metrics()
    return {
        key: (
            metric_sum(text, name + "_sum", model=model),
            metric_sum(text, name + "_count", model=model),
        )
        for key, name in TIMINGS.items()
    }


def counter_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean of each histogram over the observations between two reads."""
    means = {}
    for key, (total, count) in after.items():
        runs = count - before[key][1]
        if runs > 0:
            means[key] = (total - before[key][0]) / runs
    return means


# --- onnxruntime in-process: the physical limit ----------------------------------------------


def _feed(model: bench_models.BenchModel, batch: int) -> dict[str, Any]:
    return {model.input_name: np.repeat(model.rows, batch, axis=0)}


def ort_rows_per_s(
    path: Path, model: bench_models.BenchModel, batch: int, threads: int, seconds: float
) -> float:
    """Rows/s of one shared session run by ``threads`` Python threads, as the agent runs it."""
    session = ort_session(path)
    feed = _feed(model, batch)
    names = [o.name for o in session.get_outputs()]
    session.run(names, feed)
    counts = [0] * threads
    deadline = time.perf_counter() + seconds

    def loop(index: int) -> None:
        while time.perf_counter() < deadline:
            session.run(names, feed)
            counts[index] += 1

    start = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) * batch / (time.perf_counter() - start)


def ort_latency_us(path: Path, model: bench_models.BenchModel, batch: int, seconds: float) -> float:
    """Median time of one ``session.run`` call on ``batch`` rows, one thread, in µs."""
    session = ort_session(path)
    feed = _feed(model, batch)
    names = [o.name for o in session.get_outputs()]
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sent = time.perf_counter()
        session.run(names, feed)
        times.append(time.perf_counter() - sent)
    return float(np.median(times) * 1e6)


def expected_label(path: Path, model: bench_models.BenchModel) -> Any:
    session = ort_session(path)
    return session.run(["label"], _feed(model, 1))[0]


# --- the bench -------------------------------------------------------------------------------


def _machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy so far (user, system, irq, steal)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / TICK


def _children_cpu_s() -> float:
    """CPU seconds of this process's finished children (the load generator runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def cpu_meter(server: Server, into: list[Cpu]) -> Iterator[None]:
    """Append the CPU spent while the body runs: server, load generator, everything else."""
    before = (server.cpu_s(), _children_cpu_s(), _machine_busy_s(), time.monotonic())
    yield
    after = (server.cpu_s(), _children_cpu_s(), _machine_busy_s(), time.monotonic())
    srv, cli, busy, wall = (b - a for a, b in zip(before, after, strict=True))
    into.append(Cpu(srv, cli, max(0.0, busy - srv - cli), wall))


@dataclass
class Bench:
    """One bench run: its plan, files, load generator, and everything measured."""

    plan: Plan
    work: Path
    load: LoadGen
    models: dict[str, bench_models.BenchModel]
    requests: dict[tuple[str, str], Request]
    cells: list[Cell] = field(default_factory=list)
    variants: list[tuple[str, Cell, Cell]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sections: dict[str, list[str]] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)
    ort: dict[tuple[str, int], float] = field(default_factory=dict)
    ort_latency: dict[tuple[str, int], float] = field(default_factory=dict)
    loadavg: list[str] = field(default_factory=list)
    background: float = 0.0

    @property
    def drop(self) -> Path:
        return self.work / "models"

    def find(self, server: str, model: str, fmt: str, concurrency: int) -> Cell | None:
        """The cell of ``server`` (batching on, for the agent) with these settings."""
        for cell in self.cells:
            if (cell.server, cell.model, cell.fmt, cell.concurrency, cell.batching) == (
                server,
                model,
                fmt,
                concurrency,
                True,
            ):
                return cell
        return None

    def cell_keys(self) -> Iterator[tuple[str, str, int]]:
        for model in self.plan.models:
            for fmt in self.plan.formats:
                for concurrency in self.plan.concurrency:
                    yield model, fmt, concurrency

    def check(self, server: Server) -> None:
        """Every (model, format) answers with the in-process label before it is measured."""
        for model in self.plan.models:
            label = expected_label(self.drop / f"{model}.onnx", self.models[model])
            for fmt in self.plan.formats:
                problem = check_answer(server.url, self.requests[model, fmt], label)
                if problem:
                    self.problems.append(f"{server.name} {model} {fmt}: {problem}")

    def warm_up(self, server: Server) -> None:
        if self.plan.warm_up:
            for model in self.plan.models:
                self.load.run(server.url, self.requests[model, self.plan.formats[-1]], 8, 1)

    def measure(self, servers: Sequence[Server], key: tuple[str, str, int]) -> list[Cell]:
        """One cell on every server, in 1 s rounds that rotate the order of the servers."""
        model, fmt, concurrency = key
        cells = [Cell(_label(s), model, fmt, concurrency, s.batching) for s in servers]
        before = [agent_counters(s, model) if s.is_agent else None for s in servers]
        cpu: list[list[Cpu]] = [[] for _ in servers]
        for turn in range(self.plan.rounds):
            for i in _rotated(len(servers), turn):
                with cpu_meter(servers[i], cpu[i]):
                    cells[i].rounds.append(
                        self.load.run(
                            servers[i].url, self.requests[model, fmt], concurrency, ROUND_S
                        )
                    )
        for server, cell, counts, spent in zip(servers, cells, before, cpu, strict=True):
            cell.cpu = sum(spent, Cpu())
            if counts is not None:
                cell.timing = counter_means(counts, agent_counters(server, model))
            _progress(cell)
        return cells


def _label(server: Server) -> str:
    """Cells of the agent with batching off are "agent" cells with ``batching`` False."""
    return "agent" if server.name == "agent-nobatch" else server.name


def _rotated(n: int, turn: int) -> list[int]:
    return [(turn + i) % n for i in range(n)]


def _progress(cell: Cell) -> None:
    r = cell.result
    batching = "" if cell.server == "minimal" else (" on" if cell.batching else " off")
    note(
        f"  {cell.server + batching:>14} {cell.model:>9} {cell.fmt:>7} c={cell.concurrency:<3}"
        f"{r.rps:8.0f} req/s  p50 {r.p50_ms:7.3f}  p99 {r.p99_ms:7.3f} ms  "
        f"cores {cell.cpu.cores('server'):.2f} (other {cell.cpu.cores('other'):.2f})"
        + (f"  batch {cell.mean_batch:.1f}" if cell.mean_batch else "")
        + (f"  ERRORS {r.errors}" if r.errors else "")
    )


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[0]


@contextlib.contextmanager
def running(servers: list[Server]) -> Iterator[list[Server]]:
    """Stop every server started into ``servers``, whatever happens."""
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def run_cells(bench: Bench) -> None:
    """The matrix: minimal server, agent, agent without batching, interleaved per cell."""
    note(
        "servers: minimal, agent, agent-2p ([server] processes = 2)"
        + (", agent without batching" if bench.plan.batching_off else "")
    )
    with running([]) as servers:
        servers.append(start_minimal(bench.drop))
        agent = start_agent("agent", bench.work, bench.drop)
        servers.append(agent)
        servers.append(start_agent(TWO, bench.work, bench.drop, {"server": {"processes": 2}}))
        if bench.plan.batching_off:
            servers.append(
                start_agent(
                    "agent-nobatch", bench.work, bench.drop, {"batching": {"enabled": False}}
                )
            )
        time.sleep(1.0)
        bench.rss["bench_idle"] = agent.rss_mb()[0]
        for server in servers:
            bench.check(server)
            bench.warm_up(server)
        for key in bench.cell_keys():
            bench.cells += bench.measure(servers, key)
        for server in servers:
            if server is not agent:
                server.stop()
        bench.rss["bench_loaded"], bench.rss["bench_peak"] = agent.rss_mb()
        run_hot_swap(bench, agent)
        bench.rss["bench_after_swaps"] = agent.rss_mb()[0]
        run_variants(bench, agent)


def drift_active(agent: Server) -> bool:
    """The drift monitor answers for the tabular model (sketches are being kept)."""
    return _http("GET", agent.url + "/v1/models/tabular/drift")[0] == 200


# --- hot swap --------------------------------------------------------------------------------


def _pair_run(
    bench: Bench, agent: Server, deploy: Callable[[int], None] | None
) -> tuple[LoadResult, LoadResult, int]:
    """Tabular at c=32 and the CNN at c=4 together; ``deploy(i)`` every 0.5 s meanwhile."""
    seconds = bench.plan.swap_seconds
    tab = bench.load.start(agent.url, bench.requests["tabular", "binary"], 32, seconds)
    cnn = bench.load.start(agent.url, bench.requests["cnn", "binary"], 4, seconds)
    start = time.monotonic()
    deploys = 0
    while deploy is not None and time.monotonic() - start < seconds - SWAP_EVERY_S:
        time.sleep(SWAP_EVERY_S)
        deploys += 1
        deploy(deploys)
    return LoadGen.finish(tab, seconds), LoadGen.finish(cnn, seconds), deploys


def run_hot_swap(bench: Bench, agent: Server) -> None:
    """Throughput while a new tabular version lands every 0.5 s, and the CNN's p99 meanwhile."""
    note(f"hot swap: a new tabular version every {SWAP_EVERY_S} s, {bench.plan.swap_seconds} s")
    drop = bench.work / agent.name / "models"
    variants = [bench_models.tabular_model(i) for i in range(1, 64)]

    def deploy(index: int) -> None:
        tmp = drop / ".tabular.onnx.tmp"
        tmp.write_bytes(variants[index % len(variants)])
        os.replace(tmp, drop / "tabular.onnx")  # a rename into the drop dir: the fast path

    quiet_tab, quiet_cnn, _ = _pair_run(bench, agent, None)
    before = agent.metrics()
    tab, cnn, deploys = _pair_run(bench, agent, deploy)
    time.sleep(1.0)
    after = agent.metrics()
    again_tab, again_cnn, _ = _pair_run(bench, agent, None)
    quiet_tab = LoadResult.combine([quiet_tab, again_tab])
    quiet_cnn = LoadResult.combine([quiet_cnn, again_cnn])

    def delta(name: str, **labels: str) -> int:
        return int(metric_sum(after, name, **labels) - metric_sum(before, name, **labels))

    bench.sections["swap"] = [
        "Tabular (c=32, binary) and CNN (c=4, binary) driven together; runs without deploys "
        "before and after the run with deploys (combined).",
        "",
        "| run | tabular req/s | tabular p50 / p99 ms | cnn req/s | cnn p50 / p99 ms | non-2xx |",
        "|---|---|---|---|---|---|",
        _swap_row("no deploys", quiet_tab, quiet_cnn),
        _swap_row(f"{deploys} deploys, one every {SWAP_EVERY_S} s", tab, cnn),
        "",
        f"Tabular throughput during swaps / without: **{_ratio(tab.rps, quiet_tab.rps)}**; "
        f"CNN p99 while tabular versions load / without: "
        f"**{_ratio(cnn.p99_ms, quiet_cnn.p99_ms)}**. The agent counted "
        f"{delta('edge_agent_model_swaps_total', model='tabular')} swaps, "
        f"{delta('edge_agent_model_loads_total', model='tabular', result='failed')} failed "
        f"loads and {delta('edge_agent_model_rollbacks_total', model='tabular')} rollbacks.",
    ]


def _swap_row(label: str, tab: LoadResult, cnn: LoadResult) -> str:
    return (
        f"| {label} | {tab.rps:,.0f} | {tab.p50_ms:.2f} / {tab.p99_ms:.2f} | "
        f"{cnn.rps:,.0f} | {cnn.p50_ms:.2f} / {cnn.p99_ms:.2f} | {tab.errors + cnn.errors} |"
    )


# --- one setting at a time -------------------------------------------------------------------

#: (variant name, config overrides, what it shows) for the one-setting comparisons.
VARIANTS: Final = (
    ("access-log", {"log": {"access_log": True}}, "access log on ([log] access_log = true)"),
    ("no-drift", {"drift": {"enabled": False}}, "drift sketches off ([drift] enabled = false)"),
    (
        "no-fast-path",
        {"server": {"fast_path": False}},
        "aiohttp serves inference too ([server] fast_path = false)",
    ),
    (
        "asyncio-loop",
        {"server": {"event_loop": "asyncio"}},
        'the standard library\'s event loop ([server] event_loop = "asyncio")',
    ),
)
_VARIANT_CELLS: Final = (
    ("tabular", "binary", 32),
    ("tabular", "binary", 1),
    ("cnn", "binary", 32),
    ("tabular", "json", 32),
    ("cnn", "json", 32),
)


def run_variants(bench: Bench, agent: Server) -> None:
    """Each one-setting variant against the default agent, interleaved, on a few cells."""
    active = drift_active(agent)
    if not active:
        bench.notes.append(
            "Drift sketches on/off: not measured; the drift monitor does not "
            "answer (GET /v1/models/tabular/drift is not 200), so no sketches "
            "are being kept in this build."
        )
    keys = [k for k in _VARIANT_CELLS if k[0] in bench.plan.models and k[1] in bench.plan.formats][
        : bench.plan.variant_cells
    ]
    for name, overrides, what in VARIANTS:
        if name == "no-drift" and not active:
            continue
        note(f"variant: {what}")
        with running([start_agent(name, bench.work, bench.drop, overrides)]) as (variant,):
            bench.warm_up(variant)
            for key in keys:
                base, other = bench.measure([agent, variant], key)
                bench.variants.append((what, other, base))


# --- memory, outbox, physical limit ----------------------------------------------------------


def measure_examples_rss(bench: Bench) -> None:
    """Idle RSS of an agent serving the three bundled example models (the 150 MB target)."""
    note("agent on the three example models, idle")
    src = bench.work / "examples-src"
    bench_models.copy_examples(src)
    with running([start_agent("examples", bench.work, src)]) as (agent,):
        time.sleep(2.0)
        bench.rss["examples_idle"] = agent.rss_mb()[0]
        models = json.loads(_http("GET", agent.url + "/v1/models")[2]).get("models", [])
        bench.rss["examples_models"] = float(sum(1 for m in models if m.get("active_version")))


def measure_outbox(bench: Bench) -> None:
    """Records per second the outbox accepts durably (committed, fsynced) on this disk."""
    try:
        from agent.clock import SystemClock
        from agent.upstream.outbox import Outbox, OutboxRecord
    except ImportError as exc:
        bench.sections["outbox"] = [f"Skipped: agent.upstream.outbox is not usable ({exc})."]
        return
    note("outbox: durable puts")
    path = bench.work / "outbox" / "outbox.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = OutboxRecord(
        "feedback",
        time.time(),
        "tabular",
        1,
        {"id": "0" * 32, "label": 1, "outputs": {"label": [1]}},
    )
    try:
        rates = asyncio.run(
            _outbox_rates(Outbox, SystemClock(), path, record, bench.plan.outbox_seconds)
        )
    except Exception as exc:
        bench.sections["outbox"] = [f"Skipped: the outbox failed ({type(exc).__name__}: {exc})."]
        return
    bench.sections["outbox"] = [
        f"`Outbox.put_many` on {path.parent} ({fs_type(path.parent)}), fsync on, feedback "
        "records of about 100 bytes; a put returns once its records are committed.",
        "",
        "| concurrent writers | records per put | records/s accepted durably |",
        "|---|---|---|",
        *(f"| {callers} | {per_call} | {rate:,.0f} |" for callers, per_call, rate in rates),
    ]


async def _outbox_rates(
    outbox_cls: Any, clock: Any, path: Path, record: Any, seconds: float
) -> list[tuple[int, int, float]]:
    outbox = outbox_cls(path, max_bytes=256 * 1024 * 1024, clock=clock, fsync=True)
    await outbox.open()
    rates = []
    try:
        for callers, per_call in ((1, 1), (32, 1), (1, 100)):
            count = 0
            deadline = time.perf_counter() + seconds

            async def put(n: int = per_call, until: float = deadline) -> None:
                nonlocal count
                while time.perf_counter() < until:
                    await outbox.put_many([record] * n)
                    count += n

            start = time.perf_counter()
            await asyncio.gather(*(put() for _ in range(callers)))
            rates.append((callers, per_call, count / (time.perf_counter() - start)))
    finally:
        await outbox.close()
    return rates


def measure_ort(bench: Bench) -> None:
    """In-process onnxruntime at batch 1 and at every mean batch size the batcher formed."""
    note("onnxruntime in-process (the physical limit)")
    sizes: dict[str, set[int]] = {m: {1} for m in bench.plan.models}
    for cell in bench.cells:
        if cell.mean_batch:
            sizes[cell.model].add(max(1, round(cell.mean_batch)))
    for model, wanted in sizes.items():
        path = bench.drop / f"{model}.onnx"
        for batch in sorted(wanted):
            bench.ort_latency[model, batch] = ort_latency_us(
                path, bench.models[model], batch, bench.plan.ort_seconds / 2
            )
            bench.ort[model, batch] = ort_rows_per_s(
                path, bench.models[model], batch, 2, bench.plan.ort_seconds
            )


# --- the report ------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def fs_type(path: Path) -> str:
    """The file system type of the mount that holds ``path`` (fsync cost depends on it)."""
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in (
        "onnxruntime",
        "numpy",
        "aiohttp",
        "orjson",
        "msgpack",
        "uvloop",
        "pysimdjson",
        "edge-agent",
    ):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return f"python {platform.python_version()}, " + ", ".join(found)


def _machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    mem = Path("/proc/meminfo").read_text().split()[1]
    return (
        f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {cpu}, "
        f"{int(mem) / MB / MB:.1f} GB RAM, {platform.system()} {platform.release()}"
    )


def _wrk_version(load: LoadGen) -> str:
    if load.wrk is None:
        return "python aiohttp client in a subprocess (wrk not available)"
    out = subprocess.run([load.wrk, "--version"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "wrk"
    return first.split("[")[0].strip() + " (one thread; connections = concurrency; keep-alive)"


def header(bench: Bench, elapsed: float) -> list[str]:
    p = bench.plan
    return [
        "# edge-agent bench",
        "",
        f"- machine: {_machine()}",
        f"- background load: {bench.background:.2f} cores busy in the second before the run; "
        f"load average {' -> '.join(bench.loadavg)} (start -> end)",
        f"- versions: {_versions()}",
        f"- load generator: {_wrk_version(bench.load)}; each cell runs {p.rounds} round(s) of "
        f"{ROUND_S} s per server, the servers taking turns; the same pre-encoded batch-1 "
        "request on every call",
        "- agent: `python -m agent run` with the defaults ([batching] max_batch_size 32, "
        "max_delay_ms 2, workers 2; [models] intra_op_threads 1; [server] event_loop uvloop), "
        "[log] level info, "
        "access_log = false; *batching off* = [batching] enabled = false; *2 processes* = "
        "the same with [server] processes = 2 (the primary and one replica on the same port; "
        "its *cores* and RSS are summed over both processes)",
        "- minimal server: one aiohttp process on the standard asyncio loop; its handler "
        "decodes V2 (orjson, msgpack, or the binary header + np.frombuffer), calls session.run "
        "inline and encodes the reply; same session options as the agent",
        "- physical limit: onnxruntime in-process on the same rows, one session shared by 2 "
        "threads (= workers)",
        "- models: tabular = MLP 30-64-64-2; cnn = Conv(3->8)/MaxPool/Conv(8->16)/GAP/Gemm on "
        "1x3x64x64; sentiment = the text example (TF-IDF + LogisticRegression, BYTES)",
        "- p50 is the median round's p50, p99 the worst round's; *cores* = CPU of the server "
        "process over the cell's wall time; *other* = CPU used meanwhile by processes that are "
        "neither the server nor the load generator (background load; high = noisy cell)",
        f"- wall time of this run: {elapsed:.0f} s",
        "",
    ]


#: The agent with one replica: two serving processes.
TWO: Final = "agent-2p"


def target_rows(bench: Bench, agent: str = "agent") -> list[tuple[str, str, str, bool]]:
    """(target, measured, limit, met) for every target of issue 4 that was measured."""
    rows = []
    for fmt in ("binary", "msgpack"):
        a, m = bench.find(agent, "tabular", fmt, 1), bench.find("minimal", "tabular", fmt, 1)
        if a and m:
            limit = m.result.p50_ms + 0.1
            rows.append(
                (
                    f"c=1 tabular {fmt}: p50 <= minimal's ({fmt}) + 0.1 ms",
                    f"{a.result.p50_ms:.3f} ms",
                    f"{limit:.3f} ms",
                    a.result.p50_ms <= limit,
                )
            )
    for fmt in bench.plan.formats:
        a, m = bench.find(agent, "tabular", fmt, 32), bench.find("minimal", "tabular", fmt, 32)
        if a and m:
            rows.append(
                (
                    f"c=32 tabular {fmt}: req/s >= minimal's ({fmt})",
                    f"{a.result.rps:,.0f}",
                    f"{m.result.rps:,.0f}",
                    a.result.rps >= m.result.rps,
                )
            )
    reference = bench.find("minimal", "cnn", "json", 32)
    for fmt in bench.plan.formats:
        a = bench.find(agent, "cnn", fmt, 32)
        if a and reference:
            factor = 2 if fmt == "json" else 5
            want = factor * reference.result.rps
            rows.append(
                (
                    f"c=32 cnn {fmt}: req/s >= {factor}x minimal's (json)",
                    f"{a.result.rps:,.0f}",
                    f"{want:,.0f}",
                    a.result.rps >= want,
                )
            )
    if "examples_idle" in bench.rss and agent == "agent":
        idle = bench.rss["examples_idle"]
        rows.append(
            (
                "idle RSS, the three example models: <= 150 MB",
                f"{idle:.1f} MB",
                "150 MB",
                idle <= 150,
            )
        )
    return rows


#: Cells with more CPU than this used by other processes are flagged as noisy.
NOISY_CORES: Final = 0.3


def noise_warning(bench: Bench) -> list[str]:
    """A warning when other processes took CPU during the cells."""
    noisy = [c for c in bench.cells if c.cpu.cores("other") > NOISY_CORES]
    if not noisy:
        return []
    worst = max(c.cpu.cores("other") for c in noisy)
    return [
        f"**Warning: the machine was not quiet.** In {len(noisy)} of {len(bench.cells)} "
        f"server-cells, other processes used more than {NOISY_CORES} cores (up to {worst:.2f} "
        "of the machine's cores; see *other cores*). The servers took turns, so ratios suffer "
        "less than absolute figures, but re-run on a quiet machine before trusting a verdict.",
        "",
    ]


def target_table(bench: Bench) -> list[str]:
    lines = [
        "## Targets (issue 4)",
        "",
        *noise_warning(bench),
        "The agent with the defaults (batching on, one process), and with `[server] processes "
        "= 2` (one replica process on the second core). The minimal server is the reference in "
        "the same wire format, except for the CNN targets, which the issue states against its "
        "JSON figure.",
        "",
        "| target | processes | measured | limit | verdict |",
        "|---|---|---|---|---|",
    ]
    for agent, processes in (("agent", "1"), (TWO, "2")):
        for name, measured, limit, met in target_rows(bench, agent):
            verdict = "MET" if met else "**MISSED**"
            lines.append(f"| {name} | {processes} | {measured} | {limit} | {verdict} |")
    return [*lines, ""]


def _cell_verdict(bench: Bench, cell: Cell) -> str:
    if not cell.batching:
        return ""
    for name, _, _, met in target_rows(bench):
        if name.startswith(f"c={cell.concurrency} {cell.model} {cell.fmt}:"):
            return "MET" if met else "**MISSED**"
    return ""


def cell_table(bench: Bench) -> list[str]:
    lines = [
        "## Cells: agent vs minimal server vs onnxruntime in-process",
        "",
        "Batch-1 requests. *mean batch*: rows per onnxruntime run in the agent during the cell "
        "(edge_agent_batch_rows sum / count); *ORT rows/s*: in-process at that batch size.",
        "",
        "| model | format | c | batching | agent req/s | minimal req/s | agent / minimal "
        "| agent p50 / p99 ms | minimal p50 / p99 ms | mean batch | ORT rows/s "
        "| agent / ORT | agent cores | other cores | errors | target "
        "| 2 processes: req/s | / minimal | p50 / p99 ms | cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ordered = _ordered(bench)
    lines += [
        _cell_row(bench, c, bench.find("minimal", c.model, c.fmt, c.concurrency)) for c in ordered
    ]
    return [*lines, ""]


def _ordered(bench: Bench) -> list[Cell]:
    """The agent's cells: batching on first, then by model, format and concurrency."""
    return sorted(
        (c for c in bench.cells if c.server == "agent"),
        key=lambda c: (not c.batching, MODELS.index(c.model), FORMATS.index(c.fmt), c.concurrency),
    )


def _cell_row(bench: Bench, cell: Cell, m: Cell | None) -> str:
    r = cell.result
    ort = bench.ort.get((cell.model, max(1, round(cell.mean_batch or 1))), 0.0)
    other = max(cell.cpu.cores("other"), m.cpu.cores("other") if m else 0.0)
    return " | ".join(
        [
            f"| {cell.model}",
            cell.fmt,
            str(cell.concurrency),
            "on" if cell.batching else "off",
            f"{r.rps:,.0f}",
            f"{m.result.rps:,.0f}" if m else "-",
            _ratio(r.rps, m.result.rps) if m else "-",
            f"{r.p50_ms:.3f} / {r.p99_ms:.3f}",
            f"{m.result.p50_ms:.3f} / {m.result.p99_ms:.3f}" if m else "-",
            f"{cell.mean_batch:.1f}" if cell.mean_batch else "-",
            f"{ort:,.0f}",
            _ratio(r.rps, ort),
            f"{cell.cpu.cores('server'):.2f}",
            f"{other:.2f}",
            str(r.errors + (m.result.errors if m else 0)),
            _cell_verdict(bench, cell),
            *_two_process_columns(bench, cell, m),
        ]
    )


def _two_process_columns(bench: Bench, cell: Cell, m: Cell | None) -> list[str]:
    two = bench.find(TWO, cell.model, cell.fmt, cell.concurrency) if cell.batching else None
    if two is None:
        return ["-", "-", "-", "- |"]
    r = two.result
    return [
        f"{r.rps:,.0f}" + (f" ({r.errors} errors)" if r.errors else ""),
        _ratio(r.rps, m.result.rps) if m else "-",
        f"{r.p50_ms:.3f} / {r.p99_ms:.3f}",
        f"{two.cpu.cores('server'):.2f} |",
    ]


def ort_table(bench: Bench) -> list[str]:
    lines = [
        "## onnxruntime in-process (the physical limit)",
        "",
        "| model | batch | one run, p50 (1 thread) | rows/s (2 threads) |",
        "|---|---|---|---|",
    ]
    for model, batch in sorted(bench.ort, key=lambda k: (MODELS.index(k[0]), k[1])):
        lines.append(
            f"| {model} | {batch} | {bench.ort_latency.get((model, batch), 0):.1f} µs "
            f"| {bench.ort[model, batch]:,.0f} |"
        )
    return [*lines, ""]


def inside_table(bench: Bench) -> list[str]:
    """Where a request's time goes inside the agent, from its own histograms."""
    lines = [
        "## Inside the agent (batching on, from its /metrics histograms)",
        "",
        "*handler*: mean time from the handler's start to its result (decode, queue, run, "
        "split); *queued*: mean wait for a batch; *run*: mean time of one onnxruntime run "
        "(on an executor thread, or on the event loop for a model fast enough to run "
        "inline), against the same batch size in-process (1 thread). A *run* far above "
        "in-process is thread and GIL hand-off overhead, not onnxruntime.",
        "",
        "| model | format | c | client p50 ms | handler ms | queued ms | mean batch "
        "| run µs (agent) | run µs (in-process) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in _ordered(bench):
        t = cell.timing
        if not cell.batching or "run_s" not in t:
            continue
        batch = max(1, round(t.get("batch", 1)))
        lines.append(
            f"| {cell.model} | {cell.fmt} | {cell.concurrency} | {cell.result.p50_ms:.3f} "
            f"| {1e3 * t.get('handler_s', 0):.3f} | {1e3 * t.get('queued_s', 0):.3f} "
            f"| {t.get('batch', 0):.1f} | {1e6 * t['run_s']:.0f} "
            f"| {bench.ort_latency.get((cell.model, batch), 0):.0f} |"
        )
    return [*lines, ""]


def variant_table(bench: Bench) -> list[str]:
    lines = [
        "## One setting at a time (vs the default agent, interleaved)",
        "",
        "| setting | cell | req/s | default req/s | ratio | p50 / p99 ms | default p50 / p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for what, cell, base in bench.variants:
        r, b = cell.result, base.result
        lines.append(
            f"| {what} | {cell.model} {cell.fmt} c={cell.concurrency} | {r.rps:,.0f} "
            f"| {b.rps:,.0f} | {_ratio(r.rps, b.rps)} | {r.p50_ms:.3f} / "
            f"{r.p99_ms:.3f} | {b.p50_ms:.3f} / {b.p99_ms:.3f} |"
        )
    return [*lines, ""]


def memory_lines(bench: Bench) -> list[str]:
    rss = bench.rss
    lines = ["## Memory (VmRSS of the agent process)", ""]
    if "examples_idle" in rss:
        lines.append(
            f"- idle, the three example models ({rss['examples_models']:.0f} active): "
            f"**{rss['examples_idle']:.1f} MB**"
        )
    if "bench_idle" in rss:
        lines.append(
            f"- idle, the bench models (tabular, cnn, sentiment): {rss['bench_idle']:.1f} MB"
        )
    if "bench_loaded" in rss:
        lines.append(
            f"- after the load cells: {rss['bench_loaded']:.1f} MB (peak VmHWM "
            f"{rss['bench_peak']:.1f} MB); after the hot swaps: "
            f"{rss.get('bench_after_swaps', 0.0):.1f} MB"
        )
    return [*lines, ""]


def report(bench: Bench, elapsed: float) -> str:
    notes = [*(f"> {n}" for n in bench.notes), ""] if bench.notes else []
    lines = [
        *header(bench, elapsed),
        *notes,
        *target_table(bench),
        *cell_table(bench),
        *inside_table(bench),
        *ort_table(bench),
    ]
    if "swap" in bench.sections:
        lines += [
            "## Hot swap (issue 3: other models' latency during a load)",
            "",
            *bench.sections["swap"],
            "",
        ]
    lines += [*variant_table(bench), *memory_lines(bench)]
    if "outbox" in bench.sections:
        lines += ["## Outbox (issue 6)", "", *bench.sections["outbox"], ""]
    if bench.problems:
        lines += ["## Problems", "", *(f"- {p}" for p in bench.problems), ""]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def prepare(plan: Plan, work: Path, allow_install: bool) -> Bench:
    """Models, request bodies and the load generator."""
    note(f"work dir {work}")
    models = {m.name: m for m in bench_models.write_drop_dir(work / "models")}
    requests = encode_requests(list(models.values()), work / "bodies")
    wrk = None if plan.python_load else find_wrk(allow_install)
    bench = Bench(plan, work, LoadGen(wrk, work), models, requests, loadavg=[_loadavg()])
    busy = _machine_busy_s()
    time.sleep(1.0)
    bench.background = _machine_busy_s() - busy
    if plan.rounds == 1:
        bench.notes.append(
            "One 1 s round per server and cell (--quick or --seconds 1): a "
            "smoke run; its verdicts are not a measurement."
        )
    if wrk is None:
        bench.notes.append(
            "wrk was not available: the Python load generator was used; its "
            "client costs more CPU on the same cores, so every server's figures "
            "are lower than with wrk."
        )
    return bench


STEPS: Final = (run_cells, measure_examples_rss, measure_outbox, measure_ort)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    parser.add_argument(
        "--seconds",
        type=int,
        default=3,
        help="seconds per server and cell, in 1 s rounds (default 3)",
    )
    parser.add_argument(
        "--python-load",
        action="store_true",
        help="use the Python load generator even when wrk is there",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="do not apt-get install wrk when it is missing"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, models)")
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    parser.add_argument("--minimal-server", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--load-gen", metavar="SPEC", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.minimal_server:
        return minimal_server_main(args.minimal_server)
    if args.load_gen:
        return load_gen_main(args.load_gen)
    work = Path(tempfile.mkdtemp(prefix="edge-agent-bench-"))
    started = time.monotonic()
    try:
        bench = prepare(Plan.from_args(args), work, not args.no_install)
        for step in STEPS:
            try:
                step(bench)
            except Exception as exc:
                bench.problems.append(f"{step.__name__} failed: {type(exc).__name__}: {exc}")
                note(f"{step.__name__} failed: {exc}")
        bench.loadavg.append(_loadavg())
        text = report(bench, time.monotonic() - started)
        print(text)
        if args.output:
            args.output.write_text(text + "\n")
    finally:
        if args.keep:
            note(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
