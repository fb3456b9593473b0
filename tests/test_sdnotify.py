"""systemd's notify protocol, against a real datagram socket."""

from __future__ import annotations

import os
import socket

from labsync import sdnotify


def test_notify_sends_one_datagram_to_the_socket(tmp_path):
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        assert sdnotify.notify("READY=1\nSTATUS=ok", {"NOTIFY_SOCKET": str(path)})
        assert server.recv(100) == b"READY=1\nSTATUS=ok"


def test_notify_reaches_an_abstract_socket():
    name = f"labsync-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert server.recv(100) == b"STOPPING=1"


def test_without_systemd_notify_is_a_quiet_no_op(tmp_path):
    assert sdnotify.notify("READY=1", {}) is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_watchdog_seconds_reads_the_units_watchdog_for_this_process_only():
    assert sdnotify.watchdog_seconds({"WATCHDOG_USEC": "300000000"}) == 300.0
    assert sdnotify.watchdog_seconds({"WATCHDOG_USEC": "300000000",
                                      "WATCHDOG_PID": str(os.getpid())}) == 300.0
    assert sdnotify.watchdog_seconds({"WATCHDOG_USEC": "300000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_seconds({}) is None
    assert sdnotify.watchdog_seconds({"WATCHDOG_USEC": "0"}) is None
