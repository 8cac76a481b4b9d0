"""A real cluster's shape, on loopback: node types the autoscaler may start count as capacity, and pools of
different resource shapes share the cluster instead of deadlocking on it.

The autoscaler is played by the test: qfarm is given the cluster's config (a node type with ``min_workers: 0``,
custom resources and the ``qfarm-gpu-mem-gb`` label); its sweep is accepted although no node of that type is
alive, its demand is a pending actor in the GCS (where Ray's autoscaler reads demand), and once the test starts a
raylet of that type (`ray start --address ... --resources ... --labels ...`) the jobs run there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.cli import qfarm, results
from tests.integration.test_multinode import nodes

pytestmark = pytest.mark.integration

BIG = {"CPU": 2, "gpu_big": 1}


def cluster_config(path, **types):
    config = {"cluster_name": "t", "max_workers": 4, "provider": {"type": "local", "head_ip": "127.0.0.1"},
              "head_node_type": "head", "available_node_types": {"head": {"resources": {"CPU": 2}, "node_config": {}}}}
    for name, (resources, labels) in types.items():
        config["available_node_types"][name] = {"min_workers": 0, "max_workers": 1, "resources": resources,
                                                "labels": labels, "node_config": {}}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def lone_head(tmp_path, monkeypatch):
    from qfarm.farm.cluster import start_local_head, stop_local_head

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")  # a head that other nodes may join
    temp = f"/tmp/qfarm-as-{os.getpid()}"
    head = start_local_head(temp_dir=temp, log_path=str(tmp_path / "head.log"), num_gpus=0, num_cpus=2)
    extra = []
    yield head, extra
    for pid in extra:
        stop_local_head(pid)
    stop_local_head(head.pid)
    subprocess.run(["rm", "-rf", temp], check=False)


def pending_demand(address: str) -> list[dict]:
    """The resource requests the GCS holds for the autoscaler: what Ray's autoscaler reads to start nodes."""
    code = ("import json; from ray._raylet import GcsClient; "
            "from ray.autoscaler.v2.sdk import get_cluster_resource_state; "
            "state = get_cluster_resource_state(GcsClient(address=%r)); "
            "print(json.dumps([dict(r.request.resources_bundle) for r in state.pending_resource_requests]))")
    out = subprocess.run([sys.executable, "-c", code % address], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_node_type_the_autoscaler_may_start_is_capacity_and_its_jobs_run_when_it_comes(cli_env, tmp_path,
                                                                                         lone_head, store):
    from qfarm.farm.cluster import ray_env

    head, extra = lone_head
    config = cluster_config(tmp_path / "cluster.yaml", big=(BIG, {"qfarm-gpu-mem-gb": "80"}))
    env = dict(cli_env, QFARM_RAY_ADDRESS=head.address)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: autoscaled\njobs:\n  - kind: sleep\n    seconds: 0.5\n"
                    "    resources: {gpus: 0, cpus: 1, custom: {gpu_big: 1}, min_gpu_mem_gb: 40}\n"
                    "    matrix: {index: [0, 1]}\n")
    refused = qfarm(env, "validate", str(spec))  # the live cluster alone has no gpu_big
    assert refused.returncode == 2 and "gpu_big 1" in refused.stderr, refused.stderr
    ok = qfarm(env, "validate", str(spec), "--cluster-config", str(config))
    assert ok.returncode == 0 and "1 node type(s) its autoscaler may start" in ok.stdout, ok.stdout + ok.stderr
    huge = tmp_path / "huge.yaml"
    huge.write_text(spec.read_text().replace("gpu_big: 1", "gpu_huge: 1").replace("autoscaled", "huge"))
    no_type = qfarm(env, "validate", str(huge), "--cluster-config", str(config))
    assert no_type.returncode == 2 and "node type big (the autoscaler may start it): CPU 2, gpu_big 1, 80 GB per GPU" \
        in no_type.stderr, no_type.stderr

    out = qfarm(env, "submit", str(spec), "--cluster-config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    sweep = store.find_sweep("autoscaled").id
    deadline = time.time() + 60
    while time.time() < deadline and not any(b.get("gpu_big") == 1 for b in pending_demand(head.address)):
        time.sleep(1)
    demand = pending_demand(head.address)
    assert any(b.get("gpu_big") == 1 for b in demand), f"no demand the autoscaler would see: {demand}"
    status = qfarm(env, "status", sweep)
    assert "waiting for capacity: a worker with CPU 1, gpu_big 1" in " ".join(status.stdout.split()), status.stdout
    assert all(j.status == "queued" for j in store.sweep_jobs(sweep))

    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")  # the autoscaler, played: a node of type big
    with open(tmp_path / "big.log", "wb") as log:
        node = subprocess.Popen([ray_bin, "start", f"--address={head.address}", "--node-ip-address=127.0.0.1",
                                 "--num-cpus=2", "--num-gpus=0", f"--resources={json.dumps({'gpu_big': 1})}",
                                 "--labels=qfarm-gpu-mem-gb=80", "--block", "--disable-usage-stats"], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env=ray_env(local=True))
    extra.append(node.pid)
    deadline = time.time() + 180
    while time.time() < deadline and any(j.status in ("queued", "running") for j in store.sweep_jobs(sweep)):
        time.sleep(1)
    rows = results(env, "autoscaled")
    big = next(n["id"] for n in nodes(head.address) if "gpu_big" in n["res"])
    assert [r["status"] for r in rows] == ["succeeded"] * 2, rows
    assert all(big.startswith(r["node"]) for r in rows)  # on the node that came up, found by its label


def test_shapes_share_the_cluster_and_a_worker_that_never_starts_is_given_up(cli_env, tmp_path, store):
    """On 2 logical GPUs: stage a's two 1-GPU workers hold both; stage b needs 2 GPUs, stage c 1 again. Idle
    workers are reaped for the starved shape (the events say so), and the pipeline completes. A worker whose shape
    only a node type that never comes up has is killed after start_timeout_s, and its job fails saying so."""
    config = cluster_config(tmp_path / "cluster.yaml", never=({"CPU": 2, "never_res": 1}, {}))
    spec = tmp_path / "shapes.yaml"
    spec.write_text("name: shapes\njobs:\n"
                    "  - {name: a, kind: sleep, seconds: 1, resources: {gpus: 1}, matrix: {index: [0, 1]}}\n"
                    "  - {name: b, kind: sleep, from: a, seconds: 0.5, resources: {gpus: 2}}\n"
                    "  - {name: c, kind: sleep, from: b, seconds: 0.5, resources: {gpus: 1}}\n"
                    "  - {name: never, kind: sleep, seconds: 0.5, start_timeout_s: 5,\n"
                    "     resources: {gpus: 0, custom: {never_res: 1}}}\n")
    out = qfarm(cli_env, "submit", str(spec), "--wait", "--cluster-config", str(config), timeout=300)
    rows = results(cli_env, "shapes")
    assert sorted(r["stage"] for r in rows) == ["a", "a", "b", "b", "c", "c", "never"]
    assert all(r["status"] == "succeeded" for r in rows if r["stage"] != "never"), rows
    assert out.returncode == 1  # the never-startable job failed (exit 1), nothing else did
    (never,) = [r for r in rows if r["stage"] == "never"]
    assert never["status"] == "failed" and "started within 5 s (start_timeout_s)" in never["error"], never
    sweep = store.find_sweep("shapes").id
    events = [f for _, f in store.r.xrange(store.keys.events()) if f.get("sweep") == sweep]
    reaped = [e for e in events if e.get("event") == "worker_reaped"]
    assert any("GPU 2" in e["why"] and "waits for capacity" in e["why"] for e in reaped), events
    assert any(e.get("event") == "worker_start_timeout" and "never_res 1" in e["shape"] for e in events), events
    by_id = {r["job_id"]: r for r in rows}
    for r in rows:  # each child started after its parent finished
        if r.get("parent"):
            assert r["started_at"] >= by_id[r["parent"]]["finished_at"]


def test_a_sweep_waits_for_room_another_sweep_holds_instead_of_failing_at_start_timeout(cli_env, tmp_path, store):
    """Two sweeps on one cluster of 2 GPU slots: the first holds both for longer than the second's start_timeout_s.
    The second's worker is not failed as "no node could hold one" (a node can: it is busy); it waits, says so in
    the events, and runs when the room frees."""
    hog = tmp_path / "hog.yaml"
    hog.write_text("name: hog\njobs:\n"
                   "  - {kind: sleep, seconds: 8, resources: {gpus: 1}, matrix: {index: [0, 1]}}\n")
    patient = tmp_path / "patient.yaml"
    patient.write_text("name: patient\njobs:\n"
                       "  - {kind: sleep, seconds: 0.2, start_timeout_s: 2, resources: {gpus: 1}}\n")
    assert qfarm(cli_env, "submit", str(hog)).returncode == 0
    deadline = time.time() + 120
    while not any(r["status"] == "running" for r in results(cli_env, "hog")) and time.time() < deadline:
        time.sleep(0.5)
    out = qfarm(cli_env, "submit", str(patient), "--wait", timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    while any(r["status"] in ("queued", "running") for r in results(cli_env, "hog")) and time.time() < deadline:
        time.sleep(0.5)
    hogs, (mine,) = results(cli_env, "hog"), results(cli_env, "patient")
    assert [r["status"] for r in hogs] == ["succeeded"] * 2 and mine["status"] == "succeeded", (hogs, mine)
    assert mine["started_at"] >= min(r["finished_at"] for r in hogs)  # it ran once the room was free
    sweep = store.find_sweep("patient").id
    events = [f for _, f in store.r.xrange(store.keys.events()) if f.get("sweep") == sweep]
    assert any(e.get("event") == "worker_waits_for_capacity" for e in events), events
    assert not any(e.get("event") == "worker_start_timeout" for e in events), events
