"""The Redis store: the only source of truth for sweeps and jobs.

Everything is JSON or plain strings (never pickle). Every status change is one Lua script: a compare-and-set
on the current status (and, for a running job, on its attempt id), the new fields, the attempt history and an
event on the stream, all atomic. So a retried attempt and a zombie attempt can both finish, and only the one
the job is waiting for is written.

Job statuses: queued -> running -> succeeded | failed | cancelled; running -> queued (a retry); queued -> skipped
(the job it comes from did not succeed).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any, Iterable

import redis

from qfarm.errors import QfarmError
from qfarm.farm.keys import DEFAULT_CANCEL_GRACE_S, EVENTS_MAXLEN, Keys
from qfarm.sweep.job import Job


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # never ran: the job it comes from (``from:``) failed, was cancelled or was skipped

    @property
    def terminal(self) -> bool:
        return self is not JobStatus.QUEUED and self is not JobStatus.RUNNING


TERMINAL = frozenset(s.value for s in JobStatus if s.terminal)

# KEYS: job, events, attempts. ARGV: allowed current statuses (comma list), required attempt id ('' = any),
# new status, now, JSON object of string fields to set, events maxlen, '1' to count an attempt,
# attempt record JSON to append ('' = none), JSON list of fields to delete.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
local ok = false
for s in string.gmatch(ARGV[1], '[^,]+') do if s == cur then ok = true end end
if not ok then return 0 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'attempt_id') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'updated_at', ARGV[4])
for k, v in pairs(cjson.decode(ARGV[5])) do redis.call('HSET', KEYS[1], k, v) end
for _, k in ipairs(cjson.decode(ARGV[9])) do redis.call('HDEL', KEYS[1], k) end
if ARGV[7] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
if ARGV[8] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[8]) end
local job = redis.call('HGET', KEYS[1], 'id')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'job', job, 'from', cur, 'to', ARGV[3], 'at', ARGV[4])
return 1
"""

# KEYS: job. ARGV: job fields JSON (strings), now. Creates a queued job, or requeues a failed/cancelled/skipped one.
# Returns the job's status after the call.
_ENSURE_JOB = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then
  for k, v in pairs(cjson.decode(ARGV[1])) do redis.call('HSET', KEYS[1], k, v) end
  redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', 0, 'created_at', ARGV[2], 'queued_at', ARGV[2])
  return 'created'
end
if cur == 'failed' or cur == 'cancelled' or cur == 'skipped' then
  redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', 0, 'queued_at', ARGV[2], 'spec', cjson.decode(ARGV[1])['spec'])
  redis.call('HDEL', KEYS[1], 'error', 'error_detail', 'result', 'finished_at', 'started_at', 'attempt_id', 'progress',
             'cancel', 'cancel_grace_s')
  return 'requeued'
end
return cur
"""


# KEYS: job. ARGV: attempt id, JSON fields. Only the current running attempt may beat. Returns 2 when the job
# was asked to stop (`qfarm cancel`), so the worker stops at its next progress point.
_BEAT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'attempt_id') ~= ARGV[1] then return 0 end
for k, v in pairs(cjson.decode(ARGV[2])) do redis.call('HSET', KEYS[1], k, v) end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 2 end
return 1
"""


def _now() -> float:
    return time.time()


def _string_map(text: str | None) -> dict[str, str] | None:
    """A JSON object of strings as stored, or None for anything else (nothing read from Redis is trusted)."""
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def retry_decision(attempts: int, max_attempts: int, retryable: bool) -> JobStatus:
    """What a failed attempt leads to: queued again while it is worth retrying and attempts are left, else failed."""
    return JobStatus.QUEUED if retryable and attempts < max_attempts else JobStatus.FAILED


@dataclass(frozen=True)
class JobRecord:
    id: str
    status: str
    spec: dict[str, Any]
    attempts: int = 0
    attempt_id: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    error_detail: str | None = None
    progress: str | None = None
    worker: str | None = None
    node: str | None = None
    pid: int | None = None
    sweep_id: str | None = None
    created_at: float | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    cancel_requested: bool = False
    actor_id: str | None = None  # the Ray actor running it (its page on the Ray dashboard)
    # a job that waits ``after`` others (a search's final): the attempt of each one that had succeeded when it was
    # handed to its worker (the scheduler runs it again when one of them succeeds in another: qfarm.farm.scheduler)
    after_seen: dict[str, str] | None = None

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> "JobRecord":
        def num(name: str) -> float | None:
            return float(h[name]) if h.get(name) not in (None, "") else None

        return cls(
            id=h["id"],
            status=h.get("status", "queued"),
            spec=json.loads(h.get("spec") or "{}"),
            attempts=int(h.get("attempts") or 0),
            attempt_id=h.get("attempt_id") or None,
            result=json.loads(h["result"]) if h.get("result") else None,
            error=h.get("error") or None,
            error_detail=h.get("error_detail") or None,
            progress=h.get("progress") or None,
            worker=h.get("worker") or None,
            node=h.get("node") or None,
            pid=int(h["pid"]) if h.get("pid") else None,
            sweep_id=h.get("sweep_id") or None,
            created_at=num("created_at"),
            queued_at=num("queued_at"),
            started_at=num("started_at"),
            finished_at=num("finished_at"),
            heartbeat_at=num("heartbeat_at"),
            cancel_requested=h.get("cancel") == "1",
            actor_id=h.get("actor_id") or None,
            after_seen=_string_map(h.get("after_seen")),
        )

    @cached_property
    def job(self) -> Job:
        """The stored job, typed (``Job.from_record``: never refused, what an older record lacks at its default)."""
        return Job.from_record(self.id, self.spec)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at if self.finished_at is not None else _now()
        return max(0.0, end - self.started_at)


@dataclass(frozen=True)
class SweepRecord:
    id: str
    name: str
    created_at: float
    source: str = ""
    output_root: str = ""
    cancel_requested: bool = False
    finished_at: float | None = None
    scheduler_error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    submitted_at: float | None = None
    scheduler_beat_at: float | None = None  # its scheduler's last pass (qfarm.farm.watchdog resumes a silent one)
    waiting: dict[str, float] = field(default_factory=dict)  # resource shape -> since when its worker waits
    dashboard_url: str | None = None  # the Ray dashboard of the cluster its scheduler runs on
    tracking_note: str | None = None  # what its live MLflow tracking did last, or why it failed

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> "SweepRecord":
        return cls(
            id=h["id"],
            name=h.get("name", ""),
            created_at=float(h.get("created_at") or 0),
            source=h.get("source", ""),
            output_root=h.get("output_root", ""),
            cancel_requested=h.get("cancel") == "1",
            finished_at=float(h["finished_at"]) if h.get("finished_at") else None,
            scheduler_error=h.get("scheduler_error") or None,
            info=json.loads(h.get("info") or "{}"),
            submitted_at=float(h["submitted_at"]) if h.get("submitted_at") else None,
            scheduler_beat_at=float(h["scheduler_beat_at"]) if h.get("scheduler_beat_at") else None,
            waiting=json.loads(h.get("waiting") or "{}"),
            dashboard_url=h.get("dashboard_url") or None,
            tracking_note=h.get("tracking_note") or None,
        )


class Store:
    """Sweeps and jobs in Redis. Every write accepts ``pipeline=`` where composing makes sense."""

    def __init__(self, client: redis.Redis, namespace: str = "qfarm"):
        self.r = client
        self.keys = Keys(namespace)
        self.namespace = namespace
        self._waiting_said: dict[str, str] = {}
        self._transition = client.register_script(_TRANSITION)
        self._ensure = client.register_script(_ENSURE_JOB)
        self._beat = client.register_script(_BEAT)

    # --- sweeps ------------------------------------------------------------------------------------

    def submit(self, sweep_id: str, name: str, jobs: Iterable[dict], *, source: str, output_root: str,
               info: dict | None = None) -> dict[str, int]:
        """Record a sweep and its jobs. Idempotent: finished jobs stay finished, failed/cancelled ones requeue.

        Returns how many jobs were created, requeued, or found in each other status.
        """
        payloads = list(jobs)
        jobs = [Job.from_payload(p) for p in payloads]
        now = _now()
        key = self.keys.sweep(sweep_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hsetnx(key, "created_at", repr(now))
        pipe.hset(key, mapping={"id": sweep_id, "name": name, "source": source, "output_root": output_root,
                                "info": json.dumps(info or {}), "job_count": len(jobs)})
        self._reopen(pipe, sweep_id, now)
        pipe.zadd(self.keys.sweeps(), {sweep_id: now})  # ordered by last submit: a resubmit is the newest
        pipe.delete(self.keys.sweep_jobs(sweep_id))
        if jobs:
            pipe.rpush(self.keys.sweep_jobs(sweep_id), *[j.id for j in jobs])
        pipe.execute()
        counts: dict[str, int] = {}
        for outcome in self._ensure_jobs(sweep_id, list(zip(jobs, payloads)), now):
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    def _reopen(self, pipe, sweep_id: str, now: float) -> None:
        """The sweep runs again: not cancelled, not finished, submitted now."""
        key = self.keys.sweep(sweep_id)
        pipe.hset(key, mapping={"cancel": "0", "submitted_at": repr(now)})
        pipe.hdel(key, "finished_at", "scheduler_error")

    def _ensure_jobs(self, sweep_id: str, jobs: list[tuple[Job, dict]], now: float) -> list[str]:
        """Create each job (with its payload), or requeue it if failed/cancelled (attempts reset); its outcome, in
        order."""
        outcomes: list[str] = []
        for start in range(0, len(jobs), 500):
            pipe = self.r.pipeline(transaction=False)
            for job, payload in jobs[start:start + 500]:
                fields = {"id": job.id, "spec": json.dumps(payload), "kind": job.kind, "label": job.label,
                          "sweep_id": sweep_id}
                self._ensure(keys=[self.keys.job(job.id)], args=[json.dumps(fields), repr(now)], client=pipe)
            outcomes += pipe.execute()
        return outcomes

    def record_duration(self, shape: str, seconds: float) -> None:
        """One more finished job of this work shape took ``seconds`` (the history qfarm.farm.eta estimates from)."""
        if not (isinstance(shape, str) and re.fullmatch(r"[0-9a-f]{16}", shape)) or not 0 <= seconds < 1e7:
            return
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrbyfloat(self.keys.durations(), f"{shape}:sum", float(seconds))
        pipe.hincrby(self.keys.durations(), f"{shape}:n", 1)
        pipe.execute()

    def durations(self) -> dict[str, float]:
        """The mean duration (s) of every work shape finished so far, in this namespace."""
        raw = self.r.hgetall(self.keys.durations())
        out = {}
        for key, value in raw.items():
            shape, _, what = key.rpartition(":")
            if what == "sum" and raw.get(f"{shape}:n"):
                try:
                    out[shape] = float(value) / max(int(raw[f"{shape}:n"]), 1)
                except ValueError:
                    continue  # not a number: nothing from Redis is trusted to be what it says
        return out

    def sweep(self, sweep_id: str) -> SweepRecord | None:
        h = self.r.hgetall(self.keys.sweep(sweep_id))
        return SweepRecord.from_hash(h) if h else None

    def sweep_ids(self) -> list[str]:
        """All sweeps, least recently submitted first."""
        return list(self.r.zrange(self.keys.sweeps(), 0, -1))

    def find_sweep(self, text: str) -> SweepRecord | None:
        """A sweep by id, unique id prefix, or name (the most recently submitted sweep of that name)."""
        found = self.sweep(text)
        if found:
            return found
        ids = self.sweep_ids()
        prefixed = [i for i in ids if i.startswith(text)]
        if len(prefixed) == 1:
            return self.sweep(prefixed[0])
        for sid in reversed(ids):
            rec = self.sweep(sid)
            if rec and rec.name == text:
                return rec
        if prefixed:  # the start of several ids, and no sweep's name
            from qfarm.errors import UsageError

            shown = ", ".join(prefixed[:5]) + (f" and {len(prefixed) - 5} more" if len(prefixed) > 5 else "")
            raise UsageError(f"{text!r} is the start of {len(prefixed)} sweep ids ({shown}): give more of one")
        return None

    def job_ids(self, sweep_id: str) -> list[str]:
        return list(self.r.lrange(self.keys.sweep_jobs(sweep_id), 0, -1))

    def jobs(self, job_ids: list[str]) -> list[JobRecord]:
        pipe = self.r.pipeline(transaction=False)
        for jid in job_ids:
            pipe.hgetall(self.keys.job(jid))
        return [JobRecord.from_hash(h) for h in pipe.execute() if h]

    def statuses(self, sweep_id: str) -> list[str]:
        """Just the status of each job (cheap: for counts over many sweeps)."""
        pipe = self.r.pipeline(transaction=False)
        for jid in self.job_ids(sweep_id):
            pipe.hget(self.keys.job(jid), "status")
        return [s for s in pipe.execute() if s]

    def sweep_jobs(self, sweep_id: str) -> list[JobRecord]:
        return self.jobs(self.job_ids(sweep_id))

    def job(self, job_id: str) -> JobRecord | None:
        h = self.r.hgetall(self.keys.job(job_id))
        return JobRecord.from_hash(h) if h else None

    def attempts(self, job_id: str) -> list[dict]:
        return [json.loads(a) for a in self.r.lrange(self.keys.job_attempts(job_id), 0, -1)]

    def scheduler_event(self, sweep_id: str, event: str, **fields: str) -> None:
        """A scheduler decision (a worker reaped, one that never started) in the events stream beside job moves."""
        self.r.xadd(self.keys.events(), {"sweep": sweep_id, "event": event, "at": repr(_now()), **fields},
                    maxlen=EVENTS_MAXLEN, approximate=True)

    def set_waiting(self, sweep_id: str, waiting: dict[str, float]) -> None:
        """The resource shapes whose workers wait for capacity, and since when (``qfarm status`` says it)."""
        text = json.dumps(waiting, sort_keys=True)
        if self._waiting_said.get(sweep_id) != text:  # written when it changes, not on every pass
            self.r.hset(self.keys.sweep(sweep_id), "waiting", text)
            self._waiting_said[sweep_id] = text

    def set_tracking_note(self, sweep_id: str, text: str) -> None:
        """What the sweep's live MLflow tracking did last (qfarm.results.tracking), for ``qfarm status``."""
        self.r.hset(self.keys.sweep(sweep_id), "tracking_note", text)

    def set_dashboard(self, sweep_id: str, url: str) -> None:
        """Where the Ray dashboard of the sweep's cluster is (``qfarm status`` links each running job's worker)."""
        self.r.hset(self.keys.sweep(sweep_id), "dashboard_url", url)

    def scheduler_beat(self, sweep_id: str, *, pipeline=None) -> None:
        """The sweep's scheduler is alive and passing (qfarm.farm.watchdog resumes a sweep whose scheduler went silent)."""
        (pipeline or self.r).hset(self.keys.sweep(sweep_id), "scheduler_beat_at", repr(_now()))

    def unfinished_sweeps(self) -> list[SweepRecord]:
        """Sweeps submitted and not finished (a finished, crashed or cancelled sweep's scheduler marks it)."""
        records = (self.sweep(i) for i in self.sweep_ids())
        return [r for r in records if r is not None and r.finished_at is None]

    def clear_finished(self, sweep_id: str) -> None:
        """The sweep has a scheduler again: not finished."""
        self.r.hdel(self.keys.sweep(sweep_id), "finished_at")

    def mark_sweep_finished(self, sweep_id: str, *, pipeline=None) -> None:
        (pipeline or self.r).hset(self.keys.sweep(sweep_id), "finished_at", repr(_now()))

    def incr_stat(self, sweep_id: str, name: str, by: int = 1, *, pipeline=None) -> None:
        (pipeline or self.r).hincrby(self.keys.sweep_stats(sweep_id), name, by)

    def stats(self, sweep_id: str) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(self.keys.sweep_stats(sweep_id)).items()}

    def cancel_requested(self, sweep_id: str) -> bool:
        """One field read: the scheduler asks on every pass."""
        return self.r.hget(self.keys.sweep(sweep_id), "cancel") == "1"

    def retry(self, sweep_id: str, *, cancelled: bool = True) -> list[str]:
        """Requeue the sweep's failed and skipped jobs (and cancelled ones unless ``cancelled`` is False), attempts
        reset; clear its cancel flag so its scheduler runs them. Returns the requeued job ids. A skipped job runs
        once the job it comes from succeeds (or is skipped again)."""
        now = _now()
        wanted = {"failed", "skipped", "cancelled"} if cancelled else {"failed", "skipped"}
        jobs = [j for j in self.sweep_jobs(sweep_id) if j.status in wanted]
        outcomes = self._ensure_jobs(sweep_id, [(j.job, j.spec) for j in jobs], now)
        pipe = self.r.pipeline(transaction=True)
        self._reopen(pipe, sweep_id, now)
        pipe.execute()
        return [j.id for j, outcome in zip(jobs, outcomes) if outcome == "requeued"]

    def request_job_cancel(self, job_id: str, grace_s: float = DEFAULT_CANCEL_GRACE_S) -> str:
        """Cancel one job: a queued one at once ("dequeued"); a running one is flagged ("stopping"): its worker
        stops at its next progress point, or its scheduler kills it after ``grace_s``. A finished one is left as
        it is (its status is returned)."""
        if self.cancel_if_queued(job_id):
            return "dequeued"
        job = self.job(job_id)
        if job is None:
            return "missing"
        if job.status == JobStatus.RUNNING.value:
            self.r.hset(self.keys.job(job_id), mapping={"cancel": "1", "cancel_grace_s": repr(grace_s)})
            return "stopping"
        return job.status

    def request_cancel(self, sweep_id: str, grace_s: float = DEFAULT_CANCEL_GRACE_S) -> int:
        """Flag the sweep cancelled and cancel its queued jobs at once; running ones are asked to stop (and are
        killed after ``grace_s``). Returns how many queued jobs were cancelled."""
        self.r.hset(self.keys.sweep(sweep_id), mapping={"cancel": "1", "cancel_grace_s": repr(grace_s)})
        n = sum(self.cancel_if_queued(jid) for jid in self.job_ids(sweep_id))
        for job in self.sweep_jobs(sweep_id):
            if job.status == JobStatus.RUNNING.value:
                self.request_job_cancel(job.id, grace_s)
        return n

    def cancel_grace_s(self, *, job_id: str | None = None, sweep_id: str | None = None) -> float:
        """The grace the cancel of that job (or sweep) gave it to stop by itself."""
        key = self.keys.job(job_id) if job_id is not None else self.keys.sweep(sweep_id)
        value = self.r.hget(key, "cancel_grace_s")
        return float(value) if value else DEFAULT_CANCEL_GRACE_S

    # --- job transitions ---------------------------------------------------------------------------

    def _move(self, job_id: str, *, allowed: str, attempt_id: str = "", to: JobStatus, fields: dict | None = None,
              count_attempt: bool = False, attempt_record: dict | None = None, delete: tuple = (),
              pipeline=None) -> bool:
        now = repr(_now())
        args = [allowed, attempt_id, to.value, now, json.dumps({k: str(v) for k, v in (fields or {}).items()}),
                EVENTS_MAXLEN, "1" if count_attempt else "0",
                json.dumps(attempt_record) if attempt_record else "", json.dumps(list(delete))]
        keys = [self.keys.job(job_id), self.keys.events(), self.keys.job_attempts(job_id)]
        return bool(self._transition(keys=keys, args=args, client=pipeline or self.r))

    def claim(self, job_id: str, attempt_id: str, *, sweep_id: str, worker: str = "", node: str = "") -> bool:
        """queued -> running, under a new attempt id. False if someone else has it (or it is not queued)."""
        return self._move(job_id, allowed="queued", to=JobStatus.RUNNING, count_attempt=True,
                          fields={"attempt_id": attempt_id, "started_at": repr(_now()), "worker": worker,
                                  "node": node, "sweep_id": sweep_id},
                          delete=("finished_at", "error", "error_detail", "progress", "heartbeat_at", "pid"))

    def finish(self, job_id: str, attempt_id: str, status: JobStatus, *, result: dict | None = None,
               error: str | None = None, error_detail: str | None = None, attempt: dict | None = None) -> bool:
        """running (this attempt) -> succeeded | failed | cancelled. Exactly once per attempt."""
        now = _now()
        fields: dict[str, Any] = {"finished_at": repr(now)}
        if result is not None:
            fields["result"] = json.dumps(result)
        if error:
            fields["error"] = error
        if error_detail:
            fields["error_detail"] = error_detail
        record = {"attempt_id": attempt_id, "status": status.value, "finished_at": now, "error": error, **(attempt or {})}
        return self._move(job_id, allowed="running", attempt_id=attempt_id, to=status, fields=fields,
                          attempt_record=record, delete=("progress",))

    def requeue(self, job_id: str, attempt_id: str, *, error: str, attempt: dict | None = None) -> bool:
        """running (this attempt) -> queued, keeping the failed attempt in the history."""
        record = {"attempt_id": attempt_id, "status": "retried", "finished_at": _now(), "error": error, **(attempt or {})}
        return self._move(job_id, allowed="running", attempt_id=attempt_id, to=JobStatus.QUEUED,
                          fields={"queued_at": repr(_now()), "error": error}, attempt_record=record,
                          delete=("attempt_id", "progress"))

    def saw(self, job_id: str, seen: dict[str, str]) -> None:
        """What a job that waits ``after`` others was handed: the attempt of each of them that had succeeded."""
        self.r.hset(self.keys.job(job_id), "after_seen", json.dumps(seen, sort_keys=True))

    def rerun(self, job_id: str, attempt_id: str, why: str) -> bool:
        """succeeded (this attempt) -> queued, attempts reset: what it read has changed since (``why``, kept in its
        attempt history), so its result no longer says what it claims. False if it is not that finished attempt."""
        record = {"attempt_id": attempt_id, "status": "superseded", "finished_at": _now(), "error": why}
        return self._move(job_id, allowed="succeeded", attempt_id=attempt_id, to=JobStatus.QUEUED,
                          fields={"queued_at": repr(_now()), "attempts": 0, "error": why}, attempt_record=record,
                          delete=("attempt_id", "result", "started_at", "finished_at", "error_detail", "progress",
                                  "after_seen"))

    def fail_attempt(self, job_id: str, attempt_id: str, *, error: str, retryable: bool,
                     error_detail: str | None = None, attempt: dict | None = None) -> str | None:
        """The one retry policy: a failed attempt is requeued when it is ``retryable`` and the job has attempts
        left (``max_attempts`` of its spec), else the job fails, saying after how many attempts. Returns "queued"
        or "failed", or None when this attempt is no longer the job's current one (nothing written)."""
        job = self.job(job_id)
        if job is None or job.status != JobStatus.RUNNING.value or job.attempt_id != attempt_id:
            return None
        attempt = {"started_at": job.started_at, **(attempt or {})}
        if retry_decision(job.attempts, job.job.max_attempts, retryable) == JobStatus.QUEUED:
            return "queued" if self.requeue(job_id, attempt_id, error=error, attempt=attempt) else None
        if retryable:
            error += f" (after {job.attempts} attempt{'s' if job.attempts != 1 else ''})"
        ok = self.finish(job_id, attempt_id, JobStatus.FAILED, error=error, error_detail=error_detail, attempt=attempt)
        return "failed" if ok else None

    def record_scheduler_error(self, sweep_id: str, detail: str) -> None:
        """Why a sweep's scheduler died, kept in the sweep record (``qfarm status`` shows it)."""
        self.r.hset(self.keys.sweep(sweep_id), "scheduler_error", detail[-4000:])

    def skip_if_queued(self, job_id: str, reason: str) -> bool:
        """queued -> skipped: the job it comes from did not succeed, so it never runs (``reason`` says why)."""
        return self._move(job_id, allowed="queued", to=JobStatus.SKIPPED,
                          fields={"finished_at": repr(_now()), "error": reason})

    def cancel_if_queued(self, job_id: str) -> bool:
        return self._move(job_id, allowed="queued", to=JobStatus.CANCELLED,
                          fields={"finished_at": repr(_now()), "error": "cancelled before it started"})

    def beat(self, job_id: str, attempt_id: str, progress: str | None = None, **extra) -> int:
        """Heartbeat of a running attempt, with an optional progress line. 0 once the attempt is not current,
        2 when the job was asked to stop, else 1."""
        fields = {"heartbeat_at": repr(_now()), **{k: str(v) for k, v in extra.items()}}
        if progress is not None:
            fields["progress"] = progress
        return int(self._beat(keys=[self.keys.job(job_id)], args=[attempt_id, json.dumps(fields)]))

    def check_access(self, url: str = "") -> None:
        """Whether this Redis user may use this namespace's keys (a Redis ACL per team: ``~<namespace>:*``), said
        at once and plainly instead of as a NOPERM error from the middle of some command."""
        try:
            self.r.exists(self.keys.sweeps())
        except redis.exceptions.NoPermissionError:
            from urllib.parse import urlsplit

            user = urlsplit(url).username or "default"
            raise QfarmError(
                f"Redis user {user!r} may not use the keys of namespace {self.namespace!r}: its ACL allows other key "
                f"patterns. Use the namespace your Redis user was made for (--namespace / QFARM_NAMESPACE), or ask "
                f"whoever runs Redis for a user with ~{self.namespace}:* (README, \"Sharing one Redis\")") from None

    def delete_namespace(self) -> int:
        """Remove every key of this namespace (tests, and `qfarm purge`)."""
        n = 0
        for key in self.r.scan_iter(match=self.keys.pattern(), count=1000):
            n += self.r.delete(key)
        return n
