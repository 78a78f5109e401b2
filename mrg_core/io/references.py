"""Where a DICOM study's instances live (study, series and SOP instance UIDs), for a DICOM SR
that points back at the images it reports on.

Kept apart from load_studies on purpose: a Study never holds a UID (deid.py), so nothing that
shows, logs or stores a Study can leak one. Only an explicit export that links its SR to the
source (`python -m mrg_core report --sr-dir`) calls this, on the files it was given, and the UIDs
go straight into that SR. Only the five tags below are parsed; patient and study attributes are
never read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from io import BytesIO

from .limits import LoadLimits
from .load import CROSS_SECTIONAL, _as_list, expand_sources, read_source, sniff

_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
         "SeriesNumber", "Modality")


@dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    modality: str | None


@dataclass(frozen=True)
class SourceReference:
    """The instances of one study as load_studies groups them (one per series for CT/MR,
    one per study for radiograph views). repr() shows counts only, never a UID."""

    study_instance_uid: str
    instances: tuple[Instance, ...] = field(repr=False)

    def __repr__(self) -> str:
        series = {i.series_instance_uid for i in self.instances}
        return f"SourceReference({len(self.instances)} instance(s), {len(series)} series)"


def source_references(sources, limits: LoadLimits = LoadLimits()) -> list[SourceReference]:
    """The DICOM files among `sources` (paths, folders, zips, (name, bytes)) → one
    SourceReference per study, grouped and ordered as load_studies orders its studies
    (SeriesNumber, then as given). Plain images have none: an empty list."""
    import pydicom

    items = expand_sources(_as_list(sources), limits)
    groups: dict[tuple, list[tuple[int | None, Instance]]] = {}
    study_of: dict[tuple, str] = {}
    for i, source in enumerate(items):
        _name, data = read_source(source, limits, i)
        kind = sniff(data)
        if kind not in ("dicom", "bare_dicom"):
            continue
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=list(_TAGS),
                             force=kind == "bare_dicom")
        del data
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        sop, sop_class = str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", ""))
        if not (study and series and sop and sop_class):
            continue  # an instance that cannot be referenced
        modality = ds.get("Modality") or None
        key = (study, series) if modality in CROSS_SECTIONAL else (study, "views")
        # load_studies orders series by SeriesNumber; radiograph studies have no series
        number = ds.get("SeriesNumber") if key[1] != "views" else None
        groups.setdefault(key, []).append(
            (int(number) if number not in (None, "") else None,
             Instance(sop, sop_class, series, modality)))
        study_of[key] = study
    given = list(groups)  # first-seen order breaks ties, as in load_studies
    first_number = {k: groups[k][0][0] for k in given}
    keys = sorted(given, key=lambda k: (first_number[k] is None, first_number[k] or 0,
                                        given.index(k)))
    return [SourceReference(study_of[k], tuple(inst for _n, inst in groups[k])) for k in keys]
