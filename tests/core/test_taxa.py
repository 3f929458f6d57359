"""BirdNET 2.4's labels sorted into birds, other animals and sounds that are no taxon, checked against the label
file the model ships with."""

from __future__ import annotations

from collections import Counter

from birdflow.core.birdnet import model_labels
from birdflow.core.taxa import CLASS_OF_GENUS, is_bird, taxon_class


def labels() -> list[tuple[str, str]]:
    return [(label.partition("_")[0], label.partition("_")[2]) for label in model_labels() if label]


def test_every_label_of_the_model_is_a_bird_another_animal_or_no_taxon():
    kinds = Counter(taxon_class(scientific, common) for scientific, common in labels())
    assert kinds == {"Aves": 6422, "Amphibia": 41, "Insecta": 41, "Mammalia": 7, None: 11}
    sounds = {scientific for scientific, common in labels() if taxon_class(scientific, common) is None}
    assert {"Dog", "Engine", "Gun", "Siren", "Noise", "Human vocal", "Human non-vocal", "Human whistle"} <= sounds


def test_each_genus_named_as_no_bird_is_one_of_the_model_and_holds_no_bird():
    genera = {scientific.split(" ", 1)[0] for scientific, _ in labels()}
    assert set(CLASS_OF_GENUS) <= genera  # none stale, none misspelt
    by_genus = {
        scientific.split(" ", 1)[0]: common
        for scientific, common in labels()
        if scientific.split(" ", 1)[0] in CLASS_OF_GENUS
    }
    # their common names say what they are (frogs and toads, crickets and katydids, mammals)
    assert not any(word in name for name in by_genus.values() for word in ("Warbler", "Sparrow", "Hawk", "Owl"))
    assert not is_bird("Lithobates catesbeianus", "American Bullfrog") and is_bird(
        "Turdus migratorius", "American Robin"
    )
    # two crickets are named like the sounds (their scientific name as common name): still insects
    assert taxon_class("Gryllus assimilis", "Gryllus assimilis") == "Insecta"
