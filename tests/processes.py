"""Running the real `labsync` command in child processes, with a config file of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_config(path: Path, *, db_url: str, lis_url: str, api_key: str, pdf_dir: Path,
                 **sections: dict[str, Any]) -> Path:
    """A TOML config file; ``sections`` add or override keys, e.g. ``sync={"interval": "1s"}``."""
    tables: dict[str, dict[str, Any]] = {
        "database": {"url": db_url},
        "lis": {"adapter": "qlab", "base_url": lis_url, "api_key": api_key,
                "retry_attempts": 3, "retry_max_seconds": 5, "read_timeout": 5},
        "pdf": {"dir": str(pdf_dir)},
        "log": {"format": "json"},
    }
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            if isinstance(value, str):
                escaped = value.replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'{key} = "{escaped}"')
            elif isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            else:
                lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def labsync(config: Path, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``labsync --config CONFIG ARGS…``; its output goes to ``log`` (or is discarded)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    command = [sys.executable, "-m", "labsync.cli", "--config", str(config), *args]
    if log is None:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, env=env)
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
