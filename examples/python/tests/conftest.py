"""Fixtures for the Python examples' tests.

The cluster (pg_keel preloaded, its worker dispatching to Redis) and the redis-server are
started by the project's test harness (pg_test/tests/examples.rs), which passes them in
KEEL_TEST_HOST, KEEL_TEST_PORT, KEEL_TEST_DBNAME (superuser ``postgres``) and REDIS_URL. The
examples themselves run as ``example_app``, a role with only the grants they need.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

HERE = Path(__file__).resolve().parent.parent
ROLE = "example_app"


def conninfo(user: str) -> str:
    return psycopg.conninfo.make_conninfo(
        host=os.environ["KEEL_TEST_HOST"],
        port=os.environ["KEEL_TEST_PORT"],
        dbname=os.environ["KEEL_TEST_DBNAME"],
        user=user,
    )


ADMIN_DSN = conninfo("postgres")
APP_DSN = conninfo(ROLE)
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

SETUP = f"""
CREATE SCHEMA IF NOT EXISTS examples;
CREATE TABLE IF NOT EXISTS examples.done (
    job_id bigint PRIMARY KEY, attempt int NOT NULL, payload jsonb NOT NULL);
CREATE TABLE IF NOT EXISTS examples.applied (event_id bigint PRIMARY KEY, topic text NOT NULL);
CREATE TABLE IF NOT EXISTS examples.order_totals (customer text PRIMARY KEY, total bigint NOT NULL);
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
    CREATE ROLE {ROLE} LOGIN;
  END IF;
END $$;
GRANT USAGE ON SCHEMA examples TO {ROLE};
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA examples TO {ROLE};
SELECT keel.grant_producer('{ROLE}');
SELECT keel.grant_consumer('{ROLE}');
SELECT keel.grant_sessions('{ROLE}');
"""


@pytest.fixture(scope="session")
def admin():
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(SETUP)
        yield conn


def wait_until(check, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def spawn(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / script), *args],
        env={**os.environ, "DATABASE_URL": APP_DSN, "REDIS_URL": REDIS_URL, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"process did not exit within {timeout} s:\n{out}")
    return proc.returncode, out
