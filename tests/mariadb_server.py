"""Restarting the local MariaDB server, for the tests that prove labsync survives it."""

from __future__ import annotations

import shutil
import subprocess
import time


def ping() -> bool:
    done = subprocess.run(["mariadb-admin", "--user=root", "ping"], capture_output=True,
                          timeout=10, check=False)
    return done.returncode == 0


def can_restart() -> bool:
    return bool(shutil.which("mariadb-admin") and shutil.which("start-stop-daemon")) and ping()


def restart(down_for: float = 2.0) -> None:
    """Shut the server down, keep it down ``down_for`` seconds, start it, wait until it answers."""
    subprocess.run(["mariadb-admin", "--user=root", "shutdown"], check=True, timeout=60)
    deadline = time.monotonic() + 30
    while ping() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(down_for)
    start()


def start() -> None:
    subprocess.run(["start-stop-daemon", "--start", "--oknodo", "--background",
                    "--exec", "/usr/sbin/mariadbd"], check=True, timeout=30)
    deadline = time.monotonic() + 60
    while not ping():
        if time.monotonic() > deadline:
            raise RuntimeError("MariaDB did not come back within 60 s")
        time.sleep(0.3)
