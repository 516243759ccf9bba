"""``quantfn keys create|list|revoke``: the API keys of a stack, in its SSM Parameter Store path."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from quantfn.auth.store import KeyStore, keys_prefix
from quantfn.errors import BadRequest


def add_key_commands(commands: Any) -> None:
    """Register ``keys create``, ``keys list`` and ``keys revoke`` under the ``quantfn`` parser's subcommands."""
    keys = commands.add_parser("keys", help="API keys of a stack (AuthMode=KEY): create, list, revoke")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--stack", help="the stack's name: its keys live under /quantfn/<stack>/keys/")
    where.add_argument("--prefix", help="the SSM path itself (default: QUANTFN_AUTH_KEYS_PREFIX, or from --stack)")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", parents=[where], help="a new key: printed once, stored only as its SHA-256")
    create.add_argument("--name", required=True, help="who or what uses it (shown by list, logged never)")
    create.set_defaults(run=_create)
    listing = sub.add_parser("list", parents=[where], help="every key's id, name, state and dates (never a key)")
    listing.add_argument("--json", action="store_true", help="print the records as JSON")
    listing.set_defaults(run=_list)
    revoke = sub.add_parser("revoke", parents=[where], help="refuse a key from now on (within the caches' time)")
    revoke.add_argument("key_id", help="the id `keys list` shows (the part after qfn_)")
    revoke.set_defaults(run=_revoke)


def _store(args: argparse.Namespace) -> KeyStore:
    import boto3

    from quantfn.config import get_settings

    prefix = args.prefix or (keys_prefix(args.stack) if args.stack else get_settings().auth.keys_prefix)
    return KeyStore(boto3.client("ssm"), prefix)


def _create(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        key, record = store.create(args.name)
    except BadRequest as exc:
        print(f"quantfn keys create: {exc.message}", file=sys.stderr)
        return 2
    print(f"created key {record.key_id} ({record.name}) under {store.prefix}; it is shown only now:", file=sys.stderr)
    print(key)
    return 0


def _list(args: argparse.Namespace) -> int:
    records = sorted(_store(args).records(), key=lambda r: r.created_at)
    if args.json:
        print(json.dumps([{k: v for k, v in vars(r).items() if k != "sha256"} for r in records], indent=1))
        return 0
    for record in records:
        state = f"revoked {record.revoked_at}" if record.revoked_at else "active"
        print(f"{record.key_id}  {record.created_at}  {state:32s}  {record.name}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    try:
        record = _store(args).revoke(args.key_id)
    except BadRequest as exc:
        print(f"quantfn keys revoke: {exc.message}", file=sys.stderr)
        return 2
    print(f"revoked {record.key_id} ({record.name}) at {record.revoked_at}")
    return 0
