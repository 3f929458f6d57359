"""Reviews on their own: ids, verdicts and their errors, the review state, what is asked to be reviewed, the
reviewed truth, per-species statistics and a CSV of verdicts."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from birdflow.core.birdnet import model_labels
from birdflow.core.reviews import (
    MAX_VERDICT_LINES,
    ReviewError,
    ReviewStore,
    SpeciesNames,
    Verdict,
    detection_ids,
    id_of,
    review_candidates,
    review_page,
    review_stats,
    reviewed_truth,
    sampled,
    suggested_threshold,
    verdict_from,
    verdict_lines,
)
from tests.builders import HAWK, ROBIN, two_listeners_detections

NAMES = SpeciesNames(model_labels())


def test_a_detection_keeps_its_id_and_two_detections_differ():
    table = two_listeners_detections()
    ids = detection_ids(table)
    assert ids == detection_ids(two_listeners_detections()) and len(set(ids)) == table.num_rows
    assert all(len(key) == 12 for key in ids)
    assert [id_of(row) for row in table.to_pylist()] == ids


def test_verdicts_from_their_words_and_the_species_of_a_relabel():
    assert verdict_from("confirm", "", NAMES, "ada", "cli") == Verdict("confirmed", "ada", "cli")
    relabel = verdict_from("relabel", "pine siskin", NAMES, "ada", "cli")
    assert (relabel.verdict, relabel.scientific_name, relabel.common_name) == (
        "relabelled",
        "Spinus pinus",
        "Pine Siskin",
    )
    assert verdict_from("relabel", "Spinus pinus", NAMES, "ada", "cli") == relabel
    with pytest.raises(ReviewError, match="did you mean 'Pine Siskin'"):
        verdict_from("relabel", "Pine Siskn", NAMES, "ada", "cli")
    with pytest.raises(ReviewError, match="relabel needs the species"):
        verdict_from("relabel", " ", NAMES, "ada", "cli")
    with pytest.raises(ReviewError, match="only to relabel"):
        verdict_from("reject", "Pine Siskin", NAMES, "ada", "cli")
    with pytest.raises(ReviewError, match="none of confirm, reject, relabel"):
        verdict_from("maybe", "", NAMES, "ada", "cli")


def test_the_store_asks_once_and_keeps_the_latest_verdict(tmp_path):
    store = ReviewStore(tmp_path / "reviews.sqlite")
    robin, second_robin, hawk = two_listeners_detections().to_pylist()[:3]
    asked = store.request([(robin, "rare"), (hawk, "sample")])
    assert [reason for _, reason in asked] == ["rare", "sample"]
    assert store.request([(robin, "rare"), (second_robin, "sample")]) == [(second_robin, "sample")]
    assert [id_of(row) for row, _ in store.pending()] == [id_of(robin), id_of(second_robin), id_of(hawk)]
    assert store.requested(id_of(robin))["time"] == robin["time"]

    day = store.record(robin, Verdict("rejected", "ada", "cli", reviewed_at=1000.0))
    assert day == datetime(2025, 6, 1, tzinfo=timezone.utc)
    store.record(robin, Verdict("relabelled", "bo", "ui", "Spinus pinus", "Pine Siskin"))
    store.record(hawk, Verdict("confirmed", "ada", "csv"))
    latest = store.verdict_given(id_of(robin))
    assert latest is not None and (latest.verdict, latest.reviewer, latest.via, latest.common_name) == (
        "relabelled",
        "bo",
        "ui",
        "Pine Siskin",
    )
    assert store.verdict_given("000000000000") is None
    assert [id_of(row) for row, _ in store.pending()] == [id_of(second_robin)]
    table = store.table(day)
    assert table.column("detection_id").to_pylist() == [id_of(robin), id_of(hawk)]
    assert table.column("reviewed_common_name").to_pylist() == ["Pine Siskin", HAWK[1]]
    assert table.column("common_name").to_pylist() == [ROBIN[1], HAWK[1]]  # the model's label stays
    assert table.column("reviewer").to_pylist() == ["bo", "ada"]
    assert store.table(datetime(2025, 6, 2, tzinfo=timezone.utc)).num_rows == 0


def test_each_rare_species_at_its_best_and_a_stable_sample_of_the_rest():
    table = two_listeners_detections()
    rows = table.to_pylist()
    chosen = review_candidates(table, {ROBIN[0]}, 0.0)
    assert chosen == [
        (max((r for r in rows if r["scientific_name"] == ROBIN[0]), key=lambda r: r["confidence"]), "rare")
    ]
    everything = review_candidates(table, set(), 1.0)
    assert [row for row, _ in everything] == rows and {reason for _, reason in everything} == {"sample"}
    half = review_candidates(table, set(), 0.5)
    assert half == review_candidates(table, set(), 0.5)  # the same rows on a rerun
    assert [row for row, _ in half] == [row for row in rows if sampled(id_of(row), 0.5)]
    shares = [sum(sampled(f"{number:08x}0000", 0.25) for number in range(0, 1 << 32, 1 << 20)) / 4096]
    assert shares == [0.25]


def test_the_reviewed_truth_keeps_confirmed_and_relabelled_rows_under_their_true_species(tmp_path):
    table = two_listeners_detections()
    robin, second_robin, hawk, other_hawk = table.to_pylist()[:4]
    store = ReviewStore(tmp_path / "reviews.sqlite")
    store.record(robin, Verdict("confirmed", "ada", "cli"))
    store.record(second_robin, Verdict("rejected", "ada", "cli"))
    store.record(hawk, Verdict("relabelled", "ada", "cli", "Spinus pinus", "Pine Siskin"))
    truth = reviewed_truth(table, store.table())
    assert truth.schema == table.schema
    assert truth.column("recording_id").to_pylist() == [robin["recording_id"], hawk["recording_id"]]
    assert truth.column("common_name").to_pylist() == [ROBIN[1], "Pine Siskin"]
    assert truth.column("scientific_name").to_pylist() == [ROBIN[0], "Spinus pinus"]
    assert truth.column("confidence").to_pylist() == [robin["confidence"], hawk["confidence"]]


def test_the_suggested_threshold_is_the_lowest_that_keeps_wrong_labels_under_the_target():
    # wrong below 0.5, right above: a threshold at 0.55 leaves only right labels
    scored = [(0.3, True), (0.4, True), (0.45, True), (0.55, False), (0.7, False), (0.9, False)]
    assert suggested_threshold(scored, 0.0) == 0.55
    assert suggested_threshold(scored, 0.5) == 0.3  # half wrong is allowed: everything passes
    assert suggested_threshold([(0.9, True), (0.8, False)], 0.1) is None  # even the best is wrong
    assert suggested_threshold([(0.5, True), (0.5, False), (0.9, False)], 0.1) == 0.9  # ties go together


def test_review_statistics_per_species(tmp_path):
    store = ReviewStore(tmp_path / "reviews.sqlite")
    base = two_listeners_detections().to_pylist()[0]
    for number, (confidence, verdict) in enumerate(
        [(0.2, "rejected"), (0.3, "rejected"), (0.6, "confirmed"), (0.7, "confirmed"), (0.8, "confirmed")]
    ):
        row = {**base, "start_s": float(number), "confidence": confidence}
        store.record(row, Verdict(verdict, "ada", "cli"))
    store.record(two_listeners_detections().to_pylist()[2], Verdict("relabelled", "ada", "cli", *ROBIN))
    [robin, hawk] = review_stats(store.table(), target_wrong_share=0.1, min_reviews=5)
    assert (robin.common_name, robin.reviewed, robin.confirmed, robin.rejected, robin.relabelled) == (
        ROBIN[1],
        5,
        3,
        2,
        0,
    )
    assert robin.wrong_share == 0.4 and robin.suggested_min_confidence == 0.6
    assert (hawk.reviewed, hawk.relabelled, hawk.wrong_share, hawk.suggested_min_confidence) == (1, 1, 1.0, None)


def test_a_csv_of_verdicts_is_checked_line_by_line():
    lines = verdict_lines(b"id,verdict,species,reviewer\nabc,confirm,,\ndef,Relabel,Pine Siskin,bo\n")
    assert [(line.line, line.detection_id, line.verdict_word, line.species, line.reviewer) for line in lines] == [
        (2, "abc", "confirm", "", ""),
        (3, "def", "relabel", "Pine Siskin", "bo"),
    ]
    assert [line.detection_id for line in verdict_lines(b"ID,Verdict\nabc,reject\n")] == ["abc"]
    with pytest.raises(ReviewError, match="line 3: verdict 'perhaps'"):
        verdict_lines(b"id,verdict\nabc,reject\ndef,perhaps\n")
    with pytest.raises(ReviewError, match="line 1: the header needs column"):
        verdict_lines(b"detection,verdict\nabc,reject\n")
    with pytest.raises(ReviewError, match="line 1: unknown column"):
        verdict_lines(b"id,verdict,notes\nabc,reject,x\n")
    with pytest.raises(ReviewError, match="line 2: no detection id"):
        verdict_lines(b"id,verdict\n,reject\n")


def test_the_review_page_shows_the_spectrogram_inline_and_links_the_audio():
    row = two_listeners_detections().to_pylist()[0]
    links = [("Listen to the clip (FLAC)", "https://pi.example/clips/x.flac?expires=1&signature=ab")]
    page = review_page(row, "rare", b"\x89PNG fake", links)
    assert f"### {ROBIN[1]} (*{ROBIN[0]}*), confidence 0.91" in page
    assert "![spectrogram](data:image/png;base64,iVBORyBmYWtl)" in page
    assert "[Listen to the clip (FLAC)](https://pi.example/clips/x.flac?expires=1&signature=ab)" in page
    assert id_of(row) in page
    assert "No clip was kept" in review_page(row, "sample", None) and "Listen" not in review_page(row, "sample", None)


def test_what_a_reviewer_types_is_one_bounded_line_and_quoted_short_in_messages():
    verdict = Verdict("confirmed", "ada\n2026-12-07 12:00:00 INFO forged line\r\x1b[31m" + "x" * 500, "ui")
    assert "\n" not in verdict.reviewer and "\x1b" not in verdict.reviewer and len(verdict.reviewer) == 100
    assert verdict.reviewer.startswith("ada 2026-12-07 12:00:00 INFO forged line [31mxxx")
    with pytest.raises(ReviewError, match="reviewer's name is empty"):
        Verdict("confirmed", "\n\t ", "cli")
    with pytest.raises(ReviewError) as refused:
        verdict_from("relabel", "![x](http://e) " + "y" * 8_000_000, NAMES, "ada", "ui")
    assert len(str(refused.value)) < 120 and "8000015 characters" in str(refused.value)


def test_a_file_of_verdicts_that_is_too_big_not_utf8_or_not_a_csv_is_refused_whole_with_a_reason():
    with pytest.raises(ReviewError, match="line 2: not UTF-8"):
        verdict_lines(b"id,verdict\nab\xffc,reject\n")
    with pytest.raises(ReviewError, match="not a CSV file of verdicts: field larger than field limit"):
        verdict_lines(b"id,verdict,species\nabc,relabel," + b"z" * 200_000 + b"\n")
    too_many = b"id,verdict\n" + b"abc,reject\n" * (MAX_VERDICT_LINES + 1)
    with pytest.raises(ReviewError, match=f"more than {MAX_VERDICT_LINES} verdicts"):
        verdict_lines(too_many)
    with pytest.raises(ReviewError, match="at most 16 MiB"):
        verdict_lines(b"id,verdict\n" + b"abc,reject\n" * (2 << 20))
