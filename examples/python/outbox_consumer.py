"""Consume a pg_keel outbox topic from its Redis stream with a consumer group, applying each
event exactly once to PostgreSQL.

    python outbox_consumer.py --stream keel:orders --group billing --consumer billing-1

pg_keel's worker puts every committed ``keel.emit`` into the stream at least once and never
twice in one stream (see docs/outbox.md); Redis consumer groups deliver at least once (an entry
read but not XACKed is delivered again). So the consumer dedupes by the event's ``id``: it
records the id in ``examples.applied`` in the same transaction as the event's effect, and a
redelivered event finds its id there and changes nothing. Only then does it XACK.

Entries this consumer read before it crashed are read again first (``XREADGROUP ... 0``); those
of a consumer that died for good are taken over after ``--min-idle-ms`` with XAUTOCLAIM
(Redis 7 or later). An event the consumer cannot apply stops it (fix the code or the data,
or record such events in a table of their own in the same transaction and XACK them); an
entry trimmed from the stream before it was read is acknowledged and logged
(``keel.outbox_replay`` sends it again while pg_keel keeps it). ``examples.applied`` grows
with every event: prune it past the longest redelivery you expect.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading

import psycopg
import redis

log = logging.getLogger("outbox_consumer")


class Consumer:
    def __init__(
        self,
        dsn: str,
        redis_url: str,
        stream: str,
        group: str,
        name: str,
        *,
        min_idle_ms: int = 30_000,
        crash_after: int | None = None,
    ) -> None:
        self.dsn = dsn
        # Every Redis call is bounded: a Redis that hangs cannot hang the consumer.
        self.redis = redis.Redis.from_url(
            redis_url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True
        )
        self.stream, self.group, self.name = stream, group, name
        self.min_idle_ms = min_idle_ms
        self.crash_after = crash_after  # tests: exit hard after applying this many, before XACK
        self.stopping = threading.Event()
        self.applied = 0
        self.duplicates = 0

    def stop(self, *_: object) -> None:
        self.stopping.set()

    def run(self, until_idle: bool = False) -> None:
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        with psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None) as conn:
            # First what this consumer read and never acknowledged (it crashed), then others'
            # stale entries, then new ones.
            self._drain(conn, "0")
            while not self.stopping.is_set():
                self._take_over(conn)
                got = self._read(conn, ">", block_ms=500)
                if not got and until_idle:
                    return

    def _drain(self, conn: psycopg.Connection, start: str) -> None:
        while not self.stopping.is_set():
            if not self._read(conn, start, block_ms=None):
                return

    def _take_over(self, conn: psycopg.Connection) -> None:
        _, entries, _ = self.redis.xautoclaim(
            self.stream, self.group, self.name, self.min_idle_ms, start_id="0-0", count=100
        )
        for entry_id, fields in entries:
            if fields:
                self._apply(conn, fields)
            else:  # trimmed from the stream before it was applied: say so, then acknowledge
                log.error("entry %s was trimmed before it was applied", entry_id)
            self.redis.xack(self.stream, self.group, entry_id)

    def _read(self, conn: psycopg.Connection, start: str, block_ms: int | None) -> int:
        reply = self.redis.xreadgroup(
            self.group, self.name, {self.stream: start}, count=100, block=block_ms
        )
        entries = reply[0][1] if reply else []
        for entry_id, fields in entries:
            if fields:
                self._apply(conn, fields)
            else:
                log.error("entry %s was trimmed before it was applied", entry_id)
            self.redis.xack(self.stream, self.group, entry_id)
        return len(entries)

    def _apply(self, conn: psycopg.Connection, fields: dict[str, str]) -> None:
        event_id = int(fields["id"])
        payload = json.loads(fields["payload"])
        with conn.transaction():
            fresh = conn.execute(
                "INSERT INTO examples.applied (event_id, topic) VALUES (%s, %s)"
                " ON CONFLICT (event_id) DO NOTHING",
                (event_id, fields["topic"]),
            ).rowcount
            if fresh:
                # The event's effect, only the first time this id is seen.
                conn.execute(
                    "INSERT INTO examples.order_totals (customer, total) VALUES (%s, %s)"
                    " ON CONFLICT (customer) DO UPDATE"
                    " SET total = examples.order_totals.total + excluded.total",
                    (payload["customer"], payload["amount"]),
                )
        if fresh:
            self.applied += 1
        else:
            self.duplicates += 1
        if self.crash_after is not None and self.applied >= self.crash_after:
            log.warning("crashing on purpose after %d events, before XACK", self.applied)
            os._exit(3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1"))
    parser.add_argument("--stream", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--consumer", required=True)
    parser.add_argument("--min-idle-ms", type=int, default=30_000)
    parser.add_argument("--crash-after", type=int)
    parser.add_argument("--until-idle", action="store_true", help="exit when nothing is left")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    consumer = Consumer(
        args.dsn,
        args.redis_url,
        args.stream,
        args.group,
        args.consumer,
        min_idle_ms=args.min_idle_ms,
        crash_after=args.crash_after,
    )
    signal.signal(signal.SIGTERM, consumer.stop)
    signal.signal(signal.SIGINT, consumer.stop)
    consumer.run(until_idle=args.until_idle)
    print(json.dumps({"applied": consumer.applied, "duplicates": consumer.duplicates}))


if __name__ == "__main__":
    main()
