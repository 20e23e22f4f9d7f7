"""SQLite store: the embedded default for one control-plane instance.

WAL journal; every desired-state write is one transaction that checks the expected revision
and appends its events, with `synchronous=FULL` so an acknowledged write survives a power
cut. Heartbeats use `synchronous=NORMAL`: they are observed state, replaced every second,
and losing the last one on a crash is harmless.

Calls are made on the event loop thread: each is a few hundred microseconds on local disk,
cheaper than a thread hop, and running them all on one thread serialises them without locks.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from api.store.base import (
    EventDraft,
    ObservedRecord,
    RevisionConflict,
    Store,
    StoreUnavailable,
    dead_event,
    heartbeat_events,
)
from contract.schemas import DesiredState, Event, Heartbeat, Liveness, NodeObserved

_SCHEMA = """
CREATE TABLE IF NOT EXISTS desired (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS observed (
    node TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    last_seen REAL NOT NULL,
    ttl REAL NOT NULL,
    dead_reported INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    cause TEXT NOT NULL,
    author TEXT NOT NULL,
    revision INTEGER NOT NULL
);
"""


def _event_id(seq: int) -> str:
    return f"{seq:016d}.00"


class SqliteStore(Store):
    def __init__(self, path: Path | str) -> None:
        super().__init__()
        self._path = str(path)
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = self._open()
        return self._db

    def _open(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite {self._path}: {exc}") from exc
        return db

    async def start(self) -> None:
        _ = self.db

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- desired ---------------------------------------------------------------------

    def _read_desired(self) -> DesiredState:
        row = self.db.execute("SELECT revision, body FROM desired WHERE id = 1").fetchone()
        if row is None:
            return DesiredState()
        state = DesiredState.model_validate_json(row[1])
        return state.model_copy(update={"revision": row[0]})

    @contextlib.contextmanager
    def _transaction(self, synchronous: str | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE, COMMIT when the block ends (unless it
        rolled back itself), ROLLBACK on any error; SQLite errors become StoreUnavailable."""
        db = self.db
        try:
            if synchronous is not None:
                db.execute(f"PRAGMA synchronous={synchronous}")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                if db.in_transaction:
                    db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def read_desired(self) -> DesiredState:
        try:
            return self._read_desired()
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def write_desired(
        self, expected_revision: int, new: DesiredState, events: Sequence[EventDraft]
    ) -> DesiredState:
        with self._transaction("FULL") as db:
            current = self._read_desired()
            if current.revision != expected_revision:
                db.execute("ROLLBACK")
                if new.write_id and current.write_id == new.write_id:
                    return current
                raise RevisionConflict(current)
            revision = expected_revision + 1
            stored = new.model_copy(update={"revision": revision})
            db.execute(
                "INSERT INTO desired (id, revision, body) VALUES (1, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET "
                "revision = excluded.revision, body = excluded.body",
                (revision, stored.model_dump_json()),
            )
            now = datetime.now(UTC).timestamp()
            db.executemany(
                "INSERT INTO events (time, kind, subject, cause, author, revision) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(now, e.kind, e.subject, e.cause, e.author, revision) for e in events],
            )
        self.changes.notify()
        return stored

    # --- observed --------------------------------------------------------------------

    async def record_heartbeat(
        self, node: str, heartbeat: Heartbeat, now: datetime, ttl_s: float, author: str
    ) -> None:
        with self._transaction("NORMAL") as db:
            row = db.execute(
                "SELECT body, last_seen, ttl, dead_reported FROM observed WHERE node = ?",
                (node,),
            ).fetchone()
            previous = None
            if row is not None:
                previous = ObservedRecord(
                    heartbeat=Heartbeat.model_validate_json(row[0]),
                    last_seen=datetime.fromtimestamp(row[1], UTC),
                    # Expired but not yet swept counts as dead: the revival is an event.
                    dead_reported=bool(row[3]) or row[1] + row[2] < now.timestamp(),
                )
            events = heartbeat_events(node, previous, heartbeat, author)
            db.execute(
                "INSERT INTO observed (node, body, last_seen, ttl, dead_reported) "
                "VALUES (?, ?, ?, ?, 0) ON CONFLICT(node) DO UPDATE SET "
                "body = excluded.body, last_seen = excluded.last_seen, ttl = excluded.ttl, "
                "dead_reported = 0",
                (node, heartbeat.model_dump_json(), now.timestamp(), ttl_s),
            )
            self._insert_events(events, now)
        if events:
            # Liveness or state changed: effective weights may have moved.
            self.changes.notify()

    def _insert_events(self, events: Sequence[EventDraft], now: datetime) -> None:
        # Observed events carry revision 0: they belong to no desired revision.
        if events:
            self.db.executemany(
                "INSERT INTO events (time, kind, subject, cause, author, revision) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(now.timestamp(), e.kind, e.subject, e.cause, e.author, 0) for e in events],
            )

    async def read_observed(self, now: datetime) -> dict[str, NodeObserved]:
        try:
            rows = self.db.execute("SELECT node, body, last_seen, ttl FROM observed").fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc
        result: dict[str, NodeObserved] = {}
        for node, body, last_seen, ttl in rows:
            alive = last_seen + ttl >= now.timestamp()
            result[node] = NodeObserved(
                node=node,
                liveness=Liveness.ALIVE if alive else Liveness.DEAD,
                last_seen=datetime.fromtimestamp(last_seen, UTC),
                heartbeat=Heartbeat.model_validate_json(body),
            )
        return result

    async def sweep_dead(self, now: datetime, ttl_s: float) -> list[str]:
        dead: list[str] = []
        with self._transaction() as db:
            rows = db.execute(
                "SELECT node, body, last_seen, ttl FROM observed "
                "WHERE dead_reported = 0 AND last_seen + ttl < ?",
                (now.timestamp(),),
            ).fetchall()
            for node, body, last_seen, ttl in rows:
                record = ObservedRecord(
                    Heartbeat.model_validate_json(body), datetime.fromtimestamp(last_seen, UTC)
                )
                db.execute("UPDATE observed SET dead_reported = 1 WHERE node = ?", (node,))
                self._insert_events([dead_event(node, record, ttl)], now)
                dead.append(node)
        if dead:
            self.changes.notify()
        return dead

    # --- events ----------------------------------------------------------------------

    async def append_events(self, events: Sequence[EventDraft], now: datetime) -> None:
        with self._transaction("NORMAL"):
            self._insert_events(events, now)

    async def list_events(self, limit: int, after: str | None) -> list[Event]:
        try:
            if after is None:
                rows = self.db.execute(
                    "SELECT * FROM (SELECT seq, time, kind, subject, cause, author, revision "
                    "FROM events ORDER BY seq DESC LIMIT ?) ORDER BY seq",
                    (limit,),
                ).fetchall()
            else:
                after_seq = int(after.split(".", 1)[0])
                rows = self.db.execute(
                    "SELECT seq, time, kind, subject, cause, author, revision FROM events "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, limit),
                ).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc
        return [
            Event(
                id=_event_id(seq),
                time=datetime.fromtimestamp(time, UTC),
                kind=kind,
                subject=subject,
                cause=cause,
                author=author,
                revision=revision,
            )
            for seq, time, kind, subject, cause, author, revision in rows
        ]
