"""``p2pshare user add|list|remove|passwd``: staff accounts for the web app.

The commands work on the node's data directory directly (they need no running node), so that
the first admin can be created before the node is started. Passwords come from a terminal
prompt (asked twice) or, for scripts, from standard input with ``--password-stdin``; never
from the command line, where other users could read them in the process list.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from p2pshare.config import default_data_dir
from p2pshare.errors import ConfigError, InputError

if TYPE_CHECKING:
    from p2pshare.cli import Output

EXIT_OK = 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``user`` command to the main parser's sub-commands."""
    p = sub.add_parser("user", help="staff accounts for the web app (add, list, remove, passwd)")
    actions = p.add_subparsers(dest="user_action", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--data-dir", default=str(default_data_dir()), help="the node's data directory"
        )
        q.add_argument("--json", action="store_true", help="one JSON object per line")

    q = actions.add_parser("add", help="create an account")
    q.add_argument("name")
    q.add_argument("--role", required=True, choices=["sender", "receiver", "admin"])
    q.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    common(q)
    q.set_defaults(func=cmd_user)

    q = actions.add_parser("list", help="list accounts")
    common(q)
    q.set_defaults(func=cmd_user)

    q = actions.add_parser("remove", help="delete an account and end its sessions")
    q.add_argument("name")
    common(q)
    q.set_defaults(func=cmd_user)

    q = actions.add_parser("passwd", help="set a new password (also lifts a lock-out)")
    q.add_argument("name")
    q.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    common(q)
    q.set_defaults(func=cmd_user)


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise InputError(
            "no terminal to ask for the password on; pipe it in with --password-stdin"
        )
    first = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != first:
        raise InputError("the two passwords differ; nothing was changed. Try again")
    return first


async def cmd_user(args: argparse.Namespace, out: Output) -> int:
    # Imported here: the CLI's other commands need no database at start-up.
    from p2pshare.store import Store
    from p2pshare.users import Users, check_name, check_password, parse_role

    data_dir = Path(args.data_dir).expanduser()
    action: str = args.user_action
    if action in ("add", "passwd"):
        check_name(args.name)
        # Ask for the password before touching the data directory.
        password = check_password(read_password(args.password_stdin))
    store = Store(data_dir)
    try:
        users = Users(store.db)
        now = int(time.time())
        if action == "add":
            user = users.add(args.name, parse_role(args.role), password)
            store.audit.append(now, "staff-user-added", user=user.name, role=user.role.value)
            out.json({"type": "user-added", "name": user.name, "role": user.role.value})
            out.say(f"Added {user.name} ({user.role.value}).")
        elif action == "list":
            for u in users.all():
                locked = u.locked_until > now
                out.json(
                    {"type": "user", "name": u.name, "role": u.role.value, "locked": locked}
                )
                out.say(f"{u.name}  {u.role.value}{'  (locked)' if locked else ''}")
            if not users.all():
                out.say("No users yet: add one with 'p2pshare user add NAME --role admin'.")
        elif action == "remove":
            if not users.remove(args.name):
                raise ConfigError(f"there is no user called '{args.name}'")
            store.audit.append(now, "staff-user-removed", user=args.name)
            out.json({"type": "user-removed", "name": args.name})
            out.say(f"Removed {args.name}; their sessions have ended.")
        else:
            users.set_password(args.name, password)
            store.audit.append(now, "staff-password-changed", user=args.name)
            out.json({"type": "password-changed", "name": args.name})
            out.say(f"Changed the password of {args.name}; their sessions have ended.")
    finally:
        store.close()
    return EXIT_OK
