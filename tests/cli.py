"""Running the `qfarm` CLI the way a user does (a subprocess), for the integration, e2e and GPU tiers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def qfarm(env, *args, timeout=1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qfarm.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def submitted_id(stdout: str) -> str:
    return re.search(r"submitted (\S+):", stdout).group(1)


def results(env, *sweeps) -> list[dict]:
    """The sweeps' rows (`qfarm results --format json`), each key checked to be a declared column or option."""
    out = qfarm(env, "results", *sweeps, "--format", "json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    undeclared = {k for r in data for k in r if not task_column(r, k)} - declared_keys()
    assert not undeclared, f"result keys that are neither a column of qfarm/columns.py nor an option: {undeclared}"
    return data


def task_column(row: dict, key: str) -> bool:
    """Whether ``key`` is a column of one of the row's lm-eval tasks (``<task>_<metric>``, named after the task)."""
    from qfarm.columns import column_name

    return any(key.startswith(column_name(t) + "_") for t in row.get("tasks") or {})


def declared_keys() -> set[str]:
    """Every column of the table, and every option of every kind and method of the registry."""
    from qfarm.columns import BY_NAME
    from qfarm.methods import KINDS

    models = [m for k in KINDS.values() for m in ([k.options] if k.options else [x.options for x in k.methods.values()])]
    return set(BY_NAME) | {f for m in models for f in m.model_fields}


def files_containing(text: str, folder: Path) -> list[str]:
    """The files below ``folder`` (a Ray session's logs, say) in which ``text`` appears: a secret must be in none."""
    needle = text.encode()
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def run_sweep(env, spec, name, key="method") -> dict:
    """Submit ``spec``, wait, and return its rows by ``key``."""
    run = qfarm(env, "submit", str(spec), "--wait", timeout=1800)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return {r[key]: r for r in results(env, name)}
