"""How long a sweep has left: each unfinished job's expected duration from the finished jobs of the same kind and
method (their mean; the mean of every finished job when none is alike, nothing when none has finished), what a
running job has already spent taken off, spread over the slots the sweep runs on. Pure: reads job records only.
"""

from __future__ import annotations

import time
from statistics import mean
from typing import Iterable

from .store import TERMINAL, JobRecord


def _shape(job: JobRecord) -> tuple:
    spec = job.spec or {}
    return (spec.get("kind"), (spec.get("options") or {}).get("method"))


def expected(jobs: Iterable[JobRecord]) -> dict[str, float]:
    """Each unfinished job's expected total run time (s), by job id; absent where nothing finished to go by."""
    jobs = list(jobs)
    done = [j for j in jobs if j.status == "succeeded" and j.duration_s is not None]
    if not done:
        return {}
    by_shape: dict[tuple, list[float]] = {}
    for j in done:
        by_shape.setdefault(_shape(j), []).append(j.duration_s)
    overall = mean(j.duration_s for j in done)
    return {j.id: mean(by_shape.get(_shape(j)) or [overall]) for j in jobs if j.status in ("queued", "running")}


def eta_s(jobs: Iterable[JobRecord], now: float | None = None) -> float | None:
    """Seconds until the sweep should be done: the remaining work over the slots (the workers running its jobs
    now, at least one; or those that ran them). 0 when nothing is left; None when nothing finished yet."""
    jobs = list(jobs)
    left = [j for j in jobs if j.status not in TERMINAL]
    if not left:
        return 0.0
    guess = expected(jobs)
    if not guess:
        return None
    now = time.time() if now is None else now

    def remaining(j: JobRecord) -> float:
        spent = now - j.started_at if j.status == "running" and j.started_at else 0.0
        return max(guess[j.id] - max(spent, 0.0), 0.0)

    running = sum(1 for j in left if j.status == "running")
    workers = len({j.worker for j in jobs if j.worker})
    slots = max(1, running or workers)
    # one job cannot be split over slots: the longest remaining one bounds the sweep from below
    return max(sum(remaining(j) for j in left) / slots, max(remaining(j) for j in left))


def say(seconds: float | None) -> str:
    """An ETA for people: "ETA 3 min 20 s", "ETA unknown (no job finished yet)", "done"."""
    if seconds is None:
        return "ETA unknown (no job has finished yet)"
    if seconds <= 0:
        return "done"
    s = int(round(seconds))
    if s < 60:
        return f"ETA {s} s"
    if s < 3600:
        return f"ETA {s // 60} min {s % 60:02d} s"
    return f"ETA {s // 3600} h {s % 3600 // 60:02d} min"
