"""qfarm's own local Ray head: one per machine, however many clients start at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from tests.cli import REPO

pytestmark = pytest.mark.integration

CLIENT = """\
from qfarm.farm.cluster import ensure_local_head
print("ADDRESS", ensure_local_head(2, lambda line, **kw: print(line, flush=True)), flush=True)
"""


def test_two_clients_starting_at_once_share_one_head(tmp_path):
    """Two clients with no Ray running start together: one starts the head (under a file lock), the other waits
    for it and uses it. Without the lock both started one, and one failed after a minute."""
    from qfarm.farm.cluster import stop_local_head

    env = dict(os.environ, QFARM_HOME=str(tmp_path / "home"), QFARM_RAY_TEMP_DIR=f"/tmp/qfh-{uuid.uuid4().hex[:8]}")
    env.pop("QFARM_RAY_ADDRESS", None)
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outs = [c.communicate(timeout=300)[0] for c in clients]
        assert [c.returncode for c in clients] == [0, 0], outs
        addresses = {line.split()[1] for out in outs for line in out.splitlines() if line.startswith("ADDRESS")}
        assert len(addresses) == 1, outs
        assert sum("starting a local Ray head" in out for out in outs) == 1, outs
        assert sum("another qfarm client" in out for out in outs) == 1, outs  # it waited, then used that head
    finally:
        state = tmp_path / "home" / "ray-head.json"
        if state.is_file():
            stop_local_head(int(json.loads(state.read_text())["pid"]))
        shutil.rmtree(env["QFARM_RAY_TEMP_DIR"], ignore_errors=True)
