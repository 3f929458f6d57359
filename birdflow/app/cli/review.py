"""`birdflow review`: the detections waiting for a verdict, verdicts given by id or from a CSV, and how the
reviews of each species went (birdflow.core.reviews)."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any

from birdflow.app.cli.common import settings_of
from birdflow.app.cli.data import add_selection_arguments, selected_detections
from birdflow.app.cli.output import print_table


def _resources(args):
    from birdflow.flows.run_resources import use_run_resources

    return use_run_resources(settings_of(args))


def find_detections(resources, wanted: list[str]) -> dict[str, dict[str, Any]]:
    """The detections of these ids: those asked to be reviewed at once, any other from the local detections."""
    from birdflow.core.reviews import detection_ids
    from birdflow.core.sinks import read_detections

    found = {key: row for key in wanted if (row := resources.reviews.requested(key)) is not None}
    rest = set(wanted) - set(found)
    if rest:
        table = read_detections(resources.settings.detections_dir)
        for key, row in zip(detection_ids(table), table.to_pylist()):
            if key in rest:
                found[key] = row
    return found


def give_verdicts(resources, verdicts: list[tuple[str, Any]]) -> None:
    """(detection id, Verdict) pairs taken, once every id is known: an unknown one takes none. Then the review
    runs still waiting for them end with these verdicts."""
    from birdflow.flows.review import take_verdicts

    rows = find_detections(resources, [key for key, _ in verdicts])
    unknown = [key for key, _ in verdicts if key not in rows]
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise SystemExit(f"birdflow review: no detection with id {shown} (`birdflow review list --all` shows ids)")
    take_verdicts(resources, [(rows[key], verdict) for key, verdict in verdicts])
    for key, verdict in verdicts[:50]:
        print(f"{key}: {verdict.verdict}" + (f" as {verdict.common_name}" if verdict.common_name else ""))
    if len(verdicts) > 50:
        print(f"... and {len(verdicts) - 50} more")
    end_waiting_runs(resources)


def end_waiting_runs(resources) -> None:
    """The review runs waiting in the Prefect UI for a detection decided now, completed; when the Prefect API
    does not answer, the station's next maintenance run ends them."""
    from prefect.client.orchestration import SyncPrefectClient

    from birdflow.app.children import prefect_answers
    from birdflow.flows.review import end_decided_reviews

    settings = resources.settings
    later = "the verdicts are stored; the review runs waiting for them end at the station's next maintenance run"
    if not prefect_answers(settings.api_url, timeout_s=5.0):
        print(f"{later} (the Prefect API at {settings.api_url} does not answer)")
        return
    auth = settings.prefect.prefect_api_auth_string.get_secret_value() or None
    try:
        with SyncPrefectClient(settings.api_url, auth_string=auth) as client:
            ended = end_decided_reviews(client, resources)
    except Exception as exc:  # the verdicts are stored: only the runs' states wait
        print(f"{later} ({type(exc).__name__}: {exc})")
        return
    if ended:
        print(f"{len(ended)} review run(s) waiting in the Prefect UI ended with these verdicts")


def cmd_verdict(args) -> int:
    from birdflow.core.reviews import ReviewError, verdict_from
    from birdflow.flows.review import species_names

    resources = _resources(args)
    species = getattr(args, "to", "") or ""
    try:
        verdict = verdict_from(args.review_command, species, species_names(), args.by, "cli")
    except ReviewError as exc:
        raise SystemExit(f"birdflow review: {exc}") from None
    give_verdicts(resources, [(key, verdict) for key in args.ids])
    return 0


def cmd_import(args) -> int:
    """Every line checked (ids, verdicts, species) before any verdict is taken."""
    from birdflow.core.reviews import MAX_VERDICT_FILE_BYTES, ReviewError, verdict_from, verdict_lines
    from birdflow.flows.review import species_names

    resources = _resources(args)
    try:
        path = Path(args.file)
        if path.stat().st_size > MAX_VERDICT_FILE_BYTES:
            raise ReviewError(
                f"{path.stat().st_size} bytes: a file of verdicts holds at most {MAX_VERDICT_FILE_BYTES >> 20} MiB"
            )
        lines = verdict_lines(path.read_bytes())
        verdicts = []
        for line in lines:
            try:
                verdict = verdict_from(
                    line.verdict_word, line.species, species_names(), line.reviewer or args.by, "csv"
                )
            except ReviewError as exc:
                raise ReviewError(f"line {line.line}: {exc}") from None
            verdicts.append((line.detection_id, verdict))
    except (OSError, ReviewError) as exc:
        raise SystemExit(f"birdflow review import: {exc}") from None
    give_verdicts(resources, verdicts)
    print(f"{len(verdicts)} verdict(s) taken from {args.file}")
    return 0


def cmd_list(args) -> int:
    """What waits for a verdict; with --all, every unreviewed detection the selection options select."""
    import pyarrow as pa

    from birdflow.core.reviews import ReviewStore, detection_ids, id_of

    settings = settings_of(args, reading_only=True)
    store = ReviewStore(settings.reviews_file)
    if args.all:
        table = selected_detections(settings, args)
        reviewed = set(store.table().column("detection_id").to_pylist())
        rows = [
            {**row, "id": key, "reason": ""}
            for key, row in zip(detection_ids(table), table.to_pylist())
            if key not in reviewed
        ]
    else:
        rows = [{**row, "id": id_of(row), "reason": reason} for row, reason in store.pending()]
    # what fits 80 columns; --wide adds where to hear it: the recording and the offset in it
    columns = ["id", "time", "listener_id", "common_name", "confidence", "reason"]
    if args.wide:
        columns[4:4] = ["scientific_name"]
        columns += ["recording_id", "start_s"]
    if rows:
        listed = pa.Table.from_pylist([{name: row[name] for name in columns} for row in rows])
    else:
        listed = pa.table({name: pa.array([], pa.string()) for name in columns})
    listed = listed.rename_columns([LIST_NAMES.get(name, name) for name in columns])
    print_table(listed, args.format, title=f"{len(rows)} detection(s) waiting for a verdict", wide=args.wide)
    return 0


LIST_NAMES = {
    "time": "time (UTC)",
    "listener_id": "listener",
    "common_name": "species",
    "scientific_name": "scientific",
    "reason": "asked as",
    "recording_id": "recording",
    "start_s": "offset (s)",
}


def cmd_stats(args) -> int:
    import pyarrow as pa

    from birdflow.core.reviews import ReviewStore, review_stats

    settings = settings_of(args, reading_only=True)
    stats = review_stats(ReviewStore(settings.reviews_file).table(), args.target, args.min_reviews)
    table = pa.Table.from_pylist(
        [
            {
                "species": item.common_name,
                "reviewed": item.reviewed,
                "confirmed": item.confirmed,
                "rejected": item.rejected,
                "relabelled": item.relabelled,
                "wrong_share": round(item.wrong_share, 3),
                "suggested_min_confidence": item.suggested_min_confidence,
            }
            for item in stats
        ]
    )
    print_table(table, args.format, title=f"reviews of {len(stats)} species")
    if stats and args.format == "table":
        print(
            f"suggested_min_confidence: the lowest threshold above which at most {args.target:.0%} of the reviewed "
            f"labels were wrong (rejected or relabelled), from {args.min_reviews} reviews of a species on; set it "
            "with setting 'species_min_confidence'"
        )
    return 0


def add_commands(commands) -> None:
    review = commands.add_parser("review", help="verdicts on detections: list, confirm, reject, relabel, import, stats")
    verbs = review.add_subparsers(dest="review_command", required=True)

    listing = verbs.add_parser("list", help="detections waiting for a verdict (with ids)")
    listing.add_argument("--all", action="store_true", help="every unreviewed detection the options select")
    add_selection_arguments(listing)
    listing.add_argument("--format", choices=("table", "json", "csv"), default="table")
    listing.add_argument(
        "--wide", action="store_true", help="also the scientific name, the recording and the offset in it"
    )
    listing.set_defaults(func=cmd_list)

    for verb, text in (("confirm", "the label is right"), ("reject", "nothing of the kind was heard")):
        given = verbs.add_parser(verb, help=f"{text} (by detection id)")
        given.add_argument("ids", nargs="+", metavar="ID")
        given.add_argument("--by", default=getpass.getuser(), help="who gives the verdict (default: this user)")
        given.set_defaults(func=cmd_verdict)

    relabel = verbs.add_parser("relabel", help="it was another species of the model")
    relabel.add_argument("ids", nargs="+", metavar="ID")
    relabel.add_argument("--to", required=True, help="the species it was (scientific or common name)")
    relabel.add_argument("--by", default=getpass.getuser(), help="who gives the verdict (default: this user)")
    relabel.set_defaults(func=cmd_verdict)

    imported = verbs.add_parser("import", help="verdicts from a CSV with columns id,verdict[,species][,reviewer]")
    imported.add_argument("file")
    imported.add_argument("--by", default=getpass.getuser(), help="reviewer of lines that name none")
    imported.set_defaults(func=cmd_import)

    stats = verbs.add_parser("stats", help="per species: reviews, the share wrong, a suggested threshold")
    stats.add_argument("--target", type=float, default=0.1, help="wrong share a suggested threshold allows")
    stats.add_argument("--min-reviews", type=int, default=5, help="reviews of a species before a suggestion")
    stats.add_argument("--format", choices=("table", "json", "csv"), default="table")
    stats.set_defaults(func=cmd_stats)
