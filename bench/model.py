"""Benchmarks with the real bundled model: base-model reuse, and the farm against a plain script.

    python bench/model.py reuse     # the same 4-job sweep with the worker cache on, then off (QFARM_CACHE_MODELS=0)
    python bench/model.py direct    # one bnb-nf4 quantize+evaluate job through qfarm vs the same calls in-process
    python bench/model.py plan      # the memory plan against the measured peak, one job of each kind
    python bench/model.py all

Small evaluation (4 windows x 256 tokens, no speed test, no prompts) so it finishes in minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from farm import REDIS_URL, line, namespace, run_sweep  # noqa: E402

EVAL = "eval: {perplexity: {seq_len: 256, max_windows: 4}, speed: null}"


def spec(folder: Path, name: str, methods: list[str]) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        model: bundled:smollm2-135m
        {EVAL}
        jobs:
          - kind: quantize
            matrix: {{method: {methods}}}
    """))
    return path


@contextmanager
def head_with(env: dict, gpus: int = 2):
    """A local Ray head whose worker processes see ``env`` (the raylet passes its environment on)."""
    from farm import ray_head

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with ray_head(gpus) as head:
            yield head
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def prepare(root: Path) -> None:
    """Dequantize the bundled GGUF into <root>/_models once, so no timed run pays for it."""
    from qfarm.sweep.sources import resolve_model
    from workers.shared.models import base_dir

    ref = resolve_model("bundled:smollm2-135m", root)
    t0 = time.time()
    base_dir({"kind": ref.kind, "location": ref.location, "gguf_file": ref.gguf_file, "key": ref.key}, str(root))
    print(f"  (float copy of the bundled GGUF prepared in {time.time() - t0:.1f} s, outside every timing)")


def bench_reuse(root: Path) -> None:
    methods = ["none", "bnb-int8", "bnb-nf4", "bnb-fp4"]
    print(f"reuse: {len(methods)} jobs on 2 slots, worker cache on vs off")
    totals = {}
    for label, env in [("cache on", {"QFARM_CACHE_MODELS": "1"}), ("cache off", {"QFARM_CACHE_MODELS": "0"})]:
        with namespace() as store, head_with(env) as head:
            sid, wall = run_sweep(store, head, spec(root, "reuse", methods))
            jobs = store.sweep_jobs(sid)
            loads = store.stats(sid).get("model_loads", 0)
            totals[label] = sum(j.finished_at - j.started_at for j in jobs)
            line(f"base-model loads / jobs ({label})", f"{loads} / {len(jobs)}")
            stats = store.stats(sid)
            made, read = stats.get("reference_computations", 0), stats.get("reference_shared", 0)
            workers = len({j.worker for j in jobs})
            line(f"reference computed / read from disk ({label})", f"{made} / {read}",
                 f"on {workers} workers: reference forwards = {made} x the windows (goal: once a sweep)", made == 1)
            line(f"sum of job times ({label})", f"{totals[label]:.1f} s", f"makespan {wall:.1f} s wall")
            extra = [(j.finished_at - j.started_at) - j.result["work_s"] for j in jobs]
            share = statistics.median(e / (j.finished_at - j.started_at) for e, j in zip(extra, jobs))
            line(f"farm bookkeeping per real job ({label})", f"{statistics.median(extra) * 1000:.1f} ms",
                 f"{share * 100:.3f}% of the job (target <= 1%)", share <= 0.01)
    saved = totals["cache off"] - totals["cache on"]
    line("time saved by the cache", f"{saved:.1f} s", f"{saved / totals['cache off'] * 100:.0f}% of the uncached job time")


def bench_direct(root: Path, repeats: int = 2) -> None:
    """Same conditions on both sides: a fresh process per run (a fresh worker actor / a fresh python), one
    torch thread, OMP_NUM_THREADS=1 (what Ray gives a 1-CPU worker), the float base already prepared, and the ML
    stack imported before the clock starts (workers do it while starting)."""
    print(f"direct: one bnb-nf4 quantize + evaluate job, through qfarm vs the same calls in a plain script ({repeats}x each)")
    farm, walls = [], []
    with head_with({}) as head:
        for _ in range(repeats):
            with namespace() as store:
                sid, wall = run_sweep(store, head, spec(root, "viafarm", ["bnb-nf4"]))
                (job,) = store.sweep_jobs(sid)
                farm.append(job.finished_at - job.started_at)
                walls.append(wall)
                payload = dict(job.spec, output_dir=str(root / "direct" / job.id), output_root=str(root))
    direct = [_direct_in_fresh_process(payload) for _ in range(repeats)]
    f, d, w = statistics.median(farm), statistics.median(direct), statistics.median(walls)
    line("direct script, job calls only", f"{d:.1f} s", f"runs: {', '.join(f'{x:.1f}' for x in direct)}")
    line("through qfarm: job start -> result", f"{f:.1f} s", f"runs: {', '.join(f'{x:.1f}' for x in farm)}")
    line("farm / direct", f"{f / d:.3f}", "target <= 1.10", f / d <= 1.10)
    line("submit --wait wall / direct", f"{w / d:.3f}", "(adds Ray connect, worker start, ML imports)")


def _direct_in_fresh_process(payload: dict) -> float:
    code = textwrap.dedent(f"""\
        import json, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import workers.quantize.bnb, workers.quantize
        from workers.actor import JobContext
        from workers.shared.cache import Cache
        from workers.shared.models import preload
        preload()  # what a worker does in ready(), before its first job
        payload = json.loads(sys.stdin.read())
        from qfarm.sweep.job import Job
        ctx = JobContext(Job.from_payload(payload), "direct", "direct", payload["output_dir"], payload["output_root"], Cache(), 1,
                         lambda line: None)
        t0 = time.time()
        workers.quantize.run(ctx)
        print(time.time() - t0)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(payload), capture_output=True, text=True,
                         env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_plan(root: Path) -> None:
    """The memory plan (qfarm.sweep.plan, from the config alone) against each job kind's measured peak, on CPU workers:
    the plan's host GB beside the worker's peak RSS (which the plan models: library, cached base, own model)."""
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "guanaco_llama2_1k" / "train.jsonl"
    path = root / "plan.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: plan
        model: bundled:smollm2-135m
        {EVAL}
        stages:
          - {{name: q, kind: quantize, matrix: {{method: [none, bnb-int8, bnb-nf4, rtn, gguf]}}}}
          - {{name: gptq, kind: quantize, method: gptq, calibration: {{dataset: bundled:python-docs, samples: 16, seq_len: 256}}}}
          - name: ft
            kind: train
            matrix: {{method: [lora, qlora]}}
            dataset: {{path: {data}, text_field: text, eval_samples: 8}}
            max_steps: 4
            batch_size: 2
            seq_len: 128
          - {{name: merge, kind: merge, from: ft}}
    """))
    print("plan: planned host memory against measured peak RSS, one job of each kind (CPU workers)")
    with namespace() as store, head_with({}) as head:
        sid, _ = run_sweep(store, head, path)
        jobs = sorted(store.sweep_jobs(sid), key=lambda j: (j.spec["kind"], j.spec["label"]))
    ratios = []
    for j in jobs:
        r = j.result or {}
        if r.get("plan_host_gb") is None or not r.get("peak_mem_mb"):
            line(f"{j.spec['kind']} {j.spec['label']}", "no plan/peak", j.status)
            continue
        measured = r["peak_mem_mb"] * 2**20 / 1e9
        ratios.append(r["plan_host_gb"] / measured)
        line(f"{j.spec['kind']} {j.spec['label']}", f"plan {r['plan_host_gb']:.2f} GB", f"measured {measured:.2f} GB, "
             f"plan / measured {ratios[-1]:.2f}")
    if ratios:
        line("plan / measured over every kind", f"{min(ratios):.2f} - {max(ratios):.2f}", "target 0.5 - 2",
             all(0.5 <= x <= 2 for x in ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["reuse", "direct", "plan", "all"])
    args = parser.parse_args()
    os.environ.setdefault("QFARM_REDIS_URL", REDIS_URL)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root)
        if args.what in ("reuse", "all"):
            bench_reuse(root)
        if args.what in ("direct", "all"):
            bench_direct(root)
        if args.what in ("plan", "all"):
            bench_plan(root)


if __name__ == "__main__":
    main()
