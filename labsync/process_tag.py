"""A tag naming this process in a file name, and whether the process of a tag still runs.

A temporary PDF file carries its writer's tag: ``{host}{boot}-{pid}-{start}``, the host's
and the boot's short hashes, the process ID and its start time in clock ticks since boot
(``/proc/PID/stat``). On the same host and boot, a tag whose PID is gone, or whose PID now
belongs to a process started at another time, is dead; a tag from an earlier boot is dead
too. A tag from another host (a PDF folder shared over the network) cannot be judged here.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
from pathlib import Path

_TAG = re.compile(r"([0-9a-f]{8})([0-9a-f]{8})-(\d+)-(\d+)")


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:8]


@functools.cache
def _host() -> str:
    return _short_hash(socket.gethostname())


def _boot() -> str:
    try:
        return _short_hash(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        return "00000000"


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return -1  # there, but unreadable: count it as alive
    # The command name (field 2) is in parentheses and may hold spaces: count after it.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])  # field 22 of the whole line


def this_process() -> str:
    """This process's tag (computed anew: a forked child is another process)."""
    pid = os.getpid()
    return f"{_host()}{_boot()}-{pid}-{_start_ticks(pid) or 0}"


def is_dead(tag: str) -> bool | None:
    """True if the process of ``tag`` runs no more; False if it does; None if unknowable
    here (another host, or not a tag)."""
    match = _TAG.fullmatch(tag)
    if match is None or match.group(1) != _host():
        return None
    if match.group(2) != _boot():
        return True  # the host rebooted since
    start = _start_ticks(int(match.group(3)))
    if start == -1:
        return False
    return start is None or start != int(match.group(4))
