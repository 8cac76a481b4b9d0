"""Teams sharing one Redis: a Redis ACL user per namespace (``~<namespace>:*``). qfarm keeps every key under its
namespace and names every key its Lua scripts touch, so such a user runs whole sweeps; another team's keys are
out of its reach (Redis refuses), and qfarm says so plainly."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from tests.cli import qfarm, results

pytestmark = pytest.mark.integration

SPEC = "name: {name}\njobs:\n  - {{kind: sleep, seconds: 0.1, matrix: {{index: [0, 1]}}}}\n"


@pytest.fixture
def teams(redis_url):
    """Two ACL users, each limited to its own namespace, with the rights README's "Sharing one Redis" gives."""
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    made = {}
    for team in ("a", "b"):
        user, ns, pw = f"qfarm-test-{team}-{uuid.uuid4().hex[:6]}", f"qfarm-acl-{team}-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
        admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{pw}", f"~{ns}:*", "+@all", "-@dangerous")
        parts = urlsplit(redis_url)
        made[team] = (user, ns, urlunsplit(parts._replace(netloc=f"{user}:{pw}@{parts.hostname}:{parts.port or 6379}")))
    yield made
    for user, ns, url in made.values():
        for key in admin.scan_iter(match=f"{ns}:*"):
            admin.delete(key)
        admin.execute_command("ACL", "DELUSER", user)


def test_a_team_runs_sweeps_in_its_namespace_and_cannot_touch_anothers(teams, cli_env, tmp_path):
    (_, ns_a, url_a), (user_b, ns_b, url_b) = teams["a"], teams["b"]
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC.format(name="acl-sweep"))
    env_a = dict(cli_env, QFARM_REDIS_URL=url_a, QFARM_NAMESPACE=ns_a)
    out = qfarm(env_a, "submit", str(spec), "--wait")  # client, scheduler and workers all as team a
    assert out.returncode == 0, out.stdout + out.stderr
    assert [r["status"] for r in results(env_a, "acl-sweep")] == ["succeeded"] * 2

    # team b names team a's namespace: refused at once, plainly, without its password
    bad = qfarm(dict(cli_env, QFARM_REDIS_URL=url_b, QFARM_NAMESPACE=ns_a), "status")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert f"Redis user '{user_b}' may not use the keys of namespace '{ns_a}'" in bad.stderr
    assert urlsplit(url_b).password not in bad.stderr
    # and Redis itself keeps b out of a's keys, whatever client b uses
    as_b = redis.Redis.from_url(url_b, decode_responses=True)
    sweep_key = next(k for k in redis.Redis.from_url(url_a, decode_responses=True).scan_iter(match=f"{ns_a}:sweep:*"))
    for command in (lambda: as_b.hgetall(sweep_key), lambda: as_b.delete(sweep_key), lambda: as_b.set(f"{ns_a}:x", 1)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            command()
    assert qfarm(dict(cli_env, QFARM_REDIS_URL=url_b, QFARM_NAMESPACE=ns_b), "status").returncode == 0
