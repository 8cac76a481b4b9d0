"""Makespan of heterogeneous sweeps, dispatched in the spec's order against longest remaining path first
(qfarm.farm.eta.dispatch_order), on 2 logical GPU slots, each run in a fresh namespace (no duration history: the
prior alone orders the first sweep on a cluster) and its own output root.

    python bench/schedule.py [--specs jobs/seed_004_methods.yaml,jobs/seed_003_pipeline.yaml] [--orders file,longest]

Prints per sweep and order: the makespan (first start to last finish), its lower bound max(critical path,
Σ job time / slots) from the run's own job times, and their ratio (goal <= 1.10 longest-first); then against the
DAG bound (``bound``), which a sweep gated by one long job cannot beat either.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from farm import REDIS_URL, line, namespace  # noqa: E402
from model import head_with  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SLOTS = 2


def run(store, head, spec: Path, root: Path) -> str:
    env = dict(os.environ, QFARM_REDIS_URL=REDIS_URL, QFARM_NAMESPACE=store.namespace,
               QFARM_RAY_ADDRESS=head.address, QFARM_OUTPUT_ROOT=str(root))
    out = subprocess.run([sys.executable, "-m", "qfarm.cli", "submit", str(spec), "--wait"], env=env,
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"sweep failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return store.sweep_ids()[-1]


def bound(jobs) -> tuple[float, float, float, float]:
    """(makespan, critical path, Σ job time / slots, the DAG bound) of a finished sweep, from its own job times.

    The DAG bound: no schedule ends before, for any job j, the longest chain up to j's start, plus j, plus all of
    j's descendants spread over the slots (they cannot start before j ends). It is at least as tight as the other
    two where one long job gates most of the sweep (seed 003's training: the second slot idles meanwhile)."""
    took = {j.id: j.finished_at - j.started_at for j in jobs}
    before = {j.id: [(j.spec or {}).get("parent")] + list((j.spec or {}).get("needs") or []) for j in jobs}
    after: dict[str, set[str]] = {j: set() for j in took}
    for j, parents in before.items():
        for p in parents:
            if p in after:
                after[p].add(j)

    def path(job_id):
        return took[job_id] + max((path(p) for p in before[job_id] if p in took), default=0.0)

    def descendants(job_id) -> set[str]:
        out = set(after[job_id])
        for child in after[job_id]:
            out |= descendants(child)
        return out

    dag = max(path(j) + sum(took[d] for d in descendants(j)) / SLOTS for j in took)
    makespan = max(j.finished_at for j in jobs) - min(j.started_at for j in jobs)
    return makespan, max(path(j) for j in took), sum(took.values()) / SLOTS, dag


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default="jobs/seed_004_methods.yaml,jobs/seed_003_pipeline.yaml")
    ap.add_argument("--orders", default="file,longest", help="some of file, longest (comma-separated)")
    a = ap.parse_args()
    if not set(a.orders.split(",")) <= {"file", "longest"}:
        ap.error("--orders: file, longest or both, comma-separated")
    for name in a.specs.split(","):
        spec = (REPO / name).resolve()
        print(f"{name}: {SLOTS} slots")
        for how in a.orders.split(","):
            with tempfile.TemporaryDirectory() as tmp, namespace() as store, \
                    head_with({"QFARM_DISPATCH": how}, gpus=SLOTS) as head:
                t0 = time.time()
                sid = run(store, head, spec, Path(tmp))
                jobs = [j for j in store.sweep_jobs(sid) if j.started_at and j.finished_at]
                makespan, critical, spread, dag = bound(jobs)
                lb = max(critical, spread)
                order = ", ".join(str(j.spec.get("label")) for j in sorted(jobs, key=lambda j: j.started_at))
                line(f"{how}: makespan / lower bound", f"{makespan:.0f} / {lb:.0f} s",
                     f"{makespan / lb:.3f} (critical path {critical:.0f} s, Σ/slots {spread:.0f} s; "
                     f"{time.time() - t0:.0f} s wall)", makespan / lb <= 1.10 if how == "longest" else None)
                tight = max(lb, dag)
                line(f"{how}: makespan / DAG bound", f"{makespan:.0f} / {tight:.0f} s",
                     f"{makespan / tight:.3f} (a job's chain + its descendants over the slots: {dag:.0f} s)")
                print(f"    started: {order}")


if __name__ == "__main__":
    main()
