"""What ``labsync check`` says of an HL7 inbox's folders and port, before anything is sent.

Each line is (level, text), level one of ``ok``, ``warning``, ``problem``; ``probe()``
raises on a problem. A folder must exist or be creatable, be a directory labsync can write
into, and not be writable by everyone on the host (anyone could drop results there).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from labsync.lis.hl7.mllp import bind

OK, WARNING, PROBLEM = "ok", "warning", "problem"


def _owner(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def folder_lines(root: Path, subfolders: tuple[str, ...]) -> list[tuple[str, str]]:
    """The drop folder and its ``queue/ done/ error/``: present (or creatable), owned by
    whom, with which mode, writable by labsync."""
    lines: list[tuple[str, str]] = []
    if not root.exists():
        parent = next((p for p in root.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK | os.X_OK):
            lines.append((OK, f"lis.hl7.drop_dir: {root} does not exist yet; labsync will "
                              f"create it (in {parent}, writable)"))
        else:
            lines.append((PROBLEM, f"lis.hl7.drop_dir: {root} does not exist and labsync "
                                   f"cannot create it ({parent} is not writable for it)"))
        return lines
    for folder in (root, *(root / name for name in subfolders)):
        if not folder.exists():
            continue
        lines.append(_folder_line(folder))
    if all(level != PROBLEM for level, _ in lines):
        lines.append(_write_test(root))
    return lines


def _folder_line(folder: Path) -> tuple[str, str]:
    info = folder.stat()
    mode = stat.S_IMODE(info.st_mode)
    what = f"lis.hl7.drop_dir: {folder}: owner {_owner(info.st_uid)}, mode {mode:04o}"
    if not stat.S_ISDIR(info.st_mode):
        return PROBLEM, f"{what}: not a directory"
    if not os.access(folder, os.W_OK | os.X_OK):
        return PROBLEM, f"{what}: labsync (uid {os.geteuid()}) cannot write into it"
    if mode & stat.S_IWOTH:
        return PROBLEM, (f"{what}: writable by every user of this host, who could drop "
                         "results into it (chmod o-w; give the LIS's user group write)")
    if info.st_uid != os.geteuid() and not mode & stat.S_IWGRP:
        return WARNING, f"{what}: owned by another user"
    return OK, what


def _write_test(root: Path) -> tuple[str, str]:
    probe = root / f".labsync-probe-{os.getpid()}.tmp"
    try:
        with open(probe, "wb") as file:
            file.write(b"probe")
            file.flush()
            os.fsync(file.fileno())
        probe.unlink()
    except OSError as exc:
        return PROBLEM, f"lis.hl7.drop_dir: {root}: a test file cannot be written: {exc}"
    return OK, f"lis.hl7.drop_dir: {root}: a test file was written, fsynced and removed"


def port_line(host: str, port: int, *, listening: bool) -> tuple[str, str]:
    """Whether the MLLP port can be bound (or this process listens on it already)."""
    where = f"{host}:{port}"
    if listening:
        return OK, f"lis.hl7.listen: listening on {where}"
    try:
        bind(host, port).close()
    except OSError as exc:
        return PROBLEM, (f"lis.hl7.listen: cannot listen on {where}: {exc.strerror or exc} "
                         "(is labsync run, or another program, on that port already? a "
                         "port below 1024 needs a privilege)")
    return OK, f"lis.hl7.listen: {where} can be bound"
