"""scripts/install.sh into a throwaway root: the files, their modes, idempotence, uninstall.

Every run uses --root (nothing outside tmp_path changes) and --no-venv (no pip install).
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "install.sh"
TMPFILES = REPO / "systemd" / "edge-agent.tmpfiles"
EXAMPLE = REPO / "config.example.toml"

UNIT = "etc/systemd/system/edge-agent.service"
TMPFILES_CONF = "etc/tmpfiles.d/edge-agent.conf"
CONFIG = "etc/edge-agent/config.toml"
MODELS = "var/lib/edge-agent/models"
STATE = "var/lib/edge-agent/state"


def _install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _install_ok(root: Path, *args: str) -> str:
    result = _install("--root", str(root), "--no-venv", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tmpfiles() -> dict[str, tuple[int, str]]:
    """tmpfiles lines as relative path -> (mode, "user:group")."""
    entries = {}
    for line in TMPFILES.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            _kind, path, mode, user, group, _age = line.split()
            entries[path.lstrip("/")] = (int(mode, 8), user + ":" + group)
    return entries


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A throwaway root that does not exist yet."""
    return tmp_path / "root"


class TestInstall:
    def test_directories_have_the_tmpfiles_modes(self, root: Path) -> None:
        """Each directory the tmpfiles snippet declares exists with the same mode."""
        _install_ok(root)
        for rel, (mode, _owner) in _tmpfiles().items():
            assert _mode(root / rel) == mode, rel

    def test_owners_printed_match_tmpfiles(self, root: Path) -> None:
        """Under --root the chowns it would run name the owners the tmpfiles snippet names."""
        out = _install_ok(root)
        would = {path: owner for owner, path in re.findall(r"not running: chown (\S+) /(\S+)", out)}
        for rel, (_mode, owner) in _tmpfiles().items():
            assert would[rel] == owner, rel

    def test_drop_dir_is_group_writable_not_world_writable(self, root: Path) -> None:
        """The drop dir is set-group-ID and group-writable, and others have no access."""
        _install_ok(root)
        mode = _mode(root / MODELS)
        assert mode & stat.S_ISGID
        assert mode & stat.S_IWGRP
        assert not mode & stat.S_IRWXO

    def test_state_dir_is_private(self, root: Path) -> None:
        """Only the agent's user may enter its state dir."""
        _install_ok(root)
        assert _mode(root / STATE) == 0o700

    def test_unit_and_tmpfiles_are_copied(self, root: Path) -> None:
        """The unit and the tmpfiles snippet are installed verbatim, mode 0644."""
        _install_ok(root)
        assert (root / UNIT).read_bytes() == (REPO / "systemd" / "edge-agent.service").read_bytes()
        assert (root / TMPFILES_CONF).read_bytes() == TMPFILES.read_bytes()
        assert _mode(root / UNIT) == 0o644
        assert _mode(root / TMPFILES_CONF) == 0o644

    def test_config_points_at_the_system_paths(self, root: Path) -> None:
        """The written config uses the drop dir and state dir under /var/lib/edge-agent."""
        _install_ok(root)
        config = tomllib.loads((root / CONFIG).read_text())
        assert config["models"]["dir"] == "/var/lib/edge-agent/models"
        assert config["state"]["dir"] == "/var/lib/edge-agent/state"

    def test_config_is_readable_by_the_agent_group_only(self, root: Path) -> None:
        """The config (it may hold tokens) is 0640 in a 0750 directory."""
        _install_ok(root)
        assert _mode(root / CONFIG) == 0o640
        assert _mode((root / CONFIG).parent) == 0o750

    def test_config_differs_from_the_example_only_in_the_two_dirs(self, root: Path) -> None:
        """Every other setting of config.example.toml is kept, comments included."""
        _install_ok(root)
        written = (root / CONFIG).read_text().splitlines()
        example = EXAMPLE.read_text().splitlines()
        assert len(written) == len(example)
        changed = [(a, b) for a, b in zip(example, written, strict=True) if a != b]
        assert [b for _a, b in changed] == [
            'dir = "/var/lib/edge-agent/models"',
            'dir = "/var/lib/edge-agent/state"',
        ]

    def test_no_systemctl_under_root(self, root: Path) -> None:
        """Under --root the systemctl steps are printed, not run."""
        out = _install_ok(root)
        assert "not running: systemctl daemon-reload" in out

    def test_no_venv_skips_pip(self, root: Path) -> None:
        """--no-venv creates no venv."""
        _install_ok(root)
        assert not (root / "opt" / "edge-agent" / "venv").exists()


class TestIdempotence:
    def test_second_run_succeeds_and_keeps_the_layout(self, root: Path) -> None:
        """Running twice leaves the same files with the same modes."""
        _install_ok(root)
        first = {p: _mode(p) for p in root.rglob("*")}
        _install_ok(root)
        assert {p: _mode(p) for p in root.rglob("*")} == first

    def test_second_run_keeps_an_edited_config(self, root: Path) -> None:
        """An operator's edits to the config survive a re-install."""
        _install_ok(root)
        config = root / CONFIG
        config.write_text(config.read_text() + "\n# edited by the operator\n")
        out = _install_ok(root)
        assert config.read_text().endswith("# edited by the operator\n")
        assert "keeping the existing /etc/edge-agent/config.toml" in out

    def test_second_run_repairs_a_loosened_drop_dir(self, root: Path) -> None:
        """A drop dir made world-writable by hand gets its mode back."""
        _install_ok(root)
        (root / MODELS).chmod(0o777)
        _install_ok(root)
        assert _mode(root / MODELS) == 0o2770


class TestUninstall:
    def test_uninstall_keeps_config_and_state(self, root: Path) -> None:
        """--uninstall removes the unit and /opt/edge-agent but keeps config, models and state."""
        _install_ok(root)
        (root / MODELS / "iris.onnx").write_bytes(b"model")
        _install_ok(root, "--uninstall")
        assert not (root / UNIT).exists()
        assert not (root / TMPFILES_CONF).exists()
        assert not (root / "opt" / "edge-agent").exists()
        assert (root / CONFIG).is_file()
        assert (root / MODELS / "iris.onnx").read_bytes() == b"model"
        assert (root / STATE).is_dir()

    def test_purge_removes_config_and_state(self, root: Path) -> None:
        """--uninstall --purge also removes /etc/edge-agent and /var/lib/edge-agent."""
        _install_ok(root)
        _install_ok(root, "--uninstall", "--purge")
        assert not (root / "etc" / "edge-agent").exists()
        assert not (root / "var" / "lib" / "edge-agent").exists()

    def test_uninstall_twice_succeeds(self, root: Path) -> None:
        """Uninstalling what is already gone is not an error."""
        _install_ok(root)
        _install_ok(root, "--uninstall")
        _install_ok(root, "--uninstall")


class TestOptions:
    def test_dry_run_changes_nothing(self, root: Path) -> None:
        """--dry-run prints the actions and creates nothing."""
        out = _install_ok(root, "--dry-run")
        assert "+ chmod 2770 " + str(root / MODELS) in out
        assert not root.exists()

    def test_unknown_option_is_refused(self, root: Path) -> None:
        """An unknown option fails with a message naming it."""
        result = _install("--root", str(root), "--frobnicate")
        assert result.returncode != 0
        assert "unknown option '--frobnicate'" in result.stderr

    def test_purge_needs_uninstall(self, root: Path) -> None:
        """--purge without --uninstall is refused."""
        result = _install("--root", str(root), "--purge")
        assert result.returncode != 0
        assert "--purge only goes with --uninstall" in result.stderr

    @pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
    def test_shellcheck_clean(self) -> None:
        """shellcheck finds nothing in install.sh."""
        result = subprocess.run(
            ["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout
