"""Submitting from outside the cluster: a sweep's scheduler started by a Ray Job (``--ray-address http://HEAD:8265``).

A laptop that reaches the cluster's dashboard (its job-submission API) and Redis, but not the GCS, cannot run a Ray
driver; ``ray://`` client mode is fragile across versions. Instead ``qfarm submit`` records the sweep in Redis as
always, then submits a small Ray Job whose entrypoint (``python -m qfarm.farm.ray_jobs SWEEP``) runs on the cluster, starts
the sweep's detached scheduler there and exits. The job's runtime_env carries this qfarm (``py_modules``: the
``qfarm`` and ``workers`` packages), which the scheduler and its workers inherit. ``qfarm status``/``results``
keep reading Redis; the client may go.

Secrets: a runtime_env is logged by Ray's agent and shown by the dashboard, so only what is no secret travels in
it (namespace, output root, and the Redis URL when it has no password). A Redis URL with a password, and
``HF_TOKEN``, come from the cluster's own nodes' environment (``cluster.yaml`` puts the URL there from a file).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid

from qfarm.errors import QfarmError

JOB_START_TIMEOUT_S = 600.0  # a fresh cluster may first have to set the runtime_env up
NODES_WAIT_S = 20.0
AGENT_WAIT_S = 60.0  # a head that has just started answers "No available agent to submit job" for a while


def is_jobs_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def nodes(address: str):
    """The cluster's alive nodes, read over the dashboard's HTTP API (no Ray driver)."""
    from ray.util.state import list_nodes

    from qfarm.farm.cluster import Node

    deadline = time.time() + NODES_WAIT_S
    while True:
        try:
            found = list_nodes(address=address, limit=10_000, raise_on_missing_output=False)
        except Exception as e:  # noqa: BLE001 - the dashboard is out of reach, or not a Ray dashboard
            raise QfarmError(f"cannot read the cluster's nodes from its dashboard at {address}: {e}") from None
        if found or time.time() > deadline:
            break
        time.sleep(1)  # a dashboard that has just started lists no node for a few seconds
    return [Node(n.node_id, {k: float(v) for k, v in (n.resources_total or {}).items()}, dict(n.labels or {}))
            for n in found if n.state == "ALIVE"]


def start_scheduler(address: str, sweep_id: str, namespace: str, redis_url: str, output_root: str, say) -> str:
    """Submit the Ray Job that starts the sweep's scheduler, and wait until it has (the job then exits)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    import qfarm
    import workers
    from qfarm.farm.connection import _redact

    env = {"QFARM_NAMESPACE": namespace, "QFARM_OUTPUT_ROOT": output_root, "RAY_USAGE_STATS_ENABLED": "0"}
    if _redact(redis_url) == redis_url:
        env["QFARM_REDIS_URL"] = redis_url
    else:
        say("qfarm: the Redis URL has a secret in it: it is not sent with the Ray Job (runtime_envs are logged); "
            "the cluster's nodes must have QFARM_REDIS_URL in their environment (cluster.yaml does)", file=sys.stderr)
    package_dirs = [os.path.dirname(qfarm.__file__), os.path.dirname(workers.__file__)]
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk"):  # not a line per uploaded package (the SDK's
        logging.getLogger(name).setLevel(logging.WARNING)          # own logger is set to INFO at its import)
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            client = JobSubmissionClient(address)
            job_id = client.submit_job(entrypoint=f"python -m qfarm.farm.ray_jobs {sweep_id}",
                                       runtime_env={"py_modules": package_dirs, "env_vars": env},
                                       submission_id=f"qfarm-{sweep_id}-{uuid.uuid4().hex[:6]}",
                                       metadata={"qfarm_sweep": sweep_id})
            break
        except Exception as e:  # noqa: BLE001 - unreachable dashboard, job API refused
            if "try again later" in str(e) and time.time() < deadline:  # its job agent is still starting
                time.sleep(2)
                continue
            raise QfarmError(f"cannot submit a Ray Job to {address}: {e}") from None
    say(f"qfarm: submitted Ray Job {job_id} to start the scheduler of {sweep_id} on the cluster", file=sys.stderr)
    deadline = time.time() + JOB_START_TIMEOUT_S
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status == JobStatus.SUCCEEDED:
            return job_id
        if status in (JobStatus.FAILED, JobStatus.STOPPED):
            tail = " | ".join(client.get_job_logs(job_id).strip().splitlines()[-5:])
            raise QfarmError(f"the Ray Job {job_id} that starts the scheduler {status.value.lower()}: {tail}")
        time.sleep(1)
    raise QfarmError(f"the Ray Job {job_id} did not start the scheduler within {JOB_START_TIMEOUT_S:.0f} s "
                     f"(`ray job logs {job_id} --address {address}`)")


def main() -> None:
    """The job's entrypoint, on the cluster: start the sweep's detached scheduler, then exit."""
    import ray

    from qfarm.farm import scheduler
    from qfarm.farm.cluster import RAY_NAMESPACE
    from qfarm.sweep import hub

    sweep_id = sys.argv[1]
    url = os.environ.get("QFARM_REDIS_URL")
    if not url:
        sys.exit("QFARM_REDIS_URL is not set on this cluster's nodes: give it to `ray start` (cluster.yaml reads it "
                 "from ~/.qfarm/redis-url), or submit with a Redis URL that has no password")
    ray.init(address="auto", namespace=RAY_NAMESPACE, log_to_driver=False)
    scheduler.start(sweep_id, url, os.environ["QFARM_NAMESPACE"], os.environ["QFARM_OUTPUT_ROOT"], hub.forwarded_env())
    print(f"started the scheduler of {sweep_id}")


if __name__ == "__main__":
    main()
