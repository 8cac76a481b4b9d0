"""Connecting to Redis: passwords, clear errors, and the embedded private redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qfarm.errors import QfarmError
from qfarm.farm import connection

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, tries: int = 50) -> None:
    for _ in range(tries):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)


@pytest.fixture
def password_redis(tmp_path):
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                             "--requirepass", "s3cretQfarmPw", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    yield port
    proc.kill()
    proc.wait()


def test_password_url_works_and_a_wrong_one_is_a_clear_error(password_redis, tmp_path):
    port = password_redis
    env = {"QFARM_REDIS_URL": f"redis://:s3cretQfarmPw@127.0.0.1:{port}/0", "QFARM_HOME": str(tmp_path), "PATH": ""}
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
        # a client without retries: the server closing the connection is the answer to SHUTDOWN, not an outage
        # (qfarm's own client would retry it for its ~90 s of backoff)
        connection._client(url, retries=0).shutdown(nosave=True)
    with pytest.raises(QfarmError, match="Cannot reach Redis"):
        connection.connect_redis(f"redis://127.0.0.1:{port}/0")  # a configured URL is never replaced


@pytest.fixture
def tls_redis(tmp_path):
    """A redis-server that speaks only TLS (certificate signed by a throwaway CA) and wants a password."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=qfarm-test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
                             "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no", "--requirepass", "s3cretQfarmPw",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    yield port, tmp_path / "ca.crt"
    proc.kill()
    proc.wait()


def test_a_sweep_runs_through_a_tls_redis_with_a_password(tls_redis, cli_env, tmp_path, ray_head):
    from tests.cli import files_containing, qfarm, results

    port, ca = tls_redis
    env = dict(cli_env, QFARM_REDIS_URL=f"rediss://:s3cretQfarmPw@127.0.0.1:{port}/0?ssl_ca_certs={ca}")
    spec = tmp_path / "tls.yaml"
    spec.write_text("name: over-tls\njobs:\n  - {kind: sleep, seconds: 0.1, matrix: {index: [0, 1, 2]}}\n")
    out = qfarm(env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout + out.stderr  # client, scheduler actor and workers all spoke TLS
    assert [r["status"] for r in results(env, "over-tls")] == ["succeeded"] * 3
    # the URL reached the scheduler and workers through the object store (qfarm.farm.handoff): no Ray log has it
    assert any(p.is_file() for p in Path(ray_head.temp_dir).rglob("*"))  # there are logs to look in
    assert not files_containing("s3cretQfarmPw", Path(ray_head.temp_dir))
    # without the CA, the server's certificate is refused: a one-line error, no password, no traceback
    env["QFARM_REDIS_URL"] = f"rediss://:s3cretQfarmPw@127.0.0.1:{port}/0"
    bad = qfarm(env, "status")
    assert bad.returncode == 1 and "certificate verify failed" in bad.stderr, bad.stderr
    assert "s3cretQfarmPw" not in bad.stderr and "Traceback" not in bad.stderr
    # and plain TCP to a TLS port is not mistaken for a working Redis
    env["QFARM_REDIS_URL"] = f"redis://:s3cretQfarmPw@127.0.0.1:{port}/0"
    assert qfarm(env, "status").returncode == 1
