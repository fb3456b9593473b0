"""The ``labsync`` command: a thin shell over the functions the scheduler and the demo call.

Exit status: 0 done; 1 problems found (``check``; its warnings and skipped checks do not
count), unknown order (``order``) or an order that does not map (``try-order``); 2 unusable
config or unreachable database. Errors
reach the operator through ``_fail`` only: a list of things to fix, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy.engine import URL

from labsync import __version__, logs
from labsync.config import Config, config_path, load
from labsync.errors import ConfigError, LabsyncError, StoreError

EXIT_OK, EXIT_PROBLEMS, EXIT_UNUSABLE = 0, 1, 2
# ``run`` only: the database is not there (yet). sysexits' EX_TEMPFAIL, so systemd's
# Restart=on-failure tries again, while exit 2 (a config to fix) stops the unit.
EXIT_TRY_LATER = 75


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labsync", description="Lab results from the LIS into the Bitrix personal account.")
    parser.add_argument("--config", metavar="FILE",
                        help="config file (default: $LABSYNC_CONFIG, then "
                             "/etc/labsync/labsync.toml)")
    parser.add_argument("--version", action="version", version=f"labsync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("init-db", help="create labsync's tables (and the lab tables if missing)")
    sub.add_parser("run", help="the daemon: passes on a schedule until SIGTERM/SIGINT")
    once = sub.add_parser("sync-once", help="one full pass over the pending orders, then exit")
    once.add_argument("--all", action="store_true",
                      help="also ask about orders whose retry time after a failure is not due yet")
    sub.add_parser("check", help="validate the config, reach the database and the LIS")
    status = sub.add_parser("status", help="pending orders, recent failures, the last pass")
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    order = sub.add_parser("order", help="one order's history, for support")
    order.add_argument("external_id", metavar="EXTERNAL_ORDER_ID")
    order.add_argument("--json", action="store_true")
    review = sub.add_parser("review", help="orders found by phone that need a human to match")
    review.add_argument("--json", action="store_true")
    review.add_argument("--dismiss", metavar="EXTERNAL_ORDER_ID",
                        help="close a case that belongs to no site user")
    try_order = sub.add_parser("try-order", help="ask the LIS about one order and show what "
                                                 "labsync would write; writes nothing")
    try_order.add_argument("external_id", metavar="EXTERNAL_ORDER_ID")
    try_order.add_argument("--raw", action="store_true",
                           help="also print the LIS's answer as received (secrets masked)")
    demo = sub.add_parser("demo", help="the whole pipeline on SQLite with a built-in fake LIS")
    demo.add_argument("--dir", default="labsync-demo",
                      help="folder for the demo's database and PDFs (default: ./labsync-demo)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from labsync.demo import run_demo

        return _guard(lambda: run_demo(Path(args.dir)))
    from labsync.app import check_wiring

    try:
        config = load(config_path(args.config))
        check_wiring(config)
    except ConfigError as exc:
        return _fail_config(exc)
    logs.setup(config.log.level, config.log.format, config.secrets(),
               stream=sys.stderr if args.command in ("status", "order", "check", "review",
                                                     "try-order")
               else None, headers=config.secret_headers())
    commands: dict[str, Callable[[], int]] = {
        "init-db": lambda: _init_db(config),
        "sync-once": lambda: _sync_once(config, due_only=not args.all),
        "run": lambda: _run(config),
        "check": lambda: _check(config),
        "status": lambda: _status(config, as_json=args.json),
        "order": lambda: _order(config, args.external_id, as_json=args.json),
        "review": lambda: _review(config, as_json=args.json, dismiss=args.dismiss),
        "try-order": lambda: _try_order(config, args.external_id, raw=args.raw),
    }
    return _guard(commands[args.command], database=config.database.url)


def _guard(command: Callable[[], int], database: URL | None = None) -> int:
    """The one place that turns exceptions into words for the operator."""
    try:
        return command()
    except ConfigError as exc:
        return _fail_config(exc)
    except StoreError as exc:
        # Which database: the driver's message names the host only, not the port or schema.
        where = f" ({database.render_as_string(hide_password=True)})" if database else ""
        print(f"labsync: database{where} unusable: {logs.REDACTOR.redact(str(exc))}",
              file=sys.stderr)
        return EXIT_UNUSABLE
    except LabsyncError as exc:
        print(f"labsync: {logs.REDACTOR.redact(str(exc))}", file=sys.stderr)
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        print("labsync: interrupted", file=sys.stderr)
        return 130


def _fail_config(exc: ConfigError) -> int:
    print("labsync: the configuration cannot be used:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_UNUSABLE


def _init_db(config: Config) -> int:
    from labsync.store.db import init_db, make_engine

    engine = make_engine(config.database)
    try:
        created = init_db(engine)
    finally:
        engine.dispose()
    print("created: " + ", ".join(created) if created else "all tables already exist")
    return EXIT_OK


def _sync_once(config: Config, *, due_only: bool) -> int:
    from labsync.app import open_app

    with open_app(config) as app:
        if config.discovery.enabled:
            app.discovery.run()  # first, so an order found by phone is synced right away
        app.sync.pushed.drain_inbox()  # what the LIS pushed, then what it lists as changed
        app.sync.pushed.follow_feed()
        summary = app.sync.run_pass(due_only=due_only)
        app.metrics.pass_finished(summary)
        if app.mail is not None:
            app.mail.send_due(limit=10_000)
    return EXIT_OK


def _review(config: Config, *, as_json: bool, dismiss: str | None) -> int:
    from labsync.discovery.review import collect_review, dismiss_review, render_review
    from labsync.status import with_engine

    if dismiss is not None:
        closed = with_engine(config, lambda engine: dismiss_review(engine, dismiss))
        print(f"case {dismiss} dismissed" if closed else f"no open case for {dismiss}")
        return EXIT_OK if closed else EXIT_PROBLEMS
    rows = with_engine(config, collect_review)
    print(json.dumps(rows, ensure_ascii=False) if as_json else render_review(rows))
    return EXIT_OK


def _run(config: Config) -> int:
    import contextlib
    import threading

    from labsync.app import open_app
    from labsync.daemon import Daemon

    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        try:
            app = stack.enter_context(open_app(config, stop=stop))
        except StoreError as exc:
            where = config.database.url.render_as_string(hide_password=True)
            print(f"labsync: database ({where}) unusable: {logs.REDACTOR.redact(str(exc))}; "
                  f"exit {EXIT_TRY_LATER}: try again later", file=sys.stderr)
            return EXIT_TRY_LATER
        return Daemon(app, stop=stop).run()


def _check(config: Config) -> int:
    """One line per finding, ``ok:``/``warning:``/``skipped:``/``problem:``, in check order.
    Only a problem makes the exit status 1."""
    from labsync.checks import check_all

    report = check_all(config)
    for finding in report.findings:
        print(f"{finding.verdict}: {logs.REDACTOR.redact(finding.text)}")
    return EXIT_PROBLEMS if report.problems else EXIT_OK


def _status(config: Config, *, as_json: bool) -> int:
    from labsync.status import collect_status, render_status

    report = collect_status(config)
    print(json.dumps(report, ensure_ascii=False, default=str) if as_json
          else render_status(report))
    return EXIT_OK


def _try_order(config: Config, external_id: str, *, raw: bool) -> int:
    """The dry run: 0 the order maps, 1 problems (listed), 2 an unusable config (``_guard``)."""
    from labsync.dry_run import try_order

    return try_order(config, external_id, raw=raw)


def _order(config: Config, external_id: str, *, as_json: bool) -> int:
    from labsync.status import collect_order, render_order

    report = collect_order(config, external_id)
    if report is None:
        print(f"labsync: no order {external_id!r} in local_lab_orders", file=sys.stderr)
        return EXIT_PROBLEMS
    print(json.dumps(report, ensure_ascii=False, default=str) if as_json
          else render_order(report, zone=config.site.timezone, backend=config.notify.backend))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
