"""The `birdflow` command: one module per group of sub-commands, each command a thin call into the code
that does the work."""

from __future__ import annotations

import argparse
import logging
from typing import Optional

from birdflow.app.cli import configure, data, running, tools


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="birdflow", description=__doc__)
    parser.add_argument("--settings", help="settings.yaml to read (default: $BIRDFLOW_SETTINGS or ./settings.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (running, tools, data, configure):
        group.add_commands(commands)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    return args.func(args) or 0
