"""The cores this process may use: its CPU affinity mask, capped by a cgroup CPU quota.

``[server] processes = 0`` resolves to this. The affinity mask alone does not see a
quota: a container limited to 1.5 CPUs on a 16-core host would start 16 processes. Both
cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) are read,
on the mount roots and on every directory down to this process's own cgroup (a systemd
unit's ``CPUQuota=`` is on its own cgroup); missing or unreadable files mean no quota.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Final

#: Where cgroup v2 (``cpu.max``) and v1 (``cpu/cpu.cfs_quota_us``) are mounted.
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
#: This process's cgroups, one ``hierarchy:controllers:path`` line each.
SELF_CGROUP: Final = Path("/proc/self/cgroup")
#: The most processes ``processes = 0`` resolves to (the bound of the setting).
MAX_PROCESSES: Final = 64


def usable_cores(affinity: int, quota: float | None) -> int:
    """Cores to use: the affinity mask's count, capped by a cgroup CPU quota (in CPUs,
    rounded up: 1.5 CPUs is 2 processes), at least 1 and at most ``MAX_PROCESSES``."""
    cores = affinity if quota is None else min(affinity, math.ceil(quota))
    return max(1, min(MAX_PROCESSES, cores))


def cpu_max_quota(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` (``"150000 100000"`` is 1.5); None for
    ``"max ..."`` (no quota) or text that is not a quota."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    return _ratio(parts[0], parts[1] if len(parts) > 1 else "100000")


def cfs_quota(quota: str, period: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none)."""
    return _ratio(quota.strip(), period.strip())


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, membership: Path = SELF_CGROUP) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroups and their ancestors, v2
    or v1; None when there is none. Missing or unreadable files mean no quota.

    Looks at the mount roots (a container sees its own cgroup there) and at the paths
    ``membership`` names below them (a systemd unit's ``CPUQuota=`` is on its own cgroup).
    """
    paths = _cgroup_paths(_read_small(membership) or "")
    quotas = [q for d in _cgroup_dirs(root, paths) if (q := _dir_quota(d)) is not None]
    return min(quotas, default=None)


def _cgroup_paths(text: str) -> tuple[str, str]:
    """(cgroup v2 path, v1 ``cpu`` controller path) from ``/proc/self/cgroup``."""
    v2 = v1 = "/"
    for line in text.splitlines():
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not controllers and line.startswith("0:"):
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _cgroup_dirs(root: Path, paths: tuple[str, str]) -> list[Path]:
    """Each mount root and every directory from it down to this process's cgroup."""
    dirs = []
    for base, path in (
        (root, paths[0]),
        (root / "cpu", paths[1]),
        (root / "cpu,cpuacct", paths[1]),
    ):
        parts = [part for part in path.split("/") if part not in ("", ".", "..")]
        dirs += [base.joinpath(*parts[:depth]) for depth in range(len(parts) + 1)]
    return dirs


def _dir_quota(directory: Path) -> float | None:
    text = _read_small(directory / "cpu.max")
    if text is not None:
        return cpu_max_quota(text)
    quota = _read_small(directory / "cpu.cfs_quota_us")
    period = _read_small(directory / "cpu.cfs_period_us")
    return cfs_quota(quota, period) if quota is not None and period is not None else None


def _read_small(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except (OSError, ValueError):
        return None
