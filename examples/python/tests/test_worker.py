"""The worker example: nothing lost when it is stopped or killed mid-job, retries, the
heartbeat, and the LISTEN wake-up."""

from __future__ import annotations

import json
import signal
import time

from conftest import finish, spawn, wait_until

N_SIGTERM = 40
N_SIGKILL = 20


def new_queue(admin, name: str, **settings) -> None:
    args = "".join(f", {k} => %s" for k in settings)
    admin.execute(f"SELECT keel.create_queue(%s{args})", (name, *settings.values()))


def enqueue(admin, queue: str, payloads: list[dict]) -> list[int]:
    rows = admin.execute(
        "SELECT keel.enqueue_batch(%s, %s::jsonb[])",
        (queue, [json.dumps(p) for p in payloads]),
    ).fetchall()
    return [r[0] for r in rows]


def done_of(admin, ids: list[int]) -> int:
    return admin.execute(
        "SELECT count(*) FROM examples.done WHERE job_id = ANY(%s)", (ids,)
    ).fetchone()[0]


def listening(admin) -> bool:
    return admin.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE usename = 'example_app' AND query = 'LISTEN keel_jobs'"
    ).fetchone()[0] > 0


def start_with_jobs(admin, queue: str, n: int, sleep_ms: int, lease: str, started: int):
    """A queue with `lease`, n jobs of sleep_ms each, and a worker that has done `started`."""
    new_queue(admin, queue, visibility_timeout=lease)
    ids = enqueue(admin, queue, [{"sleep_ms": sleep_ms, "n": i} for i in range(n)])
    worker = spawn("keel_worker.py", "--queue", queue, "--batch", "10")
    wait_until(lambda: done_of(admin, ids) >= started, 30, f"{started} jobs done")
    return ids, worker


def states_of(admin, queue: str) -> dict[str, int]:
    rows = admin.execute(
        "SELECT state, count(*) FROM keel.jobs WHERE queue = %s GROUP BY state", (queue,)
    ).fetchall()
    return dict(rows)


def test_sigterm_mid_job_loses_nothing_and_leaves_no_lease(admin):
    queue = "py_sigterm"
    ids, worker = start_with_jobs(admin, queue, N_SIGTERM, 100, "5 minutes", started=5)
    worker.send_signal(signal.SIGTERM)
    rc, out = finish(worker, 10)
    assert rc == 0, out
    # The job in hand was finished and the unstarted rest given back: nothing waits for a
    # five-minute lease to run out.
    assert states_of(admin, queue).get("running", 0) == 0, states_of(admin, queue)
    stopped_at = done_of(admin, ids)
    assert stopped_at < N_SIGTERM
    second = spawn("keel_worker.py", "--queue", queue, "--batch", "10")
    wait_until(lambda: done_of(admin, ids) == N_SIGTERM, 30, "every job done")
    second.send_signal(signal.SIGTERM)
    assert finish(second, 10)[0] == 0
    assert states_of(admin, queue) == {}
    # Given back with snooze, the unstarted jobs kept their count of tries.
    tries = admin.execute(
        "SELECT max(attempt) FROM examples.done WHERE job_id = ANY(%s)", (ids,)
    ).fetchone()[0]
    assert tries <= 2


def test_sigkill_mid_job_the_lease_runs_out_and_another_worker_finishes(admin):
    queue = "py_sigkill"
    ids, worker = start_with_jobs(admin, queue, N_SIGKILL, 150, "2 seconds", started=3)
    worker.kill()
    worker.communicate()
    killed_at = done_of(admin, ids)
    second = spawn("keel_worker.py", "--queue", queue, "--batch", "10")
    wait_until(lambda: done_of(admin, ids) == N_SIGKILL, 60, "every job done")
    second.send_signal(signal.SIGTERM)
    assert finish(second, 10)[0] == 0
    # Each job's effect exactly once (the primary key of examples.done), none dead, and the
    # jobs the killed worker held came back with a higher attempt.
    assert done_of(admin, ids) == N_SIGKILL
    assert states_of(admin, queue) == {}
    retried = admin.execute(
        "SELECT count(*) FROM examples.done WHERE job_id = ANY(%s) AND attempt > 1", (ids,)
    ).fetchone()[0]
    assert killed_at < N_SIGKILL and retried >= 1


def test_a_failing_job_is_retried_then_dead(admin):
    queue = "py_retry"
    new_queue(admin, queue, max_attempts=3, retry_backoff="50 ms", retry_backoff_max="100 ms")
    flaky, hopeless = enqueue(admin, queue, [{"fail_times": 2}, {"fail_times": 99}])
    worker = spawn("keel_worker.py", "--queue", queue, "--poll-interval", "0.1")
    wait_until(lambda: done_of(admin, [flaky]) == 1, 30, "the flaky job done")
    wait_until(
        lambda: states_of(admin, queue).get("dead") == 1, 30, "the hopeless job dead"
    )
    worker.send_signal(signal.SIGTERM)
    assert finish(worker, 10)[0] == 0
    attempt = admin.execute(
        "SELECT attempt FROM examples.done WHERE job_id = %s", (flaky,)
    ).fetchone()[0]
    assert attempt == 3
    error = admin.execute(
        "SELECT last_error FROM keel.jobs WHERE job_id = %s", (hopeless,)
    ).fetchone()[0]
    assert "planned failure on attempt 3" in error
    assert done_of(admin, [hopeless]) == 0


def test_the_heartbeat_keeps_a_slow_job_from_a_second_worker(admin):
    queue = "py_heartbeat"
    new_queue(admin, queue, visibility_timeout="2 seconds")
    (slow,) = enqueue(admin, queue, [{"sleep_ms": 6000}])
    workers = [
        spawn("keel_worker.py", "--queue", queue, "--poll-interval", "0.1", "--name", f"w{i}")
        for i in range(2)
    ]
    wait_until(lambda: done_of(admin, [slow]) == 1, 30, "the slow job done")
    for w in workers:
        w.send_signal(signal.SIGTERM)
    for w in workers:
        assert finish(w, 10)[0] == 0
    # Three lease lengths of work, one attempt: never claimed a second time.
    attempt = admin.execute(
        "SELECT attempt FROM examples.done WHERE job_id = %s", (slow,)
    ).fetchone()[0]
    assert attempt == 1


def test_listen_wakes_the_worker_long_before_its_poll(admin):
    queue = "py_listen"
    new_queue(admin, queue)
    worker = spawn("keel_worker.py", "--queue", queue, "--poll-interval", "30")
    wait_until(lambda: listening(admin), 30, "the worker's LISTEN")
    time.sleep(0.2)  # its first claim (of nothing) done, now waiting for a NOTIFY
    started = time.monotonic()
    (job,) = enqueue(admin, queue, [{"n": 1}])
    wait_until(lambda: done_of(admin, [job]) == 1, 10, "the job done", step=0.005)
    took = time.monotonic() - started
    worker.send_signal(signal.SIGTERM)
    assert finish(worker, 10)[0] == 0
    assert took < 2.0, f"took {took:.3f} s with a 30 s poll"


def test_poll_only_mode_for_pgbouncer(admin):
    queue = "py_poll"
    new_queue(admin, queue)
    ids = enqueue(admin, queue, [{"n": i} for i in range(5)])
    worker = spawn("keel_worker.py", "--queue", queue, "--no-listen", "--poll-interval", "0.2")
    wait_until(lambda: done_of(admin, ids) == 5, 30, "every job done")
    worker.send_signal(signal.SIGTERM)
    assert finish(worker, 10)[0] == 0
