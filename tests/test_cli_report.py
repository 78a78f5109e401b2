"""python -m mrg_core report: one model load, one JSON object per study, readable errors."""
import json
import subprocess
import sys

import pytest

from mrg_core.models import tiny_model
from mrg_core.paths import REPO_ROOT, SAMPLES_DIR


def test_report_cli_prints_one_json_object_per_study(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("medvlm", "gpt2", seed=1).save_pretrained(model_dir)
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"DICM" + b"\x00" * 50)
    ct = SAMPLES_DIR / "ct_phantom_covid.dcm"
    # a folder = the views/slices of one study; PACS exports name folders by patient ID
    study_dir = tmp_path / "77654033"
    study_dir.mkdir()
    for name in ("ct_phantom_covid.dcm", "ct_phantom_normal.dcm"):
        (study_dir / name).write_bytes((SAMPLES_DIR / name).read_bytes())
    out = subprocess.run([sys.executable, "-m", "mrg_core", "report", str(ct), str(study_dir),
                          str(bad), "--model", str(model_dir), "--jsonl",
                          "--max-new-tokens", "12"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr  # one study failed to load
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    # the folder holds two single-slice series: one object each
    assert [(r["input"], r["kind"]) for r in rows] == [(1, "file"), (2, "folder"), (2, "folder"),
                                                       (3, "file")]
    # no path or file name in the output (PACS folders and files are named by patient)
    assert "77654033" not in out.stdout + out.stderr and "ct_phantom" not in out.stdout
    assert str(tmp_path) not in out.stdout + out.stderr
    assert len({r["path_sha256"] for r in rows}) == 3
    ok, first, second, err = rows
    assert [first["series"]["index"], second["series"]["index"]] == [1, 2]
    assert 0.0 <= ok["probability"] <= 1.0 and ok["label"] == int(
        ok["probability"] >= ok["threshold"])
    assert ok["report"].strip() and ok["model"]["name"] == "mrg-studio-tiny"
    assert ok["modality"] == "CT" and first["n_views"] == second["n_views"] == 1
    assert set(ok["timings_s"]) == {"model_load", "load_study", "probability", "report"}
    assert err["error"] and err["message"] and "Traceback" not in out.stdout + out.stderr
    assert "Warning" not in out.stderr, out.stderr  # e.g. transformers' FutureWarning via peft


def test_report_cli_without_a_model_folder_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mrg_core", "report",
                          str(SAMPLES_DIR / "ct_phantom_covid.dcm"), "--model",
                          str(tmp_path / "none")], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "no model folder" in out.stderr


def test_report_cli_threads_precision_and_out_of_domain(tmp_path):
    """The app's flags and thread policy, and the app's out-of-domain decision in the JSON."""
    from tests import factories

    model_dir = tmp_path / "model"
    tiny_model("medvlm", "gpt2", seed=1).save_pretrained(model_dir)
    cr = tmp_path / "cr_chest.dcm"  # a radiograph: the tiny model was trained on CT only
    factories.write_mono1(cr, rows=64, cols=48)
    ct = SAMPLES_DIR / "ct_phantom_covid.dcm"

    def run(*extra, env=None):
        import os

        e = {k: v for k, v in os.environ.items()
             if k not in ("MRG_DECODE_THREADS", "MRG_PRECISION")}
        out = subprocess.run([sys.executable, "-m", "mrg_core", "report", str(ct), str(cr),
                              "--model", str(model_dir), "--jsonl", "--max-new-tokens", "6",
                              "--only", *extra],  # --only: the CR to this model, flagged
                             cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=300, env={**e, **(env or {})})
        return out, [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]

    out, (in_dom, out_dom) = run("--threads", "1", "--precision", "int8")
    assert out.returncode == 0, out.stderr
    assert in_dom["run"] == out_dom["run"] == {"threads": 1, "precision": "int8"}
    assert in_dom["out_of_domain"] is False and in_dom["domain_warning"] is None
    assert out_dom["out_of_domain"] is True and out_dom["domain_warning"].startswith(
        "Out of domain") and out_dom["report"]  # still a report, flagged

    import os

    import torch

    out, rows = run()  # defaults: the app's (auto threads, int8-weights)
    auto = max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    assert [r["run"] for r in rows] == [{"threads": auto, "precision": "int8-weights"}] * 2
    out, rows = run(env={"MRG_DECODE_THREADS": "1", "MRG_PRECISION": "fp32"})
    assert rows[0]["run"] == {"threads": 1, "precision": "fp32"}

    for bad in (["--threads", "0"], ["--threads", "many"], ["--precision", "fp16"]):
        out, rows = run(*bad)
        assert out.returncode == 2 and not rows and "Traceback" not in out.stderr, bad


def test_report_cli_precisions_are_the_apps():
    import app
    from mrg_core.cli import report
    from mrg_core.models.quantize import PRECISIONS

    assert report.PRECISIONS == PRECISIONS  # the CLI's list (spelled out for a torch-free --help)
    for p in PRECISIONS:  # and the app accepts exactly these
        assert app.parse_args(["--precision", p]).precision == p
    with pytest.raises(SystemExit):
        app.parse_args(["--precision", "fp16"])


def test_report_cli_finding_chips_with_the_shipped_model():
    """--finding NAME=yes|no, as the page's chips: the JSON lists every chip with its
    probability, what the model predicted and what was stated; the draft states the tick.
    A finding the model cannot state is refused with a readable message."""
    from mrg_core.evaluation.clinical import extract_findings
    from mrg_core.paths import DEFAULT_MODEL_DIR
    from mrg_core.report_export import sections as report_sections

    ct = str(SAMPLES_DIR / "ct_phantom_covid.dcm")
    run = [sys.executable, "-m", "mrg_core", "report", ct, "--only", "--jsonl",
           "--model", str(DEFAULT_MODEL_DIR)]
    out = subprocess.run(run + ["--finding", "ground_glass=yes"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.splitlines()[-1])
    chips = {c["name"]: c for c in row["finding_chips"]}
    assert set(chips) == {"patchy_shadow", "ground_glass", "consolidation", "fibrosis_stripe",
                          "nodule", "air_bronchogram", "cavity", "bilateral", "RUL", "RML",
                          "RLL", "LUL", "LLL"}
    assert not chips["ground_glass"]["predicted"] and chips["ground_glass"]["stated"]
    assert all(c["stated"] == c["predicted"] for n, c in chips.items() if n != "ground_glass")
    assert 0 <= chips["ground_glass"]["probability"] < 0.5
    assert "ground_glass" in extract_findings(row["report"]), row["report"]
    # the tick edits the model's own draft (given as model_report): each of its clauses is
    # kept word for word
    own = report_sections(row["model_report"])["findings"]
    clauses = [c.strip(" ,.") for c in own.split(", ")]
    assert all(c in row["sections"]["findings"] for c in clauses), (own, row["report"])
    assert row["sections"]["findings"] != own
    # the sections, kept apart: the LM's Findings, the decision in words as the Impression
    phrases = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["impression_phrases"]
    assert row["sections"]["impression"] == phrases[row["label"]]
    assert row["report"] == f"Findings: {row['sections']['findings']}\nImpression: " \
                            f"{row['sections']['impression']}"
    bad = subprocess.run(run + ["--finding", "effusion=yes"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    err = json.loads(bad.stdout.splitlines()[-1])
    assert err["error"] == "unknown_finding" and "effusion" in err["message"]
    assert "ground_glass" in err["message"]  # says which it can state
    typo = subprocess.run(run + ["--finding", "ground_glass"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert typo.returncode == 2 and "NAME=yes" in typo.stderr
