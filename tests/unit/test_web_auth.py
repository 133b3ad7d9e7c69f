"""Basic auth against bcrypt hashes, as the web server checks each request (no server needed)."""

from __future__ import annotations

import base64

import bcrypt

from tfowatch.exporter.web import BasicAuth

HASH = bcrypt.hashpw(b"secret", bcrypt.gensalt(4))


def header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_the_right_pair_passes_and_anything_else_fails_without_raising() -> None:
    auth = BasicAuth({"prom": HASH})
    assert auth.check(header("prom", "secret"))
    assert auth.check(header("prom", "secret"))  # the remembered digest
    for bad in (header("prom", "wrong"), header("nobody", "secret"), header("prom", "x" * 100),
                "Basic !!!", "Bearer abc", None, ""):
        assert not auth.check(bad), bad
