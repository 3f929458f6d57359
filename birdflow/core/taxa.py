"""What kind of thing a BirdNET label is: a bird, another animal (frogs, insects, mammals), or a sound that is no
taxon at all (Engine, Human vocal, Noise). eBird takes birds only; a Darwin Core occurrence needs a taxon.

BirdNET 2.4's labels carry no taxonomy, so the animals that are not birds are named here by genus (the model's
6,522 labels have 89 of them in 35 genera, all checked against the label file in the tests). The sounds that are no
taxon are the labels whose scientific name is their common name, less two crickets named that way.
"""

from __future__ import annotations

AMPHIBIA = "Amphibia"
AVES = "Aves"
INSECTA = "Insecta"
MAMMALIA = "Mammalia"

_GENERA_BY_CLASS = {
    AMPHIBIA: (
        "Acris Anaxyrus Dryophytes Eleutherodactylus Gastrophryne Hyliola Incilius Lithobates Pseudacris Scaphiopus "
        "Spea"
    ),
    INSECTA: (
        "Allonemobius Amblycorypha Anaxipha Atlanticus Conocephalus Cyrtoxipha Eunemobius Gryllus Microcentrum "
        "Miogryllus Neoconocephalus Neonemobius Oecanthus Orchelimum Orocharis Phyllopalpus Pterophylla Scudderia"
    ),
    MAMMALIA: "Alouatta Canis Odocoileus Sciurus Tamias Tamiasciurus",
}
CLASS_OF_GENUS = {genus: name for name, genera in _GENERA_BY_CLASS.items() for genus in genera.split()}


def taxon_class(scientific_name: str, common_name: str) -> str | None:
    """The label's class (Aves, Amphibia, Insecta, Mammalia), None for a sound that is no taxon (Dog, Engine,
    Gun, Human vocal, Noise, Siren, ...)."""
    genus = scientific_name.split(" ", 1)[0]
    if genus in CLASS_OF_GENUS:
        return CLASS_OF_GENUS[genus]
    if scientific_name == common_name or " " not in scientific_name.strip():
        return None
    return AVES


def is_bird(scientific_name: str, common_name: str) -> bool:
    return taxon_class(scientific_name, common_name) == AVES
