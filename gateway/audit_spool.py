"""The audit spool: a request's row is durable before its last byte for the price of one write(2).

With `synchronous = "normal"` a committed SQLite row survives the gateway being killed (kill -9,
the OOM killer) but not the OS crashing: COMMIT has written the WAL frames into the page cache.
Committing on the request path cost ~0.1-0.2 ms per lone request, because one row dirties about
eleven B-tree pages (the row, its six indexes, three rollups): ~22 pwrite calls plus locking.
Appending the row, as one JSON line, to a file gives the very same guarantee (the line is in the
page cache once write() returns), so `AuditStore.record()` does that and hands the row to the
writer thread without waiting; the thread commits rows to SQLite in groups, off the request path.

Files live next to the database, in `<db>-spool/`:

    <owner>.lock         flock()ed for as long as the owning process runs
    <owner>.<n>.jsonl    segments of rows; a sealed segment is deleted once every row in it
                         is committed (or given up: rejected as unencodable)

A clean shutdown commits everything and removes the owner's files. After a crash they stay,
and so do rows the writer could not take (its memory buffer full while the database fails);
`recover()` (run by `AuditStore.start()` and by `aibox usage`) replays the segments of every
owner whose lock is free: rows whose request_id is not in the database yet are inserted, with
their rollups, in one transaction, then the files are deleted. A torn last line (the process
died inside write()) belongs to a response that never completed and is skipped; a failed
append is cut off again, so it cannot spoil the next row.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import sqlite3
import threading
from pathlib import Path
from typing import Any

import msgspec

from gateway.audit_schema import AuditRecord

log = logging.getLogger("aibox.audit")

SEGMENT_BYTES = 4 * 1024 * 1024  # rotate past this: a sealed segment can be deleted as a whole
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AuditRecord)


def spool_dir(db_path: str | Path) -> Path:
    return Path(f"{db_path}-spool")


class Segment:
    __slots__ = ("path", "pending", "sealed")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending = 0  # rows appended and not yet committed (or given up)
        self.sealed = False  # no more appends; deleted when pending reaches 0


class Spool:
    """One process's spool. `append()` runs on the event loop; `done()` on the writer thread."""

    def __init__(self, directory: Path, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock = threading.Lock()  # pending counts and sealing: loop vs writer thread
        self._lock_fd = -1
        self._fd = -1
        self._size = 0
        self._num_segments = 0
        self._active: Segment | None = None
        self._segments: list[Segment] = []  # not yet deleted, oldest first

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # Locked before it is visible under its name (recover() looks at *.lock, not dotfiles),
        # so recover() never sees it free.
        hidden = self.directory / f".{self._owner}.locking"
        self._lock_fd = os.open(hidden, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(hidden, self.directory / f"{self._owner}.lock")
            self._rotate()
        except OSError:  # e.g. no flock on this file system: leave nothing behind
            os.close(self._lock_fd)
            self._lock_fd = -1
            _unlink(hidden)
            _unlink(self.directory / f"{self._owner}.lock")
            raise

    def append(self, record: AuditRecord) -> Segment:
        """Write the row (raises OSError: disk full, I/O error); the caller hands the returned
        segment to the writer with the row, and the writer calls `done()` for it."""
        if self._size >= self._segment_bytes:
            self._rotate()
        data = _encoder.encode(record) + b"\n"
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError:
            try:  # a partial line (disk full mid-write) would be glued to the next row
                os.ftruncate(self._fd, self._size)
            except OSError:
                self._size = self._segment_bytes  # start a fresh segment next time instead
            raise
        self._size += len(data)
        segment = self._active
        assert segment is not None
        with self._lock:
            segment.pending += 1
        return segment

    def done(self, segment: Segment, num_rows: int = 1) -> None:
        """`num_rows` of the segment's rows are in the database (or given up)."""
        with self._lock:
            segment.pending -= num_rows
            finished = self._retire(segment)
        if finished:
            _unlink(segment.path)

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(s.pending for s in self._segments)

    def _rotate(self) -> None:
        old = self._active
        path = self.directory / f"{self._owner}.{self._num_segments + 1}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # raises: the old one stays active
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._num_segments += 1
        self._size = 0
        self._active = Segment(path)
        finished = False
        with self._lock:
            self._segments.append(self._active)
            if old is not None:
                old.sealed = True
                finished = self._retire(old)
        if old is not None and finished:
            _unlink(old.path)

    def _retire(self, segment: Segment) -> bool:
        """Under the lock: forget a sealed segment with no rows left; True if its file can go."""
        if not segment.sealed or segment.pending > 0:
            return False
        self._segments.remove(segment)
        return True

    def close(self, *, writer_alive: bool = False) -> int:
        """Release the spool; returns the rows left uncommitted. With none left every file is
        removed; otherwise the files stay, to be replayed by the next `recover()`. While the
        writer is still alive (stuck in SQLite past the close timeout) the lock is kept, so no
        replay races the commit it may still make; it goes with the process."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        left = self.pending
        if left == 0:
            for segment in self._segments:
                _unlink(segment.path)
            self._segments.clear()
            _unlink(self.directory / f"{self._owner}.lock")
        else:
            log.warning("audit: %d rows not committed; they stay in %s and are replayed at the next start", left, self.directory)
        if self._lock_fd >= 0 and not writer_alive:
            os.close(self._lock_fd)  # releases the flock: the files are now an orphan's
            self._lock_fd = -1
        return left


def recover(conn: Any, directory: Path, insert: Any) -> int:
    """Replay the spools of owners that are gone (their lock is free); returns rows inserted.

    `conn` is a sqlite3 connection, `insert(conn, records)` writes rows and rollups inside the
    open transaction (gateway.audit_writer.insert_rows). Safe against a concurrent gateway:
    live owners hold their lock, and an orphan is locked by whoever replays it.
    """
    if not directory.is_dir():
        return 0
    total = 0
    for lock_path in sorted(directory.glob("*.lock")):
        if lock_path.name.startswith("."):
            continue
        owner = lock_path.name[: -len(".lock")]
        try:
            fd = os.open(lock_path, os.O_WRONLY)
        except FileNotFoundError:
            continue  # another process finished replaying it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live gateway (or another replay) owns it
            if not lock_path.exists():
                continue  # replayed and removed while we waited for the lock
            segments = sorted(directory.glob(f"{owner}.*.jsonl"), key=lambda p: int(p.name.split(".")[-2]))
            for p in segments:  # one transaction per segment (bounded memory); a replay is idempotent
                total += _insert_missing(conn, _read(p), insert)  # OperationalError: the rest is kept, raised
                _unlink(p)
            _unlink(lock_path)
        finally:
            os.close(fd)
    if total:
        log.warning("audit: recovered %d rows from the spool of a gateway that did not shut down cleanly", total)
    return total


def _read(path: Path) -> list[AuditRecord]:
    records = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line:
            continue
        try:
            records.append(_decoder.decode(line))
        except msgspec.ValidationError:  # well-formed JSON: e.g. a NaN float was written as null
            record = _lenient(line)
            if record is None:
                log.error("audit spool %s line %d is not a valid row; skipped: %s", path.name, number, line[:200])
            else:
                records.append(record)
        except msgspec.DecodeError:  # torn by a crash mid-write: that response never completed
            log.warning("audit spool %s line %d is cut short (a crash mid-write?); skipped", path.name, number)
    return records


def _lenient(line: bytes) -> AuditRecord | None:
    """A row whose duration JSON could not carry (NaN, inf -> null): it becomes 0. (Without a
    time the row cannot be placed, and is skipped.)"""
    try:
        fields = msgspec.json.decode(line)
        if fields.get("total_ms", 0) is None:
            fields["total_ms"] = 0.0
        return msgspec.convert(fields, AuditRecord)
    except (msgspec.DecodeError, msgspec.ValidationError, AttributeError, TypeError):
        return None


def _insert_missing(conn: Any, records: list[AuditRecord], insert: Any) -> int:
    """Insert the records whose request_id is not stored yet, in one transaction."""
    if not records:
        return 0
    if conn.in_transaction:
        conn.commit()
    conn.execute("BEGIN IMMEDIATE")  # the check and the insert in one write transaction
    stored: set[str] = set()
    ids = [r.request_id for r in records]
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        sql = f"SELECT request_id FROM requests WHERE request_id IN ({', '.join('?' * len(chunk))})"
        stored.update(row[0] for row in conn.execute(sql, chunk))
    missing = [r for r in records if r.request_id not in stored]
    try:
        insert(conn, missing)
    except sqlite3.OperationalError:  # locked, full, I/O: keep the files for the next try
        conn.rollback()
        raise
    except (sqlite3.Error, TypeError, ValueError, OverflowError):  # a row SQLite refuses: skip just it
        conn.rollback()
        kept = []
        conn.execute("BEGIN IMMEDIATE")
        for record in missing:
            conn.execute("SAVEPOINT spool_row")
            try:
                insert(conn, [record])
                kept.append(record)
            except sqlite3.OperationalError:
                conn.rollback()
                raise
            except (sqlite3.Error, TypeError, ValueError, OverflowError) as exc:
                conn.execute("ROLLBACK TO spool_row")
                log.error("audit spool row %s cannot be stored and is dropped: %s", record.request_id, exc)
            conn.execute("RELEASE spool_row")
        missing = kept
    conn.commit()
    return len(missing)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # never fatal (this runs on the writer thread): the file is replayed, deduplicated
        log.error("audit spool: cannot delete %s: %s", path, exc)
