"""Group commit: the fsyncs of concurrent writers done together.

The promise to an HL7 sender is "stored before acknowledged": a message is on disk, under
its final name, before ``AA`` goes back. That costs a rename, a file fsync and a directory
fsync per message, and a disk does only so many flushes a second. Writers that come at the
same time therefore share them: each hands its step (a written temporary file to put in
place, or a file to move) to ``GroupCommit.run`` and waits; one of them, the leader, takes
every step waiting, renames them all, fsyncs their files, fsyncs each directory touched
once, and wakes them all. On ext4 the first fsync of a group commits the journal for the
whole group, so a group of 8 costs about what one message costs alone.

There is no thread of its own: the first writer to find no leader leads, and a leader goes
on while steps are waiting (followers that came during its flush are the next group).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(eq=False)
class Step:
    """One durable change: rename ``source`` to ``target`` (if both are given), fsync
    ``fsync_file`` (if any) and the directories touched. ``target`` without ``source`` is a
    file just created under its name: it and its directory are fsynced.

    ``fsync_first``: the file is fsynced before the rename, so that its final name never
    shows anything but complete content (a reason file). Without it the rename comes
    first and one fsync covers both (on ext4 the file's fsync commits the rename with its
    data, and the directory's fsync after it has nothing left to do): the caller must then
    be able to tell a file a crash left half-written under its final name (the spool
    names queued files by their content's hash).
    """

    source: Path | None = None
    target: Path | None = None
    fsync_file: Path | None = None
    fsync_first: bool = False
    error: OSError | None = None
    done: threading.Event = field(default_factory=threading.Event)


class GroupCommit:
    """Runs ``Step``s durably, sharing fsyncs between the threads that run them at once."""

    def __init__(self, *, fsync: Callable[[int], None] = os.fsync) -> None:
        self._fsync = fsync
        self._lock = threading.Lock()
        self._waiting: list[Step] = []
        self._leading = False
        self.groups = 0  # how many groups were flushed (bench, tests)
        self.steps = 0

    def run(self, *steps: Step) -> None:
        """Make ``steps`` durable; return when they are. The first ``OSError`` of a step is
        raised here (the other steps of its group are not affected)."""
        with self._lock:
            self._waiting.extend(steps)
            lead = not self._leading
            if lead:
                self._leading = True
        if lead:
            self._lead()
        for step in steps:
            step.done.wait()
        for step in steps:
            if step.error is not None:
                raise step.error

    def _lead(self) -> None:
        while True:
            with self._lock:
                group, self._waiting = self._waiting, []
                if not group:
                    self._leading = False
                    return
            try:
                self._flush(group)
            finally:
                for step in group:
                    step.done.set()

    def _flush(self, group: list[Step]) -> None:
        self.groups += 1
        self.steps += len(group)
        self._fsync_files(step for step in group if step.fsync_first)
        dirs: dict[Path, list[Step]] = {}
        for step in group:
            if step.error is not None or step.target is None:
                continue
            if step.source is None:  # created in place
                dirs.setdefault(step.target.parent, []).append(step)
                continue
            try:
                os.replace(step.source, step.target)
            except OSError as exc:
                step.error = exc
                continue
            dirs.setdefault(step.target.parent, []).append(step)
            if step.source.parent != step.target.parent:
                dirs.setdefault(step.source.parent, []).append(step)
        self._fsync_files(step for step in group if not step.fsync_first)
        for directory, touched in dirs.items():
            try:
                self._fsync_path(directory)
            except OSError as exc:
                for step in touched:
                    step.error = step.error or exc

    def _fsync_files(self, steps: Iterable[Step]) -> None:
        for step in steps:
            if step.fsync_file is not None and step.error is None:
                try:
                    self._fsync_path(step.fsync_file)
                except OSError as exc:
                    step.error = exc

    def _fsync_path(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)
