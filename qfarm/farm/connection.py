"""Connecting to Redis, with the embedded default: a private redis-server when nothing is configured.

A newcomer's first ``qfarm submit`` works with nothing set up: with no ``--redis-url`` / ``QFARM_REDIS_URL`` and
nothing answering at 127.0.0.1:6379, qfarm starts its own redis-server (append-only file on, data under the
user's data directory, bound to loopback) and says so, the way Ray starts its own GCS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import redis

from qfarm import settings
from qfarm.errors import QfarmError, UsageError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
INSTALL_HINT = (
    "Start one (`apt install redis-server` or `brew install redis`, then `redis-server`), "
    "or point qfarm at yours with --redis-url / QFARM_REDIS_URL (redis://[:password@]host:port/db, rediss:// for TLS)."
)


def data_dir() -> Path:
    """Where qfarm keeps its embedded services' state (XDG data dir)."""
    base = settings.get("QFARM_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "qfarm"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


# A restarted Redis (it replays its append-only file) is waited for, not fatal: every command retries on a
# connection error with exponential backoff, 0.1 s doubling to 2 s, for about a minute and a half in all.
RETRIES = 48


def _client(url: str, retries: int = RETRIES) -> redis.Redis:
    """A client for ``url``: redis://, rediss:// (TLS; a private CA as ``?ssl_ca_certs=/path/ca.crt``, a client
    certificate as ``&ssl_certfile=...&ssl_keyfile=...``), or unix://; a password as ``redis://:PASSWORD@host``."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=3, socket_timeout=30,
                                health_check_interval=30, retry_on_timeout=True,
                                retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries),
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def quick_sweep_ids(url: str | None, namespace: str) -> list[str]:
    """Sweep ids and names for shell completion: one try, a short timeout, never starting a server."""
    from qfarm.farm.store import Store

    client = redis.Redis.from_url(url or os.environ.get("QFARM_REDIS_URL") or DEFAULT_REDIS_URL,
                                  decode_responses=True, socket_connect_timeout=0.5, socket_timeout=1)
    store = Store(client, namespace)
    ids = store.sweep_ids()[::-1]
    pipe = client.pipeline(transaction=False)
    for i in ids:
        pipe.hget(store.keys.sweep(i), "name")
    names = [n for n in pipe.execute() if n]
    return list(dict.fromkeys(ids + names))


SECRET_PARAMS = ("password", "passwd", "pass", "token", "secret", "key_password", "ssl_password")


def _redact(url: str) -> str:
    """``url`` fit for a message or a log: the user-info part and every secret-looking query value as ***."""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<a Redis URL that does not parse>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    hidden = [(k, "***" if any(w in k.lower() for w in SECRET_PARAMS) else v) for k, v in query]
    text = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, urllib.parse.urlencode(hidden, safe="/*"),
                                    parts.fragment))
    if url.startswith(f"{parts.scheme}://") and not text.startswith(f"{parts.scheme}://"):  # unix:///path
        text = f"{parts.scheme}://" + text[len(parts.scheme) + 1:]
    return text


def connect_redis(url: str | None, *, embedded_ok: bool = True, say=print) -> tuple[redis.Redis, str]:
    """A connected client and its URL, or a QfarmError that says what to do."""
    configured = url or os.environ.get("QFARM_REDIS_URL")
    target = configured or DEFAULT_REDIS_URL
    try:
        probe = _client(target, retries=0)
    except ValueError as e:  # redis-py's parse of the URL
        raise UsageError(f"not a Redis URL: {_redact(target)} ({e}); e.g. redis://HOST:6379/0, "
                         "rediss://:PASSWORD@HOST:6380/0 or unix:///path/redis.sock") from None
    try:
        probe.ping()  # say at once when nothing answers; retries are for outages later
        return _client(target), target
    except redis.AuthenticationError as e:
        raise QfarmError(f"Redis at {_redact(target)} refused the password: {e}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        if configured or not embedded_ok:
            raise QfarmError(f"Cannot reach Redis at {_redact(target)}: {e}. {INSTALL_HINT}") from None
    except redis.RedisError as e:
        raise QfarmError(f"Redis at {_redact(target)} answered with an error: {e}") from None
    return _start_embedded(target, say)


def _start_embedded(url: str, say) -> tuple[redis.Redis, str]:
    server = shutil.which("redis-server")
    if server is None:
        raise QfarmError(f"Nothing answers at {url} and no redis-server is installed. {INSTALL_HINT}")
    folder = data_dir() / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    port = str(urlparse(url).port or 6379)
    cmd = [server, "--bind", "127.0.0.1", "--port", port, "--appendonly", "yes", "--dir", str(folder),
           "--daemonize", "yes", "--logfile", str(folder / "redis.log"), "--protected-mode", "yes"]
    say(f"qfarm: no Redis at {url}; starting a private redis-server (data in {folder}, log {folder / 'redis.log'})",
        file=sys.stderr)
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = _client(url)
    for _ in range(50):
        try:
            client.ping()
            return client, url
        except (redis.ConnectionError, OSError):
            time.sleep(0.1)
    raise QfarmError(f"Started redis-server but it does not answer at {url}; see {folder / 'redis.log'}. {INSTALL_HINT}")
