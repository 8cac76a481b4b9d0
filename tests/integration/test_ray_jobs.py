"""Submitting from outside the cluster: `qfarm submit --ray-address http://HEAD:8265` starts the sweep's scheduler as a
Ray Job through the dashboard's job API (no Ray driver on the client), and the sweep runs to the end with the
client gone."""

from __future__ import annotations

import time

import pytest

from tests.cli import qfarm, results

pytestmark = pytest.mark.integration


def test_a_sweep_submitted_as_a_ray_job_runs_to_the_end_without_its_client(cli_env, tmp_path, ray_head, store):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: via-jobs\njobs:\n  - {kind: sleep, seconds: 1, matrix: {index: [0, 1, 2]}}\n")
    out = qfarm(cli_env, "submit", str(spec), "--ray-address", ray_head.dashboard_url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "submitted Ray Job qfarm-via-jobs-" in out.stderr and "submitted via-jobs-" in out.stdout
    sweep = store.find_sweep("via-jobs").id  # the client has exited: the scheduler runs on the cluster
    deadline = time.time() + 180
    while time.time() < deadline and any(j.status in ("queued", "running") for j in store.sweep_jobs(sweep)):
        time.sleep(0.5)
    assert [r["status"] for r in results(cli_env, "via-jobs")] == ["succeeded"] * 3
    refused = tmp_path / "big.yaml"  # what no node has is refused from the dashboard's view of the nodes
    refused.write_text("name: too-big\nresources: {gpus: 64}\njobs:\n  - {kind: sleep, seconds: 1}\n")
    big = qfarm(cli_env, "submit", str(refused), "--ray-address", ray_head.dashboard_url)
    assert big.returncode == 2 and "GPU 64" in big.stderr, big.stderr
