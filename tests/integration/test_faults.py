"""Faults injected for real: a Redis server killed with -9 mid-sweep and restarted from its append-only file."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.test_farm import spec
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
    from qfarm.connection import connect_redis
    from qfarm.store import Store

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
