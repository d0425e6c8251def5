"""`zimage-tornado keys add|list|revoke|secret`: API keys without editing TOML by hand, and without a
restart (a running gateway reads the edited file within seconds, or on SIGHUP).

`add` generates a strong key, appends `[keys.NAME]` with only its SHA-256 to the TOML keys file
and prints the key once; `revoke` removes the key's table; both write a new file and rename it
over the old one (never a half-written file; through a symlink, the file it points to), under an
exclusive lock (`FILE.lock`) so that concurrent edits never lose one another, keeping the other
lines, comments and order, and check that the result parses before it replaces anything. `list`
shows names, limits, the admin flag and today's use from the server's store, never a secret.
`secret` prints a new webhook secret."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import secrets
import sqlite3
import sys
import tempfile
import time
from typing import Iterator, Sequence

from zimage_tornado.config import Settings, server_settings
from zimage_tornado.signing import new_secret
from zimage_tornado.store import StoreUnavailable, utc_day
from zimage_tornado.tenants import NAME_RE, PLAN_FIELDS, RESERVED_NAMES, digest, load_keys
from zimage_tornado.usage_cli import file_usage, redis_usage, table

KEY_BYTES = 32
HEADER_RE = re.compile(r"^\s*\[")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="zimage-tornado keys", description=__doc__.split("\n\n")[0])
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--file", help="the TOML keys file (default: the server's api_keys_file)")
    where.add_argument("--config", help="the server's --config file, to find its settings")
    where.add_argument("--env-file", help="the server's environment file (systemd EnvironmentFile), likewise")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", parents=[where], help="make a key; prints it once")
    add.add_argument("name", help="1 to 64 of A-Z a-z 0-9 . _ -")
    add.add_argument("--admin", action="store_true", help="may read every task and /admin")
    for field in PLAN_FIELDS:
        add.add_argument("--" + field.replace("_", "-"), type=int, metavar="N", help="0: unlimited")
    listing = commands.add_parser("list", parents=[where], help="names, limits and today's use")
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    revoke = commands.add_parser("revoke", parents=[where], help="remove a key")
    revoke.add_argument("name")
    commands.add_parser("secret", help="print a new webhook secret (whsec_...) for webhook_secret")
    args = parser.parse_args(argv)
    if args.command == "secret":
        print(new_secret())
        return 0
    try:
        settings = server_settings(args.config, args.env_file)
        path = args.file or settings.api_keys_file
        if not path:
            raise ValueError("no keys file: give --file PATH, or the server's --config / --env-file")
        if args.command == "list":
            return list_keys(path, settings, args.json)
        # The file itself (a symlink stays a link to it), edited by one command at a time: two
        # editors each reading, changing and renaming would lose one's change.
        path = os.path.realpath(path)
        with edit_lock(path):
            return add_key(path, args) if args.command == "add" else revoke_key(path, args.name)
    except (ValueError, OSError) as e:
        print("zimage-tornado keys: %s" % e, file=sys.stderr)
        return 2


def add_key(path: str, args: argparse.Namespace) -> int:
    name = args.name
    if not NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
        raise ValueError("%r: a key name is 1 to 64 of A-Z a-z 0-9 . _ - and not %s" % (name[:80],
                                                                                        ", ".join(RESERVED_NAMES)))
    text = read_toml_keys(path, must_exist=False)
    if text and name in load_keys("", path).names:
        raise ValueError("%s already has a key named %s (revoke it first)" % (path, name))
    key = "sk-" + secrets.token_urlsafe(KEY_BYTES)
    lines = ["[keys.%s]" % name, 'key_sha256 = "%s"' % digest(key)]
    if args.admin:
        lines.append("admin = true")
    for field in PLAN_FIELDS:
        value = getattr(args, field)
        if value is not None:
            if value < 0:
                raise ValueError("--%s must be 0 or more" % field.replace("_", "-"))
            lines.append("%s = %d" % (field, value))
    separator = "" if not text or text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
    replace(path, text + separator + "\n".join(lines) + "\n")
    print(key)
    print("zimage-tornado keys: added %s to %s (only its hash is kept: this is the only time the key is shown)"
          % (name, path), file=sys.stderr)
    return 0


def revoke_key(path: str, name: str) -> int:
    text = read_toml_keys(path, must_exist=True)
    kept, inside, found = [], False, False
    for line in text.splitlines(keepends=True):
        if HEADER_RE.match(line):
            inside = line.strip() in ("[keys.%s]" % name, '[keys."%s"]' % name)
            found = found or inside
        if not inside:
            kept.append(line)
    if not found:
        raise ValueError("%s has no key named %s" % (path, name[:80]))
    replace(path, "".join(kept))
    print("zimage-tornado keys: revoked %s in %s" % (name, path), file=sys.stderr)
    return 0


def list_keys(path: str, settings: Settings, as_json: bool) -> int:
    ring = load_keys("", path)
    today = utc_day(time.time())
    try:
        rows = redis_usage(settings.redis_url, today, today, None) if settings.redis_url else \
            file_usage(settings.database, today, today, None)
        used = {row.key: row for row in rows}
    except (sqlite3.Error, StoreUnavailable):
        used = {}  # no store yet: nothing used
    records = []
    for tenant in ring.tenants:
        row = used.get(tenant.name)
        records.append({"name": tenant.name, "admin": tenant.admin,
                        **{field: getattr(tenant.plan, field) for field in PLAN_FIELDS},
                        "tasks_today": row.tasks if row else 0, "images_today": row.images if row else 0})
    if as_json:
        for record in records:
            print(json.dumps(record, sort_keys=True))
        return 0
    print(table(["name", "admin", "requests/min", "images/day", "max waiters", "reads/min", "tasks today",
                 "images today"],
                [[r["name"], "yes" if r["admin"] else "", *(r[f] or "-" for f in PLAN_FIELDS), r["tasks_today"],
                  r["images_today"]] for r in records]))
    return 0


@contextlib.contextmanager
def edit_lock(path: str) -> Iterator[None]:
    """An exclusive lock beside the keys file, for one read-modify-write (released at exit, or
    by the kernel if the command dies)."""
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_toml_keys(path: str, must_exist: bool) -> str:
    if not path.endswith(".toml"):
        raise ValueError("%s: keys add and revoke edit a TOML keys file (*.toml), where keys have names" % path)
    if not os.path.exists(path):
        if must_exist:
            raise ValueError("%s does not exist" % path)
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


def replace(path: str, text: str) -> None:
    """Writes `text` beside `path`, checks that it parses as a keys file, then renames it over."""
    directory = os.path.dirname(os.path.abspath(path))
    mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o600
    handle, temporary = tempfile.mkstemp(prefix=".keys-", suffix=".toml", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        load_keys("", temporary)  # a file that would not parse never replaces a good one
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
