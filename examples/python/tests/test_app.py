"""The web example: sessions and a memory-mode rate limit in the middleware."""

from __future__ import annotations

import math
import os
import re

import pytest
from conftest import APP_DSN
from starlette.testclient import TestClient

POLICY = "example_api"

os.environ.update(
    DATABASE_URL=APP_DSN,
    RATE_POLICY=POLICY,
    SESSION_COOKIE_SECURE="0",
    DB_POOL_SIZE="2",
)
import app as example  # noqa: E402  (reads the settings above)

# RFC 9651 Structured Field items as the draft writes them: "name";key=int;key=int
FIELD = re.compile(r'^"([A-Za-z0-9_.:-]+)"((?:;[a-z]+=\d+)+)$')


def params(value: str) -> tuple[str, dict[str, int]]:
    m = FIELD.match(value)
    assert m, f"not a structured field item: {value!r}"
    pairs = (p.split("=") for p in m.group(2)[1:].split(";"))
    return m.group(1), {k: int(v) for k, v in pairs}


@pytest.fixture(scope="module", autouse=True)
def policy(admin):
    admin.execute(
        "SELECT keel.create_limit(%s, 5, '1 minute', durability => 'memory')", (POLICY,)
    )


def client(address: str) -> TestClient:
    return TestClient(example.app, client=(address, 50000))


def test_login_validate_logout():
    with client("192.0.2.1") as c:
        assert c.get("/me").status_code == 401
        r = c.post("/login", json={"user": "ada"})
        assert r.status_code == 200
        assert "httponly" in r.headers["set-cookie"].lower()
        me = c.get("/me")
        assert me.status_code == 200 and me.json()["user_id"] == "ada"
        token = c.cookies.get("session")
        assert c.post("/logout").status_code == 200
        c.cookies.set("session", token)  # the revoked token, replayed
        assert c.get("/me").status_code == 401


def test_a_tampered_or_unknown_cookie_is_no_session():
    with client("192.0.2.2") as c:
        for token in ["x", "A" * 43, "'; DROP TABLE keel.sessions; --", "A" * 5000]:
            c.cookies.set("session", token)
            assert c.get("/me").status_code == 401


def test_the_sixth_request_in_a_minute_gets_429_with_retry_after_and_ratelimit_fields():
    with client("192.0.2.3") as c:
        answers = [c.get("/health") for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 5 + [429]
    for i, a in enumerate(answers[:5]):
        name, policy = params(a.headers["RateLimit-Policy"])
        assert (name, policy) == (POLICY, {"q": 5, "w": 60})
        _, state = params(a.headers["RateLimit"])
        assert state["r"] == 4 - i
    denied = answers[5]
    retry = int(denied.headers["Retry-After"])
    # 5 a minute refills one every 12 s: never early, never much later.
    assert 1 <= retry <= 12
    _, state = params(denied.headers["RateLimit"])
    assert state["r"] == 0 and state["t"] >= retry
    assert math.isfinite(retry)


def test_signed_in_users_are_limited_per_user_not_per_address():
    with client("192.0.2.4") as c:
        c.post("/login", json={"user": "grace"})  # one request on the address' key
        for _ in range(5):
            assert c.get("/me").status_code == 200
        assert c.get("/me").status_code == 429
    with client("192.0.2.4") as other:  # same address, no session: its own key
        assert other.get("/health").status_code == 200
