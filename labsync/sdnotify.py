"""systemd's notify protocol (``sd_notify``): READY, WATCHDOG, STOPPING, STATUS.

A few lines over a datagram socket rather than a dependency: the protocol is one message per
datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Outside
systemd the socket is unset and every call is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``); False when not running under systemd."""
    address = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError:
        return False  # systemd went away or the socket is not ours: nothing to tell
    return True


def watchdog_seconds(env: Mapping[str, str] | None = None) -> float | None:
    """``WatchdogSec=`` of the unit in seconds, or None when no watchdog is armed for us."""
    env = env if env is not None else os.environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1_000_000
