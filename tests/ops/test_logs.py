"""agent.logs in a fresh interpreter: one format for every line, and no secrets in tracebacks.

Each test runs a short script in a subprocess, so the process-wide logging setup never
leaks into the rest of the test session.
"""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest
from ops.daemonproc import REPO, WAIT_S

SECRET = "tok-5e1c-never-logged"

_SCRIPT = """
import logging, structlog
from agent import logs
logs.configure("info", {fmt!r})

def handler(token):
    raise ValueError("bad request")

try:
    handler({secret!r})
except ValueError:
    structlog.get_logger("test").exception("request_failed")
    logging.getLogger("aiohttp.server").exception("Error handling request")
logging.getLogger("aiohttp.server").warning("plain %s record", "stdlib")
"""


def _stderr(fmt: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(fmt=fmt, secret=SECRET)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env=env,
        check=True,
    )
    return result.stderr


@pytest.fixture(scope="module")
def json_output() -> str:
    """What the script writes with the JSON format."""
    return _stderr("json")


class TestJson:
    def test_every_line_is_json_including_stdlib_records(self, json_output: str) -> None:
        """structlog events and standard-library records (aiohttp) are all JSON lines."""
        lines = [orjson.loads(line) for line in json_output.splitlines()]
        events = [(doc["event"], doc["level"]) for doc in lines]
        assert events == [
            ("request_failed", "error"),
            ("Error handling request", "error"),
            ("plain stdlib record", "warning"),
        ]
        assert lines[2]["logger"] == "aiohttp.server"

    def test_tracebacks_carry_no_local_variables(self, json_output: str) -> None:
        """A traceback names the frames but not their locals (a token, a config)."""
        assert '"handler"' in json_output
        assert SECRET not in json_output


def test_console_tracebacks_carry_no_local_variables() -> None:
    """The console renderer prints plain tracebacks, without locals, too."""
    text = _stderr("console")
    assert "ValueError: bad request" in text
    assert SECRET not in text
