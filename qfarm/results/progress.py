"""Watching sweeps: the live ``--wait`` display and the ``status`` tables. Reads Redis only."""

from __future__ import annotations

import sys
import time
from collections import Counter
from datetime import datetime

from qfarm.errors import QfarmError
from qfarm.farm.store import TERMINAL, JobRecord, Store

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
    return datetime.fromtimestamp(ts).strftime("%m-%d %H:%M") if ts else "-"


COUNTED = ("succeeded", "failed", "running", "queued", "cancelled", "skipped")


def sweep_summaries(store: Store) -> list[dict]:
    """Every sweep of the namespace, newest first: id, name, when, and its jobs counted by status
    (``qfarm status --json``)."""
    out = []
    for sid in reversed(store.sweep_ids()):
        sweep = store.sweep(sid)
        if sweep is None:
            continue
        c = Counter(store.statuses(sid))
        out.append({"sweep_id": sid, "name": sweep.name, "created_at": sweep.created_at,
                    "submitted_at": sweep.submitted_at, "finished_at": sweep.finished_at,
                    "jobs": sum(c.values()), **{s: c[s] for s in COUNTED}})
    return out


def sweeps_table(store: Store, width: int | None = None):
    """All sweeps, the id whole; at ``width`` the counts that are zero in every row go first, then the dates."""
    from qfarm.results.fit import Col, fit

    data = sweep_summaries(store)
    cols = [Col("sweep_id", "sweep", 0), Col("jobs", "jobs", 1, "right")]
    cols += [Col(s, s, 2 + i, "right") for i, s in enumerate(COUNTED)
             if width is None or any(r[s] for r in data) or s in ("succeeded", "failed")]
    cols += [Col("created", "submitted", 10), Col("finished", "finished", 9)]
    rows = [{**{k: str(v) for k, v in r.items()}, "created": _ago(r["submitted_at"] or r["created_at"]),
             "finished": _ago(r["finished_at"])} for r in data]
    table, _ = fit(cols, rows, width, title=f"sweeps (namespace {store.namespace})")
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


def job_rows(jobs: list[JobRecord], dashboard: str | None = None) -> list[dict]:
    """One sweep's jobs as ``qfarm status SWEEP --json`` gives them."""
    return [{"job_id": j.id, "label": j.job.label, "kind": j.job.kind, "status": j.status,
             "attempts": j.attempts, "duration_s": j.duration_s, "worker": j.worker, "node": j.node,
             "progress": j.progress if j.status == "running" else None, "error": j.error,
             "dashboard": actor_link(dashboard, j.actor_id) if j.status == "running" else None} for j in jobs]


def actor_link(dashboard: str | None, actor_id: str | None) -> str | None:
    """The Ray dashboard's page of the worker actor running a job."""
    if not dashboard or not actor_id:
        return None
    base = dashboard if "://" in dashboard else f"http://{dashboard}"
    return f"{base.rstrip('/')}/#/actors/{actor_id}"


def jobs_table(sweep, jobs: list[JobRecord], stats: dict[str, int], limit: int | None = STATUS_ROWS,
               width: int | None = None, history: dict[str, float] | None = None):
    from qfarm.farm.eta import eta_s, say
    from qfarm.results.fit import Col, fit

    c = _counts(jobs)
    total, every, jobs = len(jobs), jobs, shown(jobs, limit)
    loads = stats.get("model_loads", 0)
    caption = _summary(c, total) + (f" · base-model loads: {loads} for {c['succeeded']} finished jobs"
                                        if any(j.job.model for j in jobs) else "")
    if c["running"] or c["queued"]:
        caption += f" · {say(eta_s(every, history=history))}"
    running = [j for j in jobs if j.status == "running"]
    if running:
        from qfarm.farm.scheduler import HEARTBEAT_TTL_S

        limits = sorted({float(j.job.hung_after_s or HEARTBEAT_TTL_S) for j in running})
        caption += (f"\na running job without a heartbeat for {', '.join(f'{x:g}' for x in limits)} s is taken as "
                    "hung: its worker is killed and the job retried (hung_after_s)")
    caption += waiting_note(sweep)
    if getattr(sweep, "tracking_note", None):
        caption += f"\nMLflow: {sweep.tracking_note}"
    if len(jobs) < total:
        caption += f"\nshowing {len(jobs)} of {total} jobs, unfinished and failed first (--all shows every job)"
    cols = [Col("label", "job", 0), Col("status", "status", 1), Col("note", "now / note", 2, fold=True, min_width=16),
            Col("time", "time s", 3, "right"), Col("job_id", "id", 4), Col("attempts", "tries", 5, "right"),
            Col("worker", "worker", 6)]
    rows = [{"job_id": j.id, "label": j.job.label, "status": j.status, "attempts": str(j.attempts),
             "time": f"{j.duration_s:.1f}" if j.duration_s is not None else "-", "worker": j.worker or "-",
             "note": (j.progress if j.status == "running" else j.error) or ""} for j in jobs]
    table, _ = fit(cols, rows, width, title=f"sweep {sweep.id}", caption=caption)
    return table


def sweep_json(store: Store, record) -> dict:
    """One sweep for scripts (``qfarm status SWEEP --json``): its counts, ETA (s; null while unknown) and jobs."""
    from qfarm.farm.eta import eta_s

    jobs = store.sweep_jobs(record.id)
    c = _counts(jobs)
    return {"sweep_id": record.id, "name": record.name, "created_at": record.created_at,
            "submitted_at": record.submitted_at, "finished_at": record.finished_at, "jobs_total": len(jobs),
            "counts": {s: c[s] for s in COUNTED}, "eta_s": eta_s(jobs, history=store.durations()),
            "dashboard_url": record.dashboard_url,
            "waiting": record.waiting, "jobs": job_rows(jobs, record.dashboard_url)}


def running_lines(record, jobs: list[JobRecord]) -> list[str]:
    """Per running job: its label, what it does now, for how long, and its worker's page on the Ray dashboard."""
    out = []
    for j in jobs:
        if j.status != "running":
            continue
        link = actor_link(record.dashboard_url, j.actor_id)
        out.append(f"{j.spec.get('label')} ({j.id}): {j.progress or 'starting'} · {j.duration_s or 0:.0f} s"
                   + (f"\n    {link}" if link else ""))
    return out


def watch_sweep(store: Store, sweep_id: str, interval: float, wide: bool, limit: int | None = STATUS_ROWS) -> None:
    """``qfarm status SWEEP --watch``: the jobs table and the running jobs' lines, redrawn in place (rich Live) on
    a terminal until every job is finished; elsewhere (a pipe, a log) one table per change. Ctrl-C stops watching,
    never the sweep."""
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    from qfarm.results.fit import terminal_width

    def view():
        record = store.sweep(sweep_id)
        jobs = store.sweep_jobs(sweep_id)
        width = terminal_width(wide)
        table = jobs_table(record, jobs, store.stats(sweep_id), limit=limit, width=width, history=store.durations())
        lines = running_lines(record, jobs)
        done = _finished(store, sweep_id, jobs)
        return Group(table, *[Text(x) for x in lines]), done, [(j.id, j.status, j.progress) for j in jobs]

    console = Console()
    if not console.is_terminal:
        last = None
        while True:
            shown_now, done, state = view()
            if state != last:
                console.print(shown_now)
                last = state
            if done:
                return
            time.sleep(interval)
    with Live(view()[0], console=console, refresh_per_second=max(1.0, 1 / interval), transient=False,
              auto_refresh=False) as live:
        while True:
            shown_now, done, _ = view()
            live.update(shown_now, refresh=True)
            if done:
                return
            time.sleep(interval)
