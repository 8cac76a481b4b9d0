"""A killed Ray head (kill -9 of its GCS and raylet, mid-sweep) is healed with no command typed: qfarm's watchdog
sees the sweep's scheduler go silent, `qfarm resume` starts the local head again, and the sweep finishes with
its finished jobs untouched and the jobs that were running retried."""

from __future__ import annotations

import shutil
import signal
import time
import uuid

import psutil
import pytest

from tests.cli import qfarm

pytestmark = pytest.mark.integration
STALE = 6  # QFARM_WATCH_STALE_S: seconds of scheduler silence before the watchdog resumes (default 30)


def head_processes(temp_dir: str, names=("gcs_server", "raylet")) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if any(n in (p.info["name"] or "") for n in names) and temp_dir in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_a_killed_head_is_healed_and_the_sweep_finishes_with_no_command_typed(cli_env, store, tmp_path):
    temp_dir = f"/tmp/qfk-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths must stay under 107 bytes
    env = dict(cli_env, QFARM_RAY_TEMP_DIR=temp_dir, QFARM_WATCH="1", QFARM_WATCH_STALE_S=str(STALE), QFARM_WATCH_POLL_S="1")
    env.pop("QFARM_RAY_ADDRESS")  # qfarm's own local head, as a user without a cluster has
    spec = tmp_path / "naps.yaml"
    # the short job first whatever the dispatch order (longest first): the long ones come from it
    spec.write_text("name: head-loss\nresources: {gpus: 1}\nstages:\n"
                    "  - {name: first, kind: sleep, seconds: 1, matrix: {index: [0]}}\n"
                    "  - {name: then, kind: sleep, from: first, seconds: 10, matrix: {index: [1, 2]}}\n")
    try:
        out = qfarm(env, "submit", str(spec))
        assert out.returncode == 0, out.stdout + out.stderr
        sweep = store.find_sweep("head-loss").id
        deadline = time.time() + 120
        while time.time() < deadline and not sum(j.status == "running" and j.spec["options"]["index"] > 0
                                                  for j in store.sweep_jobs(sweep)) == 2:
            time.sleep(0.3)
        before = {j.id: j for j in store.sweep_jobs(sweep)}
        running = {i for i, j in before.items() if j.status == "running"}
        done = {i for i, j in before.items() if j.status == "succeeded"}
        assert len(running) == 2 and len(done) == 1, {i: j.status for i, j in before.items()}

        killed = head_processes(temp_dir)
        assert {p.info["name"] for p in killed} >= {"gcs_server", "raylet"}
        killed_at = time.time()
        for p in killed:
            p.send_signal(signal.SIGKILL)
        # no command from here on: the watchdog resumes, the local head comes back, the sweep finishes
        deadline = time.time() + 300
        while time.time() < deadline and not all(j.status == "succeeded" for j in store.sweep_jobs(sweep)):
            time.sleep(1)
        after = {j.id: j for j in store.sweep_jobs(sweep)}
        assert all(j.status == "succeeded" for j in after.values()), {i: (j.status, j.error) for i, j in after.items()}
        assert all(after[i].attempts == 2 for i in running)  # requeued once, after their workers died with the head
        assert all(after[i].attempts == 1 and after[i].finished_at == before[i].finished_at for i in done)
        restarted_s = min(after[i].started_at for i in running) - killed_at
        print(f"head killed: its jobs ran again {restarted_s:.0f} s later (silence {STALE} s + head start + "
              f"orphan requeue); the sweep finished {max(j.finished_at for j in after.values()) - killed_at:.0f} s later")
        logs = "".join(p.read_text() for p in (tmp_path / "home").glob("watch-*.log"))
        assert f"sweep {sweep}: its scheduler has been silent" in logs and "resume exited 0" in logs, logs
    finally:
        qfarm(env, "down")
        for p in head_processes(temp_dir, names=("",)):
            p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not list((tmp_path / "home").glob("watch-*.pid"))  # `qfarm down` stopped the watchdog too
