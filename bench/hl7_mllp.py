"""HL7 v2 over MLLP: from receipt to rows in the site's tables, and how many messages a second.

    .venv/bin/python -m bench.hl7_mllp [--admin-url URL] [--mode all|latency|throughput|memory]

Measures, on a scratch MariaDB database (``bench/scratch.py``) and a folder in a temporary
directory, with the senders in a child process (the LIS is another program):

- **latency**: one connection sending at 1 and at 50 messages a second to a real
  ``labsync run`` (a child process with its own config file, as systemd runs it); for each
  message the time from its send (≈ receipt) until a poll of the site's table, every 5 ms,
  sees its order completed: median and p95 (the poll adds up to 5 ms). In-process too, for
  comparison: the time to the commit (``done()`` follows it), the engine draining as soon
  as a message arrives (``Hl7Inbox.wait_for_arrival``) or on a 2-second tick.
- **throughput**: 1 and 8 connections sending back to back for ``--seconds``: messages
  acknowledged per second and applied per second, beside the floor measured in the same
  run: a bare MLLP server that writes and fsyncs each message (no grouping) before it acks.
- **memory**: ``--memory-messages`` (100,000) through the listener and the inbox (taken and
  done, no database), RSS and the backlog (messages waiting) sampled every 10,000 done.

Each message is an ORU^R01 of one order with five results, 460 bytes, for a distinct order
of the site's (no PDF: ``pdf.required = false``). Nothing is asserted; ``--json`` writes the
figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

PREFIX = "HL-"
ZONE = ZoneInfo("Europe/Moscow")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- the messages and the sender (child process) ------------------------------------------------


def hl7_message(n: int, tag: str) -> bytes:
    from labsync.model import LisOrder, OrderStatus, TestResult
    from labsync.testing.hl7_sender import oru

    results = tuple(TestResult(code, name, value, unit, low, high)
                    for code, name, value, unit, low, high in (
                        ("HGB", "Haemoglobin", "131", "g/L", "120", "160"),
                        ("RBC", "Erythrocytes", "4.41", "10*12/L", "3.8", "5.1"),
                        ("WBC", "Leukocytes", "6.2", "10*9/L", "4.0", "9.0"),
                        ("PLT", "Platelets", "250", "10*9/L", "150", "400"),
                        ("GLU", "Glucose", "5.40", "mmol/L", "3.9", "6.1")))
    order = LisOrder(f"{PREFIX}{n:07d}", OrderStatus.COMPLETED, results)
    return oru(f"{tag}-{n}", [order], sent_at=datetime(2026, 11, 30, 10, 0),
               sending_app="BENCH", sending_facility="LAB")


def sender_main(args: argparse.Namespace) -> None:
    """The LIS: ``--connections`` connections; each sends its share of messages, at
    ``--rate`` a second in all (0: back to back), for ``--seconds`` or ``--count``
    messages; prints when each was sent and how many were acked."""
    from labsync.testing.hl7_sender import MllpSender

    sent: dict[str, float] = {}
    acked = [0] * args.connections
    lock = threading.Lock()
    start = time.monotonic() + 0.2
    deadline = start + args.seconds if args.seconds else float("inf")
    per = args.count // args.connections if args.count else 0

    def connection(c: int) -> None:
        with MllpSender(args.host, args.port, timeout=120) as conn:
            i = 0
            while True:
                n = args.first + c + i * args.connections
                if (per and i >= per) or time.monotonic() >= deadline:
                    return
                if args.rate:
                    due = start + (n - args.first) / args.rate
                    pause = due - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                data = hl7_message(n, args.tag)
                at = time.monotonic()
                ack = conn.send(data)
                if b"MSA|AA|" not in ack:
                    raise SystemExit(f"not acknowledged: {ack[:200]!r}")
                with lock:
                    sent[f"{args.tag}-{n}"] = at
                acked[c] += 1
                i += 1

    while time.monotonic() < start:
        time.sleep(0.01)
    threads = [threading.Thread(target=connection, args=(c,)) for c in range(args.connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ended = time.monotonic()
    json.dump({"sent": sent, "acked": sum(acked), "started": start, "ended": ended,
               "seconds": ended - start}, sys.stdout)


def run_sender(port: int, *, tag: str, connections: int, rate: float = 0.0,
               seconds: float = 0.0, count: int = 0, first: int = 1) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.hl7_mllp", "sender", "--port", str(port),
               "--tag", tag, "--connections", str(connections), "--rate", str(rate),
               "--seconds", str(seconds), "--count", str(count), "--first", str(first)]
    done = subprocess.run(command, capture_output=True, check=False,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"sender failed: {done.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- the floor: a bare MLLP server that writes and fsyncs each message ------------------------


class FloorServer:
    """Frames in, each written to its own file and fsynced, then a fixed AA: the physical
    cost of "stored before acknowledged", without parsing, grouping or a database."""

    ACK = b"\x0bMSH|^~\\&|FLOOR||||20260101||ACK|1|P|2.5.1\rMSA|AA|x\r\x1c\r"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while chunk := conn.recv(65536):
                buffer += chunk
                while (end := buffer.find(b"\x1c\r")) >= 0:
                    data, buffer = buffer[buffer.find(b"\x0b") + 1:end], buffer[end + 2:]
                    with self._lock:
                        self.count += 1
                        n = self.count
                    fd = os.open(self.folder / f"{n}.hl7", os.O_WRONLY | os.O_CREAT, 0o600)
                    try:
                        os.write(fd, data)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    conn.sendall(self.ACK)

    def close(self) -> None:
        self.sock.close()


# -- labsync, in this process ------------------------------------------------------------------


class Labsync:
    """The adapter with its listener, the engine draining it, and when each delivery was
    committed (``done`` comes right after the commit that wrote its rows)."""

    def __init__(self, config: Any, *, drain_every: float | None,
                 gather: float | None = None) -> None:
        from labsync.app import open_app
        from labsync.lis.hl7 import Hl7Inbox
        from labsync.lis.hl7.adapter import GATHER

        self.committed: dict[str, float] = {}
        inbox = Hl7Inbox(config.lis, zone=config.site.timezone,
                         pdf_max_bytes=config.pdf.max_bytes, settle=0.0,
                         gather=GATHER if gather is None else gather)
        inbox.listen = ("127.0.0.1", 0)
        original_done = inbox.done

        def done(delivery: Any) -> None:
            original_done(delivery)
            self.committed[delivery.id.rsplit("|", 1)[-1]] = time.monotonic()

        inbox.done = done  # type: ignore[method-assign]
        self.inbox = inbox
        self._app = open_app(config, lis=inbox)
        self.app = self._app.__enter__()
        inbox.start()
        address = inbox.address
        assert address is not None
        self.port = address[1]
        self.stop = threading.Event()
        self.running = threading.Event()  # cleared: the engine pauses (receipt measured alone)
        self.running.set()
        self.drain_every = drain_every
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        pushed = self.app.sync.pushed
        while not self.stop.is_set():
            if not self.running.is_set():
                self.running.wait(0.2)
                continue
            pushed.drain_inbox(self.stop)
            if self.drain_every is None:
                self.inbox.wait_for_arrival(0.5)  # drain again as soon as one arrives
            else:
                self.stop.wait(self.drain_every)

    def wait_applied(self, names: list[str], timeout: float = 600.0) -> float:
        """Block until every one of ``names`` is committed; when the last one was."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(n in self.committed for n in names):
                return max(self.committed[n] for n in names)
            time.sleep(0.05)
        missing = [n for n in names if n not in self.committed]
        raise RuntimeError(f"{len(missing)} messages never applied, e.g. {missing[:3]}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self._app.__exit__(None, None, None)


def daemon_latency(db_url: str, engine: Any, workdir: Path, *, rate: float, seconds: float,
                   first: int) -> dict[str, Any]:
    """Latency through ``labsync run``: messages in over MLLP, their orders seen completed
    in the site's table by a poll every 5 ms."""
    from sqlalchemy import text

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = workdir / f"daemon-{first}"
    folder.mkdir()
    config = folder / "labsync.toml"
    config.write_text(
        f'[database]\nurl = "{db_url}"\n[site]\ntimezone = "Europe/Moscow"\n'
        f'[lis]\nadapter = "hl7"\n[lis.hl7]\ndrop_dir = "{folder / "hl7"}"\n'
        f'listen = "127.0.0.1:{port}"\n[pdf]\ndir = "{folder / "pdfs"}"\nrequired = false\n'
        f'[notify]\nsite_id = "s1"\n[sync]\nrecheck_days = 0\n', encoding="utf-8")
    with open(folder / "labsync.log", "wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "labsync.cli", "--config", str(config), "run"],
            stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
    try:
        _wait_for_port(port, daemon)
        seen: dict[int, float] = {}
        stop = threading.Event()
        count = int(rate * seconds)

        def poll() -> None:
            query = text("SELECT ID FROM local_lab_orders WHERE ID BETWEEN :lo AND :hi "
                         "AND STATUS = 'completed'")
            with engine.connect() as conn:
                while not stop.is_set():
                    at = time.monotonic()
                    for (order_id,) in conn.execute(query, {"lo": first,
                                                            "hi": first + count}):
                        seen.setdefault(order_id, at)
                    conn.commit()
                    stop.wait(0.005)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        tag = f"D{int(rate)}"
        sent = run_sender(port, tag=tag, connections=1, rate=rate, count=count, first=first)
        deadline = time.monotonic() + 60
        while len(seen) < sent["acked"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        poller.join(5)
    finally:
        daemon.terminate()
        daemon.wait(60)
    lat = [seen[int(name.rsplit("-", 1)[1])] - at for name, at in sent["sent"].items()
           if int(name.rsplit("-", 1)[1]) in seen]
    return {"rate": rate, "messages": sent["acked"], "completed": len(lat),
            "through": "labsync run", "median_ms": round(statistics.median(lat) * 1000, 1),
            "p95_ms": round(quantile(lat, 0.95) * 1000, 1), "max_ms": round(max(lat) * 1000, 1),
            "daemon_exit": daemon.returncode}


def _wait_for_port(port: int, daemon: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"labsync run exited with {daemon.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"labsync run did not listen on port {port} within {timeout:g} s")


def site_config(db_url: str, workdir: Path) -> Any:
    from labsync import config as config_mod

    return config_mod.from_mapping({
        "database": {"url": db_url}, "site": {"timezone": "Europe/Moscow"},
        "lis": {"adapter": "hl7", "hl7": {"drop_dir": str(workdir / "hl7"),
                                          "listen": "127.0.0.1:2575"}},
        "pdf": {"dir": str(workdir / "pdfs"), "required": False},
        "notify": {"site_id": "s1"}, "sync": {"recheck_days": 0}}, env={})


def seed(engine: Any, count: int) -> None:
    from sqlalchemy import text

    users = max(1, count // 4)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO b_user (ID, LOGIN, ACTIVE, NAME, LAST_NAME, EMAIL, DATE_REGISTER) "
            "VALUES (:id, :login, 'Y', 'Анна', 'Иванова', :email, '2025-01-01')"),
            [{"id": u, "login": f"user{u}", "email": f"p{u}@example.org"}
             for u in range(1, users + 1)])
        rows = [{"id": i, "ext": f"{PREFIX}{i:07d}", "user": i % users + 1, "day": date.today()}
                for i in range(1, count + 1)]
        for start in range(0, len(rows), 10_000):
            conn.execute(text(
                "INSERT INTO local_lab_orders (ID, USER_ID, EXTERNAL_ORDER_ID, ORDER_DATE, "
                "STATUS) VALUES (:id, :user, :ext, :day, 'received')"), rows[start:start + 10_000])


# -- the measurements --------------------------------------------------------------------------


def latency(make: Callable[[float | None], Labsync], *, rate: float, seconds: float,
            first: int, drain_every: float | None) -> dict[str, Any]:
    labsync = make(drain_every)
    try:
        sent = run_sender(labsync.port, tag=f"L{int(rate)}-{drain_every or 0}", connections=1,
                          rate=rate, seconds=seconds, first=first)
        labsync.wait_applied(list(sent["sent"]))
        lat = [labsync.committed[name] - at for name, at in sent["sent"].items()]
    finally:
        labsync.close()
    return {"rate": rate, "messages": len(lat), "drain": "on arrival" if drain_every is None
            else f"every {drain_every:g} s", "median_ms": round(statistics.median(lat) * 1000, 1),
            "p95_ms": round(quantile(lat, 0.95) * 1000, 1),
            "max_ms": round(max(lat) * 1000, 1)}


def throughput(make: Callable[[float | None], Labsync], workdir: Path, *, connections: int,
               seconds: float, first: int) -> dict[str, Any]:
    """The floor; labsync receiving alone (the engine paused), then the engine applying that
    backlog alone; and both at once, as in production."""
    floor = FloorServer(workdir / f"floor-{connections}")
    try:
        bare = run_sender(floor.port, tag=f"F{connections}", connections=connections,
                          seconds=seconds, first=first)
    finally:
        floor.close()
    floor_rate = bare["acked"] / bare["seconds"]
    figures: dict[str, Any] = {"connections": connections, "seconds": seconds,
                               "floor_acked_per_s": round(floor_rate, 1)}
    labsync = make(None)
    commit = labsync.inbox.spool.commit
    try:
        labsync.running.clear()
        groups, steps, cpu = commit.groups, commit.steps, _cpu()
        alone = run_sender(labsync.port, tag=f"A{connections}", connections=connections,
                           seconds=seconds, first=first)
        receipt_cpu = _cpu() - cpu
        groups, steps = commit.groups - groups, commit.steps - steps
        started, cpu = time.monotonic(), _cpu()
        labsync.running.set()
        last = labsync.wait_applied(list(alone["sent"]))
        apply_cpu = _cpu() - cpu
        figures.update({
            "receipt_only_acked_per_s": round(alone["acked"] / alone["seconds"], 1),
            "receipt_only_vs_floor": round(alone["acked"] / alone["seconds"] / floor_rate, 2),
            "fsync_groups": groups, "stores_per_group": round(steps / groups, 2),
            "receipt_cpu_ms_per_message": round(receipt_cpu / alone["acked"] * 1000, 2),
            "apply_only_per_s": round(alone["acked"] / (last - started), 1),
            "apply_cpu_ms_per_message": round(apply_cpu / alone["acked"] * 1000, 2)})
        both = run_sender(labsync.port, tag=f"T{connections}", connections=connections,
                          seconds=seconds, first=first + alone["acked"] + 10)
        last = labsync.wait_applied(list(both["sent"]))
        figures.update({
            "sustained_acked_per_s": round(both["acked"] / both["seconds"], 1),
            "sustained_vs_floor": round(both["acked"] / both["seconds"] / floor_rate, 2),
            "sustained_applied_per_s": round(both["acked"] / (last - both["started"]), 1)})
    finally:
        labsync.close()
    return figures


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def memory(workdir: Path, messages: int, connections: int) -> dict[str, Any]:
    from labsync.config import LisConfig
    from labsync.lis.hl7 import Hl7Inbox

    inbox = Hl7Inbox(LisConfig(adapter="hl7", base_url="", options=MappingProxyType(
        {"drop_dir": workdir / "memory-hl7", "listen": "127.0.0.1:0"})), zone=ZONE, settle=0.0)
    inbox.start()
    address = inbox.address
    assert address is not None
    samples: list[tuple[int, float, int]] = [(0, round(rss_mb(), 1), 0)]
    stop = threading.Event()
    done = [0]

    def drain() -> None:
        while not stop.is_set():
            while (delivery := inbox.take()) is not None:
                inbox.done(delivery)
                done[0] += 1
                if done[0] % 10_000 == 0:
                    samples.append((done[0], round(rss_mb(), 1),
                                    inbox.counts()["waiting"]))
            inbox.wait_for_arrival(0.5)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    sent = run_sender(address[1], tag="M", connections=connections, count=messages)
    while done[0] < sent["acked"]:
        time.sleep(0.2)
    stop.set()
    thread.join(10)
    inbox.close()
    growth = samples[-1][1] - samples[1][1] if len(samples) > 2 else 0.0
    return {"messages": sent["acked"], "done_rss_mb_waiting_every_10k": samples,
            "growth_mb_after_first_10k": round(growth, 1),
            "acked_per_s": round(sent["acked"] / sent["seconds"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--admin-url", default=None)
    parser.add_argument("--mode", choices=("all", "latency", "throughput", "memory"),
                        default="all")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--memory-messages", type=int, default=100_000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--gather", type=float, default=None,
                        help="Hl7Inbox's gather, seconds (default: the adapter's)")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval for this process (seconds)")
    args = parser.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)

    from sqlalchemy.engine import make_url

    from bench.scratch import ADMIN_URL, scratch_database

    figures: dict[str, Any] = {"cpus": os.cpu_count(), "started": time.strftime("%F %T")}
    with tempfile.TemporaryDirectory(prefix="labsync-hl7-bench-") as tmp:
        workdir = Path(tmp)
        if args.mode in ("all", "memory"):
            log(f"memory: {args.memory_messages} messages")
            figures["memory"] = memory(workdir, args.memory_messages, 8)
            log(json.dumps(figures["memory"]))
        if args.mode in ("all", "latency", "throughput"):
            with scratch_database(make_url(args.admin_url or ADMIN_URL)) as engine:
                seed(engine, 250_000)
                config = site_config(engine.url.render_as_string(hide_password=False), workdir)
                first = [1]

                def make(drain_every: float | None) -> Labsync:
                    return Labsync(config, drain_every=drain_every, gather=args.gather)

                def block(size: int) -> int:  # distinct orders for every run
                    start, first[0] = first[0], first[0] + size
                    return start

                if args.mode in ("all", "latency"):
                    figures["latency"] = []
                    db_url = engine.url.render_as_string(hide_password=False)
                    for rate in (1, 50):
                        seconds = 30 if rate == 1 else args.seconds
                        log(f"latency at {rate}/s through labsync run")
                        figures["latency"].append(daemon_latency(
                            db_url, engine, workdir, rate=rate, seconds=seconds,
                            first=block(int(rate * seconds) + 100)))
                        log(json.dumps(figures["latency"][-1]))
                    for rate, drain_every in ((1, None), (50, None), (50, 2.0)):
                        seconds = 30 if rate == 1 else args.seconds
                        log(f"latency at {rate}/s, drain {drain_every or 'on arrival'}")
                        figures["latency"].append(latency(
                            make, rate=rate, seconds=seconds, drain_every=drain_every,
                            first=block(int(rate * seconds) + 100)))
                        log(json.dumps(figures["latency"][-1]))
                if args.mode in ("all", "throughput"):
                    figures["throughput"] = []
                    for connections in (1, 8):
                        log(f"throughput from {connections} connection(s)")
                        figures["throughput"].append(throughput(
                            make, workdir, connections=connections, seconds=args.seconds,
                            first=block(100_000)))
                        log(json.dumps(figures["throughput"][-1]))
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def _sender_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--first", type=int, default=1)
    return parser.parse_args(sys.argv[2:])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "sender":
        sender_main(_sender_args())
    else:
        main()
