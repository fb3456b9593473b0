"""The on-disk inbox: HL7 messages stored one per file, waiting, done or failed.

Inside ``drop_dir`` (the folder the LIS writes files into):

- ``queue/KEY.HASH.hl7``: a message labsync has stored and acknowledged, not yet applied.
  It is written under that name and fsynced with its folder (``GroupCommit``) before the
  sender hears ``AA``. ``HASH`` is its content's: a file a crash caught half-written (never
  acknowledged, so the sender resends it) does not match it and is removed when the spool
  is loaded, rather than taken for the stored copy of that resend.
- ``queue/KEY.held``: why a waiting message is held (its order is not on the site yet).
- ``done/KEY.hl7``: applied; pruned after ``keep_done``.
- ``error/NAME`` with ``error/NAME.reason``: refused or failed, for the operator; the reason
  is written (and fsynced) before the message is moved there, so none is without one.

``KEY`` comes from the message's stable id (MSH-10 with the sending application and
facility): a resend has the same key, so "seen before" is one ``stat``, and memory does not
grow with ``done/``. Waiting messages are handed out oldest first by MSH-7 (then MSH-10,
then arrival), whatever order they arrived in. What is in hand or held is process memory
only: after a crash everything in ``queue/`` is waiting again, under the same key.
"""

from __future__ import annotations

import heapq
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

from labsync.lis.base import Delivery
from labsync.lis.hl7.commit import GroupCommit, Step

SUFFIX = ".hl7"
REASON = ".reason"
HELD = ".held"
DROP_SUFFIXES = (".hl7", ".txt")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_tmp_names = itertools.count(1)
FILE_MODE = 0o640
CACHED_DELIVERIES = 1000  # waiting messages whose delivery is kept in memory, at most


def key_for(delivery_id: str, control_id: str) -> str:
    """A file name for a delivery id: readable (its MSH-10) and unique (a hash of the id)."""
    readable = _UNSAFE.sub("_", control_id).strip("._")[:60] or "msg"
    return f"{readable}-{sha256(delivery_id.encode('utf-8')).hexdigest()[:16]}"


def content_hash(data: bytes) -> str:
    return sha256(data).hexdigest()[:16]


def queue_name(key: str, data: bytes) -> str:
    return f"{key}.{content_hash(data)}{SUFFIX}"


def split_queue_name(name: str) -> tuple[str, str] | None:
    """(key, content hash) of a ``queue/`` file name; None for a name that is not one."""
    if not name.endswith(SUFFIX):
        return None
    key, dot, digest = name[:-len(SUFFIX)].rpartition(".")
    return (key, digest) if dot and key and len(digest) == 16 else None


def safe_name(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._")[:80] or "msg"


def _write_new(path: Path, data: bytes) -> None:
    """``data`` as a new file, readable by its owner and group only (results are patient
    data), not yet fsynced; ``FileExistsError`` if ``path`` exists. A write that fails (a
    full disk) removes the file it began."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                 FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


@dataclass(slots=True)
class Described:
    """What the spool needs of a message: its id, where it sorts, and (when it is small) the
    delivery already read, so that taking it needs no second parse."""

    delivery_id: str
    sort_key: tuple[Any, ...]
    delivery: Delivery | None = None
    notes: tuple[str, ...] = ()  # what reading it left out, logged when it is handed out


@dataclass(slots=True)
class Entry:
    """A waiting message, as small as it can be: a backlog of 100,000 is in memory whole."""

    key: str
    name: str  # its file in queue/
    described: Described
    received_at: float  # wall time the message was stored
    seq: int
    held: str | None = None  # why it was released, while it waits for a later drain
    drain: int = 0  # the drain it was last taken in

    @property
    def order(self) -> tuple[Any, ...]:
        return (*self.described.sort_key, self.seq)


@dataclass
class _Inflight:
    event: threading.Event = field(default_factory=threading.Event)
    stored: bool = False


class Spool:
    """The folders, and which of their messages wait, are in hand or held (thread-safe)."""

    def __init__(self, root: Path, *, commit: GroupCommit | None = None,
                 now: Callable[[], float] = time.time) -> None:
        self.root = root
        self.queue, self.done_dir, self.error_dir = root / "queue", root / "done", root / "error"
        self.commit = commit or GroupCommit()
        self.now = now
        self._lock = threading.Lock()
        self._waiting: dict[str, Entry] = {}
        self._heap: list[tuple[tuple[Any, ...], str]] = []
        self._in_hand: set[str] = set()
        self._later: list[tuple[tuple[Any, ...], str]] = []  # released in this drain
        self._drain = 0  # drains ended (take() returned None)
        self._inflight: dict[str, _Inflight] = {}
        self._seq = itertools.count(1)
        self.arrived = threading.Condition(self._lock)  # notified on every new message
        self.unfinished = 0  # files a crash left half-written, removed by load()

    # -- opening ---------------------------------------------------------------------------

    def make_dirs(self) -> None:
        for folder in (self.root, self.queue, self.done_dir, self.error_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def load(self, describe: Callable[[Path, bytes], Described]) -> int:
        """Everything in ``queue/`` as waiting (at start, and after a crash). What a crash left
        unfinished (temporary files, a file whose content is not what its name says) was
        never acknowledged and is removed. Returns how many messages wait."""
        self.make_dirs()
        found = []
        held: dict[str, Path] = {}
        for entry in os.scandir(self.queue):
            path = Path(entry.path)
            if entry.name.startswith("."):
                path.unlink(missing_ok=True)  # never acknowledged: the sender resends it
                continue
            if entry.name.endswith(HELD):
                held[entry.name[:-len(HELD)]] = path
                continue
            parts = split_queue_name(entry.name)
            if parts is not None and entry.is_file():
                found.append((path, parts, entry.stat().st_mtime))
        loaded = 0
        for path, (key, digest), mtime in found:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if content_hash(data) != digest:
                path.unlink(missing_ok=True)
                self.unfinished += 1
                continue
            self._add(key, path, describe(path, data), mtime)
            loaded += 1
        for key, path in held.items():
            waiting = self._waiting.get(key)
            if waiting is None:
                path.unlink(missing_ok=True)
            else:
                waiting.held = path.read_text("utf-8", errors="replace")
        return loaded

    # -- storing ---------------------------------------------------------------------------

    def seen(self, key: str) -> bool:
        """Stored before: waiting, in hand, or done (and not yet pruned)."""
        with self._lock:
            if key in self._waiting:
                return True
        return (self.done_dir / f"{key}{SUFFIX}").exists()

    def store(self, key: str, data: bytes, described: Described) -> bool:
        """``data`` durably in ``queue/`` as ``key``; False, storing nothing, when that key is
        stored already (a resend). A resend that comes while the first copy is being stored
        returns once that copy is durable."""
        with self._lock:
            inflight = self._inflight.get(key)
            if inflight is None and key not in self._waiting:
                inflight = self._inflight[key] = _Inflight()
                mine = True
            else:
                mine = False
        if not mine:
            if inflight is not None:
                inflight.event.wait()
            return False
        assert inflight is not None
        try:
            if (self.done_dir / f"{key}{SUFFIX}").exists():
                return False
            final = self.queue / queue_name(key, data)
            _write_new(final, data)  # a file of that name already there is not ours to remove
            try:
                self.commit.run(Step(target=final, fsync_file=final))
            except OSError:
                final.unlink(missing_ok=True)  # in place but not durable: never acknowledged
                raise
            self._add(key, final, described, final.stat().st_mtime, notify=True)
            inflight.stored = True
            return True
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            inflight.event.set()

    def reject(self, name: str, data: bytes, reason: str) -> Path:
        """``data`` durably in ``error/`` with its reason, never queued (an MLLP message
        answered ``AE``/``AR``)."""
        self.make_dirs()
        target = self._free_name(self.error_dir, name)
        msg_tmp = self._write_tmp(self.error_dir, data)
        why_tmp = self._write_tmp(self.error_dir, reason.encode("utf-8") + b"\n")
        self.commit.run(Step(why_tmp, target.with_name(target.name + REASON), fsync_file=why_tmp,
                             fsync_first=True),
                        Step(msg_tmp, target, fsync_file=msg_tmp, fsync_first=True))
        return target

    def _write_tmp(self, folder: Path, data: bytes) -> Path:
        tmp = folder / f".{os.getpid()}-{threading.get_ident()}-{next(_tmp_names)}.tmp"
        _write_new(tmp, data)
        return tmp

    def _free_name(self, folder: Path, name: str) -> Path:
        target = folder / name
        stem, suffix = (name[:-len(SUFFIX)], SUFFIX) if name.endswith(SUFFIX) else (name, "")
        for n in itertools.count(2):
            if not target.exists() and not target.with_name(target.name + REASON).exists():
                return target
            target = folder / f"{stem}.{n}{suffix}"
        raise AssertionError("unreachable")  # pragma: no cover

    def path(self, entry: Entry) -> Path:
        return self.queue / entry.name

    def _add(self, key: str, path: Path, described: Described, received_at: float, *,
             notify: bool = False) -> None:
        entry = Entry(key, path.name, described, received_at, next(self._seq))
        with self._lock:
            if len(self._waiting) >= CACHED_DELIVERIES:
                # a backlog: what waits is read again from disk when its turn comes, so
                # memory does not grow with the queue
                described.delivery = None
            self._waiting[key] = entry
            heapq.heappush(self._heap, (entry.order, key))
            if notify:
                self.arrived.notify_all()

    # -- handing out -----------------------------------------------------------------------

    def take(self) -> Entry | None:
        """The oldest waiting message not in hand and not released in this drain, now in
        hand; None ends the drain (released ones wait again for the next)."""
        with self._lock:
            while self._heap:
                order, key = heapq.heappop(self._heap)
                entry = self._waiting.get(key)
                if entry is None or entry.order != order or key in self._in_hand:
                    continue
                self._in_hand.add(key)
                entry.drain = self._drain
                return entry
            for item in self._later:
                heapq.heappush(self._heap, item)
            self._later.clear()
            self._drain += 1
            return None

    def release(self, entry: Entry, reason: str, *, this_drain: bool = False) -> None:
        """Held until the next drain (the one under way, if the drain it was taken in has
        ended already), or with ``this_drain`` waiting again at once (the drain is given
        up, as when the database is down). The reason is also written beside the message
        (``queue/KEY.held``, not fsynced: it only informs), so that ``labsync status`` in
        another process, and this one after a restart, count it as held."""
        with self._lock:
            self._in_hand.discard(entry.key)
            if entry.key not in self._waiting:
                return
            changed, entry.held = entry.held != reason, reason
            if this_drain or entry.drain < self._drain:
                heapq.heappush(self._heap, (entry.order, entry.key))
            else:
                self._later.append((entry.order, entry.key))
        if changed:
            tmp = self._write_tmp(self.queue, reason.encode("utf-8"))
            os.replace(tmp, self.queue / f"{entry.key}{HELD}")

    def finish(self, entry: Entry, reason: str | None = None) -> None:
        """Done (``reason`` None: into ``done/``) or failed (into ``error/`` with ``reason``,
        durably), then forgotten. Finishing a finished message does nothing.

        The move into ``done/`` is not fsynced: the database recorded the delivery as
        applied in the transaction before, so a crash that undoes the move only brings it
        back once, to be marked done again (``Inbox``, rule 4).
        """
        with self._lock:
            if entry.key not in self._waiting:
                return
        source, name = self.path(entry), f"{entry.key}{SUFFIX}"
        if reason is None:
            try:
                os.replace(source, self.done_dir / name)
            except FileNotFoundError:
                pass  # moved already (another process's drain)
        else:
            target = self._free_name(self.error_dir, name)
            why = self._write_tmp(self.error_dir, reason.encode("utf-8") + b"\n")
            if source.exists():
                self.commit.run(Step(why, target.with_name(target.name + REASON),
                                     fsync_file=why, fsync_first=True), Step(source, target))
            else:
                why.unlink(missing_ok=True)
        # Durable first, then out of hand: the other way round, another thread could take
        # it again in between.
        (self.queue / f"{entry.key}{HELD}").unlink(missing_ok=True)
        with self._lock:
            self._waiting.pop(entry.key, None)
            self._in_hand.discard(entry.key)

    def wait_for_arrival(self, timeout: float) -> bool:
        """Block until a new message is stored (True) or ``timeout`` seconds pass (False)."""
        with self._lock:
            return self.arrived.wait(timeout)

    # -- dropped files ---------------------------------------------------------------------

    def drops(self, *, settle: float = 1.0) -> list[Path]:
        """The complete files in ``drop_dir`` (``*.hl7``, ``*.txt``), oldest first: never a
        dotfile, a ``*.tmp`` or a file modified in the last ``settle`` seconds."""
        self.make_dirs()
        now = self.now()
        found = []
        for entry in os.scandir(self.root):
            name = entry.name
            if (name.startswith(".") or not name.lower().endswith(DROP_SUFFIXES)
                    or not entry.is_file(follow_symlinks=False)):
                continue
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue  # taken by another reader meanwhile
            if now - mtime >= settle:
                found.append((mtime, name, Path(entry.path)))
        return [path for _mtime, _name, path in sorted(found)]

    def consumed(self, path: Path) -> None:
        """A dropped file whose messages are all stored: removed from ``drop_dir`` (a reason
        left in ``error/`` by an earlier failure of the same file goes with it)."""
        path.unlink(missing_ok=True)
        self.commit.run(Step(fsync_file=self.root))
        stale = self.error_dir / f"{path.name}{REASON}"
        if not (self.error_dir / path.name).exists():
            stale.unlink(missing_ok=True)

    # -- housekeeping and reports ----------------------------------------------------------

    def prune(self, keep_done: float) -> int:
        """Remove ``done/`` files older than ``keep_done`` seconds; how many went."""
        cutoff = self.now() - keep_done
        removed = 0
        for entry in os.scandir(self.done_dir):
            if entry.is_file() and entry.stat().st_ctime < cutoff:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        return removed

    def counts(self) -> dict[str, int]:
        with self._lock:
            held = sum(1 for e in self._waiting.values() if e.held is not None)
            waiting = len(self._waiting) - held
        return {"waiting": waiting, "held": held,
                "failed": sum(1 for _ in self._files(self.error_dir)),
                "done": sum(1 for _ in self._files(self.done_dir))}

    def held_reason(self, key: str) -> str | None:
        with self._lock:
            entry = self._waiting.get(key)
            return entry.held if entry is not None else None

    def files(self) -> Iterator[tuple[str, Path]]:
        """Every message file with its state: ``waiting``, ``done`` or ``failed``."""
        for state, folder in (("waiting", self.queue), ("done", self.done_dir),
                              ("failed", self.error_dir)):
            for path in self._files(folder):
                yield state, path

    @staticmethod
    def _files(folder: Path) -> Iterator[Path]:
        if not folder.is_dir():
            return
        for entry in os.scandir(folder):
            if not entry.name.startswith(".") and not entry.name.endswith(REASON) \
                    and entry.is_file():
                yield Path(entry.path)
