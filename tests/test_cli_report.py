"""python -m mrg_core report: one model load, one JSON object per study, readable errors."""
import json
import subprocess
import sys
from pathlib import Path

from mrg_core.models import tiny_model
from mrg_core.paths import REPO_ROOT, SAMPLES_DIR


def test_report_cli_prints_one_json_object_per_study(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("medvlm", "gpt2", seed=1).save_pretrained(model_dir)
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"DICM" + b"\x00" * 50)
    ct = SAMPLES_DIR / "ct_phantom_covid.dcm"
    study_dir = tmp_path / "study"  # a folder = the views/slices of one study
    study_dir.mkdir()
    for name in ("ct_phantom_covid.dcm", "ct_phantom_normal.dcm"):
        (study_dir / name).write_bytes((SAMPLES_DIR / name).read_bytes())
    out = subprocess.run([sys.executable, "-m", "mrg_core", "report", str(ct), str(study_dir),
                          str(bad), "--model", str(model_dir), "--jsonl",
                          "--max-new-tokens", "12"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr  # one study failed to load
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [Path(r["file"]).name for r in rows] == ["ct_phantom_covid.dcm", "study",
                                                    "broken.dcm"]
    ok, multi, err = rows
    assert 0.0 <= ok["probability"] <= 1.0 and ok["label"] == int(
        ok["probability"] >= ok["threshold"])
    assert ok["report"].strip() and ok["model"]["name"] == "mrg-studio-tiny"
    assert ok["modality"] == "CT" and multi["n_views"] == 2
    assert set(ok["timings_s"]) == {"model_load", "load_study", "probability", "report"}
    assert err["error"] and err["message"] and "Traceback" not in out.stdout + out.stderr


def test_report_cli_without_a_model_folder_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mrg_core", "report",
                          str(SAMPLES_DIR / "ct_phantom_covid.dcm"), "--model",
                          str(tmp_path / "none")], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "no model folder" in out.stderr
