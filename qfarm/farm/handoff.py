"""What the scheduler and its workers get from the submitting command, not from Redis: the Redis URL (it may carry a
password), the output root (workers write only below it: no path read from Redis decides where), and the hub
settings (``HF_TOKEN``: qfarm.sweep.hub.forwarded_env); never written to Redis, a log or an argument's value.

They travel as one small object in Ray's object store: ``hand(env)`` gives ``[ObjectRef]``, which an actor
receives unresolved (a ref nested in a list) and reads with ``received``. A small object lives in its owner's
memory; the dashboard and a task's arguments show an object id. Not Ray's ``runtime_env``: its agent logs every
variable it sets (runtime_env_agent.log, INFO level). Each actor hands on an object of its own, since the sender's
may not outlive it (the CLI exits while a detached scheduler runs on).
"""

from __future__ import annotations

REDIS_URL = "QFARM_REDIS_URL"
OUTPUT_ROOT = "QFARM_OUTPUT_ROOT"  # where workers write: the submitting command's own, not a path read from Redis


def hand(env: dict[str, str]) -> list:
    """``env`` for another actor, as ``[ObjectRef]``."""
    import ray

    return [ray.put(dict(env))]


def received(refs: list | tuple) -> dict[str, str]:
    """What ``hand`` gave this actor; the hub variables among it are set in this process's environment
    (qfarm.sweep.hub.apply_env), before anything reads them. An actor that hands it on ``hand``s it again itself."""
    import ray

    from qfarm.sweep.hub import apply_env

    if not refs:
        raise RuntimeError("this actor was started without its connection settings (by an older qfarm?): "
                           "run `qfarm resume SWEEP`")
    env = dict(ray.get(refs[0]))
    apply_env(env)
    return env
