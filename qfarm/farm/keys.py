"""Every Redis key qfarm writes, in one place.

All keys start with the deployment namespace (default ``qfarm``) so several teams, or a test run, can
share one Redis without seeing each other's sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_NAMESPACE = "qfarm"
EVENTS_MAXLEN = 10_000
DEFAULT_OUTPUT_ROOT = "qfarm-out"  # artifacts, and the hub cache (<root>/_hub), when --output-root names none
DEFAULT_CANCEL_GRACE_S = 10.0  # a running job stops by itself within this after `qfarm cancel`, or is killed


@dataclass(frozen=True)
class Keys:
    namespace: str = DEFAULT_NAMESPACE

    def sweeps(self) -> str:
        """Sorted set: sweep id -> created_at."""
        return f"{self.namespace}:sweeps"

    def sweep(self, sweep_id: str) -> str:
        """Hash: the sweep record."""
        return f"{self.namespace}:sweep:{sweep_id}"

    def sweep_jobs(self, sweep_id: str) -> str:
        """List: the sweep's job ids, in expansion order."""
        return f"{self.namespace}:sweep:{sweep_id}:jobs"

    def sweep_stats(self, sweep_id: str) -> str:
        """Hash of counters (model loads, cache hits, ...)."""
        return f"{self.namespace}:sweep:{sweep_id}:stats"

    def job(self, job_id: str) -> str:
        """Hash: the job record."""
        return f"{self.namespace}:job:{job_id}"

    def job_attempts(self, job_id: str) -> str:
        """List of JSON objects, one per attempt."""
        return f"{self.namespace}:job:{job_id}:attempts"

    def durations(self) -> str:
        """Hash: how long jobs of each work shape took (qfarm.farm.eta.work_shape), ``<shape>:n`` and ``<shape>:sum``."""
        return f"{self.namespace}:durations"

    def events(self) -> str:
        """Stream of state transitions (capped)."""
        return f"{self.namespace}:events"

    def pattern(self) -> str:
        return f"{self.namespace}:*"
