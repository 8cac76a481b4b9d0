"""Every QFARM_* variable is in one table (qfarm/settings.py) and the README's Settings section lists that table."""

from __future__ import annotations

import re

from qfarm.settings import SETTINGS, get, number
from tests.conftest import REPO

FILE_NAMES = {"QFARM_CHECKS", "QFARM_SOURCE"}  # files qfarm writes beside a model, not variables
NOT_READ = {"QFARM_TEST_REDIS_URL", "QFARM_SHARED_DATA"}  # the test suite's own


def test_every_qfarm_variable_in_the_code_is_in_the_table_and_the_readme():
    code = {m for path in [*(REPO / "qfarm").rglob("*.py"), *(REPO / "workers").rglob("*.py")]
            for m in re.findall(r"\bQFARM_[A-Z_]*[A-Z]\b", path.read_text())}
    assert code - FILE_NAMES - set(SETTINGS) == set()
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Settings"):readme.index("## Extending qfarm")]
    assert set(re.findall(r"^\| `(QFARM_[A-Z_]+)`", section, re.M)) == set(SETTINGS)


def test_a_setting_is_read_when_used_not_at_import(monkeypatch):
    monkeypatch.delenv("QFARM_REF_CACHE_MB", raising=False)
    assert number("QFARM_REF_CACHE_MB") == 2048
    monkeypatch.setenv("QFARM_REF_CACHE_MB", "64")
    assert number("QFARM_REF_CACHE_MB") == 64
    monkeypatch.setenv("QFARM_WATCH_STALE_S", "7")
    from qfarm.farm import watchdog

    assert watchdog.stale_s() == 7 and get("QFARM_DISPATCH") == "longest"
