"""The worker actor: runs one job at a time, keeps a bounded cache between jobs, writes its results to Redis.

The scheduler creates it with the job's Ray resources (``num_gpus`` ...). Heavy libraries are imported by the
job-kind modules it calls, inside this process only.
"""

from __future__ import annotations

import gc
import importlib
import os
import re
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from qfarm.errors import Permanent, one_line, retryable
from qfarm.farm import handoff
from qfarm.farm.connection import connect_redis
from qfarm.farm.store import JobStatus, Store
from qfarm.sweep.job import Job

HEARTBEAT_S = 5.0


@dataclass
class JobContext:
    """What a job-kind module gets: its job (typed: ``qfarm.sweep.job.Job``, its options in ``opts``), where to write,
    a progress line, and the worker's cache."""

    job: Job
    attempt_id: str
    sweep_id: str
    output_dir: str
    output_root: str
    cache: Any
    threads: int
    progress: Callable[[str], None]
    stats: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # result columns a method adds (e.g. calibration size)

    @property
    def opts(self):
        """The job's options, typed (the options model of its kind or method, every default applied there)."""
        return self.job.opts

    def count(self, name: str, by: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + by


class Worker:
    def __init__(self, namespace: str, name: str, cpus: float = 1, preload: bool = False, secrets: list | tuple = ()):
        env = handoff.received(secrets)  # the Redis URL and the hub token (qfarm.farm.handoff), never an argument
        client, _ = connect_redis(env[handoff.REDIS_URL], embedded_ok=False)
        self.output_root = env[handoff.OUTPUT_ROOT]  # where it may write: not a path read from Redis
        self.store = Store(client, namespace)
        self.name = name
        self.threads = max(1, int(cpus or 1))
        self.current: str | None = None
        self._cache = None
        self.jobs_run = 0
        self.preload = preload

    def __repr__(self) -> str:  # the Ray dashboard shows this beside the actor
        return f"Worker({self.current or 'idle'})"

    def created(self) -> bool:
        """Answers once a node holds this worker (the scheduler tells waiting for capacity from importing)."""
        return True

    def ready(self) -> dict:
        """Called once by the scheduler before the first job; imports the ML stack for model jobs, so the
        few seconds torch and transformers take to import are spent while the worker starts, not in a job."""
        if self.preload:
            from workers.shared.models import preload

            preload()
        return {"pid": os.getpid(), "host": socket.gethostname(), "name": self.name}

    @property
    def cache(self):
        if self._cache is None:
            from workers.shared.cache import Cache

            self._cache = Cache()
        return self._cache

    def run(self, payload: dict, attempt_id: str, sweep_id: str) -> dict:
        """Claim the job (queued -> running under ``attempt_id``), run it, write succeeded/failed with its
        result or error. Returns a small summary; "not-claimed" when the job was cancelled or taken meanwhile. The
        payload is read into a Job once claimed (a payload that does not read fails the job, under its id)."""
        job_id = str(payload["id"])
        if not self.store.claim(job_id, attempt_id, sweep_id=sweep_id, worker=self.name):
            return {"status": "not-claimed"}
        self.current = job_id
        beat = _Heartbeat(self.store, job_id, attempt_id)
        ctx = None
        node = _node_id()
        started = time.time()
        attempt = {"started_at": started, "worker": self.name, "node": node, "pid": os.getpid()}
        beat.start(pid=os.getpid(), node=node, actor_id=_actor_id())
        try:
            spec = Job.from_payload(payload)  # typed, its options validated again: nothing from Redis is trusted
            self.current = f"{job_id} {spec.label}"
            ctx = JobContext(spec, attempt_id, sweep_id, spec.output_dir, self.output_root, None, self.threads,
                             beat.progress)
            if spec.kind != "sleep":
                ctx.cache = self.cache
            work_start = time.time()
            result = _run_kind(ctx)
            # work_s: the job's own work; what the farm adds is (finished_at - started_at) - work_s
            result.update({"worker": self.name, "node": node, "threads": self.threads,
                           "work_s": time.time() - work_start})
            result.update(_model_card(spec, result, sweep_id, self.output_root))
            for name, n in ctx.stats.items():
                self.store.incr_stat(sweep_id, name, n)
            ok = self.store.finish(job_id, attempt_id, JobStatus.SUCCEEDED, result=result, attempt=attempt)
            return {"status": "succeeded", "written": ok, "seconds": time.time() - started}
        except JobCancelled as e:
            ok = self.store.finish(job_id, attempt_id, JobStatus.CANCELLED, error=str(e), attempt=attempt)
            return {"status": "cancelled", "written": ok}
        except BaseException as e:  # one job's failure must never take the worker (or other jobs) down
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            detail = traceback.format_exc()
            status = self.store.fail_attempt(job_id, attempt_id, error=one_line(e), retryable=retryable(e),
                                             error_detail=detail[-6000:], attempt=attempt)
            return {"status": status or "failed", "written": status is not None, "error": one_line(e)}
        finally:
            beat.stop()
            self.current = None
            self.jobs_run += 1
            if ctx is not None and ctx.cache is not None:
                gc.collect()  # free a model job's tensors now (costs ~25 ms: only where there is memory to free)


def _model_card(job: Job, result: dict, sweep_id: str, output_root: str) -> dict:
    """The job's artifact folder gets its model card (workers.shared.card); a card that cannot be written is said in the
    row, and never fails the job."""
    if not result.get("artifact") or job.kind == "final":  # a search's final: the candidate's folder, its card
        return {}
    try:
        from workers.shared.card import write_card

        return {"model_card": write_card(job, result, sweep_id, output_root)}
    except Exception as e:  # noqa: BLE001 - see the docstring
        return {"model_card": None, "model_card_error": one_line(e)}


WORKER_ENTRY = re.compile(r"^workers(\.[a-z_][a-z0-9_]*)+:[a-z_][a-z0-9_]*$")


def _run_kind(ctx: JobContext) -> dict:
    """Call the job's worker entry point, as its payload names it (``workers.quantize:run``): the registry
    (``qfarm.sweep.methods.KINDS``) resolved it at submit time. Only functions under ``workers`` are ever imported."""
    return entry_point(ctx.job.worker, "worker")(ctx)


# the worker modules of jobs queued before workers/ was grouped into packages: where each lives now
MOVED = {f"workers.{old}": f"workers.{new}" for old, new in {
    "reference": "quantize.reference", "bnb": "quantize.bnb", "llmc": "quantize.llmc", "gptqmodel": "quantize.gptqmodel",
    "gguf": "quantize.gguf", "calibrate": "quantize.calibrate", "merge": "train.merge",
    "checkpoint": "evaluate.checkpoint"}.items()}

def entry_point(name: str | None, what: str):
    """The ``module:attribute`` a job's payload names, imported; only under the ``workers`` package."""
    if not name:
        raise Permanent(f"the job names no {what} entry point (it was queued by an older qfarm): submit its file again")
    if not WORKER_ENTRY.match(name.lower()):
        raise Permanent(f"refusing to import {name!r}: a job's {what} must be a 'workers.<module>:<name>'")
    module, attr = name.split(":")
    return getattr(importlib.import_module(MOVED.get(module, module)), attr)



class JobCancelled(Exception):
    """Raised at a job's next progress point once `qfarm cancel` asked it to stop."""


class _Heartbeat:
    """Refreshes the job's heartbeat every HEARTBEAT_S and carries the latest progress line to Redis. Learns from
    Redis when the job was asked to stop; the job then stops at its next progress line (JobCancelled)."""

    def __init__(self, store: Store, job_id: str, attempt_id: str):
        self.store, self.job_id, self.attempt_id = store, job_id, attempt_id
        self._stop = threading.Event()
        self._line: str | None = None
        self.cancelled = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="qfarm-heartbeat")

    def start(self, **fields) -> None:
        self.store.beat(self.job_id, self.attempt_id, "starting", **fields)
        self._thread.start()

    def progress(self, line: str) -> None:
        self._line = line
        self._beat(line)
        if self.cancelled:
            raise JobCancelled(f"cancelled while running (stopped at: {line})")

    def _beat(self, line: str | None = None) -> None:
        try:
            self.cancelled |= self.store.beat(self.job_id, self.attempt_id, line) == 2
        except Exception:
            pass  # progress is best effort; the result write is not

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat()

    def stop(self) -> None:
        self._stop.set()


def _actor_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_actor_id() or ""
    except Exception:
        return ""


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()[:12]
    except Exception:
        return socket.gethostname()
