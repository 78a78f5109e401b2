"""Real CT series (issue 16): grouping by series, order along the slice normal, gaps, limits,
mixed uploads refused, zips, study-level decisions and the report CLI per series."""
import io
import json
import random
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from mrg_core.io import LoadLimits, StudyLoadError, load_studies, load_study
from mrg_core.io.limits import Budget
from mrg_core.paths import REPO_ROOT
from mrg_core.samples import make_cr_phantom, make_ct_phantom, write_cr_dicom, write_ct_dicom
from mrg_core.study_level import aggregate, key_views

SECRET_PATIENT = "PAT-77654033"
SECRET_DESCRIPTION = "SECRET-SERIES-DESCRIPTION"


def write_series(folder, n=12, seed="s1", size=64, positions=None, numbers=None,
                 patient=SECRET_PATIENT, series_number=4, drop=(), lesion_on=()):
    """n CT slices of one series, files written in a shuffled order with names that say
    nothing about the order. Slice i sits at z = 100 - 2.5 i (head first) unless positions
    are given; `numbers` overrides InstanceNumber; `lesion_on` slices get a COVID-like
    phantom."""
    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    paths = []
    for i in order:
        if i in drop:
            continue
        hu = make_ct_phantom(seed=i, covid=i in lesion_on, size=size)
        path = folder / f"img_{random.Random(f'{seed}{i}').getrandbits(32):08x}.dcm"
        ds = write_ct_dicom(path, hu, seed=f"{seed}-{i}")
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.{abs(hash(seed)) % 10**12}"
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.SeriesNumber, ds.PatientID = series_number, patient
        ds.SeriesDescription = SECRET_DESCRIPTION
        ds.ConvolutionKernel = "B40f"
        ds.SliceThickness = 2.5
        z = 100 - 2.5 * i if positions is None else positions[i]
        if z is None:
            del ds.ImagePositionPatient
        else:
            ds.ImagePositionPatient = [-22.4, -22.4, z]
        ds.InstanceNumber = i + 1 if numbers is None else numbers[i]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def slice_ids(study):
    """Which generated slice each view is (its phantom seed is its index): matched by pixels."""
    ref = {i: make_ct_phantom(seed=i, size=64) for i in range(40)}
    out = []
    for v in study.views:
        hu = np.rint(v.values).astype(np.int32)
        out.append(next(i for i, r in ref.items()
                        if np.array_equal(np.clip(r.astype(np.int32), -1024, 3071), hu)))
    return out


def test_slices_are_ordered_along_the_normal_whatever_the_file_order(tmp_path):
    # InstanceNumber says the opposite order: the position wins
    write_series(tmp_path / "s", numbers=[12 - i for i in range(12)])
    (study,) = load_studies([tmp_path / "s"])
    assert slice_ids(study) == list(range(12))
    s = study.series
    assert (s.n_slices, s.ordered_by, s.spacing_mm, s.slice_thickness_mm, s.kernel,
            s.series_number, s.gaps_after) == (12, "position", 2.5, 2.5, "B40f", 4, ())
    assert study.views[0].meta.units == "HU" and study.views[0].values.min() < -900


def test_instance_number_orders_slices_without_positions(tmp_path):
    write_series(tmp_path / "s", n=8, positions=[None] * 8, numbers=[8 - i for i in range(8)])
    (study,) = load_studies([tmp_path / "s"])
    assert study.series.ordered_by == "instance_number"
    assert slice_ids(study) == list(range(7, -1, -1))


def test_a_missing_slice_is_reported_as_a_gap(tmp_path):
    write_series(tmp_path / "s", drop=(5,))
    (study,) = load_studies([tmp_path / "s"])
    assert study.series.n_slices == 11 and study.series.gaps_after == (4,)
    assert "missing" in study.series.describe()


def test_two_series_in_one_folder_become_two_studies(tmp_path):
    write_series(tmp_path / "both", n=6, seed="a", series_number=3)
    write_series(tmp_path / "both" / "sub", n=4, seed="b", series_number=2)
    studies = load_studies([tmp_path / "both"])
    assert [(s.series.index, s.series.series_number, len(s.views)) for s in studies] == \
        [(1, 2, 4), (2, 3, 6)]
    with pytest.raises(StudyLoadError) as err:
        load_study([tmp_path / "both"])
    assert err.value.code == "several_series" and "2 series" in err.value.message


def test_mixed_modalities_and_patients_are_refused(tmp_path):
    ct = write_series(tmp_path / "ct", n=2)
    write_cr_dicom(tmp_path / "cr.dcm", make_cr_phantom(3, rows=64, cols=64))
    from PIL import Image

    Image.fromarray(make_ct_phantom(1, size=64).clip(0, 255).astype(np.uint8)).save(
        tmp_path / "slice.png")
    for mixed in ([ct[0], tmp_path / "cr.dcm"], [tmp_path / "cr.dcm", tmp_path / "slice.png"]):
        with pytest.raises(StudyLoadError) as err:
            load_studies(mixed)
        assert err.value.code == "mixed_modalities"
    other = write_series(tmp_path / "other", n=1, seed="o", patient="PAT-OTHER")
    with pytest.raises(StudyLoadError) as err:
        load_studies([ct[0], other[0]])
    assert err.value.code == "mixed_patients"
    assert SECRET_PATIENT not in err.value.message and "PAT-OTHER" not in err.value.message


def test_no_identifier_leaves_the_loader(tmp_path):
    write_series(tmp_path / "s", n=3)
    (study,) = load_studies([tmp_path / "s"])
    text = json.dumps(study.summary())
    assert SECRET_PATIENT not in text and SECRET_DESCRIPTION not in text
    assert "1.2.826.0.1.3680043.8.498" not in text  # no UID either


def test_a_zip_upload_is_the_same_study_as_its_folder(tmp_path):
    paths = write_series(tmp_path / "s", n=6)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in paths:
            zf.write(p, f"STUDY 1/SERIES 2/{p.name}")
        zf.writestr("__MACOSX/._x", b"junk")
    (from_zip,) = load_studies([("upload.zip", buf.getvalue())])
    (from_folder,) = load_studies([tmp_path / "s"])
    assert from_zip.content_hash == from_folder.content_hash


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("slice.dcm", b"\0" * (64 * 2**20))  # 64 MB of zeros, ~64 KB zipped
    assert len(buf.getvalue()) < 2**20
    import tracemalloc

    data = buf.getvalue()
    tracemalloc.start()
    try:
        with pytest.raises(StudyLoadError) as err:
            load_studies([("bomb.zip", data)], LoadLimits(max_file_bytes=2**20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.code == "file_too_big"
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MB allocated for a 1 MB limit"
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(5):
            zf.writestr(f"f{i}.dcm", b"x")
    with pytest.raises(StudyLoadError) as err:
        load_studies([("many.zip", many.getvalue())], LoadLimits(max_files=4))
    assert err.value.code == "too_many_files"


def test_default_limits_take_a_600_slice_512_series_and_stop_above():
    lim = LoadLimits()
    budget = Budget(lim)
    for i in range(600):
        budget.reserve(512, 512, 1, f"slice {i}")
        budget.read(512 * 512 * 2 + 2000, f"slice {i}")
    assert lim.max_files >= 600
    with pytest.raises(StudyLoadError):  # the total pixel limit still holds
        for i in range(200):
            budget.reserve(512, 512, 1, f"extra {i}")


def test_aggregation_rules_and_key_views():
    p = [0.1, 0.9, 0.3, 0.8, 0.2]
    assert aggregate(p, "max") == 0.9 and aggregate(p, "mean") == pytest.approx(0.46)
    assert aggregate(p, "top3_mean") == pytest.approx((0.9 + 0.8 + 0.3) / 3)
    assert aggregate(p, "noisy_or") == pytest.approx(1 - 0.9 * 0.1 * 0.7 * 0.2 * 0.8)
    assert key_views(p) == (1, 3, 2)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import torch

    from mrg_core.engine import Engine
    from mrg_core.models import tiny_model

    torch.manual_seed(0)
    return Engine(tiny_model(method="medvlm", seed=0), None)


def test_study_decision_from_slices(engine, tmp_path):
    write_series(tmp_path / "s", n=6)
    (study,) = load_studies([tmp_path / "s"])
    model = engine.model
    raw = model.view_probabilities(study)
    single = [model.predict(type(study)(views=(v,))).probability for v in study.views]
    assert np.allclose([model.calibrated(x) for x in raw], single, atol=1e-5)  # per slice
    a = engine.analyze(study)
    assert a.aggregation == model.config.study_aggregation == "max"
    assert a.key_views[0] == int(np.argmax(raw))
    assert a.probability == pytest.approx(model.calibrated(raw.max()))
    assert a.heatmaps[a.key_views[0]] is not None and sum(m is not None for m in a.heatmaps) == 1
    assert engine.view_heatmap(study, 2).shape == study.views[2].display.shape
    for t, label in ((float(raw.max()) - 1e-4, 1), (float(raw.max()) + 1e-4, 0)):
        model.config.study_threshold = t  # the study threshold, not the slice one, decides
        engine._decisions.clear()
        a = engine.analyze(study)
        assert a.label == label
        drafted, decision = engine.drafted_study(study)
        assert decision == label and len(drafted.views) == 1
        assert drafted.views[0] is study.views[a.key_views[0]]
    model.config.study_threshold = None


def test_report_cli_prints_one_object_per_series(tmp_path):
    from mrg_core.models import tiny_model

    model_dir = tmp_path / "model"
    tiny_model(method="medvlm", seed=0).save_pretrained(model_dir)
    write_series(tmp_path / "study" / "A", n=5, seed="a", series_number=2)
    write_series(tmp_path / "study" / "B", n=3, seed="b", series_number=3)
    out = subprocess.run([sys.executable, "-m", "mrg_core", "report", str(tmp_path / "study"),
                          "--model", str(model_dir), "--jsonl", "--max-new-tokens", "6",
                          "--threads", "1"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["input"], r["series"]["series_number"], r["n_views"]) for r in rows] == \
        [(1, 2, 5), (1, 3, 3)]
    for r in rows:
        assert r["aggregation"] == "max" and len(r["view_probabilities"]) == r["n_views"]
        assert r["key_views"][0] == int(np.argmax(r["view_probabilities"]))
        assert r["probability"] == pytest.approx(max(r["view_probabilities"]), abs=1e-4)
        assert set(r["timings_s"]) == {"model_load", "load_study", "probability", "report"}
    assert SECRET_PATIENT not in out.stdout and SECRET_DESCRIPTION not in out.stdout


def test_the_shared_tcia_series(shared_data):
    studies = load_studies([shared_data / "ct_series"])
    assert [(s.series.series_number, s.series.kernel, len(s.views)) for s in studies] == \
        [(2, "B70f", 30), (3, "B40f", 30)]
    for s in studies:
        pos = [v.meta.slice_position for v in s.views]
        assert all(a > b for a, b in zip(pos, pos[1:]))  # head first, strictly
        assert s.series.ordered_by == "position" and s.series.gaps_after == ()
        assert s.series.spacing_mm == pytest.approx(8.0) and s.views[0].meta.units == "HU"


def test_pa_and_lateral_radiographs_are_one_study_of_two_views(tmp_path, engine):
    """Projection views of one study stay together even when each is its own series (as PACS
    often store them), and each view gets its own probability."""
    pa = write_cr_dicom(tmp_path / "pa.dcm", make_cr_phantom(3, rows=64, cols=64), seed="pa")
    lat = write_cr_dicom(tmp_path / "lat.dcm", make_cr_phantom(4, rows=64, cols=64), seed="lat")
    for ds, path, number in ((pa, tmp_path / "pa.dcm", 1), (lat, tmp_path / "lat.dcm", 2)):
        ds.StudyInstanceUID, ds.SeriesNumber = "1.2.826.0.1.3680043.8.498.7", number
        ds.save_as(path, enforce_file_format=True)
    assert pa.SeriesInstanceUID != lat.SeriesInstanceUID
    (study,) = load_studies([tmp_path / "pa.dcm", tmp_path / "lat.dcm"])
    assert len(study.views) == 2 and study.series is None
    a = engine.analyze(study)
    assert len(a.view_probabilities) == 2 and a.aggregation == "max"


def test_a_series_correction_is_fine_tuned_on_the_slice_it_was_drafted_from(engine, tmp_path,
                                                                           monkeypatch):
    """Fine-tuning sees a saved series as the engine drafted it: the key slice alone."""
    from mrg_core import finetune
    from mrg_core.storage import DraftRecord, Store

    base = tmp_path / "base"
    engine.model.save_pretrained(base)
    url = f"sqlite:///{tmp_path / 'c.db'}"
    drafted = {}
    with Store(url) as store:
        for seed, n in (("s1", 5), ("s2", 4)):  # two studies: the least fine-tuning accepts
            write_series(tmp_path / seed, n=n, seed=seed)
            (study,) = load_studies([tmp_path / seed])
            a = engine.analyze(study)
            drafted[n] = engine.drafted_study(study)[0].views[0].display
            store.save_review(study, DraftRecord(model_name="m", model_version="1",
                                                 text="draft", probability=a.probability,
                                                 threshold=a.threshold),
                              "the radiologist's report", "dr-series", label=1)
        seen = []

        class Seen(Exception):
            pass

        def spy(examples, model):  # what fine-tuning trains on; stop there
            seen.extend(examples)
            raise Seen

        monkeypatch.setattr(finetune, "training_items", spy)
        with pytest.raises(Seen):
            finetune.finetune_from_store(store, base, tmp_path / "out",
                                         finetune.FinetuneConfig(min_corrections=1))
    assert len(seen) == 2
    for ex in seen:
        assert len(ex.images) == 1 and ex.label == 1
        assert any(np.array_equal(ex.images[0], d) for d in drafted.values())


def test_the_real_samples_load_and_are_attributed():
    """The real samples a new user can try: a TCIA CT series (zip) and two CC BY radiographs,
    each named with its licence in ATTRIBUTION.md."""
    from mrg_core.domain import study_domain
    from mrg_core.paths import SAMPLES_DIR

    attribution = (SAMPLES_DIR / "ATTRIBUTION.md").read_text(encoding="utf-8")
    real = [p for p in SAMPLES_DIR.iterdir() if p.suffix in (".zip", ".jpeg")]
    assert len(real) == 3
    for p in real:
        assert f"`{p.name}`" in attribution
    assert attribution.count("CC BY 4.0") >= 2
    (series,) = load_studies([SAMPLES_DIR / "tcia_lung_dx_a0002_ct_8_slices.zip"])
    assert (series.series.n_slices, series.series.ordered_by, series.series.kernel,
            series.views[0].meta.units) == (8, "position", "B40f", "HU")
    for name in ("cxr_child_normal.jpeg", "cxr_child_pneumonia.jpeg"):
        assert study_domain(load_study([SAMPLES_DIR / name])).kind == "chest_radiograph"
