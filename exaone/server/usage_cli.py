"""`exaone usage`: requests, tokens and cost per key / model / UTC day, as a table or CSV.

Reads the ledger only. Costs are exact decimals (USD); CSV carries them in full.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import sys
from decimal import Decimal

from exaone.server.keys_cli import DB_HELP

SUMS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "cost_usd")
GROUP_COLUMNS = {"key": ("key_id", "key_name"), "model": ("model",), "day": ("day",)}


def _groups(text: str) -> tuple[str, ...]:
    groups = tuple(g.strip() for g in text.split(",") if g.strip())
    bad = [g for g in groups if g not in GROUP_COLUMNS]
    if bad:
        raise argparse.ArgumentTypeError(f"choose from key, model, day (comma-separated), got {','.join(bad)}")
    return groups


def _day(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, metavar="URL", help=DB_HELP)
    parser.add_argument("--by", type=_groups, default=("key", "model", "day"), metavar="key,model,day",
                        help="group by any of key, model, day, comma-separated; '' for one total "
                             "(default: key,model,day)")
    parser.add_argument("--since", type=_day, default=None, metavar="YYYY-MM-DD", help="from this UTC day on")
    parser.add_argument("--until", type=_day, default=None, metavar="YYYY-MM-DD",
                        help="before this UTC day (exclusive)")
    parser.add_argument("--format", choices=("table", "csv"), default="table")


def run(args: argparse.Namespace) -> int:
    from exaone.server.ledger import Ledger

    with Ledger(args.db) as ledger:  # unreachable database (LedgerUnavailable): exaone.cli prints it, exit 1
        rows = ledger.summary(group_by=args.by, since=args.since, until=args.until)
        where = ledger.display_url
    columns = [c for g in ("key", "model", "day") if g in args.by for c in GROUP_COLUMNS[g]] + list(SUMS)
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: "" if r[c] is None else (f"{r[c].normalize():f}" if isinstance(r[c], Decimal) else r[c])
                             for c in columns})
        return 0
    _print_table(rows, columns, args, where)
    return 0


def _print_table(rows: list[dict], columns: list[str], args, where: str) -> None:
    from rich.console import Console
    from rich.table import Table

    span = f" since {args.since}" if args.since else ""
    span += f" until {args.until}" if args.until else ""
    table = Table(title=f"usage{span} in {where}", show_footer=len(rows) > 1)
    totals = {c: sum((r[c] for r in rows), Decimal(0) if c == "cost_usd" else 0) for c in SUMS}
    for i, c in enumerate(columns):
        footer = _cell(c, totals[c]) if c in SUMS else ("total" if i == 0 else "")
        table.add_column(c.replace("_tokens", "").replace("_", " "), footer=footer,
                         justify="right" if c in SUMS or c == "key_id" else "left")
    for r in rows:
        table.add_row(*(_cell(c, r[c]) for c in columns))
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 140))
    console.print(table if rows else f"no usage recorded{span}")


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column == "cost_usd":
        return f"${value.quantize(Decimal('0.000001')):f}"
    if isinstance(value, int) and column != "key_id":
        return f"{value:,}"
    return str(value)
