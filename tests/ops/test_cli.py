"""The ``edge-agent`` command line against files and a running daemon (``python -m agent``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import modelgen
import pytest
from ops.daemonproc import REPO, WAIT_S, Daemon, call, running, wait_until

ADMIN = "cli-admin-4b7e"


def _cli(*args: str, path: tuple[Path, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (*path, REPO))
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )


class TestCheckConfig:
    def test_bad_file_lists_every_problem_with_key_and_line(self, tmp_path: Path) -> None:
        """Exit 2, and each problem is printed with its dotted key and its line."""
        path = tmp_path / "bad.toml"
        path.write_text('[server]\nport = "eighty"\n\n[models]\nsettle_ms = -5\n\n[bogus]\nx = 1\n')
        result = _cli("check-config", str(path))
        assert result.returncode == 2
        assert "3 problem(s)" in result.stderr
        for expected in ("server.port (line 2)", "models.settle_ms (line 5)", "bogus (line 7)"):
            assert expected in result.stderr

    def test_good_file_is_ok(self, tmp_path: Path) -> None:
        """Exit 0 and one line saying the file is fine."""
        path = tmp_path / "good.toml"
        path.write_text('[server]\nport = 9000\n\n[log]\nlevel = "debug"\n')
        result = _cli("check-config", str(path))
        assert (result.returncode, result.stdout.strip()) == (0, f"{path}: ok")


class TestEventLoopUnavailable:
    @pytest.fixture
    def no_uvloop(self, tmp_path: Path) -> Path:
        """A directory whose ``uvloop`` fails to import, as on a box without it."""
        fake = tmp_path / "fakes" / "uvloop"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text('raise ImportError("no uvloop on this box")\n')
        return fake.parent

    def _config(self, tmp_path: Path, loop: str) -> Path:
        path = tmp_path / "agent.toml"
        path.write_text(
            f'[server]\nport = 0\nevent_loop = "{loop}"\n\n[models]\ndir = "{tmp_path}/models"'
            f'\n\n[state]\ndir = "{tmp_path}/state"\n'
        )
        return path

    @pytest.mark.parametrize("command", ["check-config", "run"])
    def test_a_missing_uvloop_is_a_config_problem_with_the_way_out(
        self, tmp_path: Path, no_uvloop: Path, command: str
    ) -> None:
        """check-config and run exit 2 naming the key, the cause and the setting to use."""
        path = self._config(tmp_path, "uvloop")
        args = (
            ("check-config", str(path))
            if command == "check-config"
            else ("run", "--config", str(path))
        )
        result = _cli(*args, path=(no_uvloop,))
        assert result.returncode == 2, result.stderr
        assert (
            "server.event_loop: uvloop cannot be imported (no uvloop on this box)" in result.stderr
        )
        assert 'event_loop = "asyncio"' in result.stderr
        assert "Traceback" not in result.stderr

    def test_the_standard_loop_needs_no_uvloop(self, tmp_path: Path, no_uvloop: Path) -> None:
        """With event_loop = "asyncio" the same box checks fine."""
        path = self._config(tmp_path, "asyncio")
        result = _cli("check-config", str(path), path=(no_uvloop,))
        assert (result.returncode, result.stdout.strip()) == (0, f"{path}: ok")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """An agent with an admin token and the affine model as version 1."""
    root = tmp_path_factory.mktemp("cli")
    overrides = {"auth": {"admin_tokens": [ADMIN]}}
    with running(root, overrides, models={"aff.onnx": modelgen.affine_model(1.0, 1.0)}) as d:
        yield d


class TestStatus:
    def test_table(self, agent: Daemon) -> None:
        """A header and one row per model: name, active version, versions, state."""
        result = _cli("status", "--url", agent.url, "--token", ADMIN)
        assert result.returncode == 0, result.stderr
        header, *rows = result.stdout.splitlines()
        assert header.split()[:4] == ["MODEL", "ACTIVE", "VERSIONS", "STATE"]
        aff = next(row.split() for row in rows if row.startswith("aff "))
        assert aff[:2] == ["aff", "1"]

    def test_json(self, agent: Daemon) -> None:
        """--json prints the agent's /v1/models document."""
        result = _cli("status", "--json", "--url", agent.url, "--token", ADMIN)
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert "aff" in [m["name"] for m in doc["models"]]

    def test_without_the_admin_token_fails_plainly(self, agent: Daemon) -> None:
        """Without a token the command exits 1 and relays the agent's 401."""
        result = _cli("status", "--url", agent.url)
        assert result.returncode == 1
        assert "HTTP 401" in result.stderr


class TestDeploy:
    def test_deployed_version_goes_live(self, agent: Daemon, tmp_path: Path) -> None:
        """`deploy --version 3` writes <dir>/<name>/3/model.onnx and version 3 starts serving."""
        model = tmp_path / "scorer.onnx"
        model.write_bytes(modelgen.affine_model(1.0, 3.0))
        drop = agent.root / "models"
        result = _cli(
            "deploy", str(model), "--name", "scorer", "--version", "3", "--dir", str(drop)
        )
        assert result.returncode == 0, result.stderr
        assert (drop / "scorer" / "3" / "model.onnx").read_bytes() == model.read_bytes()
        wait_until(lambda: call(agent.url + "/v2/models/scorer/versions/3/ready").status == 200)

    def test_deploy_reads_the_drop_dir_from_the_config(self, agent: Daemon, tmp_path: Path) -> None:
        """`deploy --config` finds the drop dir in [models] dir; the flat file goes live."""
        model = tmp_path / "ranker.onnx"
        model.write_bytes(modelgen.affine_model(2.0, 0.0))
        config = str(agent.config_path)
        result = _cli("deploy", str(model), "--name", "ranker", "--config", config)
        assert result.returncode == 0, result.stderr
        assert (agent.root / "models" / "ranker.onnx").is_file()
        wait_until(lambda: call(agent.url + "/v2/models/ranker/ready").status == 200)


class TestDeployFiles:
    """``edge-agent deploy`` writes the drop dir the safe way."""

    def test_a_stale_manifest_is_removed(self, tmp_path: Path) -> None:
        """Deploying without --manifest removes an earlier manifest at the same place."""
        from agent.cli import deploy_files

        drop = tmp_path / "drop"
        drop.mkdir()
        (drop / "m.toml").write_text("[model]\nversion = 1\n")
        src = tmp_path / "m.onnx"
        src.write_bytes(b"model bytes")
        target = deploy_files(src, drop, "m", None, None)
        assert target.read_bytes() == b"model bytes"
        assert not (drop / "m.toml").exists()
        assert sorted(p.name for p in drop.iterdir()) == ["m.onnx"]

    def test_manifest_files_outside_its_folder_are_refused(self, tmp_path: Path) -> None:
        """A manifest naming ../ files is refused before anything is written."""
        from agent.cli import deploy_files
        from agent.errors import AgentError

        drop = tmp_path / "drop"
        drop.mkdir()
        (tmp_path / "src").mkdir()
        manifest = tmp_path / "src" / "m.toml"
        manifest.write_text('[validation]\ntest_vectors = "../v.npz"\n')
        (tmp_path / "v.npz").write_bytes(b"x")
        src = tmp_path / "m.onnx"
        src.write_bytes(b"model bytes")
        with pytest.raises(AgentError, match="outside its folder"):
            deploy_files(src, drop, "m", None, manifest)
        assert list(drop.iterdir()) == []
