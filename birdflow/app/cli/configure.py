"""Setting a station and the central server up: files, listener tokens, blocks, the Prometheus agent."""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from birdflow.app.cli.common import at_least, listener_id_argument, require_prefect, settings_of, settings_with_prefect


def cmd_init(args) -> int:
    from birdflow.app.provisioning import init_station

    try:
        written = init_station(args.dir, args.station, args.force)
    except FileExistsError as exc:
        raise SystemExit(f"birdflow: {exc}") from None
    print("\n".join(f"wrote {path}" for path in written))
    print(
        "turned on in .env: listeners need a token (INGEST_AUTH=on; `birdflow listeners add ID` prints one), and the "
        "Prefect UI asks for a login (the value of PREFECT_API_AUTH_STRING there, birdflow:...)"
    )
    print("edit them, then start the station in that folder: birdflow up")
    return 0


def cmd_listeners(args) -> int:
    """Listener tokens: `add` prints a new one once (only its hash is kept), `list`, `revoke`."""
    from birdflow.core.listener_tokens import ListenerTokens

    settings = settings_of(args)
    tokens = ListenerTokens(settings.listener_tokens_file)
    if args.listeners_command == "add":
        token = tokens.add(args.listener_id)
        print(token)
        print(
            f"token for listener {args.listener_id}: shown once, only its hash is kept. The listener sends it as "
            f"'Authorization: Bearer <token>' or '?token=<token>'"
            + ("" if settings.ingest.ingest_auth == "on" else "; it is checked once 'ingest_auth' is on"),
            file=sys.stderr,
        )
    elif args.listeners_command == "list":
        records = tokens.listed()
        if records:
            print("listener\ttoken\tcreated (UTC)")
        for record in records:
            created = datetime.fromtimestamp(record.created_at, timezone.utc)
            print(f"{record.listener_id}\t{record.token_id}\t{created:%Y-%m-%dT%H:%M:%SZ}")
        if not records:
            print("no listener tokens (birdflow listeners add ID)", file=sys.stderr)
    else:
        revoked = tokens.revoke(args.listener_id, args.token_id)
        print(f"revoked {revoked} token(s) of listener {args.listener_id}", file=sys.stderr)
        if not revoked:
            return 1
    return 0


def cmd_central_setup(args) -> int:
    from birdflow.app.provisioning import central_setup

    settings = settings_with_prefect(args)
    stations = [station.strip() for station in args.stations.split(",") if station.strip()]
    central_setup(settings, stations, args.pool_limit, os.environ.get("INFLUX_ADMIN_TOKEN", ""), print)
    return 0


def cmd_blocks_register(args) -> int:
    settings = settings_with_prefect(args)
    from birdflow.blocks import register_blocks

    saved = register_blocks(settings)
    print("\n".join(f"registered {slug}" for slug in saved) or "nothing to register: S3 and InfluxDB are off")
    return 0


def cmd_prometheus_config(args) -> int:
    """Write prometheus.yml (and the secret files it refers to, beside it) for the station's agent."""
    import yaml

    from birdflow.app.observability import prometheus_config, secret_files

    settings = settings_of(args)
    text = yaml.safe_dump(prometheus_config(settings, args.target or ""), sort_keys=False)
    if not args.output:
        print(text, end="")
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "prometheus.yml").write_text(text)
    for name, content in secret_files(settings).items():
        secret = args.output / name
        secret.touch(mode=0o600)
        secret.chmod(0o600)
        secret.write_text(content)
    print(
        f"wrote {args.output / 'prometheus.yml'}; run: prometheus --enable-feature=agent "
        f"--config.file={args.output / 'prometheus.yml'}"
    )
    return 0


def cmd_notify(args) -> int:
    """Channels for rare-species notifications: a Prefect notification block and automations each, on the station's
    Prefect server or (`--central`) on its fleet's central one."""
    from contextlib import nullcontext

    from birdflow.app import notify

    settings = settings_with_prefect(args)
    try:
        server = notify.on_central_server(settings) if args.central else nullcontext()
    except notify.ChannelError as exc:
        raise SystemExit(f"birdflow: {exc}") from None
    if not args.central:
        require_prefect(settings)
    with server:
        return notify_command(args, settings)


def reach_of(args) -> str:
    """Where the channel may send (birdflow.app.notify.REACHES), from --allow-loopback and --allow-private."""
    return "loopback" if args.allow_loopback else "private" if args.allow_private else "public"


def notify_command(args, settings) -> int:
    from birdflow.app import notify

    if args.notify_command == "add":
        try:
            block, automation = notify.add_channel(settings, args.kind, args.target, args.name or "", reach_of(args))
        except notify.ChannelError as exc:
            raise SystemExit(f"birdflow: {exc}") from None
        print(
            f"{block}: rare species of station {settings.station_id}, and their confirmations by other stations, are "
            f"sent to this {args.kind} (automation {automation})"
        )
        if not args.central and settings.embedded_prefect and not settings.prefect.prefect_events_enabled:
            print(
                "the embedded Prefect server turns its triggers on within 30 s (a restart of a few seconds)",
                file=sys.stderr,
            )
    elif args.notify_command == "list":
        channels = notify.list_channels(settings)
        if channels:
            print("channel\tenabled\tautomation")
        for channel in channels:
            print(f"{channel['channel']}\t{channel['enabled']}\t{channel['automation_id']}")
        if not channels:
            print("no notification channels (birdflow notify add webhook URL)", file=sys.stderr)
    elif not notify.remove_channel(settings, args.name):
        print(f"birdflow: no notification channel {args.name!r} (see `birdflow notify list`)", file=sys.stderr)
        return 1
    else:
        print(f"removed channel {args.name} (its automations and notification block)")
    return 0


def add_commands(commands) -> None:
    init = commands.add_parser("init", help="write a commented settings.yaml and a .env template")
    init.add_argument("--dir", type=Path, default=Path("."), help="where to write them (default: here)")
    init.add_argument("--station", default="station01", help="this station's id")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(func=cmd_init)

    listeners = commands.add_parser("listeners", help="listener tokens for ingest_auth: add, list, revoke")
    listener_commands = listeners.add_subparsers(dest="listeners_command", required=True)
    add = listener_commands.add_parser("add", help="print a new token for a listener (its other tokens stay valid)")
    add.add_argument("listener_id", type=listener_id_argument)
    listener_commands.add_parser("list", help="listener, token id, created (never the tokens)")
    revoke = listener_commands.add_parser("revoke", help="revoke a listener's tokens, or one of them")
    revoke.add_argument("listener_id", type=listener_id_argument)
    revoke.add_argument("--token-id", help="only this token (its id from `list`, or a prefix of it)")
    listeners.set_defaults(func=cmd_listeners)

    central = commands.add_parser("central-setup", help="work pools per station, Prefect blocks, InfluxDB database")
    central.add_argument("--stations", required=True, help="comma-separated station ids")
    central.add_argument("--pool-limit", type=at_least(1), default=2, help="flow runs at once per station pool")
    central.set_defaults(func=cmd_central_setup)

    blocks = commands.add_parser("blocks", help="Prefect blocks")
    block_commands = blocks.add_subparsers(dest="blocks_command", required=True)
    block_commands.add_parser("register", help="create or update the blocks from the settings").set_defaults(
        func=cmd_blocks_register
    )

    notify_parser = commands.add_parser("notify", help="notifications of rare species: add, list, remove channels")
    notify_parser.add_argument(
        "--central",
        action="store_true",
        help="on the fleet's central Prefect server (central_api_url), where a station with its own history sends "
        "its rare and confirmed sightings",
    )
    notify_commands = notify_parser.add_subparsers(dest="notify_command", required=True)
    add_channel = notify_commands.add_parser(
        "add", help="send rare species to a webhook, Slack, Discord, Teams or e-mail"
    )
    add_channel.add_argument("kind", choices=("webhook", "slack", "discord", "teams", "email"))
    add_channel.add_argument(
        "target", help="the webhook URL, or e-mail addresses separated by commas (SENDGRID_API_KEY)"
    )
    add_channel.add_argument(
        "--allow-loopback",
        action="store_true",
        help="let the URL point at this machine (a relay running here), or a private network",
    )
    add_channel.add_argument(
        "--allow-private", action="store_true", help="let the URL point into a private network (a receiver on the LAN)"
    )
    add_channel.add_argument("--name", help="name of the channel (default: <station>-<kind>); lower case, digits, '-'")
    notify_commands.add_parser("list", help="this station's channels and their automations")
    remove_channel = notify_commands.add_parser("remove", help="delete a channel's automation and block")
    remove_channel.add_argument("name", help="the channel's name as `list` shows it")
    notify_parser.set_defaults(func=cmd_notify)

    prometheus = commands.add_parser(
        "prometheus-config", help="Prometheus agent config: scrape birdflow, remote-write centrally"
    )
    prometheus.add_argument("--output", type=Path, help="folder for prometheus.yml (+ password file); default: print")
    prometheus.add_argument("--target", help="host:port to scrape (default: the ingest API)")
    prometheus.set_defaults(func=cmd_prometheus_config)
