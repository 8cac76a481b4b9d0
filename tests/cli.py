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
    """The sweeps' rows (`qfarm results --format json`)."""
    out = qfarm(env, "results", *sweeps, "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def run_sweep(env, spec, name, key="method") -> dict:
    """Submit ``spec``, wait, and return its rows by ``key``."""
    run = qfarm(env, "submit", str(spec), "--wait", timeout=1800)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return {r[key]: r for r in results(env, name)}
