"""Results where users keep them, and a terminal that fits: live MLflow tracking from a spec and `qfarm results
--to mlflow` into real local MLflow stores (read back with MLflow's own client), `qfarm status --json`, `--watch`
in a real 80-column terminal (tmux), and shell completion of sweep names. Real Redis and a real local Ray head."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.cli import REPO, qfarm, redis_dump, submitted_id

pytestmark = pytest.mark.integration

SECRET = "mlflow-tok-4d3c2b1a-never-in-redis"


def spec(tmp_path: Path, body: str, name: str = "naps") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\n" + textwrap.dedent(body))
    return str(path)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_by_job(c, experiment_id: str) -> dict:
    return {r.data.tags["qfarm.job_id"]: r for r in c.search_runs([experiment_id], max_results=1000)}


def test_a_tracked_spec_sends_each_job_to_mlflow_as_it_finishes(cli_env, tmp_path, store):
    env = dict(cli_env, MLFLOW_TRACKING_TOKEN=SECRET)
    path = spec(tmp_path, """\
        tracking:
          mlflow: {tracking_uri: "sqlite:///tracking/mlflow.db", experiment: naps-live}
        stages:
          - {name: a, kind: sleep, seconds: 0.5, matrix: {index: [0, 1]}}
          - {name: bad, kind: sleep, seconds: 0.1, fail: true, max_attempts: 1}
          - {name: b, kind: sleep, from: a, seconds: 0.2, index: 5}
    """)
    out = qfarm(env, "submit", path, "--wait")
    assert out.returncode == 1, out.stderr[-2000:]  # one job failed on purpose
    sweep = submitted_id(out.stdout)
    jobs = {j.id: j for j in store.sweep_jobs(sweep)}
    uri = f"sqlite:///{env['QFARM_OUTPUT_ROOT']}/tracking/mlflow.db"  # relative: under the output root
    c = client(uri)
    experiment = c.get_experiment_by_name("naps-live")
    assert experiment is not None and experiment.tags["qfarm.sweep_id"] == sweep
    assert "kind: sleep" in experiment.tags["mlflow.note.content"]  # the spec, in the experiment's description
    runs = runs_by_job(c, experiment.experiment_id)
    assert set(runs) == set(jobs)  # one run per job, the failed one too
    for job_id, job in jobs.items():
        run = runs[job_id]
        assert run.info.run_name == job.spec["label"]
        assert run.info.status == ("FAILED" if job.status == "failed" else "FINISHED")
        assert run.data.params["index"] == str(job.spec["options"]["index"]) and run.data.params["kind"] == "sleep"
        assert run.data.metrics["duration_s"] == pytest.approx(job.duration_s)
        parent = job.spec.get("parent")
        # a pipeline's lineage: a job of stage b is the child run of the job it comes from
        assert run.data.tags.get("mlflow.parentRunId") == (runs[parent].info.run_id if parent else None)
        if job.status == "failed":
            assert "asked to fail" in run.data.tags["qfarm.error"]
        else:
            assert run.data.metrics["slept_s"] >= job.spec["options"]["seconds"]
    record = store.sweep(sweep)
    assert record.tracking_note.startswith(f"sent {len(jobs)} job(s) to MLflow")
    # MLflow's login went to the scheduler through Ray's object store: never into Redis
    assert SECRET not in redis_dump(store)

    # and by hand into another store: one experiment per sweep, the same runs; sending again changes nothing
    other = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    sent = qfarm(cli_env, "results", sweep, "--to", "mlflow", "--tracking-uri", other)
    assert sent.returncode == 0, sent.stderr
    assert f"sent {len(jobs)} job(s) of {sweep}" in sent.stdout and f"{len(jobs)} run(s) created" in sent.stdout
    assert f"mlflow ui --backend-store-uri {other}" in sent.stdout
    c2 = client(other)
    e2 = c2.get_experiment_by_name(sweep)
    assert set(runs_by_job(c2, e2.experiment_id)) == set(jobs)
    shown = mlflow_ui_page(other, e2.experiment_id, tmp_path)
    assert "qfarm sweep" in shown and sweep in shown and "sleep[0]" in shown and "sleep[1]" in shown  # MLflow's own UI
    again = qfarm(cli_env, "results", sweep, "--to", "mlflow", "--tracking-uri", other)
    assert "0 run(s) created, 0 updated, 5 unchanged" in again.stdout
    assert len(c2.search_runs([e2.experiment_id])) == len(jobs)

    # a job that ran again replaces its run (the old one is deleted), nothing else moves
    failed = next(j for j in jobs.values() if j.status == "failed")
    before = runs_by_job(c2, e2.experiment_id)[failed.id].info.run_id
    retried = qfarm(cli_env, "retry", sweep, "--wait")
    assert retried.returncode == 1  # it fails again, on purpose: a new attempt, a new finish time
    third = qfarm(cli_env, "results", sweep, "--to", "mlflow", "--tracking-uri", other)
    assert "1 run(s) created, 0 updated, 4 unchanged" in third.stdout, third.stdout
    now = runs_by_job(c2, e2.experiment_id)
    assert len(now) == len(jobs) and now[failed.id].info.status == "FAILED" and now[failed.id].info.run_id != before
    assert c2.get_run(before).info.lifecycle_stage == "deleted"

    # a folder, as the README offers: MLflow 3 refuses its folder store unless asked; qfarm asks, and says so
    folder = tmp_path / "mlruns-folder"
    env = {k: v for k, v in cli_env.items() if k != "MLFLOW_ALLOW_FILE_STORE"}
    to_folder = qfarm(env, "results", sweep, "--to", "mlflow", "--tracking-uri", folder.as_uri())
    assert to_folder.returncode == 0 and "internal error" not in to_folder.stderr, to_folder.stderr
    assert "opted in (MLFLOW_ALLOW_FILE_STORE=true)" in to_folder.stdout
    assert f"{len(jobs)} run(s) created" in to_folder.stdout, to_folder.stdout
    assert len(list(folder.glob("*/*/meta.yaml"))) == len(jobs)  # MLflow's folder layout: experiment/run/meta.yaml


def mlflow_ui_page(uri: str, experiment_id: str, tmp_path: Path) -> str:
    """The experiment's runs page as MLflow's own UI (`mlflow ui`) draws it in a real headless browser: its DOM once
    the page's scripts ran (a screenshot beside it in tmp_path)."""
    import signal
    import socket
    import urllib.request

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("this test opens MLflow's UI in Debian's chromium: `make test` installs it", pytrace=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "mlflow-ui.log", "w"),
                              start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow ui did not start"
                time.sleep(1)
        page = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        browser = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1500,900",
                   "--virtual-time-budget=20000"]
        subprocess.run(browser + [f"--screenshot={tmp_path / 'mlflow.png'}", page], capture_output=True, timeout=120)
        dom = subprocess.run(browser + ["--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
        (tmp_path / "mlflow.html").write_text(dom)
        return dom
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_a_tracking_server_that_is_away_fails_no_job(cli_env, tmp_path, store):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = spec(tmp_path, f"""\
        tracking:
          mlflow: {{tracking_uri: "http://user:pw-77@127.0.0.1:{port}"}}
        jobs:
          - {{kind: sleep, seconds: 0.2, matrix: {{index: [0, 1]}}}}
    """, name="away")
    out = qfarm(cli_env, "submit", path, "--wait")
    assert out.returncode == 0, out.stderr[-2000:]
    sweep = submitted_id(out.stdout)
    assert all(j.status == "succeeded" for j in store.sweep_jobs(sweep))
    note = store.sweep(sweep).tracking_note
    assert note.startswith("MLflow tracking failed") and "pw-77" not in note and "pw-77" not in out.stderr
    status = qfarm(cli_env, "status", sweep, "--wide")
    assert "MLflow: MLflow tracking failed" in status.stdout
    events = store.r.xrange(store.keys.events())
    assert any(e.get("event") == "tracking_failed" and e.get("sweep") == sweep for _, e in events)


def test_tracking_settings_are_checked_before_anything_runs(cli_env, tmp_path):
    for uri, said in (("/var/lib/mlflow.db", "absolute paths are given on the command line"),
                      ("sqlite:///../../escape.db", "without '..'"), ("ftp://host/x", "scheme 'ftp' is not allowed")):
        path = spec(tmp_path, f"""\
            tracking:
              mlflow: {{tracking_uri: "{uri}"}}
            jobs:
              - {{kind: sleep, seconds: 0.1}}
        """, name="bad-track")
        out = qfarm(cli_env, "validate", path, "--offline")
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert f"{path}:3: tracking.mlflow.tracking_uri: " in out.stderr and said in out.stderr, out.stderr
    misuse = qfarm(cli_env, "results", "any-sweep", "--tracking-uri", "http://h:5000")
    assert misuse.returncode == 2 and "go with --to mlflow" in misuse.stderr


def test_status_json_watch_in_80_columns_and_completion(cli_env, tmp_path, store):
    if shutil.which("tmux") is None:
        pytest.fail("this test drives a real terminal with tmux: apt-get install tmux (make test does)", pytrace=False)
    name = "status-of-a-sweep-with-a-long-name"
    path = spec(tmp_path, """\
        jobs:
          - {kind: sleep, seconds: 4, matrix: {index: [0, 1, 2]}}
    """, name=name)
    out = qfarm(cli_env, "submit", path)
    assert out.returncode == 0, out.stderr
    sweep = submitted_id(out.stdout)

    session = f"qfarm-watch-{os.getpid()}"
    log = tmp_path / "watch.exit"
    command = (" ".join(f"{k}={v}" for k, v in cli_env.items() if k.startswith(("QFARM_", "PYTHON")))
               + f" {sys.executable} -m qfarm.cli status {sweep} --watch --interval 0.3; echo exit=$? > {log}")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "50", "-c", str(REPO), command],
                   check=True, env=cli_env)
    screens = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not log.exists():
            shot = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True)
            if shot.returncode == 0:
                screens.append(shot.stdout)
            time.sleep(0.25)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert log.exists() and log.read_text().strip() == "exit=0"  # --watch returns once every job is done
    running = [s for s in screens if "running" in s and "sleep[" in s]
    assert running, screens[-1:]
    shown = running[0]
    assert sweep in shown and "ETA" in shown
    assert "/#/actors/" in "".join(running)  # each running job's worker on the Ray dashboard
    assert all(len(line) <= 80 for s in screens for line in s.splitlines())
    assert all(f"sleep[{i}]" in shown for i in range(3))  # job labels whole, never cut

    one = json.loads(qfarm(cli_env, "status", sweep, "--json").stdout)
    assert one["sweep_id"] == sweep and one["counts"]["succeeded"] == 3 and one["eta_s"] == 0
    assert one["dashboard_url"] and {j["status"] for j in one["jobs"]} == {"succeeded"}
    every = json.loads(qfarm(cli_env, "status", "--json").stdout)
    assert {"sweep_id": sweep, "jobs": 3, "succeeded": 3}.items() <= next(s for s in every if s["sweep_id"] == sweep).items()

    # the sweeps list in an 80-column terminal: the name whole, the counts beside it (COLUMNS as a terminal sets it)
    listing = subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "50", "-c", str(REPO),
                              " ".join(f"{k}={v}" for k, v in cli_env.items() if k.startswith("QFARM_"))
                              + f" {sys.executable} -m qfarm.cli status; sleep 5"], env=cli_env)
    assert listing.returncode == 0
    time.sleep(3)
    screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
    subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    line = next(x for x in screen.splitlines() if sweep in x)
    cells = [c.strip() for c in line.strip("│ ").split("│")]
    assert cells[:3] == [sweep, "3", "3"], screen  # the id whole, then jobs and succeeded

    # shell completion of sweep names, from Redis
    comp = subprocess.run([sys.executable, "-m", "qfarm.cli"], env=dict(cli_env, _QFARM_COMPLETE="bash_complete",
                          COMP_WORDS=f"qfarm status {name[:12]}", COMP_CWORD="2"), capture_output=True, text=True)
    assert f"plain,{sweep}" in comp.stdout.splitlines() and f"plain,{name}" in comp.stdout.splitlines()
    script = qfarm(cli_env, "completion", "bash")
    assert script.returncode == 0 and "_QFARM_COMPLETE" in script.stdout
