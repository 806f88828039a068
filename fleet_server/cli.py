"""``fleet-server``: the central service (registry, rollouts, telemetry ingestion, console)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from agent import __version__
from agent.clitools import EXIT_FAILED, EXIT_USAGE, not_built_yet

__all__ = ["main"]

_COMMANDS = {
    "demo": ("the whole fleet demo: embedded broker, SQLite, simulated devices", "the fleet server issue"),
}


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

    from fleet_server.service import FleetService, NotMigratedError
    from fleet_server.settings import SettingsError, load_settings

    try:
        settings = load_settings(args.config, database_url=args.database_url)
    except SettingsError as exc:
        print(f"fleet-server serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return FleetService(settings, host=args.host, port=args.port).run()
    except NotMigratedError as exc:
        print(f"fleet-server serve: {exc}", file=sys.stderr)
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fleet-server", description="Central fleet manager for edge-agent devices.")
    p.add_argument("--version", action="version", version=f"fleet-server {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in _COMMANDS.items():
        sub.add_parser(name, help=f"{help_text} (not built yet)").add_argument("args", nargs=argparse.REMAINDER)
    db = _db_parser(sub)
    serve = sub.add_parser("serve", help="run the HTTP API, MQTT ingestion and the retention schedule")
    serve.add_argument("--config", metavar="PATH", help="settings TOML file (default: $FLEET_CONFIG)")
    serve.add_argument("--database-url", metavar="URL")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
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
    return not_built_yet("fleet-server", args.command, _COMMANDS[args.command][1])
