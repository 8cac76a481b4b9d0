"""Faults injected for real: a Redis server killed with -9 mid-sweep and restarted from its append-only file."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.cli import qfarm
from tests.integration.test_farm import running_job, sleep_payload, spec
from tests.integration.test_redis_connection import free_port

pytestmark = pytest.mark.integration


def start_redis(port: int, folder) -> subprocess.Popen:
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    for _ in range(100):
        try:
            client.ping()
            return proc
        except redis.RedisError:
            time.sleep(0.1)
    raise RuntimeError("redis-server did not start")


def test_redis_killed_and_restarted_mid_sweep_loses_nothing_and_reruns_nothing(cli_env, tmp_path):
    from qfarm.farm.connection import connect_redis
    from qfarm.farm.store import Store

    port, folder = free_port(), tmp_path / "redis"
    folder.mkdir()
    server = start_redis(port, folder)
    url = f"redis://127.0.0.1:{port}/0"
    env = dict(cli_env, QFARM_REDIS_URL=url)
    path = spec(tmp_path, """\
        jobs:
          - {kind: sleep, seconds: 1.0, matrix: {index: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]}}
    """, name="outage")
    client = subprocess.Popen([sys.executable, "-m", "qfarm.cli", "submit", path, "--wait"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        store = Store(connect_redis(url, embedded_ok=False)[0], env["QFARM_NAMESPACE"])
        deadline, done_before = time.time() + 120, {}
        while time.time() < deadline:
            found = store.find_sweep("outage")
            jobs = store.sweep_jobs(found.id) if found else []
            done_before = {j.id: j.finished_at for j in jobs if j.status == "succeeded"}
            if len(done_before) >= 4:
                break
            time.sleep(0.2)
        assert 4 <= len(done_before) < 16, "the sweep should be part-way through when Redis dies"
        server.send_signal(signal.SIGKILL)
        server.wait()
        time.sleep(3)  # workers finish jobs meanwhile and must wait for Redis to write their results
        server = start_redis(port, folder)
        out, err = client.communicate(timeout=240)
        assert client.returncode == 0, out[-2000:] + err[-2000:]
        jobs = store.sweep_jobs(store.find_sweep("outage").id)
        assert [j.status for j in jobs] == ["succeeded"] * 16
        assert all(j.attempts == 1 for j in jobs)  # nothing ran twice
        assert all(j.finished_at == done_before[j.id] for j in jobs if j.id in done_before)  # nothing redone
        assert all(j.result and j.result.get("work_s") is not None for j in jobs)  # no result lost
    finally:
        if client.poll() is None:
            client.kill()
        server.kill()
        server.wait()


def test_chaos_random_worker_kills_every_job_succeeds_exactly_once(cli_env, tmp_path, store):
    """32 short jobs; a worker process running one of them is killed with -9 at random moments, 6 times."""
    import os
    import random

    rng = random.Random(20261123)
    path = spec(tmp_path, """\
        max_attempts: 8
        jobs:
          - {kind: sleep, seconds: 1.5, matrix: {index: [%s]}}
    """ % ", ".join(str(i) for i in range(32)), name="chaos")
    out = qfarm(cli_env, "submit", path, timeout=120)
    assert out.returncode == 0, out.stderr
    sweep = store.find_sweep("chaos").id
    kills: list[str] = []
    deadline = time.time() + 240
    while len(kills) < 6 and time.time() < deadline:
        time.sleep(rng.uniform(0.3, 2.0))
        running = [j for j in store.sweep_jobs(sweep) if j.status == "running" and j.pid]
        if not running:
            continue
        victim = rng.choice(running)
        try:
            os.kill(victim.pid, signal.SIGKILL)
            kills.append(victim.id)
        except ProcessLookupError:
            continue
    assert len(kills) >= 6
    while time.time() < deadline and not all(j.status == "succeeded" for j in store.sweep_jobs(sweep)):
        time.sleep(0.5)
    jobs = {j.id: j for j in store.sweep_jobs(sweep)}
    assert len(jobs) == 32 and all(j.status == "succeeded" for j in jobs.values())
    for job in jobs.values():
        history = store.attempts(job.id)
        succeeded = [a for a in history if a["status"] == "succeeded"]
        assert len(succeeded) == 1  # exactly once, whatever happened before
        assert succeeded[0]["attempt_id"] == job.attempt_id and job.result  # the result is the final attempt's
        assert job.attempts == len(history)
    # each kill cost one attempt, recorded as retried with its reason (a kill racing a job's end may miss it)
    retried = [a for j in jobs for a in store.attempts(j) if a["status"] == "retried"]
    assert len(retried) >= 5 and all(a["error"].startswith("worker process died") for a in retried)
    assert sum(j.attempts for j in jobs.values()) == 32 + len(retried)


def test_sweep_metrics_reach_the_ray_metrics_endpoint(cli_env, tmp_path, store, ray_head):
    """ray.util.metrics from the scheduler, as Prometheus text on the node's metrics export port (what the
    Ray dashboard's Metrics view and a Prometheus scrape read)."""
    import re
    import urllib.request

    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head.address, namespace="qfarm", log_to_driver=False)
    port = ray.nodes()[0]["MetricsExportPort"]
    path = spec(tmp_path, """\
        jobs:
          - {kind: sleep, seconds: 20, matrix: {index: [0, 1, 2]}}
    """, name="metered")
    out = qfarm(cli_env, "submit", path, timeout=120)
    assert out.returncode == 0, out.stderr
    sweep = store.find_sweep("metered").id
    pattern = re.compile(r'^ray_qfarm_jobs\{[^}]*status="(\w+)"[^}]*\} ([0-9.]+)$', re.MULTILINE)
    deadline, seen = time.time() + 60, {}
    try:
        while time.time() < deadline:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            seen = {m.group(1): float(m.group(2)) for m in pattern.finditer(text)
                    if f'sweep="{sweep}"' in m.group(0)}
            if seen.get("running") == 2 and seen.get("queued") == 1:
                break
            time.sleep(1)
        assert seen.get("running") == 2 and seen.get("queued") == 1, seen
    finally:
        qfarm(cli_env, "cancel", "metered", timeout=60)


def test_killing_the_client_mid_sweep_does_not_stop_the_sweep(cli_env, tmp_path, store):
    path = spec(tmp_path, """\
        jobs:
          - {kind: sleep, seconds: 1.5, matrix: {index: [0, 1, 2, 3, 4, 5]}}
    """, name="orphaned")
    client = subprocess.Popen([sys.executable, "-m", "qfarm.cli", "submit", path, "--wait"], env=cli_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline:
        found = store.find_sweep("orphaned")
        if found and any(j.status == "succeeded" for j in store.sweep_jobs(found.id)):
            break
        time.sleep(0.2)
    client.send_signal(signal.SIGKILL)
    client.wait()
    while time.time() < deadline and not all(j.status == "succeeded" for j in store.sweep_jobs(found.id)):
        time.sleep(0.3)
    jobs = store.sweep_jobs(found.id)
    assert [j.status for j in jobs] == ["succeeded"] * 6 and all(j.attempts == 1 for j in jobs)
    # and any machine that reaches Redis and Ray can look at it again
    out = qfarm(cli_env, "results", "orphaned", "--format", "csv", timeout=60)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 7


def test_a_job_past_its_timeout_is_stopped_and_fails_with_the_reason(cli_env, tmp_path, store):
    path = spec(tmp_path, """\
        jobs:
          - {kind: sleep, seconds: 60, index: 0, timeout_s: 3}
          - {kind: sleep, seconds: 0.5, index: 1}
    """, name="slow")
    out = qfarm(cli_env, "submit", path, "--wait", timeout=120)
    assert out.returncode == 1, out.stdout[-2000:]
    jobs = {j.spec["options"]["index"]: j for j in store.sweep_jobs(store.find_sweep("slow").id)}
    assert jobs[0].status == "failed" and jobs[0].error.startswith("timed out after 3 s")
    assert jobs[0].finished_at < jobs[0].started_at + 60  # stopped before its 60 s sleep would have ended
    assert jobs[0].attempts == 1  # a timeout is not retried: it would time out again
    assert jobs[1].status == "succeeded"


def test_a_frozen_worker_is_killed_and_its_job_retried(cli_env, tmp_path, store):
    """SIGSTOP the worker process running a job (as a hung CUDA kernel or NCCL call leaves it): its heartbeat
    stops while its actor lives; after hung_after_s the scheduler kills it and the job runs again, once."""
    import os

    path = spec(tmp_path, """\
        hung_after_s: 10
        jobs:
          - {kind: sleep, seconds: 4, index: 0}
    """, name="frozen")
    assert qfarm(cli_env, "submit", path).returncode == 0
    sweep = store.find_sweep("frozen").id
    victim = running_job(store, sweep, 90)
    os.kill(victim.pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        while time.time() < stopped_at + 120 and store.job(victim.id).status != "succeeded":
            time.sleep(0.5)
    finally:
        try:
            os.kill(victim.pid, signal.SIGCONT)  # should it still exist: let it be killed normally
        except ProcessLookupError:
            pass
    job = store.job(victim.id)
    assert job.status == "succeeded" and job.attempts == 2, (job.status, job.error)
    first = store.attempts(victim.id)[0]
    assert first["status"] == "retried" and first["error"].startswith("worker hung: no heartbeat for ")
    assert first["finished_at"] >= stopped_at + 9  # not before its hung_after_s (from its last beat)


def test_a_retry_as_the_scheduler_stops_starts_a_new_one_instead_of_asking_the_one_that_leaves(
        store, ray_head, redis_url, namespace, tmp_path):
    """The sweep's scheduler has found nothing left to run and is stopping when a retry requeues a job: the actor
    Ray hands back under the sweep's scheduler name still answers, and then exits. start() waits it out and starts
    a new one (it used to take the leaving one for the sweep's scheduler: the requeued job stayed queued), and the
    finished stamp the leaving one wrote after the retry reopened the sweep is not what --wait reads."""
    import os
    import threading

    import ray

    from qfarm.farm import cluster, scheduler
    from qfarm.farm.cluster import RAY_NAMESPACE

    out = str(tmp_path / "out")
    job = sleep_payload(0xa0001, 0.1)
    store.submit("leaving-0001", "leaving", [job], source="leaving.yaml", output_root=out)
    cluster.connect(ray_head.address)

    @ray.remote(num_cpus=0)
    class Leaving:  # a scheduler in its last moment: it has stopped, and exits 2 s later
        def __init__(self):
            threading.Timer(2.0, os._exit, (0,)).start()

        def ping(self):
            return {"sweep_id": "leaving-0001", "state": "finished", "inflight": 0}

    leaving = Leaving.options(name=scheduler.scheduler_name(namespace, "leaving-0001"), namespace=RAY_NAMESPACE,
                              lifetime="detached").remote()
    assert ray.get(leaving.ping.remote())["state"] == "finished"
    store.mark_sweep_finished("leaving-0001")  # its last stamp, written after the retry reopened the sweep
    actor = scheduler.start("leaving-0001", redis_url, namespace, out)
    assert ray.get(actor.ping.remote())["state"] in ("starting", "running", "stopping", "finished")
    assert actor._actor_id != leaving._actor_id
    assert store.sweep("leaving-0001").finished_at is None or store.job(job["id"]).status == "succeeded"
    deadline = time.time() + 60
    while store.job(job["id"]).status != "succeeded":
        assert time.time() < deadline, store.job(job["id"])
        time.sleep(0.2)
