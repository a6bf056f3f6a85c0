"""Bearer tokens and request limits on the real daemon: who may call what, and what is logged.

The agent has two predict tokens (one in the config, one in a token file) and two admin
tokens (likewise). Health, server metadata and /metrics stay open.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import modelgen
import pytest
from conftest import MakeAgent
from ops.daemonproc import (
    Daemon,
    Reply,
    call,
    infer_doc,
    merged,
    run_to_exit,
    running,
    write_config,
)

PREDICT_LIST = "p-list-5f2c81d0"
PREDICT_FILE = "p-file-9a1b3e77"
ADMIN_LIST = "a-list-77d0c4aa"
ADMIN_FILE = "a-file-c3e40b19"
WRONG = "not-a-token-0e1f"
ALL_TOKENS = (PREDICT_LIST, PREDICT_FILE, ADMIN_LIST, ADMIN_FILE, WRONG)

PREDICT_ROUTE = ("POST", "/v2/models/aff/infer")
ADMIN_ROUTE = ("GET", "/v1/models")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """An agent with predict and admin tokens from lists and files, and tight limits."""
    root = tmp_path_factory.mktemp("auth")
    (root / "predict.tokens").write_text(f"# rotated monthly\n{PREDICT_FILE}\n")
    (root / "admin.tokens").write_text(f"{ADMIN_FILE}\n")
    for name in ("predict.tokens", "admin.tokens"):
        (root / name).chmod(0o600)
    overrides = {
        "auth": {
            "predict_tokens": [PREDICT_LIST],
            "predict_token_file": root / "predict.tokens",
            "admin_tokens": [ADMIN_LIST],
            "admin_token_file": root / "admin.tokens",
        },
        "server": {"max_body_bytes": 4096, "max_elements": 64},
    }
    models = {"aff.onnx": modelgen.affine_model(1.0, 1.0)}
    with running(root, overrides, models=models) as daemon:
        yield daemon


def _call(
    agent: Daemon, route: tuple[str, str], token: str | None, scheme: str = "Bearer"
) -> Reply:
    method, path = route
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    body = infer_doc([1, 2, 3, 4]) if method == "POST" else None
    return call(agent.url + path, method, body, headers)


ROUTES = pytest.mark.parametrize("route", [PREDICT_ROUTE, ADMIN_ROUTE], ids=["predict", "admin"])


class TestTokens:
    @pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/v2", "/metrics"])
    def test_open_routes_need_no_token(self, agent: Daemon, path: str) -> None:
        """Health, server metadata and metrics answer without a token."""
        assert call(agent.url + path).status == 200

    @ROUTES
    def test_missing_token_is_401_with_www_authenticate(
        self, agent: Daemon, route: tuple[str, str]
    ) -> None:
        """No Authorization header: 401 with a Bearer challenge."""
        reply = _call(agent, route, None)
        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in reply.json()["error"]

    @ROUTES
    def test_wrong_token_is_401(self, agent: Daemon, route: tuple[str, str]) -> None:
        """A token nobody configured: 401 with a Bearer challenge."""
        reply = _call(agent, route, WRONG)
        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")

    @ROUTES
    def test_other_schemes_are_401(self, agent: Daemon, route: tuple[str, str]) -> None:
        """A valid token under another scheme than Bearer is refused."""
        assert _call(agent, route, ADMIN_LIST, scheme="Basic").status == 401

    @pytest.mark.parametrize("token", [PREDICT_LIST, PREDICT_FILE])
    def test_predict_tokens_call_predict_routes(self, agent: Daemon, token: str) -> None:
        """Predict tokens from the list and from the file both work on V2 routes."""
        assert _call(agent, PREDICT_ROUTE, token).status == 200

    @pytest.mark.parametrize("token", [PREDICT_LIST, PREDICT_FILE])
    def test_predict_token_on_admin_route_is_403(self, agent: Daemon, token: str) -> None:
        """A predict token is known but not enough for /v1: 403, which says to use an admin one."""
        reply = _call(agent, ADMIN_ROUTE, token)
        assert reply.status == 403
        assert "admin token" in reply.json()["error"]

    @ROUTES
    @pytest.mark.parametrize("token", [ADMIN_LIST, ADMIN_FILE])
    def test_admin_tokens_call_every_route(
        self, agent: Daemon, route: tuple[str, str], token: str
    ) -> None:
        """Admin tokens from the list and from the file work on admin and predict routes."""
        assert _call(agent, route, token).status == 200

    def test_tokens_never_appear_in_the_log(self, agent: Daemon) -> None:
        """After requests with every token, right and wrong, no log line contains one."""
        for token in ALL_TOKENS:
            for route in (PREDICT_ROUTE, ADMIN_ROUTE):
                _call(agent, route, token)
        text = agent.log_text()
        assert '"request"' in text
        assert [t for t in ALL_TOKENS if t in text] == []

    def test_startup_log_masks_token_settings(self, agent: Daemon) -> None:
        """The settings logged at start show token lists as ***."""
        starting = agent.wait_for_event("starting")
        assert starting["settings"]["auth"]["predict_tokens"] == ["***"]
        assert starting["settings"]["auth"]["admin_tokens"] == ["***"]


class TestLimits:
    def test_body_over_max_body_bytes_is_413(self, agent: Daemon) -> None:
        """A body over [server] max_body_bytes is refused with 413 and the setting's name."""
        body = infer_doc([1, 2, 3, 4]) + b" " * 8192
        headers = {"Authorization": f"Bearer {PREDICT_LIST}"}
        reply = call(agent.url + PREDICT_ROUTE[1], "POST", body, headers)
        assert reply.status == 413
        assert "max_body_bytes" in reply.json()["error"]

    def test_tensor_over_max_elements_is_refused(self, agent: Daemon) -> None:
        """A tensor with more elements than [server] max_elements is a 400 that says so."""
        doc = b'{"inputs": [{"name": "x", "shape": [100, 4], "datatype": "FP32", "data": []}]}'
        headers = {"Authorization": f"Bearer {PREDICT_LIST}"}
        reply = call(agent.url + PREDICT_ROUTE[1], "POST", doc, headers)
        assert reply.status == 400
        assert "limit of 64 elements" in reply.json()["error"]


class TestAuthKinds:
    async def test_predict_routes_open_without_predict_tokens(self, make_agent: MakeAgent) -> None:
        """With admin tokens only, predict routes need no token and admin routes do."""
        files: dict[str, bytes | Path] = {"aff.onnx": modelgen.affine_model(1.0, 1.0)}
        agent = await make_agent(files, {"auth": {"admin_tokens": [ADMIN_LIST]}})
        doc = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]}
        status, _ = await agent.infer_json("aff", doc)
        async with agent.client.get(agent.url + "/v1/models") as admin:
            assert admin.status == 401
        assert status == 200


def test_unreadable_token_file_stops_the_start(tmp_path: Path) -> None:
    """A token file that cannot be read fails the start with exit 2, naming the key and path."""
    missing = tmp_path / "missing.tokens"
    config = write_config(
        tmp_path / "agent.toml", merged(tmp_path, {"auth": {"predict_token_file": missing}})
    )
    result = run_to_exit(config)
    assert result.returncode == 2
    assert "auth.predict_token_file" in result.stderr
    assert str(missing) in result.stderr
