"""Two Ray nodes on this machine, tagged with different GPU-type resources: jobs land where their tags say.

A head with `gpu_h100: 2` (labelled as having 80 GB GPUs) and a second node (`ray start --address`) with
`gpu_a10: 1` (24 GB GPUs), both real raylets. The sweep's jobs name a custom resource, or a least GPU memory; the
node id each attempt recorded must be the node that has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.cli import qfarm, results
from tests.integration.test_farm import spec

pytestmark = pytest.mark.integration


def nodes(address: str) -> list[dict]:
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], 'res': n['Resources']} for n in ray.nodes()]))")
    out = subprocess.run([sys.executable, "-c", code % address], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled"))
    assert out.returncode == 0, out.stderr[-2000:]
    return [n for n in json.loads(out.stdout.strip().splitlines()[-1]) if n["alive"]]


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    from qfarm.farm.cluster import ray_env, start_local_head, stop_local_head

    # a head that accepts other nodes: qfarm's single-node head sets this to 0, which makes `ray start --address`
    # refuse to join ("Multi-node Ray clusters are not supported")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    temp = f"/tmp/qfarm-mn-{os.getpid()}"
    head = start_local_head(temp_dir=temp, log_path=str(tmp_path / "head.log"), num_gpus=0, num_cpus=2,
                            resources={"gpu_h100": 2}, labels={"qfarm-gpu-mem-gb": "80"})
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    with open(tmp_path / "node2.log", "wb") as log:
        node2 = subprocess.Popen([ray_bin, "start", f"--address={head.address}", "--node-ip-address=127.0.0.1",
                                  "--num-cpus=2", "--num-gpus=0", '--resources={"gpu_a10": 1}', "--block",
                                  "--labels=qfarm-gpu-mem-gb=24",
                                  "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, env=ray_env(local=True))
    try:
        deadline = time.time() + 90
        while time.time() < deadline and len(nodes(head.address)) < 2:
            time.sleep(1)
        yield head
    finally:
        stop_local_head(node2.pid)
        stop_local_head(head.pid)
        subprocess.run(["rm", "-rf", temp], check=False)


def test_jobs_land_on_the_node_with_their_gpu_type(cli_env, tmp_path, two_nodes):
    by_resource = {}
    for n in nodes(two_nodes.address):
        for r in ("gpu_h100", "gpu_a10"):
            if r in n["res"]:
                by_resource[r] = n["id"]
    assert set(by_resource) == {"gpu_h100", "gpu_a10"} and by_resource["gpu_h100"] != by_resource["gpu_a10"]
    env = dict(cli_env, QFARM_RAY_ADDRESS=two_nodes.address)
    path = spec(tmp_path, """\
        jobs:
          - {kind: sleep, seconds: 0.5, resources: {gpus: 0, cpus: 0.5, custom: {gpu_h100: 1}}, matrix: {index: [0, 1, 2]}}
          - {kind: sleep, seconds: 0.5, resources: {gpus: 0, cpus: 0.5, custom: {gpu_a10: 1}}, matrix: {index: [10, 11]}}
          - {kind: sleep, seconds: 0.5, resources: {gpus: 0, cpus: 0.5, min_gpu_mem_gb: 40}, matrix: {index: [20, 21, 22]}}
    """, name="placed")
    checked = qfarm(env, "validate", path)
    assert checked.returncode == 0 and "checked against the Ray cluster" in checked.stdout, checked.stdout + checked.stderr
    out = qfarm(env, "submit", path, "--wait", timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {r["index"]: r for r in results(env, "placed")}
    assert all(by_resource["gpu_h100"].startswith(rows[i]["node"]) for i in (0, 1, 2))  # a 12-char node id prefix
    assert all(by_resource["gpu_a10"].startswith(rows[i]["node"]) for i in (10, 11))
    assert all(by_resource["gpu_h100"].startswith(rows[i]["node"]) for i in (20, 21, 22))  # only it has 40+ GB
    # and a job needing a GPU type no node has is refused before anything runs, naming what the cluster has
    bad = spec(tmp_path, "jobs:\n  - {kind: sleep, resources: {gpus: 0, custom: {gpu_b200: 1}}}\n", name="nowhere")
    out = qfarm(env, "submit", bad)
    assert out.returncode == 2 and "gpu_b200" in out.stderr and "gpu_h100" in out.stderr, out.stderr
    # ... and already at validate time, when validate is given the cluster
    big = spec(tmp_path, "jobs:\n  - {kind: sleep, resources: {gpus: 0, min_gpu_mem_gb: 100}}\n", name="toobig")
    out = qfarm(env, "validate", big)
    assert out.returncode == 2 and "GPUs of at least 100 GB" in out.stderr, out.stdout + out.stderr
    assert "80 GB per GPU" in out.stderr and "24 GB per GPU" in out.stderr  # what the cluster has
    offline = qfarm(dict(env, QFARM_RAY_ADDRESS=""), "validate", big, "--offline")
    assert offline.returncode == 0 and "not checked" in offline.stdout, offline.stdout + offline.stderr
