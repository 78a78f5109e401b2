"""A finished report as a DICOM Comprehensive SR (highdicom), for PACS and reporting systems.

The document follows TID 2000 (Basic Diagnostic Imaging Report): a "Diagnostic Imaging Report"
container holding a Findings section (one Finding text) and, when the report has one, an
Impressions section (one Impression text), then how the draft was made (algorithm name and
version, the model's probability and threshold, the research-use disclaimer) as text items.

Identity: the SR's patient module is left empty (type 2 attributes present, no values). With a
`SourceReference` (io.references: the UIDs read from the user's own DICOM files at export
time) the SR joins the source study (same StudyInstanceUID) and lists its instances as evidence,
so a PACS files it with the images; without one (PNG/JPEG, or the web page, which keeps no UID)
it is a standalone document with new UIDs and no evidence.
"""
from __future__ import annotations

from datetime import datetime

from pydicom import Dataset
from pydicom.uid import generate_uid

from . import report_export
from .io.references import SourceReference

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # stands in for non-DICOM sources
_EMPTY_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                        "ReferringPhysicianName")


def _code(value: str, scheme: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _evidence(source: SourceReference | None) -> list[Dataset]:
    """Stand-in datasets that carry only what highdicom copies into the SR: UIDs (the source's,
    or new ones) and the patient/study module left empty."""
    def stub(study: str, series: str, sop: str, sop_class: str, modality: str | None):
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID, ds.SOPClassUID = sop, sop_class
        ds.Modality = modality or "OT"
        for keyword in _EMPTY_PATIENT_STUDY:
            setattr(ds, keyword, "")
        return ds

    if source is None:
        return [stub(generate_uid(), generate_uid(), generate_uid(), SECONDARY_CAPTURE, "OT")]
    return [stub(source.study_instance_uid, i.series_instance_uid, i.sop_instance_uid,
                 i.sop_class_uid, i.modality) for i in source.instances]


def to_dicom_sr(final_text: str, probability: float | None = None,
                threshold: float | None = None, model_info: dict | None = None,
                final: bool = False, reviewer: str | None = None,
                effective: datetime | None = None, source: SourceReference | None = None,
                series_number: int = 990) -> Dataset:
    """The report as a Comprehensive SR dataset (write it with .save_as(path)).

    final: the radiologist saved this text (PreliminaryFlag FINAL, CompletionFlag COMPLETE);
    otherwise a PRELIMINARY, PARTIAL draft. The reviewer's name, when given, goes in as a text
    item ("Reviewed by"), not as a verifying observer: the app does not sign reports."""
    import highdicom as hd
    from highdicom.sr import ContainerContentItem, TextContentItem

    text = (final_text or "").strip()
    if not text:
        raise ValueError("the report is empty: nothing to export")
    parts = report_export.sections(text)
    model = report_export._model_facts(model_info)
    contains = "CONTAINS"

    def section(name, item_name, value):
        box = ContainerContentItem(name=name, relationship_type=contains)
        box.ContentSequence = [TextContentItem(name=item_name, value=value,
                                               relationship_type=contains)]
        return box

    children = [section(_code("121070", "DCM", "Findings"), _code("121071", "DCM", "Finding"),
                        parts["findings"] or text)]
    if parts["impression"]:
        children.append(section(_code("121072", "DCM", "Impressions"),
                                _code("121073", "DCM", "Impression"), parts["impression"]))
    about = [(_code("111001", "DCM", "Algorithm Name"), model["name"]),
             (_code("111003", "DCM", "Algorithm Version"), model["version"])]
    line = report_export._probability_line(probability, threshold,
                                           report_export._meaning(model_info))
    notes = [n for n in (line, f"Reviewed by: {reviewer}" if reviewer else None,
                         report_export.DISCLAIMER) if n]
    about += [(_code("121106", "DCM", "Comment"), n) for n in notes]
    children += [TextContentItem(name=n, value=v, relationship_type=contains) for n, v in about]
    root = ContainerContentItem(name=_code("18748-4", "LN", "Diagnostic Imaging Report"),
                                template_id="2000")
    root.ContentSequence = children

    sr = hd.sr.ComprehensiveSR(
        evidence=_evidence(source), content=root, series_instance_uid=generate_uid(),
        series_number=series_number, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="MRG Studio", is_complete=final, is_final=final,
        record_evidence=source is not None, series_description="AI-assisted report")
    if source is None:  # the stand-in instance does not exist: claim no evidence
        del sr.CurrentRequestedProcedureEvidenceSequence
    sr.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: report text and "≥" / "→" as typed
    when = report_export._aware(effective)
    sr.ContentDate, sr.ContentTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    return sr
