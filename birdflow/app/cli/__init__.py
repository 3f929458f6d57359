"""The `birdflow` command: one module per group of sub-commands, each command a thin call into the code
that does the work. Installed packages add groups through the entry point group `birdflow.commands`
(the developer tools in tools/ add `bench`, `drill` and `image`)."""

from __future__ import annotations

import argparse
import logging
import os
from importlib.metadata import entry_points

from birdflow.app.cli import configure, data, listen, model, review, running


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    """The command line; without `plugins`, only birdflow's own commands (those of a station's install)."""
    parser = argparse.ArgumentParser(
        prog="birdflow",
        description="Edge acoustic monitoring: each recording a listener sends becomes a Prefect flow run that "
        "runs BirdNET on it, stores the detections and archives the audio.",
    )
    parser.add_argument("--settings", help="settings.yaml to read (default: $BIRDFLOW_SETTINGS or ./settings.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (running, listen, data, review, configure, model):
        group.add_commands(commands)
    for plugin in entry_points(group="birdflow.commands") if plugins else ():
        plugin.load()(commands)
    return parser


# what birdflow writes is its user's alone: recordings, tokens, and the Prefect database, which holds the key to
# the secrets stored beside it (S3 keys, the InfluxDB token)
PRIVATE_UMASK = 0o077


def main(argv: list[str] | None = None) -> int:
    os.umask(PRIVATE_UMASK)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    return args.func(args) or 0
