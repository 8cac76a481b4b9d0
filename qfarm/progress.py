"""Watching sweeps: the live ``--wait`` display and the ``status`` tables. Reads Redis only."""

from __future__ import annotations

import sys
import time
from collections import Counter
from datetime import datetime

from .errors import QfarmError
from .store import TERMINAL, JobRecord, Store

POLL_S = 0.5
ALIVE_CHECK_S = 5.0


def _counts(jobs: list[JobRecord]) -> Counter:
    return Counter(j.status for j in jobs)


def _summary(c: Counter, total: int) -> str:
    done = sum(c[s] for s in TERMINAL)
    parts = [f"{done}/{total} done", f"{c['running']} running", f"{c['queued']} queued", f"{c['succeeded']} succeeded"]
    if c["failed"]:
        parts.append(f"{c['failed']} failed")
    for status in ("cancelled", "skipped"):
        if c[status]:
            parts.append(f"{c[status]} {status}")
    return " · ".join(parts)


def follow(store: Store, sweep_id: str, poll_s: float = POLL_S, alive=None) -> list[JobRecord]:
    """Block until every job of the sweep is finished, showing progress. Returns the final job records.

    ``alive()``, when given, says whether the sweep's scheduler still exists; if it is gone before the sweep
    finished, waiting would be forever, so this raises instead.
    """
    watch = _Watch(store, sweep_id, alive)
    if sys.stderr.isatty():
        return _follow_live(watch, poll_s)
    return _follow_plain(watch, poll_s)


class _Watch:
    def __init__(self, store: Store, sweep_id: str, alive):
        self.store, self.sweep_id, self.alive = store, sweep_id, alive
        self._checked = time.time()

    def done(self, jobs: list[JobRecord]) -> bool:
        if _finished(self.store, self.sweep_id, jobs):
            return True
        if self.alive and time.time() - self._checked > ALIVE_CHECK_S:
            self._checked = time.time()
            if not self.alive() and not _finished(self.store, self.sweep_id, self.store.sweep_jobs(self.sweep_id)):
                raise QfarmError(f"the scheduler of sweep {self.sweep_id} is gone before the sweep finished. "
                                 "Every result so far is in Redis: submit the same file again to resume it.")
        return False


def _finished(store: Store, sweep_id: str, jobs: list[JobRecord]) -> bool:
    if all(j.status in TERMINAL for j in jobs):
        return True
    sweep = store.sweep(sweep_id)  # the scheduler stamps finished_at when it stops, crashed or not
    if sweep and sweep.finished_at and not any(j.status == "running" for j in jobs):
        if sweep.scheduler_error:
            print(f"the sweep's scheduler stopped with an error:\n{sweep.scheduler_error}", file=sys.stderr)
        return True
    return False


def _follow_plain(watch: _Watch, poll_s: float) -> list[JobRecord]:
    """For logs and CI: one line whenever something changes."""
    last = None
    start = time.time()
    while True:
        jobs = watch.store.sweep_jobs(watch.sweep_id)
        c = _counts(jobs)
        running = [f"{j.spec.get('label')}: {j.progress}" for j in jobs if j.status == "running" and j.progress]
        line = _summary(c, len(jobs)) + (f" | {'; '.join(running)}" if running else "")
        if line != last:
            print(f"[{time.time() - start:6.1f}s] {line}", file=sys.stderr, flush=True)
            last = line
        if watch.done(jobs):
            return jobs
        time.sleep(poll_s)


def _follow_live(watch: _Watch, poll_s: float) -> list[JobRecord]:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[summary]}"))
    store, sweep_id = watch.store, watch.sweep_id
    jobs = store.sweep_jobs(sweep_id)
    task = progress.add_task(sweep_id, total=len(jobs), summary="")
    with Live(progress, console=Console(stderr=True), refresh_per_second=4, transient=False) as live:
        while True:
            jobs = store.sweep_jobs(sweep_id)
            c = _counts(jobs)
            progress.update(task, completed=sum(c[s] for s in TERMINAL), summary=_summary(c, len(jobs)))
            lines = [f"  {j.spec.get('label')} ({j.id}): {j.progress or 'starting'}  {j.duration_s or 0:.0f}s"
                     for j in jobs if j.status == "running"]
            live.update(Group(progress, *lines))
            if watch.done(jobs):
                return jobs
            time.sleep(poll_s)


def _ago(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def sweeps_table(store: Store):
    from rich.table import Table

    table = Table(title=f"sweeps (namespace {store.namespace})", header_style="bold")
    for col in ("sweep", "created", "jobs", "succeeded", "failed", "running", "queued", "cancelled", "skipped", "finished"):
        table.add_column(col, justify="right" if col not in ("sweep", "created", "finished") else "left")
    for sid in reversed(store.sweep_ids()):
        sweep = store.sweep(sid)
        if sweep is None:
            continue
        c = Counter(store.statuses(sid))
        table.add_row(sid, _ago(sweep.created_at), str(sum(c.values())), str(c["succeeded"]), str(c["failed"]),
                      str(c["running"]), str(c["queued"]), str(c["cancelled"]), str(c["skipped"]),
                      _ago(sweep.finished_at))
    return table


STATUS_ROWS = 60
_ORDER = {"running": 0, "failed": 1, "queued": 2, "cancelled": 3, "skipped": 3, "succeeded": 4}


def shown(jobs: list[JobRecord], limit: int | None) -> list[JobRecord]:
    """At most ``limit`` jobs, the unfinished and failed ones first, in sweep order."""
    if limit is None or len(jobs) <= limit:
        return jobs
    index = {j.id: i for i, j in enumerate(jobs)}
    keep = sorted(jobs, key=lambda j: (_ORDER.get(j.status, 5), index[j.id]))[:limit]
    return sorted(keep, key=lambda j: index[j.id])


def waiting_note(sweep, now: float | None = None) -> str:
    """Which resource shapes' workers wait for capacity (no node has room now; an autoscaler may be starting one)."""
    import time

    if not getattr(sweep, "waiting", None) or sweep.finished_at is not None:
        return ""
    now = time.time() if now is None else now
    shapes = "; ".join(f"{shape} for {max(0.0, now - since):.0f} s" for shape, since in sorted(sweep.waiting.items()))
    return (f"\nwaiting for capacity: a worker with {shapes} (no node has room for it now; an autoscaler may be "
            "starting one, and idle workers of other shapes give theirs back)")


def jobs_table(sweep, jobs: list[JobRecord], stats: dict[str, int], limit: int | None = STATUS_ROWS):
    from rich.table import Table

    c = _counts(jobs)
    total, jobs = len(jobs), shown(jobs, limit)
    loads = stats.get("model_loads", 0)
    caption = _summary(c, total) + (f" · base-model loads: {loads} for {c['succeeded']} finished jobs"
                                        if any(j.spec.get("model") for j in jobs) else "")
    running = [j for j in jobs if j.status == "running"]
    if running:
        from .scheduler import HEARTBEAT_TTL_S

        limits = sorted({float(j.spec.get("hung_after_s") or HEARTBEAT_TTL_S) for j in running})
        caption += (f"\na running job without a heartbeat for {', '.join(f'{x:g}' for x in limits)} s is taken as "
                    "hung: its worker is killed and the job retried (hung_after_s)")
    caption += waiting_note(sweep)
    if len(jobs) < total:
        caption += f"\nshowing {len(jobs)} of {total} jobs, unfinished and failed first (--all shows every job)"
    table = Table(title=f"sweep {sweep.id}", caption=caption, header_style="bold")
    for col in ("job", "method", "status", "attempts", "time s", "worker", "now / note"):
        table.add_column(col, justify="right" if col in ("attempts", "time s") else "left")
    for j in jobs:
        note = j.progress if j.status == "running" else (j.error or "")
        dur = f"{j.duration_s:.1f}" if j.duration_s is not None else "-"
        table.add_row(j.id, str(j.spec.get("label")), j.status, str(j.attempts), dur, j.worker or "-", note or "")
    return table
