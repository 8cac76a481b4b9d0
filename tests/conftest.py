"""Shared fixtures. Server-backed tests use the real Redis and one local Ray head per test session.

A missing service is an error, never a skip: CI must fail loudly when Redis is not there.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import shutil
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QFARM_SHARED_DATA", REPO.parent / "shared" / "data"))
REDIS_URL = os.environ.get("QFARM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two pytest workers share the cores: each process computes on one thread (as every qfarm worker does), or
    # OpenMP's spinning threads in one test (lm_eval's own CLI, in-process quantization) starve the other's
    # (the lm-eval test took 402 s beside the integration tier with the default threads, 193 s alone)
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")  # every test cluster is on loopback (qfarm.farm.cluster.loopback_auth)


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as e:
        pytest.fail(f"the integration tests need Redis at {REDIS_URL} (set QFARM_TEST_REDIS_URL): {e}", pytrace=False)
    return REDIS_URL


@pytest.fixture
def namespace(redis_url):
    """A throwaway key prefix, removed after the test."""
    from qfarm.farm.connection import connect_redis
    from qfarm.farm.store import Store

    ns = f"qfarm-test-{uuid.uuid4().hex[:8]}"
    yield ns
    client, _ = connect_redis(redis_url, embedded_ok=False)
    Store(client, ns).delete_namespace()


@pytest.fixture
def store(redis_url, namespace):
    from qfarm.farm.connection import connect_redis
    from qfarm.farm.store import Store

    client, _ = connect_redis(redis_url, embedded_ok=False)
    return Store(client, namespace)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """One local Ray head for the whole session: 127.0.0.1, 2 logical GPUs (the real ones on a GPU machine),
    4 logical CPUs, so that GPU slots, not CPUs, bound how many GPU-tagged jobs run at once.
    Stopped by its own PID (session): any other Ray on the machine is left alone.
    """
    from qfarm.farm.cluster import cuda_gpu_count, start_local_head, stop_local_head

    temp_dir = f"/tmp/qfarm-test-ray-{os.getpid()}"  # short: Ray's socket paths must stay under 107 bytes
    log = tmp_path_factory.mktemp("ray") / "head.log"
    gpus = cuda_gpu_count()
    head = start_local_head(temp_dir=temp_dir, log_path=str(log), num_gpus=gpus or 2, num_cpus=max(4, 2 * gpus))
    os.environ["QFARM_RAY_ADDRESS"] = head.address
    yield head
    import ray

    if ray.is_initialized():
        ray.shutdown()
    stop_local_head(head.pid)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def cli_env(redis_url, namespace, ray_head, tmp_path):
    """Environment for running the `qfarm` CLI as a user would, against the test services."""
    env = dict(os.environ)
    env.update(QFARM_REDIS_URL=redis_url, QFARM_NAMESPACE=namespace, QFARM_RAY_ADDRESS=ray_head.address,
               QFARM_OUTPUT_ROOT=str(tmp_path / "out"), QFARM_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1",
               QFARM_WATCH="0")  # no watchdog resuming the sweeps fault tests kill on purpose (test_head_loss.py has one)
    return env


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "wikitext2" / "wiki.test.raw").is_file():
        pytest.fail(f"the e2e tests read real data from {SHARED_DATA} (../shared/data beside the repo); it is missing",
                    pytrace=False)
    return SHARED_DATA


def pytest_xdist_make_scheduler(config, log):
    """Under `pytest -n 2 --dist loadgroup` (what `make test` runs) the tests on the bundled model (those that take
    the e2e tier's ``model_root``) are one unit of work: one worker runs them in order, with one output root, so
    the bundled GGUF is dequantized and its references computed once. Every other test goes to whichever worker is
    free: the integration tier mostly waits (heartbeats, timeouts, Ray starts), which leaves room for the tiny-model
    e2e tests beside the bundled ones. A scheduler of our own, since xdist 3.8's `xdist_group` marks do not group
    under pytest 9.2 (it renames node ids through an attribute pytest no longer reads)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class BundledModelScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "bundled-model" if takes(nodeid, "model_root") else nodeid

    return BundledModelScheduling(config, log)


@functools.lru_cache(maxsize=None)
def takes(nodeid: str, fixture: str) -> bool:
    """Whether the test function ``nodeid`` names asks for ``fixture`` (read from its signature: the scheduler runs
    in pytest's controller, which collects nothing under xdist)."""
    path, _, name = nodeid.partition("::")
    if not path.endswith(".py") or not name:
        return False
    module = importlib.import_module(path[:-3].replace("/", "."))
    function = getattr(module, name.split("[")[0], None)
    return callable(function) and fixture in inspect.signature(function).parameters
