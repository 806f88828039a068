"""``fleet-server``: the central service (registry, rollouts, telemetry ingestion, console)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from agent import __version__
from agent.clitools import EXIT_FAILED, EXIT_USAGE

__all__ = ["main"]


def _db_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    db = sub.add_parser("db", help="database schema and housekeeping (db upgrade, db current, db retention)",
                        description="Database schema migrations and housekeeping.")
    actions = db.add_subparsers(dest="action", metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="settings TOML file (default: $FLEET_CONFIG)")
    common.add_argument("--database-url", metavar="URL",
                        help="overrides database_url (default: settings, else sqlite:///./fleet.db)")
    up = actions.add_parser("upgrade", parents=[common], help="apply migrations up to the newest revision")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    actions.add_parser("current", parents=[common], help="show the database's revision and the newest one")
    actions.add_parser("retention", parents=[common],
                       help="roll raw drift windows past retention into hourly/daily summaries")
    return db


def _db(args: argparse.Namespace) -> int:
    from fleet_server.db import create_db_engine
    from fleet_server.settings import SettingsError, load_settings

    try:
        settings = load_settings(args.config, database_url=args.database_url)
    except SettingsError as exc:
        print(f"fleet-server db: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from sqlalchemy.exc import SQLAlchemyError

    from fleet_server.migrate import current_revision, head_revision, upgrade

    engine = create_db_engine(settings.database_url, busy_timeout_ms=settings.database_busy_timeout_ms)
    shown = engine.url.render_as_string(hide_password=True)
    try:
        if args.action == "upgrade":
            before = current_revision(engine)
            upgrade(engine, args.revision)
            after = current_revision(engine)
            print(f"{shown}: {before or 'empty'} -> {after}" if before != after else f"{shown}: already at {after}")
        elif args.action == "current":
            current, head = current_revision(engine), head_revision()
            print(f"{shown}: at {current or 'empty (never migrated)'}; newest {head}")
            return 0 if current == head else EXIT_FAILED
        else:
            from fleet_server.retention import run_retention

            report = run_retention(engine, now=time.time(), raw_days=settings.retention_raw_days,
                                   hourly_days=settings.retention_hourly_days)
            print(json.dumps(report.as_dict()))
    except SQLAlchemyError as exc:
        print(f"fleet-server db {args.action}: {shown}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        engine.dispose()
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    from fleet_server.service import FleetService, StartupError
    from fleet_server.settings import SettingsError, load_settings

    try:
        settings = load_settings(args.config, database_url=args.database_url)
    except SettingsError as exc:
        print(f"fleet-server serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return FleetService(settings, host=args.host, port=args.port).run()
    except StartupError as exc:
        print(f"fleet-server serve: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _demo(args: argparse.Namespace) -> int:
    import logging

    from fleet_server.demo import run_demo

    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run_demo(devices=args.devices, port=args.port, workdir=args.dir, keep_running=args.keep_running)
    except (ValueError, RuntimeError, TimeoutError, OSError) as exc:
        print(f"fleet-server demo: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0 if result.ok else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fleet-server", description="Central fleet manager for edge-agent devices.")
    p.add_argument("--version", action="version", version=f"fleet-server {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    db = _db_parser(sub)
    serve = sub.add_parser("serve", help="run the HTTP API, MQTT ingestion and the retention schedule")
    serve.add_argument("--config", metavar="PATH", help="settings TOML file (default: $FLEET_CONFIG)")
    serve.add_argument("--database-url", metavar="URL")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
    from fleet_server.auth import cli as user_cli
    from fleet_server.simulator import cli as simulate_cli

    demo = sub.add_parser("demo", help="the whole system on embedded defaults: embedded broker, SQLite, a fleet of "
                                       "simulated devices, two staged rollouts (one halted by its drift gate)")
    demo.add_argument("--devices", type=int, default=60, help="simulated devices (default 60, at least 20)")
    demo.add_argument("--port", type=int, default=8080, help="HTTP port of the server and console (0: any free one)")
    demo.add_argument("--dir", type=Path, metavar="DIR", help="where keys, database and bundles go (default: a "
                                                                 "new temporary directory)")
    demo.add_argument("--keep-running", action="store_true", help="keep the server and devices up afterwards, "
                                                                  "to look around in the console (Ctrl-C stops)")
    user = user_cli.add_parser(sub)
    simulate_cli.add_parser(sub)
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return EXIT_USAGE
    if args.command == "db":
        if args.action is None:
            db.print_usage(sys.stderr)
            print("fleet-server db: choose an action: upgrade, current or retention", file=sys.stderr)
            return EXIT_USAGE
        return _db(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "user":
        if args.user_action is None:
            user.print_usage(sys.stderr)
            print("fleet-server user: choose an action: add, set-role, disable, enable, token or list", file=sys.stderr)
            return EXIT_USAGE
        return user_cli.run(args)
    if args.command == "simulate":
        return simulate_cli.run(args)
    p.error(f"unknown command {args.command!r}")
    return EXIT_USAGE
