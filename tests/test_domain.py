"""What a study looks like (issue 15, routing): DICOM tags first, else the shipped pixel
classifier (assets/domain); the out-of-domain warning says it in words."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import require
from mrg_core.domain import FOLDER, KINDS, dicom_kind, study_domain
from mrg_core.engine import domain_warning
from mrg_core.io import load_study
from mrg_core.paths import REPO_ROOT, SAMPLES_DIR

CT_MODEL = {"trained_on": {"modality": "CT", "body_part": "CHEST",
                           "description": "COV-CTR chest CT slices"}}


def test_dicom_tags_decide_when_present():
    assert study_domain(load_study([SAMPLES_DIR / "ct_phantom_covid.dcm"])).to_dict() == \
        {"kind": "ct_slice", "source": "dicom", "probability": None}
    assert study_domain(load_study([SAMPLES_DIR / "cr_phantom_pa.dcm"])).kind == \
        "chest_radiograph"
    assert dicom_kind("MR", "CHEST") == "other" and dicom_kind("DX", "HAND") == "other"
    assert dicom_kind("DX", None) == "chest_radiograph" and dicom_kind(None, "CHEST") is None


@pytest.fixture(scope="module")
def held_out(shared_data):
    """A held-out mix the classifier never trained on: COV-CTR test slices (PNG and JPEG),
    cxr_pneumonia test and cxr_ccby radiographs, and kinds of picture it never saw."""
    from mrg_core.domain_training import HELDOUT_MAKERS, generated

    require((FOLDER / "model.safetensors").is_file(), "assets/domain is absent")
    splits = json.loads((shared_data / "covctr" / "splits.json").read_text())
    paths = {p.name: p for p in (shared_data / "covctr" / "images").rglob("*") if p.is_file()}
    test = [paths[i] for i in splits["test"] if i in paths]
    ct = [p for p in test if p.suffix == ".png"][:15] + [p for p in test if p.suffix == ".jpg"][:15]
    cxr_ids = json.loads((shared_data / "cxr_pneumonia" / "splits.json").read_text())["test"]
    cxr = [shared_data / "cxr_pneumonia" / "images" / i for i in cxr_ids[::20]][:20]
    cxr += sorted((shared_data / "cxr_ccby" / "images").iterdir())[:10]
    other = generated(HELDOUT_MAKERS, 30, seed=7)
    return {"ct_slice": [load_study([p]) for p in ct],
            "chest_radiograph": [load_study([p]) for p in cxr],
            "other": [load_study([("pic.png", _png(a))]) for a in other]}


def _png(array) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="png")
    return buf.getvalue()


def test_pixels_tell_ct_slices_radiographs_and_other_pictures_apart(held_out):
    correct = total = 0
    for kind, studies in held_out.items():
        got = [study_domain(s) for s in studies]
        assert all(d.source == "pixels" for d in got)
        correct += sum(d.kind == kind for d in got)
        total += len(got)
    assert correct / total >= 0.99, f"{correct}/{total}"


def test_the_warning_says_what_the_pixels_show(held_out):
    ct_png = held_out["ct_slice"][0]
    assert domain_warning(CT_MODEL, ct_png) is None  # a CT slice as PNG: the model's own kind
    text = domain_warning(CT_MODEL, held_out["chest_radiograph"][0])
    assert text.startswith("Out of domain") and "chest radiograph (from the pixels" in text
    assert "neither a CT slice nor a chest radiograph" in domain_warning(
        CT_MODEL, held_out["other"][0])


def test_report_json_carries_the_domain_decision(tmp_path, held_out):
    from mrg_core.models import tiny_model

    model_dir = tmp_path / "model"
    tiny_model("medvlm", "gpt2", seed=1).save_pretrained(model_dir)
    cxr = tmp_path / "chest.png"
    Image.fromarray(held_out["chest_radiograph"][0].views[0].display).save(cxr)
    out = subprocess.run([sys.executable, "-m", "mrg_core", "report", str(cxr),
                          str(SAMPLES_DIR / "ct_phantom_covid.dcm"), "--model", str(model_dir),
                          "--jsonl", "--max-new-tokens", "4", "--threads", "1", "--only"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    png, dcm = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert png["domain"]["kind"] == "chest_radiograph" and png["domain"]["source"] == "pixels"
    assert png["out_of_domain"] is True
    assert dcm["domain"] == {"kind": "ct_slice", "source": "dicom", "probability": None}


def test_the_shipped_classifier_states_its_classes_and_held_out_score():
    cfg = json.loads((FOLDER / "config.json").read_text())
    assert tuple(cfg["kinds"]) == KINDS and cfg["heldout_accuracy"] >= 0.99
