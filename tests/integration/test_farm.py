"""The farm end to end with `sleep` jobs: real Redis, a real local Ray head with 2 logical GPUs, the real CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.cli import qfarm, results

pytestmark = pytest.mark.integration


def spec(tmp_path, body: str, name="naps") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\n" + textwrap.dedent(body))
    return str(path)


def sleep_payload(index: int, seconds: float, **extra) -> dict:
    """A stored sleep job written by hand (what a spec cannot say: ``after``), one attempt, id ``j<index in hex>``."""
    return {"id": f"j{index:012x}", "kind": "sleep", "label": f"sleep[{index}]", "worker": "workers.sleep:run",
            "options": {"index": index, "seconds": seconds}, "max_attempts": 1, **extra}


def max_overlap(rows) -> int:
    edges = sorted([(r["started_at"], 1) for r in rows] + [(r["finished_at"], -1) for r in rows])
    best = now = 0
    for _, d in edges:
        now += d
        best = max(best, now)
    return best


def test_gpu_slots_bound_concurrency(cli_env, tmp_path, ray_head):
    path = spec(tmp_path, """\
        resources: {gpus: 1}
        jobs:
          - kind: sleep
            seconds: 3
            matrix: {index: [0, 1, 2, 3]}
    """)
    out = qfarm(cli_env, "submit", path, "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = results(cli_env, "naps")
    assert [r["status"] for r in rows] == ["succeeded"] * 4
    slots = min(ray_head.num_gpus, 4)
    assert max_overlap(rows) == slots  # 4 one-GPU jobs on 2 GPU slots: two at a time, never more
    assert max(r["finished_at"] for r in rows) - min(r["started_at"] for r in rows) >= 3.0 * (4 // slots)
    assert len({r["worker"] for r in rows}) == slots  # one worker actor per slot, each reused


def test_a_failing_job_loses_no_other_result_and_resubmit_reuses(cli_env, tmp_path):
    path = spec(tmp_path, """\
        jobs:
          - kind: sleep
            seconds: 0.2
            matrix: {index: [0, 1, 2]}
          - {kind: sleep, seconds: 0.1, index: 9, fail: true}
    """)
    out = qfarm(cli_env, "submit", path, "--wait")
    assert out.returncode == 1  # some job failed
    assert "sleep job 9 was asked to fail" in out.stdout
    rows = {r["label"]: r for r in results(cli_env, "naps")}
    assert [rows[f"sleep[{i}]"]["status"] for i in range(3)] == ["succeeded"] * 3
    assert rows["sleep[9]"]["status"] == "failed"
    assert rows["sleep[9]"]["error"] == "RuntimeError: sleep job 9 was asked to fail (fail: true)"
    first = {label: r["started_at"] for label, r in rows.items()}

    again = qfarm(cli_env, "submit", path)
    assert again.returncode == 0 and "(3 reused from an earlier run)" in again.stdout
    time.sleep(3)
    rows = {r["label"]: r for r in results(cli_env, "naps")}
    for i in range(3):  # finished jobs were not run again
        assert rows[f"sleep[{i}]"]["started_at"] == first[f"sleep[{i}]"]
        assert rows[f"sleep[{i}]"]["attempts"] == 1
    assert rows["sleep[9]"]["started_at"] != first["sleep[9]"]  # the failed one ran again


def test_submit_returns_at_once_and_cancel_stops_running_jobs(cli_env, tmp_path):
    path = spec(tmp_path, """\
        jobs:
          - kind: sleep
            seconds: 120
            matrix: {index: [0, 1, 2, 3]}
    """)
    out = qfarm(cli_env, "submit", path)
    assert out.returncode == 0 and "submitted naps-" in out.stdout
    # submit returned before any job finished (each sleeps 120 s): it does not wait for the sweep
    assert all(r["finished_at"] is None for r in results(cli_env, "naps"))
    deadline = time.time() + 60
    while time.time() < deadline:
        running = [r for r in results(cli_env, "naps") if r["status"] == "running"]
        if len(running) == 2:
            break
        time.sleep(0.5)
    assert len(running) == 2
    out = qfarm(cli_env, "cancel", "naps")
    assert out.returncode == 0 and "cancelled 2 queued job(s)" in out.stdout
    deadline = time.time() + 30
    while time.time() < deadline:
        statuses = [r["status"] for r in results(cli_env, "naps")]
        if statuses == ["cancelled"] * 4:
            break
        time.sleep(0.5)
    assert statuses == ["cancelled"] * 4
    reasons = sorted(r["error"] for r in results(cli_env, "naps"))
    assert reasons[:2] == ["cancelled before it started"] * 2
    assert all(r.startswith("cancelled while running (stopped at: slept ") for r in reasons[2:]), reasons
    status = qfarm(cli_env, "status", "naps")
    assert status.returncode == 0 and "4 cancelled" in status.stdout


def test_resources_no_node_has_are_refused(cli_env, tmp_path, ray_head):
    path = spec(tmp_path, """\
        resources: {gpus: 64}
        jobs:
          - {kind: sleep, seconds: 0.1}
    """)
    out = qfarm(cli_env, "submit", path)
    assert out.returncode == 2
    assert "no node of this cluster can run these jobs" in out.stderr
    assert "need GPU 64, CPU 1" in out.stderr and f"GPU {ray_head.num_gpus:g}" in out.stderr
    assert "Traceback" not in out.stderr


def test_unreachable_redis_is_a_clear_error(tmp_path, cli_env):
    env = dict(cli_env, QFARM_REDIS_URL="redis://127.0.0.1:1/0")
    out = qfarm(env, "status")
    assert out.returncode == 1
    assert out.stderr.startswith("error: Cannot reach Redis at redis://127.0.0.1:1/0")
    assert "--redis-url" in out.stderr and "Traceback" not in out.stderr


def test_status_and_unknown_sweep(cli_env, tmp_path):
    out = qfarm(cli_env, "results", "no-such-sweep")
    assert out.returncode == 2 and "no sweep 'no-such-sweep'" in out.stderr
    out = qfarm(cli_env, "status")
    assert out.returncode == 0 and "sweeps (namespace qfarm-test-" in out.stdout


def test_a_killed_worker_is_retried_and_the_sweep_completes(cli_env, tmp_path, store):
    import os
    import signal

    path = spec(tmp_path, """\
        max_attempts: 2
        jobs:
          - kind: sleep
            seconds: 4
            matrix: {index: [0, 1]}
    """)
    out = qfarm(cli_env, "submit", path)
    assert out.returncode == 0, out.stderr
    sweep = store.find_sweep("naps").id
    victim = running_job(store, sweep, 60)
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.time() + 90
    while time.time() < deadline and not all(j.status == "succeeded" for j in store.sweep_jobs(sweep)):
        time.sleep(0.5)
    jobs = {j.id: j for j in store.sweep_jobs(sweep)}
    assert all(j.status == "succeeded" for j in jobs.values())
    assert jobs[victim.id].attempts == 2
    history = store.attempts(victim.id)
    assert history[0]["status"] == "retried" and history[0]["error"].startswith("worker process died")
    assert history[1]["status"] == "succeeded"
    other = next(j for j in jobs.values() if j.id != victim.id)
    assert other.attempts == 1  # the other job was not disturbed


def test_wait_does_not_hang_when_the_scheduler_dies(cli_env, tmp_path, store, ray_head):
    import ray

    from qfarm.farm import scheduler

    path = spec(tmp_path, """\
        stages:
          - {name: a, kind: sleep, seconds: 8, matrix: {index: [0, 1]}}
          - {name: b, kind: sleep, from: a, seconds: 0.5, index: 5}
    """)
    waiting = subprocess.Popen([sys.executable, "-m", "qfarm.cli", "submit", path, "--wait"], env=cli_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, sweep = time.time() + 60, None
    while time.time() < deadline and not (sweep and any(j.status == "running" for j in store.sweep_jobs(sweep))):
        found = store.find_sweep("naps")
        sweep = found.id if found else None
        time.sleep(0.3)
    if not ray.is_initialized():
        ray.init(address=ray_head.address, namespace="qfarm", log_to_driver=False)
    assert scheduler.kill(sweep, store.namespace)
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 1
    assert f"the scheduler of sweep {sweep} is gone before the sweep finished" in err
    assert "submit the same file again to resume it" in err

    # `qfarm resume`: a new scheduler rebuilds its view from Redis; the jobs the dead one left "running" (their
    # workers died with it) are requeued once two heartbeats are missed (even while their children wait on them
    # in the queue), and the sweep completes
    running_then = {j.id for j in store.sweep_jobs(sweep) if j.status == "running"}
    assert "b" in {j.spec["stage"] for j in store.sweep_jobs(sweep) if j.status == "queued"}
    # workers write only below the resuming command's own output root (never a path read from Redis): it must be
    # the one the sweep was submitted with
    elsewhere = qfarm(dict(cli_env, QFARM_OUTPUT_ROOT=str(tmp_path / "elsewhere")), "resume", "naps")
    assert elsewhere.returncode == 2 and f"keeps its artifacts under {Path(cli_env['QFARM_OUTPUT_ROOT']).resolve()}" \
        in elsewhere.stderr, elsewhere.stderr
    out = qfarm(cli_env, "resume", "naps", "--wait", timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    jobs = {j.id: j for j in store.sweep_jobs(sweep)}
    assert all(j.status == "succeeded" for j in jobs.values())
    assert running_then and all(jobs[i].attempts == 2 for i in running_then)
    for child in (j for j in jobs.values() if j.spec["parent"]):
        assert child.started_at >= jobs[child.spec["parent"]].finished_at
    history = store.attempts(next(iter(running_then)))
    assert "is gone" in history[0]["error"] or "heartbeat lapsed" in history[0]["error"]


def test_retry_requeues_failed_and_cancelled_jobs(cli_env, tmp_path, store):
    path = spec(tmp_path, """\
        jobs:
          - {kind: sleep, seconds: 0.2, matrix: {index: [0, 1]}}
          - {kind: sleep, seconds: 0.1, index: 9, fail: true, max_attempts: 1}
    """, name="retry")
    assert qfarm(cli_env, "submit", path, "--wait").returncode == 1
    before = {r["index"]: r for r in results(cli_env, "retry")}
    assert before[9]["status"] == "failed" and before[0]["status"] == "succeeded"
    out = qfarm(cli_env, "retry", "retry", "--failed", "--wait")
    assert out.returncode == 1 and "requeued 1 job(s)" in out.stdout  # it fails again, by design
    after = {r["index"]: r for r in results(cli_env, "retry")}
    assert after[9]["status"] == "failed" and after[9]["attempts"] == 1  # attempts start over
    assert after[0]["finished_at"] == before[0]["finished_at"]  # finished jobs are not run again

    # cancelled jobs: --failed leaves them, a plain retry runs them
    path = spec(tmp_path, """\
        jobs:
          - {kind: sleep, seconds: 3, matrix: {index: [0, 1, 2]}}
    """, name="stopped")
    assert qfarm(cli_env, "submit", path).returncode == 0
    assert qfarm(cli_env, "cancel", "stopped").returncode == 0
    deadline = time.time() + 60
    while time.time() < deadline and any(r["status"] != "cancelled" for r in results(cli_env, "stopped")):
        time.sleep(0.3)
    assert "nothing to retry" in qfarm(cli_env, "retry", "stopped", "--failed").stdout
    out = qfarm(cli_env, "retry", "stopped", "--wait", timeout=240)
    assert out.returncode == 0 and "requeued 3 job(s)" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert [r["status"] for r in results(cli_env, "stopped")] == ["succeeded"] * 3


def test_cancel_one_job_running_or_queued(cli_env, tmp_path, store):
    path = spec(tmp_path, """\
        jobs:
          - {kind: sleep, seconds: 30, index: 1, busy: true}
          - {kind: sleep, seconds: 30, matrix: {index: [0, 2]}}
    """, name="one")
    assert qfarm(cli_env, "submit", path).returncode == 0
    sweep = store.find_sweep("one").id
    deadline, running = time.time() + 60, []
    while time.time() < deadline and len(running) < 2:
        running = [j for j in store.sweep_jobs(sweep) if j.status == "running"]
        time.sleep(0.3)
    busy = next(j for j in running if j.spec["options"]["busy"])
    victim = next(j for j in running if not j.spec["options"]["busy"])
    queued = next(j for j in store.sweep_jobs(sweep) if j.status == "queued")
    assert f"job {queued.id} cancelled (it had not started)" in qfarm(cli_env, "cancel", queued.id).stdout
    asked = time.time()
    out = qfarm(cli_env, "cancel", victim.id)
    assert out.returncode == 0 and f"job {victim.id} is being stopped (killed after 10 s)" in out.stdout
    assert qfarm(cli_env, "cancel", busy.id, "--grace", "2").returncode == 0

    def wait_cancelled(job_id):
        while time.time() < asked + 30 and store.job(job_id).status != "cancelled":
            time.sleep(0.2)
        return store.job(job_id)

    # a job that reports progress stops by itself, at its next progress line, well within the grace; its worker lives on
    stopped = wait_cancelled(victim.id)
    # ("stopped at", not "killed": it stopped before its 10 s grace ran out)
    assert stopped.status == "cancelled" and stopped.error.startswith("cancelled while running (stopped at: slept ")
    # a job that never reports progress is killed once the grace it was given is over, and not before
    killed = wait_cancelled(busy.id)
    assert killed.error == "cancelled while running (killed: it did not stop within 2 s)"
    assert killed.finished_at - asked >= 2
    assert "already cancelled" in qfarm(cli_env, "cancel", victim.id).stdout
    qfarm(cli_env, "cancel", "one", "--grace", "0")


def test_a_final_runs_again_when_a_job_it_ranked_without_succeeds_on_retry(cli_env, tmp_path, store):
    """A search's final job waits ``after`` its candidates however they end, and ranks those that succeeded. One
    cancelled (or failed) before it ran, and retried after it, is a candidate the final never saw: it runs again."""
    late, early = sleep_payload(1, 6), sleep_payload(2, 0.2)
    final = sleep_payload(3, 0.2, after=[late["id"], early["id"]])
    store.submit("ranked-0001", "ranked", [late, early, final], source="ranked.yaml",
                 output_root=str((tmp_path / "out").resolve()))
    assert qfarm(cli_env, "resume", "ranked").returncode == 0
    deadline = time.time() + 120
    while store.job(late["id"]).status != "running":
        assert time.time() < deadline, store.job(late["id"])
        time.sleep(0.1)
    assert qfarm(cli_env, "cancel", late["id"], "--grace", "0").returncode == 0
    while any(store.job(j["id"]).status not in ("succeeded", "failed", "cancelled") for j in (late, early, final)):
        assert time.time() < deadline, [store.job(j["id"]) for j in (late, early, final)]
        time.sleep(0.2)
    first, ranked = store.job(early["id"]), store.job(final["id"])
    assert store.job(late["id"]).status == "cancelled" and ranked.status == "succeeded"
    assert ranked.after_seen == {early["id"]: first.attempt_id}  # handed the one that had succeeded

    out = qfarm(cli_env, "retry", "ranked", "--wait", timeout=240)
    assert out.returncode == 0 and "requeued 1 job(s)" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    done, again, kept = store.job(late["id"]), store.job(final["id"]), store.job(early["id"])
    assert done.status == again.status == "succeeded"
    assert again.started_at > done.finished_at
    assert again.after_seen == {late["id"]: done.attempt_id, early["id"]: kept.attempt_id}
    assert kept.started_at == first.started_at  # the rest is not run again
    history = store.attempts(final["id"])
    assert [a["status"] for a in history] == ["succeeded", "superseded", "succeeded"]
    assert history[1]["error"] == f"ran again: sleep[1] ({late['id']}) succeeded after it ranked the jobs it waited for"


def test_stages_run_in_dag_order_and_a_failed_parent_skips_its_subtree(cli_env, tmp_path):
    path = spec(tmp_path, """\
        stages:
          - {name: a, kind: sleep, seconds: 1.0, matrix: {index: [0, 1]}}
          - {name: bad, kind: sleep, seconds: 0.1, index: 9, fail: true}
          - {name: b, kind: sleep, from: a, seconds: 0.1, index: 10}
          - {name: c, kind: sleep, from: bad, seconds: 0.1, index: 11}
          - {name: d, kind: sleep, from: c, seconds: 0.1, index: 12}
    """, name="dag")
    out = qfarm(cli_env, "submit", path, "--wait")
    assert out.returncode == 1, out.stdout + out.stderr  # a job failed
    rows = results(cli_env, "dag")
    by_id = {r["job_id"]: r for r in rows}
    by_stage: dict[str, list[dict]] = {}
    for r in rows:
        by_stage.setdefault(r["stage"], []).append(r)
    assert [r["status"] for r in by_stage["a"]] == ["succeeded"] * 2
    assert [r["status"] for r in by_stage["b"]] == ["succeeded"] * 2  # one b per a
    for child in by_stage["b"]:  # a child starts only after its own parent finished
        assert child["started_at"] >= by_id[child["parent"]]["finished_at"]
        assert child["lineage"] == by_id[child["parent"]]["label"]
    assert by_stage["bad"][0]["status"] == "failed"
    (c,), (d,) = by_stage["c"], by_stage["d"]
    assert c["status"] == d["status"] == "skipped"  # not failed, not lost: skipped, with the reason
    assert c["started_at"] is None and "sleep[9]" in c["error"] and "failed" in c["error"]
    assert "sleep[11]" in d["error"] and "skipped" in d["error"]
    status = qfarm(cli_env, "status", "dag")
    assert "2 skipped" in status.stdout + status.stderr


def running_job(store, sweep: str, timeout_s: float):
    """The first job of ``sweep`` seen running with a worker pid (to inject a fault into its process)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        victim = next((j for j in store.sweep_jobs(sweep) if j.status == "running" and j.pid), None)
        if victim is not None:
            return victim
        time.sleep(0.2)
    raise AssertionError(f"no job of {sweep} was running within {timeout_s:g} s")


def test_longest_remaining_path_starts_first_and_the_next_sweep_knows_its_durations(cli_env, tmp_path, store):
    """One slot (a job of 2 GPUs on the 2-GPU head): jobs start by the longest remaining path, the spec's order
    aside; the durations go to Redis by work shape, and a later sweep of the same shapes has an ETA before any
    of its jobs finishes."""
    import json

    path = spec(tmp_path, """\
        resources: {gpus: 2}
        stages:
          - {name: short, kind: sleep, seconds: 0.5, index: 0}
          - {name: long, kind: sleep, seconds: 2.0, index: 1}
          - {name: mid, kind: sleep, seconds: 1.0, index: 2}
          - {name: head, kind: sleep, seconds: 0.3, index: 3}
          - {name: tail, kind: sleep, from: head, seconds: 2.5, index: 4}
    """, name="order")
    out = qfarm(cli_env, "submit", path, "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = sorted(results(cli_env, "order"), key=lambda r: r["started_at"])
    # head leads the longest chain (0.3 + 2.5 s): first; its tail, once ready, outranks the rest; then by length
    assert [r["stage"] for r in rows] == ["head", "tail", "long", "mid", "short"]
    assert max_overlap(rows) == 1
    history = store.durations()
    assert len(history) == 5 and all(v > 0.3 for v in history.values())
    again = spec(tmp_path, """\
        resources: {gpus: 2}
        jobs:
          - {kind: sleep, seconds: 2.0, index: 7}
          - {kind: sleep, seconds: 1.0, index: 8}
    """, name="again")  # new jobs (other indices), the shapes of two above
    out = qfarm(cli_env, "submit", again)
    assert out.returncode == 0, out.stdout + out.stderr
    status = json.loads(qfarm(cli_env, "status", "again", "--json").stdout)
    if status["counts"]["succeeded"] == 0:  # nothing finished yet: the estimate can only come from the history
        assert status["eta_s"] is not None and status["eta_s"] > 0.5
    sweep = store.find_sweep("again")
    deadline = time.time() + 120
    while time.time() < deadline and any(j.status in ("queued", "running") for j in store.sweep_jobs(sweep.id)):
        time.sleep(0.5)
    assert [j.status for j in store.sweep_jobs(sweep.id)] == ["succeeded"] * 2
