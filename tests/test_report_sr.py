"""DICOM SR export (issue 21): a Comprehensive SR with Findings and Impression sections, read
back with pydicom and highdicom; linked to the source study only from the user's own files
(io.references), never carrying a patient attribute."""
import json
from io import BytesIO

import highdicom as hd
import pydicom
import pytest

from mrg_core.io import load_studies
from mrg_core.io.references import source_references
from mrg_core.paths import DEFAULT_MODEL_DIR, SAMPLES_DIR
from mrg_core.report_sr import to_dicom_sr
from tests import factories

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
TEXT = "Findings: Patchy opacity → right lower lobe. No effusion.\nImpression: Pneumonia."
INFO = {"name": "mrg-test", "version": "9.9", "label_meaning": "pneumonia vs normal"}


def reread(ds, tmp_path, name="sr.dcm"):
    ds.save_as(tmp_path / name)
    return pydicom.dcmread(tmp_path / name), hd.sr.srread(tmp_path / name)


def content(sr) -> dict:
    """{concept meaning: [text values]} over the root's items and one level of sections."""
    out: dict = {}
    for item in sr.ContentSequence:
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning
        if "ContentSequence" in item:
            out[meaning] = [c.TextValue for c in item.ContentSequence]
        else:
            out.setdefault(meaning, []).append(item.TextValue)
    return out


def test_sections_flags_and_text_read_back(tmp_path):
    sr, parsed = reread(to_dicom_sr(TEXT, 0.91, 0.5, INFO, final=True, reviewer="Dr Ada"),
                        tmp_path)
    assert isinstance(parsed, hd.sr.ComprehensiveSR)
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.Modality == "SR"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "18748-4"  # Diagnostic Imaging Report
    got = content(sr)
    assert got["Findings"] == ["Patchy opacity → right lower lobe. No effusion."]  # UTF-8 kept
    assert got["Impressions"] == ["Pneumonia."]
    assert got["Algorithm Name"] == ["mrg-test"] and got["Algorithm Version"] == ["9.9"]
    comments = " ".join(got["Comment"])
    assert "0.91" in comments and "positive" in comments and "pneumonia vs normal" in comments
    assert "Reviewed by: Dr Ada" in comments and "not for clinical use" in comments
    assert (sr.PreliminaryFlag, sr.CompletionFlag) == ("FINAL", "COMPLETE")
    draft, _ = reread(to_dicom_sr("Clear lungs.", 0.1, 0.5, INFO), tmp_path, "draft.dcm")
    assert (draft.PreliminaryFlag, draft.CompletionFlag) == ("PRELIMINARY", "PARTIAL")
    assert content(draft)["Findings"] == ["Clear lungs."] and "Impressions" not in content(draft)
    with pytest.raises(ValueError, match="empty"):
        to_dicom_sr("  \n")


def test_linked_sr_joins_the_source_study_without_its_patient(tmp_path):
    """From a DICOM whose every basic-profile attribute holds a marker: the SR has the source's
    study, series and instance UIDs (that is the link) and none of the other markers."""
    src = tmp_path / "phi.dcm"
    markers = factories.write_phi_dicom(src)
    refs = source_references([src])
    assert len(refs) == 1 and "1 instance" in repr(refs[0])
    source = pydicom.dcmread(src, stop_before_pixels=True)
    assert source.StudyInstanceUID not in repr(refs[0])  # repr shows counts, never a UID
    sr, _ = reread(to_dicom_sr(TEXT, 0.2, 0.5, INFO, source=refs[0]), tmp_path)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    sop = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (sop.ReferencedSOPInstanceUID, sop.ReferencedSOPClassUID) == (
        source.SOPInstanceUID, source.SOPClassUID)
    assert str(sr.PatientName) == "" and sr.PatientID == "" and sr.PatientBirthDate == ""
    raw = (tmp_path / "sr.dcm").read_bytes().decode("latin-1")
    uids = {str(source.StudyInstanceUID), str(source.SeriesInstanceUID),
            str(source.SOPInstanceUID)}
    leaked = [m for m in markers if m in raw and not any(m in u for u in uids)]
    assert not leaked


def test_references_follow_the_loaders_series(tmp_path):
    """A real 8-slice CT series (zip): one reference, 8 instances, as load_studies groups it;
    two series in one upload come out in the loader's order; plain images have none."""
    zipped = SAMPLES_DIR / "tcia_lung_dx_a0002_ct_8_slices.zip"
    refs, studies = source_references([zipped]), load_studies([zipped])
    assert len(refs) == len(studies) == 1
    assert len(refs[0].instances) == len(studies[0].views) == 8
    assert len({i.sop_instance_uid for i in refs[0].instances}) == 8
    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    for path, number in ((a, 7), (b, 2)):  # one study, two series, numbered out of order
        factories.write_ct_signed(path)
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesNumber = "1.2.826.0.1.3680043.8.498.77", number
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{number}"
        ds.save_as(path)
    two = source_references([a, b])
    loaded = load_studies([a, b])
    assert [s.series.series_number for s in loaded] == [2, 7]
    assert [r.instances[0].series_instance_uid for r in two] == [
        str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in (b, a)]
    assert source_references([SAMPLES_DIR / "cxr_child_normal.jpeg"]) == []


def test_report_cli_writes_linked_and_standalone_srs(tmp_path, capsys):
    from mrg_core.cli.report import main

    cr, jpeg = SAMPLES_DIR / "cr_phantom_pa.dcm", SAMPLES_DIR / "cxr_child_normal.jpeg"
    out = tmp_path / "sr"
    assert main([str(cr), str(jpeg), "--model", str(DEFAULT_MODEL_DIR), "--only",
                 "--sr-dir", str(out), "--jsonl", "--max-new-tokens", "20"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert [r["sr"] for r in records] == [
        {"file": "report_1_1.sr.dcm", "linked_to_source": True},
        {"file": "report_2_1.sr.dcm", "linked_to_source": False}]
    linked = pydicom.dcmread(out / "report_1_1.sr.dcm")
    assert linked.StudyInstanceUID == pydicom.dcmread(cr, stop_before_pixels=True).StudyInstanceUID
    assert linked.PreliminaryFlag == "PRELIMINARY"  # a draft nobody has read yet
    # the CT model's draft: the LM's Findings, the decision as the Impression (sections.py)
    from mrg_core.report_export import sections

    parts = sections(records[0]["report"])
    assert content(linked)["Findings"] == [parts["findings"]]
    assert content(linked)["Impressions"] == [parts["impression"]]
    assert parts["impression"] in json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())[
        "impression_phrases"]
    alone = pydicom.dcmread(BytesIO((out / "report_2_1.sr.dcm").read_bytes()))
    assert "CurrentRequestedProcedureEvidenceSequence" not in alone
