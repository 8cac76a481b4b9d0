"""Every ``QFARM_*`` environment variable qfarm reads: its name, default and meaning, in one table. Read when used
(``get``), never at import, so a test or a worker that sets one sees it. The README's "Settings" section is this
table (tests/unit/test_settings.py holds the two, and every ``QFARM_`` name in the code, to each other).

The CLI's own options (``--redis-url``, ``--namespace``, ...) take their ``QFARM_*`` variable through click; they
are listed here too, with the option that reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None
    meaning: str


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("QFARM_REDIS_URL", None, "`--redis-url`: the Redis holding all state (default redis://127.0.0.1:6379/0, "
                                     "or a private redis-server qfarm starts when nothing answers there)"),
    Setting("QFARM_NAMESPACE", "qfarm", "`--namespace`: the key prefix in Redis, so several teams share one server"),
    Setting("QFARM_OUTPUT_ROOT", None, "`--output-root`: where artifacts, caches and reports are written"),
    Setting("QFARM_RAY_ADDRESS", None, "`--ray-address`: an existing Ray cluster (else a local head on 127.0.0.1)"),
    Setting("QFARM_LOGICAL_GPUS", None, "`--logical-gpus`: GPU slots a local head declares on a machine with none "
                                        "(default 2)"),
    Setting("QFARM_CLUSTER_CONFIG", None, "`--cluster-config`: the Ray autoscaler's cluster.yaml, for placement"),
    Setting("QFARM_RAY_TEMP_DIR", None, "the local head's Ray temp dir (default /tmp/qfarm-ray-<uid>)"),
    Setting("QFARM_HOME", None, "qfarm's state folder: locks, watchdog logs (default ~/.local/share/qfarm)"),
    Setting("QFARM_HUB_CACHE", None, "where hub downloads live (default <output root>/_hub)"),
    Setting("QFARM_DISPATCH", "longest", "dispatch order: `longest` remaining path first, or `file` (the spec's)"),
    Setting("QFARM_WATCH", "1", "`0`: `qfarm submit` leaves no watchdog to resume a sweep whose scheduler died"),
    Setting("QFARM_WATCH_POLL_S", "5", "seconds between the watchdog's looks at Redis"),
    Setting("QFARM_WATCH_STALE_S", "30", "seconds of scheduler silence before the watchdog resumes its sweep"),
    Setting("QFARM_WATCH_KEY", None, "internal: the watchdog's Redis, namespace and output root, set by submit"),
    Setting("QFARM_REF_CACHE_MB", "2048", "MB of reference log-probs a worker keeps in memory (past it: on disk "
                                          "under the output root, read a window at a time)"),
    Setting("QFARM_CACHE_MODELS", "1", "float base models a worker keeps loaded between jobs"),
    Setting("QFARM_HOST_MEM_GB", None, "host RAM a worker may use for evaluation buffers (default: what is free)"),
    Setting("QFARM_GPU_MEM_GB", None, "the most of each GPU a job may take (a GPU shared with others)"),
    Setting("QFARM_LLAMA_CPP_DIR", None, "a llama.cpp checkout whose convert_hf_to_gguf.py GGUF jobs use (default "
                                         "the one `make install` unpacks into the virtualenv)"),
    Setting("QFARM_DEBUG", None, "set: an internal error prints its traceback"),
]}


def get(name: str) -> str | None:
    """The variable's value now, else its default. KeyError for a name the table does not have."""
    return os.environ.get(name, SETTINGS[name].default)


def number(name: str) -> float:
    """``get`` as a number (the table's default where the variable is unset or empty)."""
    value = os.environ.get(name) or SETTINGS[name].default
    return float(value)
