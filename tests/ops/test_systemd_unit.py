"""systemd/edge-agent.service: systemd's own checks (verify, security) and what we promise in it.

`systemd-analyze verify` reports an ExecStart= binary that does not exist, and
/opt/edge-agent/venv/bin/edge-agent exists only on an installed machine. `--root` would
need a whole systemd tree (sysinit.target, /bin/kill) inside the throwaway root, so the
test verifies a copy of the unit in which only the ExecStart= executable is replaced by
this interpreter (same arguments, every other line byte for byte). Neither command needs
systemd to run as PID 1.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "edge-agent.service"
TMPFILES = REPO / "systemd" / "edge-agent.tmpfiles"
INSTALLED_EXE = "/opt/edge-agent/venv/bin/edge-agent"
MAX_EXPOSURE = 2.5
ANALYZE = shutil.which("systemd-analyze")

needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze is not installed (apt-get install -y systemd; PID 1 not needed)",
)


def _settings(text: str) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file as "Section.Key" -> values (keys may repeat)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(section + "." + key.strip(), []).append(value.strip())
    return found


def _one(settings: dict[str, list[str]], key: str) -> str:
    values = settings[key]
    assert len(values) == 1, (key, values)
    return values[0]


def _analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_LOG_COLOR": "0", "LANG": "C"},
    )


def _verify_problems(unit: Path) -> list[str]:
    """The lines of `systemd-analyze verify` output that concern our unit or ignore a setting."""
    result = _analyze("verify", str(unit), cwd=unit.parent)
    lines = (result.stdout + result.stderr).splitlines()
    problems = [ln for ln in lines if unit.name in ln or "ignoring" in ln.lower()]
    if result.returncode != 0:
        problems.append("exit status " + str(result.returncode))
    return problems


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart= executable exists on this machine."""
    text = UNIT.read_text()
    assert text.count("ExecStart=" + INSTALLED_EXE + " ") == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("ExecStart=" + INSTALLED_EXE, "ExecStart=" + sys.executable))
    return copy


@needs_analyze
class TestSystemdAnalyze:
    def test_verify_is_clean(self, verifiable_unit: Path) -> None:
        """`systemd-analyze verify` accepts the unit without a warning or an ignored setting."""
        assert _verify_problems(verifiable_unit) == []

    def test_verify_check_catches_ignored_settings(self, verifiable_unit: Path) -> None:
        """The verify check above is not vacuous: an unknown key is reported."""
        verifiable_unit.write_text(
            verifiable_unit.read_text().replace("[Service]\n", "[Service]\nNoSuchKey=1\n")
        )
        assert any("NoSuchKey" in line for line in _verify_problems(verifiable_unit))

    def test_security_exposure_is_low(self, tmp_path: Path) -> None:
        """`systemd-analyze security --offline=yes` rates the unit at most 2.5 (of 10)."""
        result = _analyze("security", "--offline=yes", str(UNIT), cwd=tmp_path)
        match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
        assert match is not None, result.stdout + result.stderr
        assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


class TestPromises:
    def test_type_notify_not_notify_reload(self) -> None:
        """The unit uses Type=notify, which systemd 252 (Debian 12) understands."""
        assert _one(_settings(UNIT.read_text()), "Service.Type") == "notify"

    def test_runs_the_installed_agent_with_the_installed_config(self) -> None:
        """ExecStart runs the venv's edge-agent on /etc/edge-agent/config.toml."""
        exec_start = _one(_settings(UNIT.read_text()), "Service.ExecStart")
        assert exec_start == INSTALLED_EXE + " run --config /etc/edge-agent/config.toml"

    def test_reload_is_sighup_to_the_main_process(self) -> None:
        """systemctl reload sends SIGHUP to the agent."""
        assert _one(_settings(UNIT.read_text()), "Service.ExecReload") == "/bin/kill -HUP $MAINPID"

    def test_stop_timeout_covers_the_drain(self) -> None:
        """TimeoutStopSec leaves room for the default drain of config.example.toml."""
        example = tomllib.loads((REPO / "config.example.toml").read_text())
        stop_s = int(_one(_settings(UNIT.read_text()), "Service.TimeoutStopSec"))
        assert stop_s > example["server"]["drain_timeout_s"] + 10

    def test_restart_is_rate_limited(self) -> None:
        """Restart=on-failure comes with a start limit, set in [Unit] where systemd reads it."""
        settings = _settings(UNIT.read_text())
        assert _one(settings, "Service.Restart") == "on-failure"
        assert int(_one(settings, "Unit.StartLimitBurst")) >= 1
        assert int(_one(settings, "Unit.StartLimitIntervalSec")) > 0

    def test_watchdog_is_on(self) -> None:
        """The service manager expects a watchdog ping from the agent."""
        assert int(_one(_settings(UNIT.read_text()), "Service.WatchdogSec")) > 0


class TestCoherenceWithTmpfiles:
    def _tmpfiles(self) -> dict[str, tuple[str, str, str]]:
        """tmpfiles lines as path -> (mode, user, group)."""
        entries = {}
        for line in TMPFILES.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                _kind, path, mode, user, group, _age = line.split()
                entries[path] = (mode, user, group)
        return entries

    def test_state_directory_matches(self) -> None:
        """StateDirectory and its mode are the ones tmpfiles creates for the agent's user."""
        settings = _settings(UNIT.read_text())
        mode, user, group = self._tmpfiles()["/var/lib/" + _one(settings, "Service.StateDirectory")]
        assert mode == _one(settings, "Service.StateDirectoryMode")
        assert (user, group) == (_one(settings, "Service.User"), _one(settings, "Service.Group"))

    def test_drop_dir_is_readable_through_the_deploy_group(self) -> None:
        """The agent's supplementary group owns the drop dir, which is read-only in the service."""
        settings = _settings(UNIT.read_text())
        mode, _user, group = self._tmpfiles()["/var/lib/edge-agent/models"]
        assert group == _one(settings, "Service.SupplementaryGroups")
        assert int(mode, 8) & 0o040
        assert not int(mode, 8) & 0o002
        assert _one(settings, "Service.ReadOnlyPaths") == "-/var/lib/edge-agent/models"
