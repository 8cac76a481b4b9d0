"""A job that needs a library its worker lacks says which extra installs it (`make demo` installs one extra)."""

from __future__ import annotations

import os
import tomllib

import pytest

from qfarm.errors import EXTRAS, one_line, retryable
from tests.conftest import REPO


def test_a_missing_optional_library_names_the_extra_that_installs_it():
    e = ModuleNotFoundError("No module named 'llmcompressor'", name="llmcompressor.modifiers")
    line = one_line(e)
    assert line.startswith("llmcompressor is not installed on this worker: pip install 'qfarm[ml]'"), line
    assert not retryable(e)  # the same worker would fail again
    gguf = one_line(ModuleNotFoundError("No module named 'llama_cpp'", name="llama_cpp"))
    assert "qfarm[gguf]" in gguf
    # any other missing module is reported as it is
    other = one_line(ModuleNotFoundError("No module named 'foo'", name="foo"))
    assert other == "ModuleNotFoundError: No module named 'foo'"


def test_every_extra_named_is_one_pyproject_defines():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = {v for v in EXTRAS.values() if " " not in v}
    assert named <= set(extras), named - set(extras)
    assert "demo" in extras and "qfarm[demo]" in extras["ml"]  # make demo installs the demo extra alone


def test_a_command_that_needs_a_missing_extra_says_which_instead_of_an_internal_error(capsys, monkeypatch):
    """After `make demo` (the demo extra alone), `qfarm report` imports matplotlib: the user is told what to install."""
    from qfarm.cli import handle_errors

    monkeypatch.delenv("QFARM_DEBUG", raising=False)

    def report():
        import sys

        saved = sys.modules.get("matplotlib")
        sys.modules["matplotlib"] = None  # type: ignore[assignment] - what an absent package looks like to import
        try:
            import matplotlib  # noqa: F401
        finally:
            sys.modules.pop("matplotlib")
            if saved is not None:
                sys.modules["matplotlib"] = saved

    with pytest.raises(SystemExit) as exit_:
        handle_errors(report)()
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "internal error" not in err
    assert err.startswith("error: matplotlib is not installed here: pip install 'qfarm[report]' (`make install`"), err

    def bug():
        raise ModuleNotFoundError("No module named 'qfarm_nonexistent'", name="qfarm_nonexistent")

    with pytest.raises(SystemExit):
        handle_errors(bug)()
    assert capsys.readouterr().err.startswith("internal error: ModuleNotFoundError")  # ours: still said as a bug


def test_a_path_that_cannot_be_written_is_a_user_error_not_an_internal_one(capsys, monkeypatch):
    """`qfarm report SWEEP -o /no/such/dir/r.html`, `results --format csv -o ...`: the path and why, exit 2."""
    from pathlib import Path

    from qfarm.cli import handle_errors

    monkeypatch.delenv("QFARM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        handle_errors(lambda: Path("/proc/no-such-dir/report.html").write_text("x"))()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: No such file or directory: /proc/no-such-dir"), err


def test_a_tracking_uri_mlflow_cannot_store_runs_in_is_refused_before_mlflow_is_asked():
    from qfarm.results.tracking import cli_uri_problem

    assert "scheme 'weird' is not one MLflow stores runs in" in cli_uri_problem("weird://x")
    for fine in ("mlruns", "/abs/folder", "file:/abs/folder", "sqlite:///m.db", "http://127.0.0.1:5000",
                 "postgresql://u@h/db", "C:\\runs"):
        assert cli_uri_problem(fine) is None, fine


@pytest.mark.parametrize("answer", [b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.0 400 Bad Request\r\n\r\n", b""])
def test_a_server_that_answers_but_is_not_redis_is_one_line_and_exit_1(answer):
    """`--redis-url` at a port where something else listens (an SSH banner, an HTTP refusal, a server that hangs up):
    the user reads what answered there, exit 1 (an unreachable service), never "internal error"."""
    import socket
    import threading

    from tests.cli import qfarm

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        out = qfarm(dict(os.environ, QFARM_REDIS_URL=f"redis://127.0.0.1:{port}/0"), "status", timeout=120)
    finally:
        server.close()
    said = (out.stdout + out.stderr).strip()
    assert out.returncode == 1, said
    assert said.startswith("error: ") and len(said.splitlines()) == 1, said
    assert "internal error" not in said and "Traceback" not in said and f"127.0.0.1:{port}" in said
