"""Connecting to Redis: passwords, clear errors, and the embedded private redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import pytest

from qfarm import connection
from qfarm.errors import QfarmError

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def password_redis(tmp_path):
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                             "--requirepass", "s3cret", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(50):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield port
    proc.kill()
    proc.wait()


def test_password_url_works_and_a_wrong_one_is_a_clear_error(password_redis, tmp_path):
    port = password_redis
    env = {"QFARM_REDIS_URL": f"redis://:s3cret@127.0.0.1:{port}/0", "QFARM_HOME": str(tmp_path), "PATH": ""}
    ok = subprocess.run([sys.executable, "-m", "qfarm.cli", "status"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    env["QFARM_REDIS_URL"] = f"redis://:wrong@127.0.0.1:{port}/0"
    bad = subprocess.run([sys.executable, "-m", "qfarm.cli", "status"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.startswith(f"error: Redis at redis://***@127.0.0.1:{port}/0 refused the password")
    assert "wrong" not in bad.stderr  # the password is never printed


def test_embedded_redis_starts_when_nothing_answers(tmp_path, monkeypatch):
    port = free_port()
    monkeypatch.setattr(connection, "DEFAULT_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.delenv("QFARM_REDIS_URL", raising=False)
    monkeypatch.setenv("QFARM_HOME", str(tmp_path))
    said = []
    client, url = connection.connect_redis(None, say=lambda text, **_: said.append(text))
    try:
        assert url == f"redis://127.0.0.1:{port}/0" and client.ping()
        assert "starting a private redis-server" in said[0]
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("dir")["dir"] == str(tmp_path / "redis")
    finally:
        client.shutdown(nosave=True)
    with pytest.raises(QfarmError, match="Cannot reach Redis"):
        connection.connect_redis(f"redis://127.0.0.1:{port}/0")  # a configured URL is never replaced
