"""The scheduler: a detached, named Ray actor per sweep that dispatches its jobs to GPU-tagged worker actors.

It outlives the client that submitted the sweep. Its view of the sweep is re-read from Redis on every pass, so
Redis stays the only source of truth: a job is claimed there (queued -> running, new attempt id) before it
is handed to a worker, and the worker writes its own result. The scheduler handles what a worker cannot:
its process dying (the job is requeued until ``max_attempts``, then failed), a job's ``timeout_s``, and cancel.

Worker actors are pooled per resource shape (gpus, cpus, gpu type, custom resources) and reused across the
sweep's jobs, so a worker keeps its loaded base model and tokenized eval data between jobs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

from qfarm import settings
from qfarm.errors import one_line
from qfarm.farm import handoff
from qfarm.farm.cluster import RAY_NAMESPACE, cluster_nodes, describe_nodes, needs, ray_options, slots
from qfarm.farm.connection import connect_redis
from qfarm.farm.eta import dispatch_order, work_shape
from qfarm.farm.store import JobRecord, JobStatus, Store
from qfarm.results.tracking import FORWARDED_ENV as TRACKING_ENV

log = logging.getLogger("qfarm.farm.scheduler")
POLL_S = 0.25  # longest sleep between passes when nothing finishes
REFRESH_S = 1.0  # full re-read of the sweep from Redis
MAX_ACTOR_START_FAILURES = 3
# A worker is handed one job at a time. Handing it the next one early saves ~3 ms a job, but commits the job to a
# busy worker: with jobs of uneven length (a reference and a 4-bit variant) it then waits behind a long job while
# another worker goes idle, which cost far more in a real sweep than it saved (bench/README.md).
HEARTBEAT_TTL_S = 60.0  # workers beat every HEARTBEAT_S (workers/actor.py)
GONE_WORKER_S = 12.0  # two missed beats, and the worker actor named by the job no longer exists
SLOW_REFRESH_S = 5.0  # a re-read of the sweep this slow means Redis was unreachable meanwhile
# Pools of different resource shapes share the cluster: an idle worker gives its resources back after IDLE_REAP_S
# (it keeps its cached model until then, for the next job of its shape), and at once when a worker of another
# shape has waited STARVED_AFTER_S for capacity. A worker that has not started within start_timeout_s (no node
# could hold it, and no autoscaler brought one) is killed; when none of its shape ever started, its jobs fail. One
# that an alive node could hold but whose room other work holds (another sweep on the cluster) keeps waiting.
IDLE_REAP_S = 30.0
STARVED_AFTER_S = 2.0
DEFAULT_START_TIMEOUT_S = 600.0  # an autoscaler may take minutes to start a GPU node


def _shape(resources: dict) -> str:
    """A resource shape as people read it: "GPU 2, CPU 1"."""
    return ", ".join(f"{k} {v:g}" for k, v in needs(resources).items())


def scheduler_name(namespace: str, sweep_id: str) -> str:
    return f"qfarm-scheduler:{namespace}:{sweep_id}"


@dataclass
class Slot:
    actor: Any
    name: str
    ready_ref: Any = None  # set while the actor is starting
    job_id: str | None = None  # the job handed to this worker
    since: float = field(default_factory=time.time)  # asked for (while starting), or last went idle
    created_ref: Any = None  # set until the actor exists: until then it waits for capacity (not just importing)


@dataclass
class Pool:
    key: str
    resources: dict
    capacity: int
    preload: bool  # its jobs load models: workers import the ML stack while starting
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    slots: list[Slot] = field(default_factory=list)
    start_failures: int = 0
    last_error: str = ""

    def idle(self) -> Slot | None:
        return next((s for s in self.slots if s.ready_ref is None and s.job_id is None), None)


@dataclass
class Inflight:
    slot: Slot
    pool: Pool
    job_id: str
    attempt_id: str
    timeout_s: float | None
    kill_at: float | None = None  # set when a cancel asked the job to stop: killed then if still running


class Scheduler:
    """Runs one sweep to completion. Created detached by ``qfarm submit``; its loop runs in a thread."""

    def __init__(self, sweep_id: str, namespace: str, secrets: list | tuple = ()):
        self.sweep_id, self.namespace = sweep_id, namespace
        env = handoff.received(secrets)  # the Redis URL and hub token, handed on to its workers as its own object
        self._tracking_env = {k: v for k, v in env.items() if k in TRACKING_ENV}  # MLflow's login: this actor's only
        self._secrets = handoff.hand({k: v for k, v in env.items() if k not in TRACKING_ENV})
        self.tracker = None
        self.output_root = env[handoff.OUTPUT_ROOT]  # the submitting command's, never a path read from Redis
        client, _ = connect_redis(env[handoff.REDIS_URL], embedded_ok=False)
        self.store = Store(client, namespace)
        self.pools: dict[str, Pool] = {}
        self.inflight: dict[Any, Inflight] = {}
        self.jobs: dict[str, JobRecord] = {}
        self.history: dict[str, float] = {}  # mean duration by work shape, from earlier jobs (qfarm.farm.eta)
        self.sweep = None
        self._refreshed = 0.0
        self._watching_since = time.time()  # hung workers are judged on heartbeats seen since then
        self.state = "starting"
        self._worker_seq = 0
        self.metrics = Metrics(sweep_id)
        # the stamp a scheduler of this sweep that was stopping may have written after a retry reopened the sweep
        # (start() waits for it to be gone): cleared before anyone follows this one
        self.store.clear_finished(sweep_id)
        self._thread = threading.Thread(target=self._main, name="qfarm-scheduler", daemon=True)
        self._thread.start()

    def ping(self) -> dict:
        return {"sweep_id": self.sweep_id, "state": self.state, "inflight": len(self.inflight)}

    def __repr__(self) -> str:  # shown by the Ray dashboard
        return f"Scheduler({self.sweep_id}, {self.state})"

    # --- main loop ---------------------------------------------------------------------------------

    def _main(self) -> None:
        import ray

        try:
            self.state = "running"
            self._say_dashboard()
            self._start_tracking()
            self._loop()
            self.state = "finished"
        except Exception:  # the loop must never die silently: say why in the sweep record
            self.state = "crashed"
            detail = traceback.format_exc()
            log.error("scheduler crashed: %s", detail)
            self.store.record_scheduler_error(self.sweep_id, detail)
        finally:
            self._stop_workers()
            if self.tracker is not None:
                self.tracker.close()
            self.store.mark_sweep_finished(self.sweep_id)
            ray.kill(ray.get_runtime_context().current_actor)

    def _start_tracking(self) -> None:
        """A spec's ``tracking: {mlflow: ...}``: each job goes to MLflow as it finishes (qfarm.results.tracking)."""
        record = self.store.sweep(self.sweep_id)
        settings = ((record.info if record else {}).get("tracking") or {}).get("mlflow")
        if not settings:
            return
        try:
            from qfarm.results.tracking import LiveTracker

            self.tracker = LiveTracker(settings, self.store, self.sweep_id, self.output_root, self._tracking_env,
                                       lambda: list(self.jobs.values()))
        except Exception as e:  # noqa: BLE001 - tracking never stops a sweep: it is said, and the jobs run
            self.store.set_tracking_note(self.sweep_id, f"MLflow tracking could not start: {one_line(e)}")

    def _say_dashboard(self) -> None:
        """Where the cluster's Ray dashboard is (as the head registered it), for ``qfarm status`` to link each
        running job's worker actor."""
        try:
            from ray.experimental import internal_kv

            url = internal_kv._internal_kv_get("webui:url", namespace="dashboard")
        except Exception:  # noqa: BLE001 - a link for people; a cluster without a dashboard has none
            url = None
        if url:
            self.store.set_dashboard(self.sweep_id, url.decode() if isinstance(url, bytes) else str(url))

    def _loop(self) -> None:
        """Event-driven: wake when a worker finishes (or every POLL_S), dispatch at once.

        The scheduler keeps a local view of its jobs, updated by its own transitions and by re-reading each
        finished job; the whole sweep is re-read from Redis every REFRESH_S (cancels, resubmits, jobs that
        another sweep's scheduler runs), and once more before deciding the sweep is done.
        """
        self._refresh()
        while True:
            if time.time() - self._refreshed > REFRESH_S:
                self._refresh()
                self._foreign()  # requeues orphans now: a job waiting on an orphaned parent would wait forever
            if self.sweep is None:
                return
            if self.store.cancel_requested(self.sweep_id):
                self._cancel(list(self.jobs.values()))
                return
            self._expire()
            self._superseded()
            queued = [j for j in self.jobs.values() if j.status == JobStatus.QUEUED.value]
            if not queued and not self.inflight and not self._foreign():
                self.state = "stopping"  # a retry now is either seen by this refresh, or started anew (start())
                self._refresh()  # confirm from Redis before stopping
                if not any(j.status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value) for j in self.jobs.values()):
                    return
                self.state = "running"
                continue
            self._dispatch(queued)
            self._reap()
            self._collect()

    def _refresh(self) -> None:
        started = time.time()
        self.sweep = self.store.sweep(self.sweep_id)
        self.jobs = {j.id: j for j in self.store.sweep_jobs(self.sweep_id)}
        self.history = self.store.durations()
        if self.sweep is not None:  # (a deleted sweep's record is not made again by a beat)
            self.store.scheduler_beat(self.sweep_id)
        self._refreshed = time.time()
        if self._refreshed - started > SLOW_REFRESH_S:  # Redis was away (the client retried): heartbeats were too
            self._watching_since = self._refreshed
        self.metrics.update(self.jobs.values())

    def _foreign(self) -> list[JobRecord]:
        """Running jobs this scheduler did not dispatch (another sweep's, or an orphan of a dead scheduler)."""
        mine = {i.job_id for i in self.inflight.values()}
        running = [j for j in self.jobs.values() if j.status == JobStatus.RUNNING.value and j.id not in mine]
        return [j for j in running if not self._orphan(j)]

    def _dispatch(self, queued: list[JobRecord]) -> None:
        output_root, sweep_name = self.output_root, self.sweep.name
        handed = {f.job_id for f in self.inflight.values()}
        for job in dispatch_order(queued, self.jobs.values(), self.history, settings.get("QFARM_DISPATCH")):
            if job.id in handed:
                continue
            inputs = self._inputs(job)
            if inputs is None:
                continue  # its parent has not finished yet, or it was just skipped
            pool = self._pool(job.job.resources)
            if pool.capacity == 0 or pool.start_failures >= MAX_ACTOR_START_FAILURES:
                reason = pool.last_error or f"no node of the cluster has {needs(pool.resources)}"
                self._fail_unstarted(job, f"cannot start a worker: {reason}")
                continue
            slot = pool.idle() or self._grow(pool)
            if slot is None or slot.ready_ref is not None:
                continue
            attempt_id = uuid.uuid4().hex[:12]
            if job.job.after:  # a search's final: what it ranks, so that a later success among them re-runs it
                self.store.saw(job.id, seen_after(job, self.jobs))
            payload = dict(job.spec, output_dir=f"{output_root}/{sweep_name}/{job.id}", input=inputs or None)
            ref = slot.actor.run.options(name=f"{job.id} {job.job.label}").remote(
                payload, attempt_id, self.sweep_id)
            slot.job_id = job.id
            self.inflight[ref] = Inflight(slot, pool, job.id, attempt_id, job.job.timeout_s)

    def _inputs(self, job: JobRecord) -> dict | None:
        """What a job that comes ``from`` another needs of it: {} for a job without a parent, with the artifacts of
        the jobs it ``needs`` under "needs"; None while one of them has not finished (the job waits), or when one
        did not succeed (the job is marked skipped, with why)."""
        inputs: dict = {}
        needs = [d for d in job.job.needs if isinstance(d, str)]  # e.g. the capture a GPTQ job shares
        for dep_id in [job.job.parent] + needs:
            dep = (self.jobs.get(dep_id) or self.store.job(dep_id)) if dep_id else None
            decision, value = readiness(dep_id, dep)
            if decision == "skip":
                self.store.skip_if_queued(job.id, value[:500])
                self._reload(job.id)
                return None
            if decision == "wait":
                return None
            if dep_id in needs:
                inputs.setdefault("needs", {})[dep_id] = value.get("artifact")
            else:
                inputs.update(value)
        ended = []
        for dep_id in [d for d in job.job.after if isinstance(d, str)]:  # a search's final: its screened candidates
            dep = self.jobs.get(dep_id) or self.store.job(dep_id)
            if dep is not None and dep.status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value):
                return None
            ended.append(screened(dep_id, dep))
        if ended:
            inputs["after"] = ended
        return inputs

    def _collect(self) -> None:
        import ray

        starting = {s.ready_ref: (p, s) for p in self.pools.values() for s in p.slots if s.ready_ref is not None}
        refs = list(self.inflight) + list(starting)
        if not refs:
            time.sleep(POLL_S)
            return
        done, rest = ray.wait(refs, num_returns=1, timeout=POLL_S)
        if done and rest:  # take everything else that is ready too, without waiting
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            done += more
        for ref in done:
            if ref in starting:
                self._started(*starting[ref], ref)
            else:
                self._finished(ref, self.inflight.pop(ref))

    def _started(self, pool: Pool, slot: Slot, ref) -> None:
        import ray

        try:
            ray.get(ref)
            slot.ready_ref, slot.created_ref, slot.since = None, None, time.time()
        except Exception as e:  # the actor could not be created or its __init__ raised
            pool.start_failures += 1
            pool.last_error = one_line(e, typed=False)
            pool.slots.remove(slot)

    def _finished(self, ref, flight: Inflight) -> None:
        import ray

        flight.slot.job_id, flight.slot.since = None, time.time()
        try:
            ray.get(ref)
            job = self._reload(flight.job_id)
            if job is not None and job.status == JobStatus.SUCCEEDED.value and job.attempt_id == flight.attempt_id \
                    and job.duration_s is not None:  # this attempt's: what the next sweep's estimates go by
                self.store.record_duration(work_shape(job.job), job.duration_s)
            return  # the worker wrote the job's result (or its failure) itself, or found it taken
        except ray.exceptions.RayActorError as e:
            reason = f"worker process died ({one_line(e, typed=False)})"
            if flight.slot in flight.pool.slots:
                flight.pool.slots.remove(flight.slot)
        except Exception as e:
            reason = f"worker error: {one_line(e, typed=False)}"
        self._attempt_failed(flight, reason)
        self._reload(flight.job_id)

    def _superseded(self) -> None:
        """A search's final (or rung) job ranked the jobs it waited ``after`` as they had ended when it started; one
        of them that has succeeded since (`qfarm retry`, a resubmit, after it failed or was cancelled) was not
        among them: the job runs again, so that its row (and the pick) rank every candidate that succeeded."""
        for job in [j for j in self.jobs.values() if j.job.after]:
            why = superseded(job, self.jobs)
            if why and self.store.rerun(job.id, job.attempt_id or "", why):
                self.store.scheduler_event(self.sweep_id, "job_superseded", job=job.id, why=why)
                self._reload(job.id)

    def _reload(self, job_id: str) -> JobRecord | None:
        job = self.store.job(job_id)
        if job is not None:
            self.jobs[job_id] = job
        return job

    def _attempt_failed(self, flight: Inflight, reason: str, retry: bool = True) -> None:
        self.store.fail_attempt(flight.job_id, flight.attempt_id, error=reason, retryable=retry,
                                attempt={"worker": flight.slot.name})

    def _expire(self) -> None:
        """Stop running jobs past their timeout_s, hung ones (no heartbeat for hung_after_s: killed and retried),
        and jobs cancelled one by one (`qfarm cancel JOB`)."""
        now = time.time()
        for ref, flight in list(self.inflight.items()):
            seen = self.jobs.get(flight.job_id)  # refreshed from Redis every REFRESH_S: no read per job here
            if seen is not None and seen.cancel_requested and seen.attempt_id == flight.attempt_id:
                # its worker stops it at the job's next progress point; if it has not within the grace, kill it
                if flight.kill_at is None:
                    flight.kill_at = now + self.store.cancel_grace_s(job_id=flight.job_id)
                elif now >= flight.kill_at:
                    self.inflight.pop(ref)
                    self._force_cancel(flight)
                continue
            if seen is not None and seen.status == JobStatus.RUNNING.value and seen.attempt_id == flight.attempt_id:
                reason = hung(seen, now, float(seen.job.hung_after_s or HEARTBEAT_TTL_S), self._watching_since)
                if reason:  # frozen (a hung kernel, SIGSTOP): its heartbeat stopped while its actor lives
                    self._kill(flight.slot, flight.pool)
                    self.inflight.pop(ref)
                    self._attempt_failed(flight, reason, retry=True)
                    self._reload(flight.job_id)
                    continue
            if not flight.timeout_s:
                continue
            job = self.store.job(flight.job_id)
            started = job.started_at if job and job.attempt_id == flight.attempt_id else None
            if timed_out(started, flight.timeout_s, now):
                self._kill(flight.slot, flight.pool)
                self.inflight.pop(ref)
                self._attempt_failed(flight, f"timed out after {flight.timeout_s:g} s", retry=False)
                self._reload(flight.job_id)

    def _orphan(self, job: JobRecord) -> bool:
        """A running job no live worker is heartbeating (its worker or an earlier scheduler died): requeued while
        it has attempts left (see ``orphaned``)."""
        reason = orphaned(job, time.time(), self._worker_gone)
        if reason is None:
            return False
        self.store.fail_attempt(job.id, job.attempt_id or "", error=reason, retryable=True)
        self._reload(job.id)
        return True

    @staticmethod
    def _worker_gone(name: str | None) -> bool:
        import ray

        if not name:
            return False
        try:
            ray.get_actor(name, namespace=RAY_NAMESPACE)
            return False
        except ValueError:
            return True

    def _cancel(self, jobs: list[JobRecord]) -> None:
        """The sweep is cancelled: queued jobs at once; running ones are asked to stop, and killed after the
        grace the cancel gave (`qfarm cancel --grace`) if they have not stopped by then."""
        for job in jobs:
            if job.status == JobStatus.QUEUED.value:
                self.store.cancel_if_queued(job.id)
        grace = self.store.cancel_grace_s(sweep_id=self.sweep_id)
        for flight in self.inflight.values():
            self.store.request_job_cancel(flight.job_id, grace)
        deadline = time.time() + grace
        while self.inflight and time.time() < deadline:
            self._collect()
        for flight in self.inflight.values():
            self._force_cancel(flight)
        self.inflight.clear()

    def _force_cancel(self, flight: Inflight) -> None:
        self._kill(flight.slot, flight.pool)
        grace = self.store.cancel_grace_s(job_id=flight.job_id)
        self.store.finish(flight.job_id, flight.attempt_id, JobStatus.CANCELLED,
                          error=f"cancelled while running (killed: it did not stop within {grace:g} s)")
        self._reload(flight.job_id)

    def _fail_unstarted(self, job: JobRecord, reason: str) -> None:
        attempt_id = uuid.uuid4().hex[:12]
        if self.store.claim(job.id, attempt_id, sweep_id=self.sweep_id):
            self.store.finish(job.id, attempt_id, JobStatus.FAILED, error=reason)
        self._reload(job.id)

    # --- worker pools ------------------------------------------------------------------------------

    def _nodes(self):
        """The nodes alive now and those the cluster's autoscaler may start (the node types given at submit)."""
        return cluster_nodes((self.sweep.info if self.sweep else {}).get("node_types"))

    def _pool(self, resources: dict) -> Pool:
        key = json.dumps(resources, sort_keys=True)
        if key not in self.pools:
            shape = [j for j in self.jobs.values() if json.dumps(j.job.resources, sort_keys=True) == key]
            capacity = min(slots(resources, self._nodes()), max(1, len(shape)))
            preload = any(j.job.needs_model for j in shape)
            timeout = max((float(j.job.start_timeout_s or DEFAULT_START_TIMEOUT_S) for j in shape),
                          default=DEFAULT_START_TIMEOUT_S)
            self.pools[key] = Pool(key, resources, capacity, preload, timeout)
        return self.pools[key]

    def _reap(self) -> None:
        """Give resources back across shapes: kill workers that never started in time, idle workers after
        IDLE_REAP_S or at once when another shape's worker waits for capacity; say what waits, in the sweep."""
        now = time.time()
        for pool in self.pools.values():
            for slot in [s for s in pool.slots if s.ready_ref is not None and now - s.since > pool.start_timeout_s]:
                self._start_timed_out(pool, slot)
        uncreated = {id(s) for s in self._uncreated()}
        waiting = {p.key: min(s.since for s in p.slots if id(s) in uncreated)
                   for p in self.pools.values() if any(id(s) in uncreated for s in p.slots)}
        starved = self._lacking({k for k, since in waiting.items() if now - since > STARVED_AFTER_S})
        for pool in self.pools.values():
            held = set(needs(pool.resources))
            for slot in [s for s in pool.slots if s.ready_ref is None and s.job_id is None]:
                helped = sorted(k for k, lack in starved.items() if k != pool.key and lack & held)
                if helped or now - slot.since > IDLE_REAP_S:
                    why = (f"a worker with {_shape(self.pools[helped[0]].resources)} waits for capacity" if helped
                           else f"idle for {IDLE_REAP_S:g} s")
                    self._kill(slot, pool)
                    self.store.scheduler_event(self.sweep_id, "worker_reaped", worker=slot.name,
                                               shape=_shape(pool.resources), why=why)
        self.store.set_waiting(self.sweep_id, {_shape(self.pools[k].resources): since for k, since in waiting.items()})

    def _uncreated(self) -> list[Slot]:
        """Starting workers that no node holds yet: waiting for capacity (one that exists and imports is not)."""
        import ray

        pending = [s for p in self.pools.values() for s in p.slots if s.created_ref is not None]
        if pending:
            done, _ = ray.wait([s.created_ref for s in pending], num_returns=len(pending), timeout=0)
            for slot in pending:
                if slot.created_ref in done:
                    slot.created_ref = None
        return [s for s in pending if s.created_ref is not None]

    def _lacking(self, keys: set[str]) -> dict[str, set[str]]:
        """For each starved pool, the resources the cluster has too little of free now for one more of its workers:
        an idle worker is given up for it only if it holds one of those (a GPU worker is not reaped for a shape
        that waits on a node type with a resource nobody here has)."""
        if not keys:
            return {}
        import ray

        free = ray.available_resources()
        return {k: {r for r, v in needs(self.pools[k].resources).items() if free.get(r, 0.0) < v} for k in keys}

    def _start_timed_out(self, pool: Pool, slot: Slot) -> None:
        if slot.created_ref is not None and slots(pool.resources, [n for n in self._nodes() if not n.node_type]):
            # no node holds it yet although an alive one could: its room is taken by other work (another sweep's
            # workers on the same cluster). That is a queue, not a cluster that cannot run it: keep waiting
            slot.since = time.time()
            self.store.scheduler_event(self.sweep_id, "worker_waits_for_capacity", worker=slot.name,
                                       shape=_shape(pool.resources), after_s=f"{pool.start_timeout_s:g}")
            return
        self._kill(slot, pool)
        self.store.scheduler_event(self.sweep_id, "worker_start_timeout", worker=slot.name,
                                   shape=_shape(pool.resources), after_s=f"{pool.start_timeout_s:g}")
        if any(s.ready_ref is None for s in pool.slots):
            pool.capacity = len(pool.slots)  # the cluster holds fewer workers of this shape than it seemed to
            return
        pool.start_failures = MAX_ACTOR_START_FAILURES  # none of its shape ever started: its jobs fail, saying why
        pool.last_error = (f"no worker with {_shape(pool.resources)} started within {pool.start_timeout_s:g} s "
                           f"(start_timeout_s): no node could hold one, and none came up (the cluster has: "
                           f"{describe_nodes(self._nodes())})")

    def _grow(self, pool: Pool) -> Slot | None:
        import ray

        from workers.actor import Worker

        if len(pool.slots) >= pool.capacity:
            return None
        self._worker_seq += 1
        name = f"qfarm-worker:{self.sweep_id}:{self._worker_seq}"
        opts = ray_options(pool.resources, self._nodes())
        actor = ray.remote(Worker).options(name=name, namespace=RAY_NAMESPACE, max_restarts=0, **opts).remote(
            self.namespace, name, opts["num_cpus"], pool.preload, self._secrets)
        created = actor.created.remote()  # answers as soon as a node holds it; ready() then imports the ML stack
        slot = Slot(actor, name, ready_ref=actor.ready.remote(), created_ref=created)
        pool.slots.append(slot)
        return slot

    def _kill(self, slot: Slot, pool: Pool) -> None:
        import ray

        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        if slot in pool.slots:
            pool.slots.remove(slot)

    def _stop_workers(self) -> None:
        for pool in self.pools.values():
            for slot in list(pool.slots):
                self._kill(slot, pool)


class Metrics:
    """The sweep's numbers in the Ray dashboard's metrics (Prometheus, through ray.util.metrics): jobs per status
    (``qfarm_jobs``), and the duration of each finished job (``qfarm_job_duration_s``), tagged by sweep."""

    STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "skipped")

    def __init__(self, sweep_id: str):
        from ray.util.metrics import Gauge, Histogram

        self.tags = {"sweep": sweep_id}
        self.jobs = Gauge("qfarm_jobs", description="qfarm jobs of a sweep, by status", tag_keys=("sweep", "status"))
        self.duration = Histogram("qfarm_job_duration_s", description="wall time of finished qfarm jobs (s)",
                                  boundaries=[1, 5, 15, 60, 300, 900, 3600, 14400], tag_keys=("sweep", "kind"))
        self.seen: set[str] = set()

    def update(self, jobs) -> None:
        counts = dict.fromkeys(self.STATUSES, 0)
        for job in jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
            if job.status in ("succeeded", "failed") and job.id not in self.seen and job.duration_s is not None:
                self.seen.add(job.id)
                self.duration.observe(job.duration_s, tags={**self.tags, "kind": job.job.kind})
        for status, n in counts.items():
            self.jobs.set(n, tags={**self.tags, "status": status})


# --- the scheduler's decisions, as pure functions of what it has read (unit-tested on a fake clock) -------------


def readiness(parent_id: str | None, parent: JobRecord | None) -> tuple[str, Any]:
    """Whether a queued job can run: ("ready", its inputs: {} without a parent, else what it needs of the parent),
    ("wait", None) while the parent is queued or running, ("skip", why) when the parent will never succeed."""
    if not parent_id:
        return "ready", {}
    if parent is not None and parent.status == JobStatus.SUCCEEDED.value:
        result = parent.result or {}
        inputs = {"id": parent.id, "kind": parent.job.kind, "label": parent.job.label, "options": parent.job.options,
                  "artifact": result.get("artifact")}
        if result.get("quantized_base"):  # an adapter trained on a quantized stage's model: a merge needs that base
            inputs["quantized_base"] = result["quantized_base"]
        return "ready", inputs
    if parent is not None and parent.status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value):
        return "wait", None
    if parent is None:
        return "skip", f"skipped: the job it comes from ({parent_id}) is not in Redis"
    why = f": {parent.error}" if parent.error else ""
    return "skip", f"skipped: {parent.job.label} ({parent.id}) {parent.status}{why}"


def screened(dep_id: str, dep: JobRecord | None) -> dict:
    """What a search's final job reads of a candidate it waited for (``Job.after``), however it ended: its status,
    label, options and the row's facts a final needs (qfarm.sweep.search.SCREEN_KEYS and the search's objective)."""
    from qfarm.sweep.search import SCREEN_KEYS

    if dep is None:
        return {"id": dep_id, "status": "missing"}
    result = dep.result or {}
    objective = (dep.job.search or {}).get("objective")
    keys = SCREEN_KEYS + ((objective,) if isinstance(objective, str) else ())
    return {"id": dep_id, "status": dep.status, "label": dep.job.label, "options": dep.job.options,
            "search": dep.job.search, "result": {k: result[k] for k in keys if k in result}}


def seen_after(job: JobRecord, jobs: dict[str, JobRecord]) -> dict[str, str]:
    """The attempt of each job ``job`` waits ``after`` that has succeeded: what it is handed to rank."""
    deps = [jobs.get(d) for d in job.job.after]
    return {d.id: d.attempt_id for d in deps if d is not None and d.status == JobStatus.SUCCEEDED.value and d.attempt_id}


def superseded(job: JobRecord, jobs: dict[str, JobRecord]) -> str | None:
    """Why a finished job that waited ``after`` others must run again, or None: one of them has succeeded in an
    attempt it was not handed (it had failed or was cancelled then, and ran again since). A job whose record says
    nothing of what it saw (one of an older qfarm) is left as it is."""
    if job.status != JobStatus.SUCCEEDED.value or job.after_seen is None:
        return None
    seen = seen_after(job, jobs)
    new = [jobs[d] for d, attempt in seen.items() if job.after_seen.get(d) != attempt]
    if not new:
        return None
    names = ", ".join(f"{d.job.label} ({d.id})" for d in new[:3]) + (f" and {len(new) - 3} more" if len(new) > 3 else "")
    return f"ran again: {names} succeeded after it ranked the jobs it waited for"


def orphaned(job: JobRecord, now: float, worker_gone) -> str | None:
    """Why a running job has no live worker, or None while it may still have one.

    Orphaned when its heartbeat lapsed (HEARTBEAT_TTL_S: a lost node), or sooner, after two missed beats, when
    the worker actor it names no longer exists (``worker_gone(name)``: a dead scheduler takes its workers)."""
    quiet_s = now - (job.heartbeat_at or job.started_at or 0)
    if quiet_s >= HEARTBEAT_TTL_S:
        return f"heartbeat lapsed ({quiet_s:.0f} s without one)"
    if quiet_s > GONE_WORKER_S and worker_gone(job.worker):
        return f"its worker {job.worker} is gone (no heartbeat for {quiet_s:.0f} s)"
    return None


def hung(job: JobRecord, now: float, after_s: float, watching_since: float = 0.0) -> str | None:
    """Why a running job's worker counts as hung (no heartbeat for ``after_s``), or None. Its heartbeat thread
    beats every few seconds whatever the job does, so silence means the process is frozen or gone. Silence is
    counted only from ``watching_since``: while Redis was unreachable no worker could beat."""
    quiet_s = now - max(job.heartbeat_at or job.started_at or now, watching_since)
    if quiet_s <= after_s:
        return None
    return f"worker hung: no heartbeat for {quiet_s:.0f} s (more than {after_s:g} s); its worker was killed"


def timed_out(started_at: float | None, timeout_s: float | None, now: float) -> bool:
    return bool(timeout_s) and started_at is not None and now - started_at > timeout_s


def start(sweep_id: str, redis_url: str, namespace: str, output_root: str, env: dict[str, str] | None = None) -> Any:
    """Start (or find) the sweep's detached scheduler actor and wait until it answers. The Redis URL, the output
    root and ``env`` (HF_TOKEN...: qfarm.sweep.hub.forwarded_env) reach it and every worker it starts through Ray's
    object store (qfarm.farm.handoff), never Redis, a log or an argument's value."""
    import ray

    name = scheduler_name(namespace, sweep_id)
    for _ in range(3):
        actor = ray.remote(Scheduler).options(
            name=name, namespace=RAY_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
            max_concurrency=4, max_restarts=0,
        ).remote(sweep_id, namespace, handoff.hand({**(env or {}), handoff.REDIS_URL: redis_url,
                                                     handoff.OUTPUT_ROOT: output_root}))
        try:
            _settled(actor)  # a running one re-reads the sweep: it finds the jobs a retry requeued
            return actor
        except ray.exceptions.RayActorError:
            time.sleep(0.5)  # an old scheduler of this sweep was exiting, or had found nothing left: make a new one
    raise RuntimeError(f"could not start the scheduler actor {name}")


def _settled(actor, wait_s: float = 60.0) -> None:
    """Return once the scheduler is not taking its last look at Redis ("stopping"). One that has stopped ("finished",
    "crashed": it found nothing left) is waited out until it exits: RayActorError, and the caller makes a new one."""
    import ray

    deadline = time.time() + wait_s
    while True:
        state = ray.get(actor.ping.remote(), timeout=wait_s)["state"]
        if state not in ("stopping", "finished", "crashed"):
            return
        if time.time() > deadline:
            if state == "stopping":
                return
            raise RuntimeError(f"the scheduler of {actor} stopped but did not exit within {wait_s:g} s")
        time.sleep(0.05)


def alive(sweep_id: str, namespace: str) -> bool:
    import ray

    try:
        ray.get_actor(scheduler_name(namespace, sweep_id), namespace=RAY_NAMESPACE)
        return True
    except ValueError:
        return False


def kill(sweep_id: str, namespace: str) -> bool:
    import ray

    try:
        actor = ray.get_actor(scheduler_name(namespace, sweep_id), namespace=RAY_NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True

