"""The outbox consumer: every committed event applied exactly once, across a crash between
applying an event and acknowledging it, and across a consumer that died for good."""

from __future__ import annotations

import json

import redis
from conftest import REDIS_URL, finish, spawn, wait_until

COMMITTED = 100
ROLLED_BACK = 20


def emit_orders(admin, topic: str) -> dict[str, int]:
    """COMMITTED events in their own transactions and ROLLED_BACK that roll back; the
    expected total per customer."""
    expected: dict[str, int] = {}
    for i in range(COMMITTED + ROLLED_BACK):
        customer, amount = f"{topic}-c{i % 5}", i + 1
        with admin.transaction(force_rollback=i >= COMMITTED):
            admin.execute(
                "SELECT keel.emit(%s, %s)",
                (topic, json.dumps({"customer": customer, "amount": amount})),
            )
        if i < COMMITTED:
            expected[customer] = expected.get(customer, 0) + amount
    return expected


def emit_and_wait(admin, topic: str) -> tuple[dict[str, int], redis.Redis]:
    """emit_orders, then wait until pg_keel's worker has put every committed one in Redis."""
    expected = emit_orders(admin, topic)
    r = redis.Redis.from_url(REDIS_URL)
    wait_until(lambda: r.xlen(f"keel:{topic}") == COMMITTED, 30, "every event in the stream")
    return expected, r


def assert_applied_once(admin, r: redis.Redis, topic: str, expected: dict[str, int]) -> None:
    assert applied(admin, topic) == COMMITTED
    assert totals(admin, topic) == expected
    assert r.xpending(f"keel:{topic}", "billing")["pending"] == 0


def totals(admin, topic: str) -> dict[str, int]:
    rows = admin.execute(
        "SELECT customer, total FROM examples.order_totals WHERE customer LIKE %s",
        (f"{topic}-%",),
    ).fetchall()
    return dict(rows)


def applied(admin, topic: str) -> int:
    return admin.execute(
        "SELECT count(*) FROM examples.applied WHERE topic = %s", (topic,)
    ).fetchone()[0]


def consume(topic: str, name: str, *extra: str) -> tuple[int, str]:
    proc = spawn(
        "outbox_consumer.py", "--stream", f"keel:{topic}", "--group", "billing",
        "--consumer", name, "--until-idle", *extra,
    )
    return finish(proc, 60)


def test_a_crash_before_xack_applies_nothing_twice(admin):
    topic = "py_orders_crash"
    expected, r = emit_and_wait(admin, topic)
    rc, out = consume(topic, "billing-1", "--crash-after", "30")
    assert rc == 3, out
    rc, out = consume(topic, "billing-1")
    assert rc == 0, out
    counts = json.loads(out.strip().splitlines()[-1])
    # The 30th event was applied but not acknowledged: read again, found applied, skipped.
    assert counts == {"applied": COMMITTED - 30, "duplicates": 1}
    assert_applied_once(admin, r, topic, expected)


def test_another_consumer_takes_over_a_dead_ones_entries(admin):
    topic = "py_orders_takeover"
    expected, r = emit_and_wait(admin, topic)
    rc, out = consume(topic, "billing-dead", "--crash-after", "10")
    assert rc == 3, out
    rc, out = consume(topic, "billing-2", "--min-idle-ms", "0")
    assert rc == 0, out
    assert_applied_once(admin, r, topic, expected)
