"""Shared GPTQ calibration and resumable GPTQ on the bundled model (issue 20), through the CLI on a local Ray head with
2 logical GPU slots, each run in a fresh namespace and output root (the bundled GGUF's float copy prepared outside
every timing).

    python bench/calibration.py grid   # 12-point GPTQ grid: independent vs shared calibration, wall time and quality
    python bench/calibration.py kill [--modes gptq,gptq-shared,awq]
                                       # a GPTQ (AWQ) job killed at ~50 % of its layers and retried, vs uninterrupted

grid: bits 2/3/4/8 × group 32/64/-1, 32 calibration samples × 256 tokens, perplexity on 4 × 256 tokens. Prints each
mode's wall time (submit to the last row) and their ratio (goal >= 3), then each point's perplexity, KL and top-1 in
both modes side by side.
kill: for each mode (gptq: sequential, the job calibrates itself; gptq-shared: it solves from a capture; awq: the
sequential AWQ 4-bit g64 job), the 4-bit job's worker is killed with -9 once its progress passes half of its layers;
the retried attempt's time plus the killed
one's, over the time of the same job uninterrupted (goal <= 1.2), beside what restarting from layer 0 would cost
(the killed time plus an uninterrupted run).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from farm import REDIS_URL, line, namespace  # noqa: E402
from model import head_with, prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EVAL = "eval: {perplexity: {dataset: bundled:python-docs, seq_len: 256, max_windows: 4}, speed: null}"
CALIB = "{dataset: bundled:python-docs, samples: 32, seq_len: 256, share: %s}"


def grid_spec(share: bool) -> str:
    return f"""name: gptq-grid
model: bundled:smollm2-135m
{EVAL}
resources: {{gpus: 1}}
jobs:
  - {{kind: quantize, method: none}}
  - kind: quantize
    method: gptq
    calibration: {CALIB % str(share).lower()}
    matrix: {{bits: [2, 3, 4, 8], group_size: [32, 64, -1]}}
"""


def kill_spec(method: str, share: bool) -> str:
    calibration = CALIB % str(share).lower() if method == "gptq" else CALIB.replace(", share: %s", "")
    return f"""name: {method}-kill
model: bundled:smollm2-135m
{EVAL}
resources: {{gpus: 1}}
max_attempts: 2
jobs:
  - {{kind: quantize, method: {method}, bits: 4, group_size: 64, calibration: {calibration}}}
"""


def env_for(store, head, root: Path) -> dict:
    return dict(os.environ, QFARM_REDIS_URL=REDIS_URL, QFARM_NAMESPACE=store.namespace,
                QFARM_RAY_ADDRESS=head.address, QFARM_OUTPUT_ROOT=str(root))


def cli(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "qfarm.cli", *args], env=env, capture_output=True, text=True,
                         cwd=REPO)
    if check and out.returncode != 0:
        raise SystemExit(f"qfarm {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def rows(store) -> list[dict]:
    sid = store.sweep_ids()[-1]
    return [dict(j.result or {}, label=j.spec.get("label"), kind=j.spec.get("kind"), status=j.status,
                 started_at=j.started_at, finished_at=j.finished_at) for j in store.sweep_jobs(sid)]


def bench_grid() -> None:
    print("grid: 12 GPTQ points (bits 2/3/4/8 x group 32/64/-1) + the reference, 2 slots")
    walls, quality = {}, {}
    for share in (False, True):
        mode = "shared" if share else "independent"
        with tempfile.TemporaryDirectory() as tmp, namespace() as store, head_with({}, gpus=2) as head:
            root = Path(tmp)
            prepare(root)
            spec = root / "grid.yaml"
            spec.write_text(grid_spec(share))
            t0 = time.time()
            cli(env_for(store, head, root), "submit", str(spec), "--wait")
            walls[mode] = time.time() - t0
            got = rows(store)
            bad = [r["label"] for r in got if r["status"] != "succeeded"]
            if bad:
                raise SystemExit(f"{mode}: not succeeded: {bad}")
            quality[mode] = {r["label"]: r for r in got if r.get("method") == "gptq"}
            jobs = sum(r.get("quant_s") or 0 for r in quality[mode].values())
            capture = sum(r.get("capture_s") or 0 for r in got if r["kind"] == "calibrate")
            line(f"{mode}: wall time", f"{walls[mode]:.0f} s",
                 f"(quant_s summed over the 12 jobs {jobs:.0f} s; capture {capture:.0f} s)")
    line("independent / shared wall time", f"{walls['independent'] / walls['shared']:.2f}x", "goal >= 3",
         walls["independent"] / walls["shared"] >= 3)
    print(f"  {'point':<22} {'ppl indep':>10} {'ppl shared':>10} {'KL indep':>9} {'KL shared':>9} "
          f"{'top1 indep':>10} {'top1 shared':>11}")
    for label in sorted(quality["independent"], key=lambda s: (int(re.search(r"(\d+)b", s).group(1)), s)):
        a, b = quality["independent"][label], quality["shared"].get(label, {})
        print(f"  {label:<22} {a['perplexity']:>10.3f} {b.get('perplexity', float('nan')):>10.3f} "
              f"{a['kl_div']:>9.4f} {b.get('kl_div', float('nan')):>9.4f} {a['top1_agree']:>10.3f} "
              f"{b.get('top1_agree', float('nan')):>11.3f}")


def _quantizer(store, method: str):
    sid = store.sweep_ids()[-1]
    return next(j for j in store.sweep_jobs(sid) if (j.spec.get("options") or {}).get("method") == method)


KILL_MODES = {"gptq": ("gptq", False, "gptq sequential (replays solved layers)"),
              "gptq-shared": ("gptq", True, "gptq shared (solves the rest)"),
              "awq": ("awq", False, "awq sequential (replays smoothed layers)")}


def bench_kill(modes: list[str]) -> None:
    print("kill: one 4-bit g64 job killed at ~50 % of its layers and retried, vs uninterrupted")
    for method, share, mode in (KILL_MODES[m] for m in modes):
        times = {}
        for kill in (False, True):
            with tempfile.TemporaryDirectory() as tmp, namespace() as store, head_with({}, gpus=2) as head:
                root = Path(tmp)
                prepare(root)
                spec = root / "kill.yaml"
                spec.write_text(kill_spec(method, share))
                env = env_for(store, head, root)
                cli(env, "submit", str(spec))
                killed_after = 0.0
                if kill:
                    deadline = time.time() + 1800
                    while time.time() < deadline:
                        job = _quantizer(store, method)
                        m = re.search(r"(?:layer|subgraph) (\d+)/(\d+)", job.progress or "")
                        if job.status == "running" and job.pid and m and int(m.group(1)) > int(m.group(2)) // 2:
                            killed_after = time.time() - job.started_at
                            os.kill(job.pid, signal.SIGKILL)
                            break
                        if job.status not in ("queued", "running"):
                            raise SystemExit(f"the job ended before it was killed: {job.status} {job.error}")
                        time.sleep(0.05)
                while _quantizer(store, method).status in ("queued", "running"):
                    time.sleep(0.5)
                job = _quantizer(store, method)
                if job.status != "succeeded":
                    raise SystemExit(f"{mode}: {job.status} {job.error}")
                times[kill] = killed_after + (job.finished_at - job.started_at)
                if kill:
                    line(f"{mode}: killed after", f"{killed_after:.0f} s",
                         f"retry {job.finished_at - job.started_at:.0f} s, resumed_from "
                         f"{(job.result or {}).get('resumed_from')}, attempts {job.attempts}")
        ratio = times[True] / times[False]
        line(f"{mode}: (killed + retry) / uninterrupted", f"{times[True]:.0f} / {times[False]:.0f} s",
             f"{ratio:.2f} (goal <= 1.2)", ratio <= 1.2)
        line(f"{mode}: restarting from layer 0 instead", f"{killed_after + times[False]:.0f} s",
             f"{(killed_after + times[False]) / times[False]:.2f} (killed time + an uninterrupted run: before resume)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["grid", "kill"])
    ap.add_argument("--modes", default=",".join(KILL_MODES), help=f"kill: some of {', '.join(KILL_MODES)}")
    a = ap.parse_args()
    modes = a.modes.split(",")
    if not set(modes) <= set(KILL_MODES):
        ap.error(f"--modes: one or more of {', '.join(KILL_MODES)}, comma-separated")
    bench_grid() if a.what == "grid" else bench_kill(modes)


if __name__ == "__main__":
    main()
