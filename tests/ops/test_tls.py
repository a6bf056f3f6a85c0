"""TLS on the real daemon, with a self-signed certificate made by the test (openssl).

The ``cryptography`` package is not in the test environment, so the certificates come
from ``openssl req -x509``; the tests skip when no openssl binary is found.
"""

from __future__ import annotations

import http.client
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import modelgen
import pytest
from ops.daemonproc import (
    WAIT_S,
    Daemon,
    call,
    infer_doc,
    merged,
    run_to_exit,
    running,
    write_config,
)

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1 and localhost; (cert, key) PEM paths."""
    assert OPENSSL is not None
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=edge-agent-test",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The certificate and key the agent serves."""
    return make_certificate(tmp_path_factory.mktemp("pki"), "agent")


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def tls_agent(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    certificate: tuple[Path, Path],
) -> Iterator[Daemon]:
    """An agent serving HTTPS only, on each event loop (their TLS is not the same code)."""
    cert, key = certificate
    root = tmp_path_factory.mktemp("tls")
    overrides = {"server": {"cert_file": cert, "key_file": key, "event_loop": request.param}}
    with running(root, overrides, models={"aff.onnx": modelgen.affine_model(1.0, 1.0)}) as agent:
        yield agent


@pytest.fixture(scope="module")
def trusting(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    """A client context that trusts the test certificate (and checks the host name)."""
    return ssl.create_default_context(cafile=str(certificate[0]))


class TestTls:
    def test_inference_over_https(self, tls_agent: Daemon, trusting: ssl.SSLContext) -> None:
        """A client that trusts the certificate gets answers over HTTPS."""
        url = tls_agent.url + "/v2/models/aff/infer"
        reply = call(url, "POST", infer_doc([1, 2, 3, 4]), context=trusting)
        assert reply.status == 200
        assert reply.json()["outputs"][0]["data"] == [2, 3, 4, 5]

    def test_one_connection_carries_fast_and_handed_over_requests(
        self, tls_agent: Daemon, trusting: ssl.SSLContext
    ) -> None:
        """On one kept-alive TLS connection: inferences (the fast path), then a health check
        (handed to aiohttp over the same TLS session), then an inference again."""
        conn = http.client.HTTPSConnection("127.0.0.1", tls_agent.port, context=trusting)
        statuses, sockets = [], set()
        try:
            for method, path, body in (
                ("POST", "/v2/models/aff/infer", infer_doc([1, 2, 3, 4])),
                ("POST", "/v2/models/aff/infer", infer_doc([5, 6, 7, 8])),
                ("GET", "/v2/health/live", None),
                ("POST", "/v2/models/aff/infer", infer_doc([0, 0, 0, 0])),
            ):
                conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
                sockets.add(id(conn.sock))
        finally:
            conn.close()
        assert statuses == [200, 200, 200, 200]
        assert len(sockets) == 1  # http.client reopens a closed connection: it never had to

    def test_the_configured_certificate_is_presented(
        self, tls_agent: Daemon, certificate: tuple[Path, Path]
    ) -> None:
        """The certificate the server presents is the one in [server] cert_file."""
        presented = ssl.get_server_certificate(("127.0.0.1", tls_agent.port), timeout=WAIT_S)
        expected = certificate[0].read_text()
        assert ssl.PEM_cert_to_DER_cert(presented) == ssl.PEM_cert_to_DER_cert(expected)

    def test_listening_line_says_tls(self, tls_agent: Daemon) -> None:
        """The server_listening log line reports tls = true."""
        assert tls_agent.wait_for_event("server_listening")["tls"] is True

    def test_plain_http_gets_no_answer(self, tls_agent: Daemon) -> None:
        """Plain HTTP on the TLS port gets no HTTP response."""
        plain = f"http://127.0.0.1:{tls_agent.port}/v2/health/live"
        with pytest.raises((OSError, http.client.HTTPException)):
            call(plain, timeout=5.0)

    def test_untrusting_client_refuses_the_connection(self, tls_agent: Daemon) -> None:
        """A client with only the system CAs refuses the self-signed certificate."""
        with pytest.raises(ssl.SSLCertVerificationError):
            call(tls_agent.url + "/v2/health/live", context=ssl.create_default_context())


def test_key_of_another_certificate_stops_the_start(tmp_path: Path) -> None:
    """A key that does not belong to the certificate fails the start with exit 2 and the key."""
    cert, _ = make_certificate(tmp_path, "one")
    _, other_key = make_certificate(tmp_path, "two")
    sections = merged(tmp_path, {"server": {"cert_file": cert, "key_file": other_key}})
    config = write_config(tmp_path / "agent.toml", sections)
    result = run_to_exit(config)
    assert result.returncode == 2
    assert "server.cert_file" in result.stderr
    assert "key belongs to the certificate" in result.stderr
