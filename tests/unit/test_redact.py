"""Secrets in a Redis URL never reach a message: the user-info part and secret-looking query values are hidden."""

from __future__ import annotations

import pytest

from qfarm.farm.connection import _redact


@pytest.mark.parametrize("url,shown", [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:s3cret@h:6379/0", "redis://***@h:6379/0"),
    ("redis://user:s3cret@h/0?password=abc", "redis://***@h/0?password=***"),
    ("rediss://h:6380/0?ssl_ca_certs=/p/ca.crt&ssl_password=zz&password=pw",
     "rediss://h:6380/0?ssl_ca_certs=/p/ca.crt&ssl_password=***&password=***"),
    ("unix:///tmp/r.sock?password=x", "unix:///tmp/r.sock?password=***"),
])
def test_secrets_are_hidden(url, shown):
    assert _redact(url) == shown
    assert not any(secret in _redact(url) for secret in ("s3cret", "=abc", "=zz", "=pw", "=x"))
