"""No PS3.15 basic-profile attribute ever leaves the loader."""
from __future__ import annotations

import json
import subprocess
import sys

from pydicom.datadict import tag_for_keyword

from factories import phi_found, phi_readings, write_phi_dicom
from mrg_core.io import StudyLoadError, load_study
from mrg_core.io.deid import ALLOWED, BASIC_PROFILE
from mrg_core.paths import REPO_ROOT


def test_profile_list_is_valid_and_disjoint_from_allow_list():
    assert len(BASIC_PROFILE) > 250 and len(set(BASIC_PROFILE)) == len(BASIC_PROFILE)
    assert all(tag_for_keyword(k) is not None for k in BASIC_PROFILE)
    assert not set(ALLOWED) & set(BASIC_PROFILE)
    for k in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName",
              "StudyInstanceUID", "AccessionNumber", "ReferringPhysicianName"):
        assert k in BASIC_PROFILE


def test_markers_never_leak(tmp_path):
    path = tmp_path / "phi.dcm"
    markers = write_phi_dicom(path)
    assert len(markers) > 200 and "PHI-MARKER-PatientName" in markers
    raw = path.read_bytes()
    assert all(m.encode() in raw for m in markers)  # the file really holds them
    study = load_study(path)
    assert study.modality == "CT" and study.views[0].meta.units == "HU"
    texts = [repr(study), json.dumps(study.summary()), repr(study.views[0].meta),
             json.dumps(study.views[0].meta.to_dict())]
    out = subprocess.run([sys.executable, "-m", "mrg_core", "inspect", str(path)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    texts += [out.stdout, out.stderr]
    blob = "\n".join(texts)
    assert [m for m in markers if m in blob] == []
    # ages, binary numbers, dates and times, names: as they would read once printed
    readings = phi_readings(path)
    assert {"077Y", "47093", "-27183", "3141592653", "31337.25", "1893-07-07",
            "07:17:33.424242", "PHIMARKGV137 PHI-MARKER-PatientName"} <= set(readings)
    assert phi_found(readings, blob) == []


def test_errors_carry_no_phi(tmp_path):
    path = tmp_path / "phi.dcm"
    markers = write_phi_dicom(path)
    data = path.read_bytes()
    for cut in (len(data) - 500, len(data) // 2):
        try:
            load_study([("scan.dcm", data[:cut])])
        except StudyLoadError as err:
            assert not [m for m in markers if m in err.message or m in str(err)]
