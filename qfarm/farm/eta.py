"""How long jobs take, before they run: the order a scheduler dispatches them in, and how long a sweep has left.

Each job's expected duration comes from, in order:

1. the finished jobs of the same sweep with the same work shape (``work_shape``: kind, method, model, the
   evaluation's size, calibration and training length: what decides the time, not what decides the quality, so
   the points of a bits × group-size grid share one), their mean;
2. the history of earlier sweeps in Redis, keyed by the same shape (``Store.record_duration``): content-addressed,
   so the second sweep on a model knows its GPTQ jobs take minutes before the first one finishes;
3. else a prior: the method's relative cost (the registry's ``Method.cost``) × the tokens it evaluates, calibrates on and
   trains on, scaled by what the finished jobs took against their own prior (nothing finished: unitless, good for
   the order, not for an ETA).

Dispatch is longest-first, and on a pipeline by the longest remaining path (``ranks``: a job's own expected time
plus its longest chain of descendants), so the critical path starts first and short rows fill the gaps. Pure:
reads job specs, records and the history only.
"""

from __future__ import annotations

import hashlib
import json
import time
from statistics import mean, median
from typing import Iterable

from qfarm.errors import Permanent
from qfarm.farm.store import TERMINAL, JobRecord
from qfarm.sweep.job import Job


def quality_only(job: Job) -> frozenset[str]:
    """The job's options that change its quality, not its time: those its options model marks ``QUALITY_ONLY``
    (qfarm.sweep.methods), so jobs differing only in them share their history."""
    from qfarm.sweep.methods import KINDS

    kind = KINDS.get(job.kind)
    try:
        model, _, _ = kind.options_for(job.options) if kind is not None else (None, None, None)
    except LookupError:
        return frozenset()
    return model.quality_only() if model is not None else frozenset()


def work_shape(job: Job) -> str:
    """The key of what decides a job's duration (its history across sweeps): the options as stored, less the
    quality-only ones, so a key is the same for every qfarm that stored the same options."""
    skip = quality_only(job)
    opts = {k: v for k, v in job.options.items() if k not in skip}
    ident = [job.kind, opts, (job.model or {}).get("key"), job.eval, job.resources.get("gpus")]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prior_units(job: Job) -> float:
    """A job's cost in the prior's units: its method's relative cost (the registry's ``cost``) × the tokens it
    evaluates, calibrates on (at a quarter: no evaluation per token) and trains on (three passes a token); a sleep
    job's seconds."""
    from qfarm.sweep.methods import KINDS

    opts, kind = job.stored, KINDS.get(job.kind)
    if kind is None:
        return 1.0
    if kind.name == "sleep":
        return float(opts.seconds or 0.0)
    method = kind.method(job.method)
    cost = method.cost if method is not None else kind.cost
    try:
        ev = job.evaluation
    except Permanent:  # a record this qfarm cannot read
        ev = None
    if ev is None:  # priced as the spec's default evaluation
        from qfarm.sweep.spec import StoredEval

        ev = StoredEval()
    tokens = sum(t.seq_len * t.max_windows for t in ev.texts) + 2000 * len(ev.tasks) if kind.name != "calibrate" else 0
    cal = opts.calibration
    # a GPTQ job that shares a capture only solves: the calibration tokens are the capture job's
    calibrates = cal is not None and (kind.name == "calibrate" or (
        method is not None and method.calibrates and not (method.captures and cal.share)))
    calib = (cal.samples or 0) * (cal.seq_len or 0) if calibrates else 0
    train = (opts.max_steps or 0) * (opts.batch_size or 1) * (opts.seq_len or 0) * 3
    return cost * (tokens + calib / 4 + train)


def _took(job: JobRecord) -> float | None:
    return job.duration_s if job.status == "succeeded" and job.duration_s is not None else None


def expected(jobs: Iterable[JobRecord], history: dict[str, float] | None = None,
             unitless: bool = False) -> dict[str, float]:
    """Each unfinished job's expected total run time (s), by job id. Without anything finished or remembered to
    scale the prior by, absent (``unitless``: the prior's units instead, enough to order jobs by)."""
    jobs, history = list(jobs), history or {}
    shape = {j.id: work_shape(j.job) for j in jobs}  # each job's once: this runs on every dispatch pass
    units = {j.id: prior_units(j.job) for j in jobs}
    done = [j for j in jobs if _took(j) is not None]
    alike: dict[str, list[float]] = {}
    for j in done:
        alike.setdefault(shape[j.id], []).append(_took(j))
    ratios = [_took(j) / units[j.id] for j in done if units[j.id] > 0]
    ratios += [history[shape[j.id]] / units[j.id] for j in jobs if shape[j.id] in history and units[j.id] > 0]
    scale = median(ratios) if ratios else (1.0 if unitless else None)
    out = {}
    for j in jobs:
        if j.status not in ("queued", "running"):
            continue
        if shape[j.id] in alike:
            out[j.id] = mean(alike[shape[j.id]])
        elif shape[j.id] in history:
            out[j.id] = history[shape[j.id]]
        elif scale is not None:
            out[j.id] = units[j.id] * scale
    return out


def ranks(jobs: Iterable[JobRecord], history: dict[str, float] | None = None) -> dict[str, float]:
    """Each unfinished job's dispatch priority: its expected time plus the longest chain of unfinished jobs that
    come from it (the critical path through it). Higher first."""
    jobs = list(jobs)
    guess = expected(jobs, history, unitless=True)
    children: dict[str, list[str]] = {}
    for j in jobs:
        for parent in (j.job.parent, *j.job.needs, *j.job.after):  # a search's finals come after its candidates
            if parent:
                children.setdefault(parent, []).append(j.id)
    memo: dict[str, float] = {}

    def rank(job_id: str, depth: int = 0) -> float:
        if job_id not in memo:
            below = [rank(c, depth + 1) for c in children.get(job_id, []) if depth < 64]
            memo[job_id] = guess.get(job_id, 0.0) + max(below, default=0.0)
        return memo[job_id]

    return {j.id: rank(j.id) for j in jobs if j.id in guess}


def dispatch_order(queued: list[JobRecord], jobs: Iterable[JobRecord], history: dict[str, float] | None = None,
                   how: str = "longest") -> list[JobRecord]:
    """``queued`` in the order to dispatch them: ``longest`` remaining path first (ties in file order), or
    ``file`` order (``QFARM_DISPATCH=file``, for comparison)."""
    if how == "file":
        return list(queued)
    r = ranks(jobs, history)
    return sorted(queued, key=lambda j: -r.get(j.id, 0.0))  # sorted is stable: file order among equals


def eta_s(jobs: Iterable[JobRecord], now: float | None = None, history: dict[str, float] | None = None) -> float | None:
    """Seconds until the sweep should be done: the remaining work over the slots (the workers running its jobs
    now, at least one; or those that ran them), never less than its longest remaining job. 0 when nothing is
    left; None when there is nothing to scale the estimates by (no job finished, no history)."""
    jobs = list(jobs)
    left = [j for j in jobs if j.status not in TERMINAL]
    if not left:
        return 0.0
    guess = expected(jobs, history)
    if not guess or any(j.id not in guess for j in left):
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
