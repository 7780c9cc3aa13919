"""`exaone keys`: create, list, set limits of and revoke API keys in the ledger.

`create` shows the secret once, alone on its last line (so `exaone keys create x | tail -n 1`
captures it); only its hash is stored, so it can never be shown again. `list` never shows
secrets or hashes, only the prefix.
"""
from __future__ import annotations

import argparse
from decimal import Decimal

UNCHANGED = object()  # `keys set`: an option not given leaves that limit as it is
DB_HELP = "ledger database URL (default: $EXAONE_DB_URL, else sqlite:///exaone.db in the current directory)"


def _budget(text: str) -> Decimal:
    from exaone.server.pricing import to_decimal
    try:
        return to_decimal(text, "budget")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def _or_none(parse):
    return lambda text: None if text.lower() == "none" else parse(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = sub.add_parser("create", help="create a key and print its secret (shown only once)")
    p.add_argument("name", help="who or what the key is for")
    p.add_argument("--rpm", type=_count, default=None, metavar="N", help="requests per minute (default: no limit)")
    p.add_argument("--tpm", type=_count, default=None, metavar="N", help="tokens per minute (default: no limit)")
    p.add_argument("--budget", type=_budget, default=None, metavar="USD",
                   help="total spend after which requests are refused (default: none)")
    p.add_argument("--db", default=None, metavar="URL", help=DB_HELP)
    p = sub.add_parser("list", help="list keys with their limits and spend")
    p.add_argument("--db", default=None, metavar="URL", help=DB_HELP)
    p = sub.add_parser("set", help="change a key's limits ('none' removes one)")
    p.add_argument("id_or_prefix", metavar="ID_OR_PREFIX")
    p.add_argument("--rpm", type=_or_none(_count), default=UNCHANGED, metavar="N|none")
    p.add_argument("--tpm", type=_or_none(_count), default=UNCHANGED, metavar="N|none")
    p.add_argument("--budget", type=_or_none(_budget), default=UNCHANGED, metavar="USD|none")
    p.add_argument("--db", default=None, metavar="URL", help=DB_HELP)
    p = sub.add_parser("revoke", help="revoke a key (by id or by the prefix `list` shows)")
    p.add_argument("id_or_prefix", metavar="ID_OR_PREFIX")
    p.add_argument("--db", default=None, metavar="URL", help=DB_HELP)


def _usd(d: Decimal | None) -> str:
    if d is None:
        return "-"
    return f"${d.quantize(Decimal('0.000001')).normalize():f}" if d else "$0"


def _when(t) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%d %H:%M")


def run(args: argparse.Namespace) -> int:
    from exaone.server.ledger import Ledger

    with Ledger(args.db) as ledger:  # unreachable database (LedgerUnavailable): exaone.cli prints it, exit 1
        if args.keys_command == "create":
            key, secret = ledger.create_key(args.name, rpm_limit=args.rpm, tpm_limit=args.tpm,
                                            budget_usd=args.budget)
            print(f"created key {key.id} '{key.name}' ({key.prefix}...; {_limits_text(key)}).")
            print("The secret follows. Store it now: it is not kept and cannot be shown again.")
            print(secret)
        elif args.keys_command == "list":
            _print_list(ledger)
        elif args.keys_command == "set":
            changes = {col: v for col, v in (("rpm_limit", args.rpm), ("tpm_limit", args.tpm),
                                             ("budget_usd", args.budget)) if v is not UNCHANGED}
            if not changes:
                raise ValueError("nothing to change: give --rpm, --tpm or --budget")
            key = ledger.update_key(args.id_or_prefix, **changes)
            print(f"key {key.id} '{key.name}' ({key.prefix}...): {_limits_text(key)}")
        elif args.keys_command == "revoke":
            key = ledger.revoke_key(args.id_or_prefix)
            print(f"revoked key {key.id} '{key.name}' ({key.prefix}...) at {_when(key.revoked_at)} UTC")
    return 0


def _limits_text(key) -> str:
    limits = [f"{k} {v}" for k, v in (("rpm", key.rpm_limit), ("tpm", key.tpm_limit),
                                      ("budget", None if key.budget_usd is None else _usd(key.budget_usd)))
              if v is not None]
    return ", ".join(limits) or "no limits"


def _print_list(ledger) -> None:
    from rich.console import Console
    from rich.table import Table

    keys, spent = ledger.list_keys(), ledger.spent_by_key()
    table = Table(title=f"API keys in {ledger.display_url}")
    for col in ("id", "name", "prefix", "created (UTC)", "revoked", "rpm", "tpm", "budget", "spent"):
        table.add_column(col, justify="right" if col in ("id", "rpm", "tpm", "budget", "spent") else "left")
    for k in keys:
        table.add_row(str(k.id), k.name, k.prefix + "...", _when(k.created_at), _when(k.revoked_at),
                      "-" if k.rpm_limit is None else str(k.rpm_limit),
                      "-" if k.tpm_limit is None else str(k.tpm_limit),
                      _usd(k.budget_usd), _usd(spent.get(k.id, Decimal(0))))
    console = Console()
    if not console.is_terminal:  # piped or captured: don't squeeze the table into 80 columns
        console = Console(width=max(console.width, 140))
    console.print(table if keys else "no API keys yet: create one with `exaone keys create NAME`")
