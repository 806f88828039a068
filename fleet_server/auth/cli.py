"""``fleet-server user ...``: manage users and tokens from the server's host (e.g. the first admin).

* ``user add NAME --role ROLE [--password-stdin | --no-password]``: the password is read from the first line
  of stdin with ``--password-stdin``, prompted twice on a terminal otherwise; ``--no-password`` makes a user
  who works with API tokens only.
* ``user set-role NAME ROLE``, ``user disable NAME``, ``user enable NAME`` (role changes and disabling end
  the user's console sessions at once).
* ``user token NAME --name LABEL [--role R] [--expires-in-s N]``: create an API token for NAME and print it
  (alone on stdout, once; it cannot be shown again).
* ``user list``.

Each command works on the database of the settings (``--config``, ``--database-url``), which must be migrated
(``fleet-server db upgrade``). Changes are audited with the actor ``cli:<os user>``.
The lead wires :func:`add_parser` and :func:`run` into ``fleet_server.cli``.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import IO, Any, TextIO

from fleet_server.auth.roles import ROLES

__all__ = ["add_parser", "run"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``user`` command group to ``subparsers``; returns its parser."""
    user = subparsers.add_parser("user", help="manage users and API tokens (user add, set-role, token, list...)",
                                 description="Manage users and their API tokens.")
    actions = user.add_subparsers(dest="user_action", metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="settings TOML file (default: $FLEET_CONFIG)")
    common.add_argument("--database-url", metavar="URL", help="overrides database_url")
    add = actions.add_parser("add", parents=[common], help="create a user")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES)
    how = add.add_mutually_exclusive_group()
    how.add_argument("--password-stdin", action="store_true", help="read the password from stdin's first line")
    how.add_argument("--no-password", action="store_true", help="no console login (API tokens only)")
    set_role = actions.add_parser("set-role", parents=[common], help="change a user's role (ends their sessions)")
    set_role.add_argument("name")
    set_role.add_argument("role", choices=ROLES)
    for verb, text in (("disable", "disable a user (ends their sessions, refuses their tokens)"),
                       ("enable", "enable a disabled user")):
        actions.add_parser(verb, parents=[common], help=text).add_argument("name")
    token = actions.add_parser("token", parents=[common], help="create an API token for a user (printed once)")
    token.add_argument("name")
    token.add_argument("--name", dest="label", required=True, metavar="LABEL", help="what the token is for")
    token.add_argument("--role", choices=ROLES, help="cap the token at this role (at most the user's)")
    token.add_argument("--expires-in-s", type=int, metavar="N", help="the token expires after N seconds")
    actions.add_parser("list", parents=[common], help="list users")
    return user


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _read_password(args: argparse.Namespace, stdin: IO[str], err: TextIO) -> str | None:
    if args.no_password:
        return None
    if args.password_stdin:
        return stdin.readline().rstrip("\r\n")
    if not stdin.isatty():
        raise _UsageError("no terminal to prompt for a password: use --password-stdin or --no-password")
    first = getpass.getpass(f"password for {args.name}: ", stream=err)
    if getpass.getpass("again: ", stream=err) != first:
        raise _UsageError("the passwords differ")
    return first


class _UsageError(Exception):
    pass


def run(args: argparse.Namespace, *, stdin: IO[str] | None = None, stdout: IO[str] | None = None,
        stderr: TextIO | None = None) -> int:
    """Run the parsed ``user`` command; 0 on success, 1 when it failed, 2 for a usage error."""
    out, err, inp = stdout or sys.stdout, stderr or sys.stderr, stdin or sys.stdin
    prog = f"fleet-server user {args.user_action or ''}".rstrip()
    if args.user_action is None:
        print("fleet-server user: choose an action: add, set-role, disable, enable, token or list", file=err)
        return EXIT_USAGE
    from sqlalchemy.exc import SQLAlchemyError

    from fleet_server.db import create_db_engine
    from fleet_server.migrate import current_revision, head_revision
    from fleet_server.settings import SettingsError, load_settings

    try:
        settings = load_settings(args.config, database_url=args.database_url)
    except SettingsError as exc:
        print(f"{prog}: {exc}", file=err)
        return EXIT_USAGE
    engine = create_db_engine(settings.database_url, busy_timeout_ms=settings.database_busy_timeout_ms)
    try:
        current, head = current_revision(engine), head_revision()
        if current != head:
            print(f"{prog}: the database is at {current or 'empty'}, not {head}: run 'fleet-server db upgrade'",
                  file=err)
            return EXIT_FAILED
        return _dispatch(args, engine, prog=prog, inp=inp, out=out, err=err)
    except _UsageError as exc:
        print(f"{prog}: {exc}", file=err)
        return EXIT_USAGE
    except SQLAlchemyError as exc:
        print(f"{prog}: {str(exc).splitlines()[0]}", file=err)
        return EXIT_FAILED
    finally:
        engine.dispose()


def _dispatch(args: argparse.Namespace, engine: Any, *, prog: str, inp: IO[str], out: IO[str],
              err: TextIO) -> int:
    from sqlmodel import Session, select

    from fleet_server.auth import tokens, users
    from fleet_server.models import User, utcnow

    actor, now = _actor(), utcnow()
    with Session(engine) as db:
        if args.user_action == "list":
            for u in db.exec(select(User).order_by(User.id)):  # type: ignore[arg-type]
                flags = ",".join(f for f, on in (("disabled", u.disabled), ("no-password", u.password_hash is None))
                                 if on)
                print(f"{u.username}\t{u.role}\t{flags or '-'}\t{u.created_at.isoformat()}", file=out)
            return EXIT_OK
        if args.user_action == "add":
            password = _read_password(args, inp, err)
            try:
                users.create_user(db, username=args.name, role=args.role, password=password, actor=actor, now=now)
            except users.UserError as exc:
                print(f"{prog}: {exc}", file=err)
                return EXIT_FAILED
            db.commit()
            print(f"created user {args.name!r} ({args.role})", file=err)
            return EXIT_OK
        user = users.get_user(db, args.name)
        if user is None:
            print(f"{prog}: no user {args.name!r}", file=err)
            return EXIT_FAILED
        try:
            if args.user_action == "token":
                issued = tokens.create_token(db, user, name=args.label, now=now, actor=actor, role=args.role,
                                             expires_in_s=args.expires_in_s)
                db.commit()
                print(issued.secret, file=out)
                print(f"token {issued.row.id} for {user.username!r}: shown once, store it now", file=err)
                return EXIT_OK
            changes: dict[str, dict[str, Any]] = {
                "set-role": {"role": getattr(args, "role", None)},
                "disable": {"disabled": True},
                "enable": {"disabled": False},
            }
            done = users.update_user(db, user, actor=actor, now=now, **changes[args.user_action])
        except (users.UserError, tokens.TokenError) as exc:
            print(f"{prog}: {exc}", file=err)
            return EXIT_FAILED
        db.commit()
        print(f"{user.username}: {', '.join(done) if done else 'unchanged'}", file=err)
        return EXIT_OK
