"""Self-healing after head loss: a sweep whose scheduler went silent is resumed, with no command typed.

A killed Ray head (kill -9 of its GCS and raylet, a reboot, an OOM kill) takes every scheduler and worker of it
along; their state stays in Redis. ``qfarm submit`` (and ``resume``/``retry``) start one watchdog per Redis,
namespace and output root on the submitting machine: a small background process that reads Redis every
``POLL_S`` — it never connects to Ray, since Ray ends a driver whose head has gone — and, for an unfinished sweep
whose scheduler has not passed for ``STALE_S``, runs ``qfarm resume``. That starts qfarm's local head again
when it was the one that died (on a cluster it finds the head once it is back; until then it tries again every
``RETRY_S``); the new scheduler requeues the jobs the dead workers left running and the sweep finishes. A sweep
whose scheduler is alive is left alone (``resume`` finds it), so a Redis outage that silenced every scheduler
costs one no-op resume each. The watchdog exits after ``IDLE_EXIT_S`` with nothing unfinished; ``qfarm down``
stops it (a head stopped on purpose is not started again). ``QFARM_WATCH=0`` starts none.

Chosen over Ray's GCS fault tolerance (an external Redis for the GCS): that keeps actors across a GCS restart,
but nothing restarts a head whose raylet died too, which is the case here. The watchdog's own log
(``<qfarm home>/watch-<key>.log``) has no secret: it gets the Redis URL and the hub token in its environment
and prints URLs redacted.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import time

from qfarm import settings
from qfarm.farm.connection import data_dir


def stale_s() -> float:
    """Seconds of scheduler silence before a sweep is resumed (a scheduler passes every second)."""
    return settings.number("QFARM_WATCH_STALE_S")


RETRY_S = 60.0
IDLE_EXIT_S = 300.0
ENV = ("QFARM_REDIS_URL", "QFARM_NAMESPACE", "QFARM_OUTPUT_ROOT", "QFARM_RAY_ADDRESS")


def _key(redis_url: str, namespace: str, output_root: str) -> str:
    return hashlib.sha256(f"{redis_url}\0{namespace}\0{output_root}".encode()).hexdigest()[:12]


def ensure(redis_url: str, namespace: str, output_root: str, ray_address: str | None) -> None:
    """Start the watchdog of (Redis, namespace, output root) in the background, unless one runs already (it
    holds a lock: a second one exits at once) or ``QFARM_WATCH=0``."""
    if settings.get("QFARM_WATCH") == "0":
        return
    key = _key(redis_url, namespace, output_root)
    env = dict(os.environ, QFARM_REDIS_URL=redis_url, QFARM_NAMESPACE=namespace, QFARM_OUTPUT_ROOT=output_root,
               QFARM_WATCH_KEY=key)
    env.pop("QFARM_RAY_ADDRESS", None)
    if ray_address:
        env["QFARM_RAY_ADDRESS"] = ray_address
    with open(data_dir() / f"watch-{key}.log", "ab") as log:
        subprocess.Popen([sys.executable, "-m", "qfarm.farm.watchdog"], env=env, stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(data_dir()))


def stop_all() -> int:
    """Stop every watchdog of this qfarm home (``qfarm down``). Returns how many were running."""
    import signal

    stopped = 0
    for pidfile in data_dir().glob("watch-*.pid"):
        try:
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
            stopped += 1
        except (OSError, ValueError):
            pass
        pidfile.unlink(missing_ok=True)
    return stopped


def _say(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", flush=True)


def run() -> None:
    from qfarm.farm.connection import _redact, connect_redis
    from qfarm.farm.store import Store

    key = os.environ["QFARM_WATCH_KEY"]
    lock = open(data_dir() / f"watch-{key}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # this sweep set has a watchdog already
    pidfile = data_dir() / f"watch-{key}.pid"
    pidfile.write_text(str(os.getpid()))
    url, root = os.environ["QFARM_REDIS_URL"], os.environ["QFARM_OUTPUT_ROOT"]
    client, _ = connect_redis(url, embedded_ok=False)
    store = Store(client, os.environ["QFARM_NAMESPACE"])
    _say(f"watching the sweeps of namespace {store.namespace!r} at {_redact(url)} (output root {root})")
    resumed_at: dict[str, float] = {}
    idle_since = time.time()
    try:
        while True:
            now = time.time()
            live = [s for s in store.unfinished_sweeps() if s.output_root == root]
            if live:
                idle_since = now
            elif now - idle_since > IDLE_EXIT_S:
                _say("nothing left to watch; exiting")
                return
            for sweep in live:
                silent_s = now - (sweep.scheduler_beat_at or sweep.submitted_at or sweep.created_at)
                if silent_s > stale_s() and now - resumed_at.get(sweep.id, 0) > RETRY_S:
                    resumed_at[sweep.id] = now
                    _resume(sweep.id, silent_s)
            time.sleep(settings.number("QFARM_WATCH_POLL_S"))
    finally:
        if pidfile.is_file() and pidfile.read_text() == str(os.getpid()):
            pidfile.unlink(missing_ok=True)


def _resume(sweep_id: str, silent_s: float) -> None:
    _say(f"sweep {sweep_id}: its scheduler has been silent for {silent_s:.0f} s; running `qfarm resume {sweep_id}`")
    try:
        out = subprocess.run([sys.executable, "-m", "qfarm.cli", "resume", sweep_id], capture_output=True, text=True,
                             timeout=600, stdin=subprocess.DEVNULL, env=dict(os.environ, QFARM_WATCH="0"))
        text = " ".join((out.stdout + out.stderr).split())[-500:]
        _say(f"sweep {sweep_id}: resume exited {out.returncode}: {text}")
    except subprocess.TimeoutExpired:
        _say(f"sweep {sweep_id}: resume did not finish within 600 s; trying again later")


if __name__ == "__main__":
    run()
