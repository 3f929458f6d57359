"""A person's verdict on a detection: confirmed, rejected, or relabelled to another species of the model, with
who gave it, when and how (the Prefect UI, the command line, a CSV of verdicts).

A detection's row keeps the label the model gave it; its verdict sits beside it in the `reviews` table, keyed by
the detection's id, and a reader asks for the reviewed truth (`reviewed_truth`, the `reviewed` SQL view). The
station's review state is one SQLite file: the detections asked to be reviewed (each rare species of a recording,
a sample of the rest on request) and the latest verdict on each detection. No network here.
"""

from __future__ import annotations

import base64
import csv
import difflib
import hashlib
import io
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from birdflow.core.errors import Refused
from birdflow.core.local_db import LocalDatabase

# what a person says, as a command word, and as it is stored
VERDICT_OF_WORD = {"confirm": "confirmed", "reject": "rejected", "relabel": "relabelled"}
VERDICTS = tuple(VERDICT_OF_WORD.values())
WRONG_VERDICTS = ("rejected", "relabelled")  # the model's label was not what was heard

REVIEWS_SCHEMA = pa.schema(
    [
        pa.field("time", pa.timestamp("ms", tz="UTC"), nullable=False),  # the detection's time
        pa.field("station_id", pa.string(), nullable=False),
        pa.field("listener_id", pa.string(), nullable=False),
        pa.field("recording_id", pa.string(), nullable=False),
        pa.field("analysis_id", pa.string(), nullable=False),
        pa.field("detection_id", pa.string(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("scientific_name", pa.string(), nullable=False),  # as the model labelled it
        pa.field("common_name", pa.string(), nullable=False),
        pa.field("confidence", pa.float64(), nullable=False),
        pa.field("verdict", pa.string(), nullable=False),
        pa.field("reviewed_scientific_name", pa.string(), nullable=True),  # what it was; null when rejected
        pa.field("reviewed_common_name", pa.string(), nullable=True),
        pa.field("reviewer", pa.string(), nullable=False),
        pa.field("reviewed_at", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("via", pa.string(), nullable=False),
    ]
)
REVIEW_TAG_COLUMNS = ["station_id", "listener_id", "recording_id", "detection_id"]
DETECTION_KEYS = (
    *("time", "station_id", "listener_id", "recording_id", "analysis_id", "start_s", "end_s"),
    *("scientific_name", "common_name", "confidence", "clip_key"),
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (detection_id TEXT PRIMARY KEY, detection TEXT NOT NULL, reason TEXT NOT NULL,
    requested_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS verdicts (detection_id TEXT PRIMARY KEY, detection TEXT NOT NULL, day TEXT NOT NULL,
    verdict TEXT NOT NULL, scientific_name TEXT, common_name TEXT, reviewer TEXT NOT NULL, reviewed_at REAL NOT NULL,
    via TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS verdicts_by_day ON verdicts (day);
"""


class ReviewError(Refused):
    """A verdict that cannot be taken: an unknown detection id or species, a malformed CSV line."""


REVIEWER_MAX = 100  # characters of a reviewer's name
SPECIES_TEXT_MAX = 120  # characters of a species as a person types it (the model's longest label has 60)


def one_line(text: str, limit: int) -> str:
    """What a person typed, as one line of at most `limit` characters: control characters (a newline that would
    forge a log line) become spaces, runs of spaces one."""
    return " ".join("".join(char if char.isprintable() else " " for char in text).split())[:limit]


def shown(text: str, limit: int = 40) -> str:
    """Typed text quoted in a message: one line, cut where it is long."""
    short = one_line(text, limit)
    return repr(short + ("..." if len(text) > limit else ""))


def detection_id(recording_id: str, analysis_id: str, start_s: float, scientific_name: str) -> str:
    """Twelve hex digits that name one detection: the same row always gets the same id."""
    key = f"{recording_id}\x1f{analysis_id}\x1f{start_s:g}\x1f{scientific_name}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def id_of(row: dict[str, Any]) -> str:
    return detection_id(row["recording_id"], row["analysis_id"], row["start_s"], row["scientific_name"])


def detection_ids(table: pa.Table) -> list[str]:
    columns = [table.column(name).to_pylist() for name in ("recording_id", "analysis_id", "start_s", "scientific_name")]
    return [detection_id(*values) for values in zip(*columns)]


@dataclass(frozen=True)
class Verdict:
    verdict: str  # one of VERDICTS
    reviewer: str
    via: str  # ui, cli or csv
    scientific_name: str | None = None  # what it was, for a relabel
    common_name: str | None = None
    reviewed_at: float | None = None  # epoch seconds; now when not given

    def __post_init__(self) -> None:
        reviewer = one_line(self.reviewer, REVIEWER_MAX)
        if not reviewer:
            raise ReviewError("the reviewer's name is empty")
        object.__setattr__(self, "reviewer", reviewer)
        if self.verdict not in VERDICTS:
            raise ReviewError(f"verdict {self.verdict!r} is none of {', '.join(VERDICTS)}")
        if (self.verdict == "relabelled") != bool(self.scientific_name):
            raise ReviewError("a relabel names the species it was, and only a relabel does")


class SpeciesNames:
    """The model's species, for relabels: a scientific or common name (any case) to (scientific, common)."""

    def __init__(self, labels: Iterable[str]):
        self._by_name: dict[str, tuple[str, str]] = {}
        for label in labels:
            scientific, common = label.split("_", 1)
            self._by_name[scientific.lower()] = self._by_name[common.lower()] = (scientific, common)

    def resolve(self, name: str) -> tuple[str, str]:
        if len(name) > SPECIES_TEXT_MAX:
            raise ReviewError(f"{shown(name)} ({len(name)} characters) is no species of the model")
        found = self._by_name.get(name.strip().lower())
        if found is None:
            close = difflib.get_close_matches(name.strip().lower(), self._by_name, n=3, cutoff=0.75)
            hint = f" (did you mean {', '.join(repr(self._by_name[key][1]) for key in close)}?)" if close else ""
            raise ReviewError(f"{shown(name)} is no species of the model{hint}")
        return found


def verdict_from(verdict_word: str, species: str, names: SpeciesNames, reviewer: str, via: str) -> Verdict:
    """A verdict from its command word (confirm, reject, relabel) and, for a relabel, the species it was."""
    if verdict_word not in VERDICT_OF_WORD:
        raise ReviewError(f"verdict {shown(verdict_word)} is none of {', '.join(VERDICT_OF_WORD)}")
    verdict = VERDICT_OF_WORD[verdict_word]
    if verdict != "relabelled":
        if species.strip():
            raise ReviewError(f"a species is given only to relabel (got {shown(species)} with {verdict_word})")
        return Verdict(verdict, reviewer, via)
    if not species.strip():
        raise ReviewError("relabel needs the species it was")
    scientific, common = names.resolve(species)
    return Verdict(verdict, reviewer, via, scientific, common)


def _stored(row: dict[str, Any]) -> str:
    values = {key: row.get(key) for key in DETECTION_KEYS}
    time_value = values["time"]
    values["time"] = time_value.isoformat() if isinstance(time_value, datetime) else time_value
    return json.dumps(values)


def _loaded(text: str) -> dict[str, Any]:
    row = json.loads(text)
    row["time"] = datetime.fromisoformat(row["time"])
    return row


class ReviewStore:
    """The station's review state (module docstring). Safe for several processes: each change is one statement."""

    def __init__(self, path: Path):
        self.database = LocalDatabase(path, [SCHEMA])

    def request(self, rows: Iterable[tuple[dict[str, Any], str]]) -> list[tuple[dict[str, Any], str]]:
        """Ask for reviews of these (detection row, reason); returns those asked for the first time."""
        new = []
        for row, reason in rows:
            cursor = self.database.execute(
                "INSERT OR IGNORE INTO requests VALUES (?, ?, ?, ?)", (id_of(row), _stored(row), reason, time.time())
            )
            if cursor.rowcount:
                new.append((row, reason))
        return new

    def pending(self) -> list[tuple[dict[str, Any], str]]:
        """(detection, reason) asked for and not reviewed yet, oldest detection first."""
        found = self.database.execute(
            "SELECT detection, reason FROM requests WHERE detection_id NOT IN (SELECT detection_id FROM verdicts)"
        ).fetchall()
        return sorted(((_loaded(text), reason) for text, reason in found), key=lambda item: item[0]["time"])

    def requested(self, wanted: str) -> dict[str, Any] | None:
        found = self.database.execute("SELECT detection FROM requests WHERE detection_id = ?", (wanted,)).fetchone()
        return _loaded(found[0]) if found else None

    def record(self, row: dict[str, Any], verdict: Verdict) -> datetime:
        """The detection's verdict (a later one replaces it); returns the detection's day, whose table changed."""
        [day] = self.record_all([(row, verdict)])
        return day

    def record_all(self, decided: Sequence[tuple[dict[str, Any], Verdict]]) -> set[datetime]:
        """The verdicts, all in one transaction (a file of them is taken whole or not at all); returns the days
        whose tables changed."""
        now = time.time()
        rows = []
        for row, verdict in decided:
            day = row["time"].astimezone(timezone.utc).strftime("%Y-%m-%d")
            reviewed_at = verdict.reviewed_at if verdict.reviewed_at is not None else now
            rows.append(
                (id_of(row), _stored(row), day, verdict.verdict, verdict.scientific_name, verdict.common_name)
                + (verdict.reviewer, reviewed_at, verdict.via)
            )
        with self.database.transaction():
            self.database.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return {datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc) for _, _, day, *_ in rows}

    def verdict_given(self, wanted: str) -> Verdict | None:
        """The latest verdict on the detection, None when it has none."""
        found = self.database.execute(
            "SELECT verdict, reviewer, via, scientific_name, common_name, reviewed_at FROM verdicts "
            "WHERE detection_id = ?",
            (wanted,),
        ).fetchone()
        return Verdict(*found) if found else None

    def table(self, day: datetime | None = None) -> pa.Table:
        """Every verdict (REVIEWS_SCHEMA), or those on detections of one UTC day, by detection time."""
        statement = "SELECT * FROM verdicts" + (" WHERE day = ?" if day else "")
        found = self.database.execute(statement, (f"{day:%Y-%m-%d}",) if day else ()).fetchall()
        rows = []
        for detection_key, text, _, verdict, scientific, common, reviewer, reviewed_at, via in found:
            row = _loaded(text)
            rows.append(
                {
                    **{name: row[name] for name in REVIEWS_SCHEMA.names if name in row},
                    "detection_id": detection_key,
                    "verdict": verdict,
                    "reviewed_scientific_name": row["scientific_name"] if verdict == "confirmed" else scientific,
                    "reviewed_common_name": row["common_name"] if verdict == "confirmed" else common,
                    "reviewer": reviewer,
                    "reviewed_at": datetime.fromtimestamp(reviewed_at, timezone.utc),
                    "via": via,
                }
            )
        return pa.Table.from_pylist(rows, schema=REVIEWS_SCHEMA).sort_by([("time", "ascending")])


def review_candidates(table: pa.Table, rare_species: set[str], sample_share: float) -> list[tuple[dict[str, Any], str]]:
    """(detection row, reason) to ask a person about: each rare species at its most confident in the recording,
    and of the rest the share `sample_share`, picked by detection id (the same rows on every rerun)."""
    rows = table.to_pylist()
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        name = row["scientific_name"]
        if name in rare_species and (name not in best or row["confidence"] > best[name]["confidence"]):
            best[name] = row
    chosen = [(row, "rare") for row in best.values()]
    chosen += [(row, "sample") for row in rows if row not in best.values() and sampled(id_of(row), sample_share)]
    return chosen


def sampled(wanted: str, share: float) -> bool:
    return int(wanted[:8], 16) / 0x1_0000_0000 < share


def reviewed_truth(detections: pa.Table, reviews: pa.Table) -> pa.Table:
    """The detections a person confirmed or relabelled, under the species they were; rejected and unreviewed ones
    are left out."""
    verdicts = {
        row["detection_id"]: row
        for row in reviews.select(
            ["detection_id", "verdict", "reviewed_scientific_name", "reviewed_common_name"]
        ).to_pylist()
        if row["verdict"] != "rejected"
    }
    keep = [verdicts.get(key) for key in detection_ids(detections)]
    chosen = detections.filter(pa.array([verdict is not None for verdict in keep], pa.bool_()))
    kept = [verdict for verdict in keep if verdict is not None]
    for column, source in (("scientific_name", "reviewed_scientific_name"), ("common_name", "reviewed_common_name")):
        index = chosen.schema.get_field_index(column)
        chosen = chosen.set_column(index, chosen.schema.field(index), pa.array([v[source] for v in kept], pa.string()))
    return chosen


@dataclass(frozen=True)
class SpeciesReviews:
    scientific_name: str
    common_name: str
    reviewed: int
    confirmed: int
    rejected: int
    relabelled: int
    suggested_min_confidence: float | None

    @property
    def wrong_share(self) -> float:
        return (self.rejected + self.relabelled) / self.reviewed


def review_stats(reviews: pa.Table, target_wrong_share: float = 0.1, min_reviews: int = 5) -> list[SpeciesReviews]:
    """Per species as the model labelled it, how its reviews went, most reviewed first; with enough reviews, the
    lowest threshold at which the share of wrong labels (rejected or relabelled) above it is at most the target."""
    by_species: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for row in reviews.select(["scientific_name", "common_name", "confidence", "verdict"]).to_pylist():
        by_species.setdefault((row["scientific_name"], row["common_name"]), []).append(
            (row["confidence"], row["verdict"])
        )
    stats = []
    for (scientific, common), verdicts in by_species.items():
        count = {verdict: sum(1 for _, given in verdicts if given == verdict) for verdict in VERDICTS}
        suggestion = (
            suggested_threshold([(score, given in WRONG_VERDICTS) for score, given in verdicts], target_wrong_share)
            if len(verdicts) >= min_reviews
            else None
        )
        stats.append(
            SpeciesReviews(
                scientific,
                common,
                len(verdicts),
                count["confirmed"],
                count["rejected"],
                count["relabelled"],
                suggestion,
            )
        )
    return sorted(stats, key=lambda item: (-item.reviewed, item.common_name))


def suggested_threshold(scored: Sequence[tuple[float, bool]], target_wrong_share: float) -> float | None:
    """The lowest reviewed confidence t such that of the reviews at or above t at most `target_wrong_share` were
    wrong; None when even the most confident ones are wrong more often than that."""
    ordered = sorted(scored, reverse=True)
    best, wrong = None, 0
    for seen, (score, is_wrong) in enumerate(ordered, start=1):
        wrong += is_wrong
        next_score = ordered[seen][0] if seen < len(ordered) else None
        if next_score == score:
            continue  # a threshold takes every review of the same confidence
        if wrong / seen <= target_wrong_share:
            best = score
    return best


@dataclass(frozen=True)
class VerdictLine:
    line: int
    detection_id: str
    verdict_word: str
    species: str
    reviewer: str


VERDICT_CSV_COLUMNS = ("id", "verdict", "species", "reviewer")


MAX_VERDICT_LINES = 100_000  # a CSV of verdicts is taken whole or not at all: bounded, so is its memory
MAX_VERDICT_FILE_BYTES = 16 << 20


def verdict_lines(data: bytes) -> list[VerdictLine]:
    """A CSV of verdicts (header `id,verdict[,species][,reviewer]`, UTF-8): every line checked before any is
    taken, the first bad one named by its line number; a file past MAX_VERDICT_FILE_BYTES or MAX_VERDICT_LINES is
    refused whole."""
    if len(data) > MAX_VERDICT_FILE_BYTES:
        raise ReviewError(f"{len(data)} bytes: a file of verdicts holds at most {MAX_VERDICT_FILE_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ReviewError(f"line {line}: not UTF-8 (byte {exc.start})") from None
    try:
        return _verdict_lines(text)
    except csv.Error as exc:
        raise ReviewError(f"not a CSV file of verdicts: {exc}") from None


def _verdict_lines(text: str) -> list[VerdictLine]:
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip().lower() for name in reader.fieldnames or []]
    missing = [name for name in ("id", "verdict") if name not in header]
    if missing:
        raise ReviewError(
            f"line 1: the header needs columns {', '.join(missing)} (columns: id,verdict,species,reviewer)"
        )
    unknown = [name for name in header if name not in VERDICT_CSV_COLUMNS]
    if unknown:
        raise ReviewError(f"line 1: unknown column(s) {', '.join(unknown)} (columns: id,verdict,species,reviewer)")
    reader.fieldnames = header
    lines: list[VerdictLine] = []
    for row in reader:
        values = {key: (value or "").strip() for key, value in row.items() if key is not None}
        number = reader.line_num
        if len(lines) == MAX_VERDICT_LINES:
            raise ReviewError(f"more than {MAX_VERDICT_LINES} verdicts in one file: split it")
        if not values.get("id"):
            raise ReviewError(f"line {number}: no detection id")
        word = values.get("verdict", "").lower()
        if word not in VERDICT_OF_WORD:
            raise ReviewError(f"line {number}: verdict {shown(word)} is none of {', '.join(VERDICT_OF_WORD)}")
        lines.append(VerdictLine(number, values["id"], word, values.get("species", ""), values.get("reviewer", "")))
    return lines


def review_page(
    row: dict[str, Any], reason: str, spectrogram: bytes | None, listen_links: Sequence[tuple[str, str]] = ()
) -> str:
    """The markdown a reviewer reads: what was heard, where and when, the clip's spectrogram (inline, so it shows
    wherever the page is opened) and links to its audio, as (text, address)."""
    why = "a rare species here" if reason == "rare" else "a sample of what is heard often"
    lines = [
        f"### {row['common_name']} (*{row['scientific_name']}*), confidence {row['confidence']:.2f}",
        "",
        f"Heard by listener **{row['listener_id']}** of station **{row['station_id']}** at "
        f"{row['time']:%Y-%m-%d %H:%M:%S} UTC, {row['start_s']:g}-{row['end_s']:g} s into recording "
        f"`{row['recording_id']}`; asked to be reviewed as {why}. Detection id `{id_of(row)}`.",
        "",
    ]
    if spectrogram:
        lines += [f"![spectrogram](data:image/png;base64,{base64.b64encode(spectrogram).decode()})", ""]
    else:
        lines += ["No clip was kept of this detection.", ""]
    lines += [f"[{text}]({address})" for text, address in listen_links]
    if listen_links:
        lines.append("")
    lines.append(
        "Resume this run with the verdict: confirm, reject, or relabel with the species it was (scientific or "
        "common name)."
    )
    return "\n".join(lines)
