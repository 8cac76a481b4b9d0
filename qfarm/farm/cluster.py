"""Ray: connecting to a cluster, the embedded local head, and what a job's resources mean to Ray.

With no ``--ray-address`` / ``QFARM_RAY_ADDRESS``, qfarm uses a local Ray head that it starts itself (``ray start
--head --block`` in its own session, bound to 127.0.0.1) and keeps running between commands, so a sweep
submitted without ``--wait`` goes on after the client exits. On a machine without a GPU that head declares
logical GPU slots (``--logical-gpus``, default 2), so the same GPU-tagged scheduling runs on the CPU.
``qfarm down`` stops it. Ray is imported only by the commands that need it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qfarm import settings
from qfarm.errors import QfarmError, UsageError
from qfarm.farm.connection import data_dir
from qfarm.sweep.job import as_job

RAY_NAMESPACE = "qfarm"
DEFAULT_LOGICAL_GPUS = 2
LOCAL_HEAD_PORT = 6390  # not Ray's default 6379, which is Redis's port too


def ray_env(local: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # `python` on the node is the interpreter Ray runs in (a Ray Job's entrypoint, `python -m qfarm.farm.ray_jobs`, is run
    # by a shell), not whatever comes first on PATH
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    if local:
        # Keeps every Ray service of a single-node head on 127.0.0.1 (--node-ip-address alone did not).
        env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        loopback_auth(env)
    return env


def loopback_auth(env) -> None:
    """A head bound to 127.0.0.1 is reachable by this machine's users only; Ray's token auth would switch on by
    itself for it as soon as any earlier ``ray.init()`` left a ~/.ray/auth_token behind, and then refuse every
    driver that was not told the mode. Say the mode instead of letting a stray file decide."""
    env.setdefault("RAY_AUTH_MODE", "disabled")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(address: str, timeout_s: float = 0.5) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout_s).close()
        return True
    except OSError:
        return False


def cuda_gpu_count() -> int:
    """GPUs nvidia-smi sees (without importing torch): 0 on a machine without NVIDIA GPUs."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


@dataclass(frozen=True)
class LocalHead:
    address: str
    pid: int
    temp_dir: str
    dashboard_url: str
    log_path: str
    num_gpus: int | None = None  # as declared; None = Ray's own detection


def start_local_head(*, temp_dir: str, log_path: str, port: int | None = None, num_gpus: int | None = None,
                     num_cpus: int | None = None, resources: dict | None = None, dashboard_port: int | None = None,
                     labels: dict[str, str] | None = None, wait_s: float = 90.0) -> LocalHead:
    """Start ``ray start --head --block`` in a new session on 127.0.0.1 and wait until it accepts drivers."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_bin is None:
        raise QfarmError("the `ray` command is missing; install qfarm with its dependencies (pip install -e .)")
    port = port if port and _port_free(port) else _free_port()
    dashboard_port = dashboard_port if dashboard_port and _port_free(dashboard_port) else _free_port()
    # the dashboard agent (it runs Ray Jobs) on a free port: at Ray's fixed default, a second Ray on the machine
    # finds it taken, and that head then refuses every job ("No available agent to submit job")
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
           f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"]
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    if labels:
        cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=ray_env(local=True))
    address = f"127.0.0.1:{port}"
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise QfarmError(f"`ray start` exited with code {proc.returncode}; see {log_path}")
        if _answers(address) and _raylet_up(temp_dir):
            return LocalHead(address, proc.pid, temp_dir, f"http://127.0.0.1:{dashboard_port}", log_path, num_gpus)
        time.sleep(0.2)
    stop_local_head(proc.pid)
    raise QfarmError(f"the local Ray head did not come up within {wait_s:.0f} s; see {log_path}")


def _raylet_up(temp_dir: str) -> bool:
    return any(Path(temp_dir).glob("session_*/sockets/raylet"))


def stop_local_head(pid: int, grace_s: float = 8.0) -> None:
    """Stop one local head and everything it started (its whole session), leaving any other Ray alone."""
    import psutil

    def members() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == pid:
                    out.append(p)
            except (OSError, psutil.Error):
                continue
        return out

    for p in members():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in members()):
        time.sleep(0.2)
    for p in members():
        try:
            p.kill()
        except psutil.Error:
            pass


# --- the embedded default ---------------------------------------------------------------------------


def _state_file() -> Path:
    return data_dir() / "ray-head.json"


def local_head_state() -> dict | None:
    try:
        state = json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(state["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return None
    return state if _answers(state["address"]) else None


HEAD_LOCK_WAIT_S = 180.0  # another client starting the head holds the lock at most ~its 90 s start timeout


def ensure_local_head(logical_gpus: int | None, say) -> str:
    """The address of qfarm's local Ray head, starting it if it is not running. One head per machine (per
    QFARM_HOME): starting it takes a file lock, and a client that finds the lock taken waits for the head the
    other one is starting and uses it."""
    state = local_head_state()
    if state:
        return state["address"]
    with _head_lock(say):
        state = local_head_state()  # another client started it while this one waited for the lock
        if state:
            say(f"qfarm: using the local Ray head another qfarm client just started ({state['address']})",
                file=sys.stderr)
            return state["address"]
        return _start_embedded_head(logical_gpus, say)


@contextlib.contextmanager
def _head_lock(say):
    import fcntl

    path = data_dir() / "ray-head.lock"
    with open(path, "a") as f:
        deadline, told = time.time() + HEAD_LOCK_WAIT_S, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    raise QfarmError(f"another qfarm client has been starting the local Ray head for more than "
                                     f"{HEAD_LOCK_WAIT_S:.0f} s (it holds {path}); see {data_dir() / 'ray-head.log'}")
                if not told:
                    say("qfarm: another qfarm client is starting the local Ray head; waiting for it", file=sys.stderr)
                    told = True
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _start_embedded_head(logical_gpus: int | None, say) -> str:
    gpus = cuda_gpu_count()
    num_gpus = None if gpus else (logical_gpus if logical_gpus is not None else DEFAULT_LOGICAL_GPUS)
    folder = data_dir()
    temp_dir = settings.get("QFARM_RAY_TEMP_DIR") or f"/tmp/qfarm-ray-{os.getuid()}"
    what = f"{gpus} GPU(s)" if gpus else f"{num_gpus} logical GPU slot(s), no CUDA GPU found"
    say(f"qfarm: starting a local Ray head on 127.0.0.1 ({what}); `qfarm down` stops it", file=sys.stderr)
    t0 = time.time()
    head = start_local_head(temp_dir=temp_dir, log_path=str(folder / "ray-head.log"), port=LOCAL_HEAD_PORT,
                            num_gpus=num_gpus, dashboard_port=8265)
    tmp = _state_file().with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"address": head.address, "pid": head.pid, "dashboard": head.dashboard_url,
                               "temp_dir": temp_dir, "started_at": time.time()}))
    os.replace(tmp, _state_file())  # a client reading it never sees half a file
    say(f"qfarm: Ray is up in {time.time() - t0:.1f} s; dashboard {head.dashboard_url}", file=sys.stderr)
    return head.address


def stop_embedded_head() -> bool:
    state = local_head_state()
    if not state:
        return False
    stop_local_head(int(state["pid"]))
    _state_file().unlink(missing_ok=True)
    return True


def connect(address: str | None, logical_gpus: int | None = None, say=print) -> str:
    """ray.init against ``address`` (or the embedded local head). Returns the address used."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("QFARM_RAY_ADDRESS")
    if not address:
        address = ensure_local_head(logical_gpus, say)
    if address.split(":")[0] in ("127.0.0.1", "localhost"):
        # Without this the driver announces the interface address and waits for a GCS there (see ray_env).
        # Ray reads it at import time, so it is set before the import below.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        loopback_auth(os.environ)
    import ray

    if ray.is_initialized():
        return address
    try:
        ray.init(address=address, namespace=RAY_NAMESPACE, logging_level=logging.ERROR, log_to_driver=False,
                 configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise QfarmError(f"cannot connect to Ray at {address}: {e}") from None
    return address


# --- resources -------------------------------------------------------------------------------------


# GiB of one GPU, by Ray's accelerator type (the ``accelerator_type:X`` resource Ray gives a GPU node). A node can
# say it itself with the label ``qfarm-gpu-mem-gb`` (`ray start --labels qfarm-gpu-mem-gb=80`, see cluster.yaml),
# which wins: an A100 may have 40 or 80 GB.
GPU_MEMORY_GB: dict[str, float] = {
    "B300": 288, "B200": 180, "H200": 141, "RTX-PRO-6000": 96, "H100": 80, "A100-80G": 80, "A100": 40,
    "A100-40G": 40, "L40S": 48, "A10G": 24, "L4": 24, "V100": 16, "T4": 16, "P100": 16,
}
GPU_MEM_LABEL = "qfarm-gpu-mem-gb"


@dataclass(frozen=True)
class Node:
    id: str
    resources: dict[str, float]
    labels: dict[str, str]
    node_type: str | None = None  # set for a node the autoscaler may start (NodeType), not one alive now

    @property
    def gpu_mem_gb(self) -> float | None:
        """GiB of one of its GPUs: its qfarm-gpu-mem-gb label, else what its accelerator type is known to have."""
        try:
            return float(self.labels[GPU_MEM_LABEL])
        except (KeyError, ValueError):
            pass
        kinds = [k.split(":", 1)[1] for k in self.resources if k.startswith("accelerator_type:")]
        return next((GPU_MEMORY_GB[k] for k in kinds if k in GPU_MEMORY_GB), None)

    @property
    def cuda(self) -> bool:
        """Whether its GPUs are real NVIDIA ones (Ray names their type), not logical slots of a CPU machine."""
        return any(k.startswith("accelerator_type:") for k in self.resources) or GPU_MEM_LABEL in self.labels

    @property
    def name(self) -> str:
        return next((k.split(":", 1)[1] for k in self.resources if k.startswith("node:") and "internal" not in k),
                    self.id[:12])


def cluster_nodes(node_types: list[dict] | None = None) -> list[Node]:
    """The nodes alive now, and (``node_types``: ``NodeType.as_dict()``) every node the autoscaler may start."""
    import ray

    alive = [Node(n["NodeID"], dict(n["Resources"]), dict(n.get("Labels") or {})) for n in ray.nodes() if n.get("Alive")]
    return alive + startable_nodes(node_types or [])


# --- node types the autoscaler may start -----------------------------------------------------------

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the cluster's config on its head
UNDECLARED_CPU = 1024.0  # a node type that declares no CPU count gets Ray's detected one: plenty, for planning


@dataclass(frozen=True)
class NodeType:
    """A node type of a Ray cluster launcher config (``available_node_types``) that the autoscaler may start."""

    name: str
    resources: dict[str, float]
    labels: dict[str, str]
    max_workers: int

    def as_dict(self) -> dict:
        return {"name": self.name, "resources": self.resources, "labels": self.labels, "max_workers": self.max_workers}


def node_types_of(config: dict) -> list[NodeType]:
    """The worker node types of a cluster launcher config: the head's own type is alive already, or not at all."""
    types = config.get("available_node_types") if isinstance(config, dict) else None
    if not isinstance(types, dict):
        raise UsageError("the cluster config has no available_node_types: give the file `ray up` starts the "
                         "cluster from (cluster.yaml)")
    cap = int(config.get("max_workers", 10**6))
    out = []
    for name, t in types.items():
        if name == config.get("head_node_type") or not isinstance(t, dict):
            continue
        resources = {str(k): float(v) for k, v in (t.get("resources") or {}).items()}
        resources.setdefault("CPU", UNDECLARED_CPU)
        labels = {str(k): str(v) for k, v in (t.get("labels") or {}).items()}
        out.append(NodeType(str(name), resources, labels, min(int(t.get("max_workers", cap)), cap)))
    return out


def read_node_types(path: str | None) -> list[NodeType]:
    """Node types from ``path`` (--cluster-config), else from the config `ray up` left on this head, else none."""
    import yaml

    found = Path(path).expanduser() if path else Path(BOOTSTRAP_CONFIG).expanduser()
    if not path and not found.is_file():
        return []
    try:
        config = yaml.safe_load(found.read_text()[:1_000_000])
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read the cluster config {found}: {one_line_text(e)}") from None
    return node_types_of(config)


def one_line_text(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def startable_nodes(node_types: list[dict]) -> list[Node]:
    """One planned ``Node`` per node the autoscaler may start (``max_workers`` of each type)."""
    return [Node(f"{t['name']}#{i}", dict(t["resources"]), dict(t.get("labels") or {}), t["name"])
            for t in node_types for i in range(max(int(t.get("max_workers", 0)), 0))]


def eligible(resources: dict[str, Any], nodes: list[Node]) -> list[Node]:
    """The nodes whose GPUs have the memory a job asks for (``min_gpu_mem_gb``); every node when it asks none."""
    least = resources.get("min_gpu_mem_gb")
    if not least:
        return nodes
    return [n for n in nodes if (n.gpu_mem_gb or 0) >= least]


def ray_options(resources: dict[str, Any], nodes: list[Node] | None = None) -> dict[str, Any]:
    """A job's ``resources:`` as Ray actor options. ``min_gpu_mem_gb`` pins it to the nodes that have it."""
    opts: dict[str, Any] = {"num_gpus": resources.get("gpus", 0), "num_cpus": resources.get("cpus", 1)}
    if resources.get("gpu_type"):
        opts["accelerator_type"] = resources["gpu_type"]
    if resources.get("custom"):
        opts["resources"] = dict(resources["custom"])
    if resources.get("min_gpu_mem_gb") and nodes is not None:
        opts["label_selector"] = gpu_mem_selector(eligible(resources, nodes))
    return opts


def gpu_mem_selector(nodes: list[Node]) -> dict[str, str]:
    """A Ray label selector for the nodes with enough GPU memory. On the ``qfarm-gpu-mem-gb`` label's values when
    every such node carries it, so a node that joins later (an autoscaled one) is eligible too; nodes known only by
    their accelerator type are pinned by id (alive ones only: label such node types to autoscale them)."""
    if nodes and all(GPU_MEM_LABEL in n.labels for n in nodes):
        values = sorted({n.labels[GPU_MEM_LABEL] for n in nodes}, key=float)
        return {GPU_MEM_LABEL: f"in({','.join(values)})"}
    ids = ",".join(n.id for n in nodes if n.node_type is None) or "none"
    return {"ray.io/node-id": f"in({ids})"}


def needs(resources: dict[str, Any]) -> dict[str, float]:
    """The Ray resource amounts one job holds while it runs."""
    out = {"GPU": float(resources.get("gpus", 0)), "CPU": float(resources.get("cpus", 1))}
    if resources.get("gpu_type"):
        out[f"accelerator_type:{resources['gpu_type']}"] = 0.001
    out.update({k: float(v) for k, v in (resources.get("custom") or {}).items()})
    return {k: v for k, v in out.items() if v > 0}


def slots(resources: dict[str, Any], nodes: list[Node]) -> int:
    """How many jobs of this shape the cluster can run at once."""
    need = needs(resources)
    total = 0
    for node in eligible(resources, nodes):
        have = node.resources
        fits = [int(have.get(k, 0) // v) if v >= 0.01 else (1_000_000 if have.get(k, 0) > 0 else 0)
                for k, v in need.items()]
        total += min(fits) if fits else 1_000_000
    return total


def describe_nodes(nodes: list[Node]) -> str:
    parts, typed = [], {}
    for node in nodes:
        if node.node_type:
            typed[node.node_type] = typed.get(node.node_type, 0) + 1
            if typed[node.node_type] > 1:
                continue
        res = ", ".join(f"{k} {v:g}" for k, v in sorted(node.resources.items())
                        if not k.startswith("node:") and k not in ("memory", "object_store_memory")
                        and not (k == "CPU" and v == UNDECLARED_CPU))
        mem = f", {node.gpu_mem_gb:g} GB per GPU" if node.gpu_mem_gb else ""
        name = f"node type {node.node_type} (the autoscaler may start it)" if node.node_type else node.name
        parts.append(f"{name}: {res}{mem}")
    return "; ".join(parts) or "no alive nodes"


def has_cuda(nodes: list[Node]) -> bool:
    """Whether any of ``nodes`` has CUDA GPUs (Ray names their accelerator type, or a label says their memory),
    not just logical GPU slots."""
    return any(n.cuda and n.resources.get("GPU", 0) > 0 for n in nodes)


def cuda_refusal(jobs: list[dict], nodes: list[Node]) -> str | None:
    """Why jobs that need real CUDA GPUs (``eval.engine: vllm``) cannot run on these nodes, or None."""
    labels = sorted({j.label for j in map(as_job, jobs) if j.evaluation is not None and j.evaluation.engine == "vllm"})
    if not labels or has_cuda(nodes):
        return None
    return (f"eval.engine: vllm runs on CUDA GPUs only, and no node of this cluster has one (its GPU slots, if any, "
            f"are logical: Ray names no accelerator type); {len(labels)} job(s) ({', '.join(labels[:5])}) would "
            f"be served by vLLM. The cluster has: {describe_nodes(nodes)}. Connect to a cluster with NVIDIA GPUs "
            "(--ray-address), or use engine: native")


def preflight(jobs: list[dict], node_types: list[dict] | None = None, shape=None) -> None:
    """Refuse jobs no node of the connected cluster could ever run (Ray would leave them waiting forever): no node
    alive now, and no node type the autoscaler may start (``node_types``); with the model's ``shape``, also the jobs
    whose memory plan fits none of its GPUs (qfarm.sweep.plan.place)."""
    refuse_unplaceable(jobs, cluster_nodes(node_types), shape)


def refuse_unplaceable(jobs: list[dict], nodes: list[Node], shape=None) -> None:
    """UsageError naming the jobs none of ``nodes`` (alive, or startable by the autoscaler) can hold. With the
    model's ``shape`` (qfarm.sweep.plan), each GPU job that names no ``min_gpu_mem_gb`` first gets its memory plan's as
    one, on a cluster whose GPUs say their memory."""
    from qfarm.sweep.plan import place

    refused = place(jobs, shape, [n.gpu_mem_gb for n in nodes if n.cuda and n.resources.get("GPU", 0) > 0
                                  and n.gpu_mem_gb])
    if refused:
        raise UsageError("\n".join(refused))
    bad: dict[str, list[str]] = {}
    for job in map(as_job, jobs):
        res = job.resources
        if slots(res, nodes) == 0:
            key = ", ".join(f"{k} {v:g}" for k, v in needs(res).items())
            if res.get("min_gpu_mem_gb"):
                key += f", GPUs of at least {res['min_gpu_mem_gb']:g} GB"
            bad.setdefault(key, []).append(job.label)
    no_cuda = cuda_refusal(jobs, nodes)
    if no_cuda:
        raise UsageError(no_cuda)
    if bad:
        lines = [f"  {len(labels)} job(s) ({', '.join(sorted(set(labels))[:5])}) need {need}" for need, labels in bad.items()]
        raise UsageError("no node of this cluster can run these jobs:\n" + "\n".join(lines)
                         + f"\nthe cluster has: {describe_nodes(nodes)}\n"
                         "lower `resources:` in the spec, connect to a cluster that has them (--ray-address), or name "
                         "the node types its autoscaler may start (--cluster-config cluster.yaml)")
