"""Health-gated rollout: per-version request statistics and the probation verdict.

Pure decisions over counters: nothing here swaps, logs or sleeps. The registry feeds
outcomes in and acts on the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

_RING = 2048

Verdict = Literal["pending", "passed", "rollback"]


@dataclass(slots=True)
class VersionStats:
    """Requests, errors and a ring of recent latencies for one live version."""

    requests: int = 0
    errors: int = 0
    _latencies: np.ndarray = field(default_factory=lambda: np.zeros(_RING, dtype=np.float64))
    _filled: int = 0

    def record(self, latency_s: float) -> None:
        """Count one request answered by the version, and its latency."""
        self.requests += 1
        self._latencies[self._filled % _RING] = latency_s
        self._filled += 1

    def fail(self) -> None:
        """Count one request the version failed (no latency: it would skew the p99 down)."""
        self.requests += 1
        self.errors += 1

    def p99(self) -> float | None:
        """p99 latency over the recent ring, None before any request."""
        n = min(self._filled, _RING)
        return float(np.percentile(self._latencies[:n], 99)) if n else None

    def error_rate(self) -> float:
        """Failed share of all requests (0 before any)."""
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbationPolicy:
    """Limits a new version must respect while on probation."""

    probation_s: float
    max_error_rate: float
    max_p99_ratio: float
    min_requests: int

    def overridden(
        self,
        probation_s: float | None,
        max_error_rate: float | None,
        max_p99_ratio: float | None,
    ) -> ProbationPolicy:
        """This policy with a manifest's ``[rollout]`` values where it sets them."""
        return ProbationPolicy(
            probation_s=self.probation_s if probation_s is None else probation_s,
            max_error_rate=self.max_error_rate if max_error_rate is None else max_error_rate,
            max_p99_ratio=self.max_p99_ratio if max_p99_ratio is None else max_p99_ratio,
            min_requests=self.min_requests,
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict and, for a rollback, the reason in words."""

    verdict: Verdict
    reason: str = ""


def judge(
    stats: VersionStats,
    policy: ProbationPolicy,
    elapsed_s: float,
    baseline_p99: float | None,
) -> Decision:
    """Decide whether a version on probation passes, fails, or needs more evidence."""
    if stats.requests >= policy.min_requests:
        rate = stats.error_rate()
        if rate > policy.max_error_rate:
            return Decision(
                "rollback",
                f"error rate {rate:.1%} over {stats.requests} requests exceeds "
                f"max_error_rate {policy.max_error_rate:.1%}",
            )
        p99 = stats.p99()
        if baseline_p99 and p99 is not None and p99 > policy.max_p99_ratio * baseline_p99:
            return Decision(
                "rollback",
                f"p99 latency {p99 * 1000:.2f} ms exceeds {policy.max_p99_ratio:g} x the "
                f"previous version's {baseline_p99 * 1000:.2f} ms",
            )
    if elapsed_s >= policy.probation_s:
        return Decision("passed")
    return Decision("pending")
