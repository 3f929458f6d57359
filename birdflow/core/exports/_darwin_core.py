"""A Darwin Core Archive GBIF can publish: occurrence.txt (an occurrence per detection of a bird, never a
rejected one), meta.xml saying exactly how that file is written, and eml.xml (title, licence, rights holder,
contact, coverage)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
import zipfile
from datetime import date, timedelta
from pathlib import Path

from birdflow.core.exports._records import (
    Evidence,
    ExportError,
    Place,
    Publishing,
    Record,
    identified_by,
    is_reviewed,
    review_note,
)
from birdflow.core.exports._tables import iso_utc
from birdflow.core.taxa import AVES, is_bird

DWC = "http://rs.tdwg.org/dwc/terms/"
DCTERMS = "http://purl.org/dc/terms/"
OCCURRENCE_TERMS = [
    *(f"{DCTERMS}{term}" for term in ("type", "license", "rightsHolder")),
    *(
        f"{DWC}{term}"
        for term in (
            *("occurrenceID", "basisOfRecord", "occurrenceStatus", "recordedBy", "associatedMedia", "eventID"),
            *("eventDate", "samplingProtocol", "countryCode", "decimalLatitude", "decimalLongitude"),
            *("geodeticDatum", "coordinateUncertaintyInMeters", "identifiedBy", "dateIdentified"),
            *("identificationVerificationStatus", "identificationRemarks", "scientificName", "vernacularName"),
            *("kingdom", "class", "genus", "taxonRank"),
        )
    ),
]
ID_INDEX = OCCURRENCE_TERMS.index(f"{DWC}occurrenceID")
LICENSES = {  # SPDX id -> (the licence's address GBIF expects, its name)
    "CC0-1.0": ("http://creativecommons.org/publicdomain/zero/1.0/legalcode", "Public Domain (CC0 1.0)"),
    "CC-BY-4.0": ("http://creativecommons.org/licenses/by/4.0/legalcode", "Creative Commons Attribution (CC-BY) 4.0"),
    "CC-BY-NC-4.0": (
        "http://creativecommons.org/licenses/by-nc/4.0/legalcode",
        "Creative Commons Attribution Non Commercial (CC-BY-NC) 4.0",
    ),
}
SAMPLING_PROTOCOL = "passive acoustic monitoring; BirdNET on 3 s windows"


def occurrence_id(station_id: str, detection_id: str) -> str:
    """The same for the detection whatever a reviewer later says it was (a relabel is no new record)."""
    return f"urn:birdflow:{station_id}:{detection_id}"


def occurrences(records: list[Record], place: Place, evidence: Evidence, publishing: Publishing) -> list[list[str]]:
    """An occurrence per detection of a bird, in OCCURRENCE_TERMS order: BirdNET's other classes (its sounds that
    are no taxon, its frogs, insects and mammals, whose detection it was not trained to publish) and rejected
    detections are none."""
    latitude, longitude = place.require_coordinates("a Darwin Core Archive")
    license_url = LICENSES[publishing.license][0]
    lines = []
    for record in records:
        scientific, common = record["label_scientific_name"], record["label_common_name"]
        if not is_bird(scientific, common) or record["verdict"] == "rejected":
            continue
        start = record["time"]
        end = start + timedelta(seconds=record["end_s"] - record["start_s"])
        reviewed = is_reviewed(record)
        model_words = f"{record['model_version']} confidence {record['confidence']:.4f} for {record['common_name']}"
        values = {
            "type": "Sound",
            "license": license_url,
            "rightsHolder": publishing.rights_holder or f"birdflow station {place.station_id}",
            "occurrenceID": occurrence_id(place.station_id, record["detection_id"]),
            "basisOfRecord": "MachineObservation",
            "occurrenceStatus": "present",
            "recordedBy": f"{place.station_id}/{record['listener_id']}",
            "associatedMedia": evidence.clip_links.get(record["clip_key"] or "", ""),
            "eventID": record["recording_id"],
            "eventDate": f"{iso_utc(start)}/{iso_utc(end)}",
            "samplingProtocol": SAMPLING_PROTOCOL,
            "countryCode": place.country_code,
            "decimalLatitude": f"{latitude:.6f}",
            "decimalLongitude": f"{longitude:.6f}",
            "geodeticDatum": "EPSG:4326",
            "coordinateUncertaintyInMeters": f"{place.uncertainty_m:g}",
            "identifiedBy": identified_by(record),
            "dateIdentified": iso_utc(record["reviewed_at"]) if reviewed else "",
            "identificationVerificationStatus": "verified by reviewer" if reviewed else "unverified",
            "identificationRemarks": (
                review_note(record) if record["verdict"] == "relabelled" else f"{model_words}; {review_note(record)}"
            ).strip("; "),
            "scientificName": scientific,
            "vernacularName": common,
            "kingdom": "Animalia",
            "class": AVES,
            "genus": scientific.split(" ", 1)[0],
            "taxonRank": "species",
        }
        lines.append([_plain(values[term.rsplit("/", 1)[-1]]) for term in OCCURRENCE_TERMS])
    return lines


def _plain(value: str) -> str:
    """meta.xml says fields are tab-separated and never enclosed: no value may hold a tab or a line break."""
    return " ".join(str(value).split()) if any(char in str(value) for char in "\t\r\n") else str(value)


def meta_xml() -> str:
    archive = ET.Element("archive", {"xmlns": "http://rs.tdwg.org/dwc/text/", "metadata": "eml.xml"})
    core = ET.SubElement(
        archive,
        "core",
        {
            "encoding": "UTF-8",
            "fieldsTerminatedBy": "\\t",
            "linesTerminatedBy": "\\n",
            "fieldsEnclosedBy": "",
            "ignoreHeaderLines": "1",
            "rowType": f"{DWC}Occurrence",
        },
    )
    ET.SubElement(ET.SubElement(core, "files"), "location").text = "occurrence.txt"
    ET.SubElement(core, "id", {"index": str(ID_INDEX)})
    for index, term in enumerate(OCCURRENCE_TERMS):
        ET.SubElement(core, "field", {"index": str(index), "term": term})
    ET.indent(archive)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(archive, encoding="unicode") + "\n"


def eml_xml(records: list[Record], place: Place, publishing: Publishing, published: date) -> str:
    """The dataset's metadata in GBIF's EML profile: what an IPT needs to publish it."""
    eml_ns = "eml://ecoinformatics.org/eml-2.1.1"
    ET.register_namespace("eml", eml_ns)
    root = ET.Element(
        f"{{{eml_ns}}}eml",
        {"packageId": f"birdflow-{place.station_id}", "system": "birdflow", "scope": "system", "xml:lang": "en"},
    )
    dataset = ET.SubElement(root, "dataset")
    title = publishing.title or f"Birds heard at station {place.station_id} (birdflow)"
    ET.SubElement(dataset, "title", {"xml:lang": "en"}).text = title
    for role in ("creator", "metadataProvider"):
        _party(ET.SubElement(dataset, role), place, publishing)
    ET.SubElement(dataset, "pubDate").text = published.isoformat()
    ET.SubElement(dataset, "language").text = "en"
    abstract = ET.SubElement(dataset, "abstract")
    ET.SubElement(abstract, "para").text = (
        f"Detections of BirdNET ({', '.join(sorted({r['model_version'] for r in records})) or 'BirdNET'}) on "
        f"recordings of the listeners of birdflow station {place.station_id}: a machine observation per 3 s window, "
        "with the verdicts people gave."
    )
    url, name = LICENSES[publishing.license]
    rights = ET.SubElement(ET.SubElement(dataset, "intellectualRights"), "para")
    rights.text = f"{publishing.rights_holder or place.station_id} licenses this work under a "
    link = ET.SubElement(rights, "ulink", {"url": url})
    ET.SubElement(link, "citetitle").text = f"{name} License"
    link.tail = "."
    coverage = ET.SubElement(dataset, "coverage")
    latitude, longitude = place.require_coordinates("a Darwin Core Archive")
    geographic = ET.SubElement(coverage, "geographicCoverage")
    ET.SubElement(geographic, "geographicDescription").text = f"around station {place.station_id}"
    bounds = ET.SubElement(geographic, "boundingCoordinates")
    for name, value in (("west", longitude), ("east", longitude), ("north", latitude), ("south", latitude)):
        ET.SubElement(bounds, f"{name}BoundingCoordinate").text = f"{value:.6f}"
    if records:
        dates = ET.SubElement(ET.SubElement(coverage, "temporalCoverage"), "rangeOfDates")
        for name, moment in (("beginDate", records[0]["time"]), ("endDate", records[-1]["time"])):
            ET.SubElement(ET.SubElement(dates, name), "calendarDate").text = moment.date().isoformat()
    _party(ET.SubElement(dataset, "contact"), place, publishing)
    methods = ET.SubElement(ET.SubElement(ET.SubElement(dataset, "methods"), "methodStep"), "description")
    ET.SubElement(methods, "para").text = SAMPLING_PROTOCOL
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _party(element: ET.Element, place: Place, publishing: Publishing) -> None:
    """A person when a contact is named, else the station as an organisation."""
    if publishing.contact_name:
        *given, surname = publishing.contact_name.split()
        person = ET.SubElement(element, "individualName")
        if given:
            ET.SubElement(person, "givenName").text = " ".join(given)
        ET.SubElement(person, "surName").text = surname
    ET.SubElement(element, "organizationName").text = publishing.rights_holder or f"birdflow station {place.station_id}"
    if publishing.contact_email:
        ET.SubElement(element, "electronicMailAddress").text = publishing.contact_email


def write_dwca(records: list[Record], archive: Path, place: Place, evidence: Evidence, publishing: Publishing) -> None:
    """The archive, written whole: refused (nothing written) without the station's coordinates."""
    if publishing.license not in LICENSES:
        raise ExportError(f"licence {publishing.license!r} is none GBIF publishes under: {', '.join(LICENSES)}")
    rows = occurrences(records, place, evidence, publishing)
    header = [term.rsplit("/", 1)[-1] for term in OCCURRENCE_TERMS]
    text = "".join("\t".join(line) + "\n" for line in [header, *rows])
    eml = eml_xml(records, place, publishing, date.today())
    if archive.is_symlink():
        raise ExportError(f"{archive.name} is a link: remove it, exports do not follow links")
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(f".{archive.name}.partial")
    partial.unlink(missing_ok=True)
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("meta.xml", meta_xml())
        zipped.writestr("eml.xml", eml)
        zipped.writestr("occurrence.txt", text)
    partial.replace(archive)
