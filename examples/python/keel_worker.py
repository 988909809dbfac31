"""A pg_keel queue worker: wake on LISTEN (or poll), claim, keep the lease while working, ack or
fail, and stop cleanly on SIGTERM.

    python keel_worker.py --queue emails            # DSN from $DATABASE_URL
    python keel_worker.py --queue emails --no-listen  # behind PgBouncer in transaction mode

The guarantees it relies on (see docs/queues.md):

* A claimed job is leased for the queue's visibility timeout. If this process dies, the lease
  runs out and another worker claims the job again with a higher ``attempt``; the old lease can
  no longer ack it. So nothing is lost when a worker is killed, and work may be done twice.
* The handler runs inside the transaction that acks the job. Whatever it writes to PostgreSQL
  commits together with the ack, or not at all: a job whose lease was lost (another worker has
  it now) rolls its writes back. Effects outside PostgreSQL (an email, an HTTP call) should be
  idempotent by ``job_id``.
* Just before a job starts its lease is renewed (the batch's later jobs waited while earlier
  ones ran; one whose lease ran out and was claimed elsewhere is skipped), and while the
  handler runs a heartbeat thread on its own connection extends it every third of its length,
  so a slow job is not handed to a second worker. Handlers need their own timeouts: a hung
  handler with a live heartbeat holds its job for ever.
* A lost database connection ends ``run`` with the error (restart the process): the leases run
  out and the jobs are claimed again, as after a crash.
* On SIGTERM the worker finishes the job in hand, gives the unstarted rest of its batch back at
  once with ``keel.snooze`` (no attempt used up), and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import psycopg
from psycopg.rows import dict_row

log = logging.getLogger("keel_worker")


@dataclass(frozen=True)
class Job:
    job_id: int
    attempt: int
    payload: Any
    priority: int
    lease_seconds: float  # the lease's length: the queue's visibility timeout unless overridden


class LeaseLost(Exception):
    """The job's lease is no longer ours: its writes were rolled back."""


# A handler gets the open transaction's connection and the job; it raises to fail the job.
Handler = Callable[[psycopg.Connection, Job], None]


class Worker:
    def __init__(
        self,
        dsn: str,
        queue: str,
        handler: Handler,
        *,
        batch: int = 10,
        visibility_timeout: float | None = None,
        poll_interval: float = 1.0,
        listen: bool = True,
        name: str | None = None,
    ) -> None:
        if not 1 <= batch <= 10_000:
            raise ValueError("batch must be between 1 and 10000")
        if visibility_timeout is not None and visibility_timeout <= 0:
            raise ValueError("visibility_timeout must be positive")
        self.dsn = dsn
        self.queue = queue
        self.handler = handler
        self.batch = batch
        self.visibility_timeout = visibility_timeout
        self.poll_interval = poll_interval
        self.listen = listen
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.stopping = threading.Event()
        self.processed = 0

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        """Ask the worker to stop after the job in hand (safe from a signal handler)."""
        self.stopping.set()

    def run(self) -> None:
        # prepare_threshold=None: no server-side prepared statements, so the same code runs
        # behind PgBouncer in transaction pooling mode.
        with psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None) as work, \
             psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None) as beat:
            waker = self._listener() if self.listen else None
            try:
                while not self.stopping.is_set():
                    jobs = self._claim(work)
                    if not jobs:
                        self._wait(waker)
                        continue
                    for i, job in enumerate(jobs):
                        if self.stopping.is_set():
                            self._give_back(work, jobs[i:])
                            break
                        self._process(work, beat, job)
            finally:
                if waker is not None:
                    waker.close()
        log.info("stopped after %d jobs", self.processed)

    # -- steps -----------------------------------------------------------------------------

    def _listener(self) -> psycopg.Connection:
        conn = psycopg.connect(self.dsn, autocommit=True)
        conn.execute("LISTEN keel_jobs")
        return conn

    def _wait(self, waker: psycopg.Connection | None) -> None:
        """Sleep until a NOTIFY for our queue, the poll interval, or a stop request."""
        deadline = time.monotonic() + self.poll_interval
        while not self.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if waker is None:
                self.stopping.wait(min(left, 0.1))
                continue
            # Short slices, so a SIGTERM is noticed within 100 ms.
            for note in waker.notifies(timeout=min(left, 0.1)):
                if note.payload == self.queue:
                    return

    def _claim(self, work: psycopg.Connection) -> list[Job]:
        # NULL visibility_timeout: the queue's own. now() is the claim's start, so the lease's
        # length comes without comparing clocks.
        vt = None if self.visibility_timeout is None else f"{self.visibility_timeout} seconds"
        rows = work.execute(
            "SELECT job_id, attempt, payload, priority,"
            " extract(epoch FROM lease_expires_at - now())::float8"
            " FROM keel.claim(%s, %s, %s::interval, %s)",
            (self.queue, self.batch, vt, self.name),
        ).fetchall()
        return [Job(*row) for row in rows]

    def _process(self, work: psycopg.Connection, beat: psycopg.Connection, job: Job) -> None:
        # The batch's later jobs waited while earlier ones ran: renew this one's lease before
        # starting, and skip it if it ran out and another worker has it now.
        if work.execute(
            "SELECT keel.extend(%s, %s, %s)", (job.job_id, job.attempt, f"{job.lease_seconds} seconds")
        ).fetchone()[0] is None:
            log.warning("lease of job %d ran out before it started; skipped", job.job_id)
            return
        heartbeat = _Heartbeat(beat, job)
        heartbeat.start()
        error: str | None = None
        try:
            with work.transaction():
                self.handler(work, job)
                held = work.execute(
                    "SELECT keel.ack(%s, %s)", (job.job_id, job.attempt)
                ).fetchone()[0]
                if not held:
                    raise LeaseLost(f"job {job.job_id} attempt {job.attempt}")
            self.processed += 1
        except LeaseLost:
            log.warning("lease of job %d lost; its writes were rolled back", job.job_id)
        except Exception as exc:  # the handler's failure: the job is retried or dead
            error = f"{type(exc).__name__}: {exc}"[:1000]
        finally:
            heartbeat.stop()
        if heartbeat.broken:
            raise RuntimeError("the heartbeat connection broke; stopping")
        if error is not None:
            outcome = work.execute(
                "SELECT keel.fail(%s, %s, %s)", (job.job_id, job.attempt, error)
            ).fetchone()[0]
            log.info("job %d attempt %d failed (%s): %s", job.job_id, job.attempt, outcome, error)

    def _give_back(self, work: psycopg.Connection, jobs: list[Job]) -> None:
        if not jobs:
            return
        for job in jobs:
            work.execute("SELECT keel.snooze(%s, %s, '0')", (job.job_id, job.attempt))
        log.info("gave back %d unstarted jobs", len(jobs))


class _Heartbeat:
    """Extends a job's lease every third of the visibility timeout until stopped."""

    def __init__(self, conn: psycopg.Connection, job: Job) -> None:
        self.conn, self.job, self.vt = conn, job, job.lease_seconds
        self.done = threading.Event()
        self.broken = False
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def _beat(self) -> None:
        while not self.done.wait(self.vt / 3):
            try:
                until = self.conn.execute(
                    "SELECT keel.extend(%s, %s, %s)",
                    (self.job.job_id, self.job.attempt, f"{self.vt} seconds"),
                ).fetchone()[0]
            except psycopg.Error as exc:
                # A broken heartbeat connection cannot keep any later lease either: the ack
                # will tell whether this one held; the worker stops after this job.
                log.error("heartbeat of job %d: %s", self.job.job_id, exc)
                self.broken = True
                return
            if until is None and not self.done.is_set():
                log.warning("lease of job %d lost during the work", self.job.job_id)
                return


def demo_handler(conn: psycopg.Connection, job: Job) -> None:
    """The demo's work: sleep ``sleep_ms``, fail while ``attempt <= fail_times``, then record
    the job in ``examples.done`` in the ack's transaction (its primary key makes a second
    record of one job an error, so the test can count effects exactly)."""
    payload = job.payload if isinstance(job.payload, dict) else {}
    time.sleep(int(payload.get("sleep_ms", 0)) / 1000)
    if job.attempt <= int(payload.get("fail_times", 0)):
        raise RuntimeError(f"planned failure on attempt {job.attempt}")
    conn.execute(
        "INSERT INTO examples.done (job_id, attempt, payload) VALUES (%s, %s, %s)",
        (job.job_id, job.attempt, json.dumps(payload)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", required=True)
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--visibility-timeout", type=float, help="default: the queue's")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--no-listen", action="store_true", help="poll only (PgBouncer)")
    parser.add_argument("--name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    worker = Worker(
        args.dsn,
        args.queue,
        demo_handler,
        batch=args.batch,
        visibility_timeout=args.visibility_timeout,
        poll_interval=args.poll_interval,
        listen=not args.no_listen,
        name=args.name,
    )
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    worker.run()


if __name__ == "__main__":
    main()
