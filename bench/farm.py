"""Benchmarks of the farm itself: dispatch overhead, makespan efficiency, scale. Prints numbers and ratios.

    python bench/farm.py dispatch  [--jobs 40 --seconds 1.0 --gpus 2]
    python bench/farm.py makespan  [--jobs 40 --seconds 1.0 --gpus 2 4]
    python bench/farm.py scale     [--jobs 10000]
    python bench/farm.py all

Each run starts its own local Ray head (127.0.0.1, G logical GPUs) and uses a throwaway Redis namespace on
QFARM_BENCH_REDIS_URL (default redis://127.0.0.1:6379/0), removed afterwards. Not a test: nothing asserts,
the figures and their targets are printed for a person to read (bench/README.md records the last run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from qfarm.farm.connection import connect_redis  # noqa: E402
from qfarm.farm.store import Store  # noqa: E402

REDIS_URL = os.environ.get("QFARM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def line(name: str, value: str, target: str = "", ok: bool | None = None) -> None:
    verdict = "" if ok is None else ("  ok" if ok else "  MISSED")
    print(f"  {name:<44} {value:>16}   {target}{verdict}")


@contextmanager
def namespace():
    client, _ = connect_redis(REDIS_URL, embedded_ok=False)
    ns = f"qfarm-bench-{uuid.uuid4().hex[:8]}"
    store = Store(client, ns)
    try:
        yield store
    finally:
        store.delete_namespace()


@contextmanager
def ray_head(gpus: int):
    from qfarm.farm.cluster import start_local_head, stop_local_head

    temp = f"/tmp/qfarm-bench-ray-{os.getpid()}-{gpus}"
    t0 = time.time()
    head = start_local_head(temp_dir=temp, log_path=f"{temp}.log", num_gpus=gpus, num_cpus=max(4, gpus))
    print(f"  (local Ray head with {gpus} logical GPUs up in {time.time() - t0:.1f} s)")
    try:
        yield head
    finally:
        stop_local_head(head.pid)


def sleep_spec(folder: Path, name: str, jobs: int, seconds: float) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        resources: {{gpus: 1}}
        jobs:
          - kind: sleep
            seconds: {seconds}
            matrix: {{index: {list(range(jobs))}}}
    """))
    return path


def run_sweep(store: Store, head, spec: Path) -> tuple[str, float]:
    env = dict(os.environ, QFARM_REDIS_URL=REDIS_URL, QFARM_NAMESPACE=store.namespace,
               QFARM_RAY_ADDRESS=head.address, QFARM_OUTPUT_ROOT=str(spec.parent))
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "qfarm.cli", "submit", str(spec), "--wait"], env=env,
                         capture_output=True, text=True)
    wall = time.time() - t0
    if out.returncode != 0:
        raise SystemExit(f"sweep failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    sweep = store.find_sweep(spec.stem)
    return sweep.id, wall


def dispatch_latencies(jobs) -> tuple[list[float], list[float]]:
    """Per job: started_at minus the moment it could have started (queued, and its worker free).

    Returns (first job of each worker: includes starting the worker actor, every later job: pure dispatch).
    """
    by_worker: dict[str, list] = {}
    for j in jobs:
        by_worker.setdefault(j.worker, []).append(j)
    first, steady = [], []
    for runs in by_worker.values():
        runs.sort(key=lambda j: j.started_at)
        first.append(runs[0].started_at - runs[0].queued_at)
        steady += [b.started_at - max(b.queued_at, a.finished_at) for a, b in zip(runs, runs[1:])]
    return first, steady


def bench_dispatch(args) -> None:
    print(f"dispatch: {args.jobs} sleep jobs of {args.seconds:g} s on {args.gpus[0]} logical GPUs")
    with namespace() as store, ray_head(args.gpus[0]) as head, tempfile.TemporaryDirectory() as tmp:
        sid, wall = run_sweep(store, head, sleep_spec(Path(tmp), "dispatch", args.jobs, args.seconds))
        jobs = store.sweep_jobs(sid)
        first, steady = dispatch_latencies(jobs)
        lat = [x * 1000 for x in steady]
        farm = [(j.finished_at - j.started_at) - j.result["work_s"] for j in jobs]
        frac = statistics.median(f / (j.finished_at - j.started_at) for f, j in zip(farm, jobs))
        line("dispatch latency p50", f"{pct(lat, 50):.1f} ms", "target <= 50 ms", pct(lat, 50) <= 50)
        line("dispatch latency p99", f"{pct(lat, 99):.1f} ms")
        line("first job per worker (incl. actor start)", f"{max(first) * 1000:.0f} ms", "(max over workers)")
        line("bookkeeping inside a job (median)", f"{statistics.median(farm) * 1000:.1f} ms")
        line("bookkeeping / job time (median)", f"{frac * 100:.2f} %", "target <= 1% of a >= 10 s job")
        line("bookkeeping / 10 s job (projected)", f"{statistics.median(farm) / 10 * 100:.3f} %", "<= 1%",
             statistics.median(farm) / 10 <= 0.01)


def bench_makespan(args) -> None:
    for gpus in args.gpus:
        print(f"makespan: {args.jobs} sleep jobs of {args.seconds:g} s on {gpus} logical GPUs")
        with namespace() as store, ray_head(gpus) as head, tempfile.TemporaryDirectory() as tmp:
            sid, wall = run_sweep(store, head, sleep_spec(Path(tmp), f"makespan{gpus}", args.jobs, args.seconds))
            jobs = store.sweep_jobs(sid)
            makespan = max(j.finished_at for j in jobs) - min(j.started_at for j in jobs)
            ideal = args.jobs / gpus * args.seconds
            ratio = makespan / ideal
            firsts = {}
            for j in jobs:
                firsts[j.worker] = min(firsts.get(j.worker, j.started_at), j.started_at)
            stagger = max(firsts.values()) - min(firsts.values())
            line(f"makespan (first start -> last finish), G={gpus}", f"{makespan:.2f} s", f"ideal {ideal:.2f} s")
            line(f"makespan / ideal, G={gpus}", f"{ratio:.3f}", "target <= 1.05", ratio <= 1.05)
            line(f"worker start stagger, G={gpus}", f"{stagger:.2f} s", "(last worker's first job - first's)")
            line(f"submit --wait wall time, G={gpus}", f"{wall:.2f} s", "(includes Ray connect, actor starts)")


def bench_scale(args) -> None:
    from rich.console import Console

    from qfarm.results.progress import jobs_table, sweeps_table
    from qfarm.sweep.expand import load_sweep

    print(f"scale: a {args.scale_jobs}-job sweep (sleep jobs; validate + expand + record, no run)")
    with namespace() as store, tempfile.TemporaryDirectory() as tmp:
        spec = sleep_spec(Path(tmp), "scale", args.scale_jobs, 1.0)
        t0 = time.time()
        loaded, plan = load_sweep(spec, max_jobs=max(args.scale_jobs, 10_000))
        t1 = time.time()
        store.submit(plan.sweep_id, plan.name, [j.payload() for j in plan.jobs], source=str(spec), output_root=tmp)
        t2 = time.time()
        line("validate + expand", f"{t1 - t0:.2f} s")
        line("record in Redis", f"{t2 - t1:.2f} s")
        line("validate + expand + record", f"{t2 - t0:.2f} s", "target <= 5 s", t2 - t0 <= 5)
        console = Console(file=open(os.devnull, "w"), width=160)
        t0 = time.time()
        console.print(sweeps_table(store))
        t1 = time.time()
        record = store.sweep(plan.sweep_id)
        console.print(jobs_table(record, store.sweep_jobs(plan.sweep_id), store.stats(plan.sweep_id)))
        t2 = time.time()
        line("`qfarm status` (all sweeps)", f"{t1 - t0:.2f} s", "target <= 1 s", t1 - t0 <= 1)
        line("`qfarm status SWEEP` (first 60 of 10k rows)", f"{t2 - t1:.2f} s", "target <= 1 s", t2 - t1 <= 1)
        total = sum(store.r.memory_usage(k) or 0 for k in store.r.scan_iter(match=store.keys.pattern(), count=1000))
        per_job = total / args.scale_jobs
        line("Redis memory per job", f"{per_job / 1024:.2f} KB", "target <= 5 KB", per_job <= 5 * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["dispatch", "makespan", "scale", "all"])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--scale-jobs", type=int, default=10_000)
    args = parser.parse_args()
    if args.what in ("dispatch", "all"):
        bench_dispatch(args)
    if args.what in ("makespan", "all"):
        bench_makespan(args)
    if args.what in ("scale", "all"):
        bench_scale(args)


if __name__ == "__main__":
    main()
