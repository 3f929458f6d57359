"""Notifications of rare species: a Prefect notification block per channel and two Prefect automations for each,
"birdflow.recording.rare of this station -> send notification" (one message per recording, naming its rare
species) and "birdflow.detection.confirmed with this station
-> send notification", so the server's own machinery (retries, the UI's Automations page, pausing) does the sending.
A station that keeps its own run history puts them on its fleet's central server (`--central`), where the
confirmed events are.

The embedded server keeps its triggers off while no automation exists (they cost CPU per run); `birdflow
up` turns them on when one does (birdflow/app/embedded_prefect.py).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast
from urllib.parse import urlparse

from birdflow.core.central_link import CONFIRMED_EVENT
from birdflow.core.errors import Refused
from birdflow.core.rarity import RARE_IN_RECORDING_EVENT
from birdflow.settings import Settings

# one message per recording, naming each of its rare species (birdflow.recording.rare)
SUBJECT = (
    "Rare bird{% if event.payload.species | length > 1 %}s{% endif %} at {{ event.payload.station_id }}: "
    "{{ event.payload.common_names }}"
)
BODY = (
    "{% for item in event.payload.species %}{{ item.common_name }} ({{ item.scientific_name }}), confidence "
    "{{ item.confidence | round(2) }}, at {{ item.time }}{% if item.watched %} (on the watch list){% endif %}"
    "{% if item.clip_url %}, clip: {{ item.clip_url }}{% endif %}\n{% endfor %}"
    "heard by listener {{ event.payload.listener_id }} at station {{ event.payload.station_id }}."
    "{% if event.payload.run_url %}\nRun: {{ event.payload.run_url }}{% endif %}"
)
CONFIRMED_SUBJECT = "Confirmed: {{ event.payload.common_name }} at {{ event.payload.stations | join(', ') }}"
CONFIRMED_BODY = (
    "{{ event.payload.common_name }} ({{ event.payload.scientific_name }}) heard by stations "
    "{{ event.payload.stations | join(', ') }} within {{ event.payload.window_s | int }} s, first at "
    "{{ event.payload.first_time }}.\n"
    "{% for sighting in event.payload.sightings %}{{ sighting.station_id }} {{ sighting.listener_id }} "
    "{{ sighting.time }} {{ sighting.confidence }} {{ sighting.run_url }}\n{% endfor %}"
)


def as_json_document(subject: str, body: str, fields: tuple[str, ...]) -> str:
    """A template of one JSON document: the message's subject and text, and the event's fields on their own (what
    a webhook gets)."""
    values = ", ".join(f'"{field}": {{{{ event.payload.{field} | tojson }}}}' for field in fields)
    return (
        f"{{% set subject %}}{subject}{{% endset %}}{{% set text %}}{body}{{% endset %}}"
        f'{{"subject": {{{{ subject | trim | tojson }}}}, "text": {{{{ text | trim | tojson }}}}, {values}}}'
    )


WEBHOOK_BODY = as_json_document(
    SUBJECT,
    BODY,
    ("station_id", "listener_id", "recording_id", "time", "latitude", "longitude", "run_url", "species"),
)
CONFIRMED_WEBHOOK_BODY = as_json_document(
    CONFIRMED_SUBJECT,
    CONFIRMED_BODY,
    ("scientific_name", "common_name", "stations", "first_time", "window_s", "sightings"),
)
BLOCK_PREFIX = "birdflow-notify-"

if TYPE_CHECKING:
    from prefect.blocks.core import Block


class ChannelError(Refused):
    """The channel's address cannot be used; the message says what was expected."""


# where a channel may send: the internet only, also private networks (a receiver on the LAN), also this machine
REACHES = ("public", "private", "loopback")
# private networks (RFC 1918, carrier-grade NAT, IPv6 unique local): a LAN's hosts, a cloud's internal services
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(network)
    for network in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)


def _webhook(target: str, reach: str = "public"):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    _require_http(target, "a webhook URL", reach)
    # the body is the JSON document (WEBHOOK_BODY), sent as it is; Prefect checks the address again when it sends
    return CustomWebhookNotificationBlock(
        name="birdflow",
        url=target,
        form_data="{{body}}",
        headers={"Content-Type": "application/json"},
        allow_private_urls=reach != "public",
    )


def _slack(target: str, reach: str = "public"):
    from prefect.blocks.notifications import SlackWebhook

    _require_http(target, "a Slack incoming-webhook URL", reach)
    return SlackWebhook(url=target, allow_private_urls=reach != "public")


def _teams(target: str, reach: str = "public"):
    from prefect.blocks.notifications import MicrosoftTeamsWebhook

    _require_http(target, "a Microsoft Teams webhook URL", reach)
    return MicrosoftTeamsWebhook(url=target, allow_private_urls=reach != "public")


def _discord(target: str, reach: str = "public"):
    from prefect.blocks.notifications import DiscordWebhook

    match = re.search(r"/api/webhooks/(\d+)/([\w-]+)", target)
    if not match:
        raise ChannelError("expected a Discord webhook URL (https://discord.com/api/webhooks/<id>/<token>)")
    return DiscordWebhook(webhook_id=match.group(1), webhook_token=match.group(2))


def _email(target: str, reach: str = "public"):
    from prefect.blocks.notifications import SendgridEmail

    addresses = [part.strip() for part in target.split(",") if part.strip()]
    if not addresses or not all(re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", address) for address in addresses):
        raise ChannelError("expected one or more e-mail addresses, separated by commas")
    key = os.environ.get("SENDGRID_API_KEY", "")
    if not key:
        raise ChannelError("e-mail is sent through SendGrid: set SENDGRID_API_KEY in the environment")
    return SendgridEmail(api_key=key, sender_email=os.environ.get("SENDGRID_SENDER", addresses[0]), to_emails=addresses)


def _require_http(target: str, what: str, reach: str = "public") -> None:
    """An http(s) URL without template braces whose host, every address it resolves to checked (an IPv4 address
    written as IPv6 as the IPv4 one), is on the internet, or also on a private network (`reach` private), or also
    this machine (`reach` loopback: a relay on the station itself). Never a link-local address (the cloud's
    metadata service, 169.254.169.254), nor a name that does not resolve here: notifications must not reach the
    station's own APIs or its network's."""
    parsed = urlparse(target)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ChannelError(f"expected {what} (http:// or https://), got {target!r}")
    if "{" in target or "}" in target:
        raise ChannelError(f"{what} must not hold template braces ({{ }}): {target!r}")
    found = _addresses(parsed.hostname)
    if not found:
        raise ChannelError(f"{what}: {parsed.hostname!r} does not resolve from this station")
    for address in found:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_link_local or address.is_unspecified or address.is_multicast or address.is_reserved:
            raise ChannelError(f"{what} must not point at {address} (a link-local or unroutable address)")
        if address.is_loopback and reach != "loopback":
            raise ChannelError(
                f"{what} points at this machine ({address}): add --allow-loopback for a relay running here"
            )
        if any(address in network for network in PRIVATE_NETWORKS) and reach == "public":
            raise ChannelError(
                f"{what} points into a private network ({address}): add --allow-private for a receiver on it"
            )


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The host as an address, or what its name resolves to now (nothing when it does not resolve here)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in found]


CHANNELS: dict[str, Callable[[str, str], Block]] = {
    "webhook": _webhook,
    "slack": _slack,
    "discord": _discord,
    "teams": _teams,
    "email": _email,
}


def automation_name(settings: Settings, block_name: str, event: str = "rare") -> str:
    return f"birdflow {settings.station_id}: {event} species -> {block_name}"


def add_channel(settings: Settings, kind: str, target: str, name: str = "", reach: str = "public") -> tuple[str, str]:
    """Save the channel's block and (re)create its automations; returns (block name, the rare automation's id)."""
    from prefect.automations import Automation, EventTrigger, SendNotification
    from prefect.events.schemas.automations import Posture

    block = CHANNELS[kind](target, reach)
    block_name = BLOCK_PREFIX + (name or f"{settings.station_id}-{kind}")
    if not re.fullmatch(r"[a-z0-9-]+", block_name):
        raise ChannelError(f"channel name {name!r}: use lower-case letters, digits and '-'")
    block_id = block.save(block_name, overwrite=True)
    _delete_automations(automation_name(settings, block_name), automation_name(settings, block_name, "confirmed"))
    automation = Automation(
        name=automation_name(settings, block_name),
        description=f"Sends {RARE_IN_RECORDING_EVENT} events of station {settings.station_id} to {kind} ({block_name})",
        trigger=EventTrigger(
            expect={RARE_IN_RECORDING_EVENT},
            match={"birdflow.station": settings.station_id},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        ),
        actions=[
            SendNotification(
                block_document_id=block_id, subject=SUBJECT, body=WEBHOOK_BODY if kind == "webhook" else BODY
            )
        ],
    ).create()
    Automation(
        name=automation_name(settings, block_name, "confirmed"),
        description=f"Sends {CONFIRMED_EVENT} events that station {settings.station_id} took part in to {kind}",
        trigger=EventTrigger(
            expect={CONFIRMED_EVENT},
            match_related={"prefect.resource.id": f"birdflow.station.{settings.station_id}"},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject=CONFIRMED_SUBJECT,
                body=CONFIRMED_WEBHOOK_BODY if kind == "webhook" else CONFIRMED_BODY,
            )
        ],
    ).create()
    return block_name, str(cast(Automation, automation).id)


def list_channels(settings: Settings) -> list[dict[str, str]]:
    from prefect import get_client

    prefix = automation_name(settings, "")
    with get_client(sync_client=True) as client:
        automations = client.read_automations()
    return [
        {
            "channel": automation.name.removeprefix(prefix),
            "automation_id": str(automation.id),
            "enabled": "yes" if automation.enabled else "no",
        }
        for automation in automations
        if automation.name.startswith(prefix)
    ]


def remove_channel(settings: Settings, block_name: str) -> bool:
    """Delete the channel's automation and block; False when there was neither."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    block_name = block_name if block_name.startswith(BLOCK_PREFIX) else BLOCK_PREFIX + block_name
    removed = _delete_automations(
        automation_name(settings, block_name), automation_name(settings, block_name, "confirmed")
    )
    with get_client(sync_client=True) as client:
        for document in client.read_block_documents():
            if document.name == block_name:
                try:
                    client.delete_block_document(document.id)
                    removed += 1
                except ObjectNotFound:
                    pass
    return removed > 0


def _delete_automations(*names: str) -> int:
    from prefect import get_client

    deleted = 0
    with get_client(sync_client=True) as client:
        for name in names:
            for automation in client.read_automations_by_name(name):
                client.delete_automation(automation.id)
                deleted += 1
    return deleted


@contextmanager
def on_central_server(settings: Settings) -> Iterator[None]:
    """This process's Prefect client pointed at the fleet's central server (with its auth), for the while."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    if not settings.prefect.central_api_url:
        raise ChannelError("--central: the setting 'central_api_url' names no central Prefect server")
    auth = settings.prefect.central_api_auth_string.get_secret_value() or None
    with temporary_settings({PREFECT_API_URL: settings.prefect.central_api_url, PREFECT_API_AUTH_STRING: auth}):
        yield
