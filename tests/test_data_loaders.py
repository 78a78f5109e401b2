"""Dataset loaders on synthetic data in the real layouts, and COV-CTR counts on the shared data."""
import json

import pytest
import torch

from conftest import require
from mrg_core.data import (ImageCache, file_format, is_png_only, load_corrections, load_covctr,
                           load_r2gen, load_splits, resolve_data_spec, split_by_id)
from mrg_core.data.synthetic import write_synthetic_covctr, write_synthetic_r2gen


@pytest.fixture(scope="module")
def covctr_root(tmp_path_factory):
    return write_synthetic_covctr(tmp_path_factory.mktemp("covctr"),
                                  n={"train": 8, "val": 4, "test": 4}, size=32)


def test_synthetic_covctr_loader(covctr_root):
    splits = load_covctr(covctr_root)
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "val": 4, "test": 4}
    last = splits["train"][-1]
    assert last.report == "" and not last.has_report and last.label in (0, 1)  # kept, flagged
    assert all(ex.has_report for ex in splits["val"])
    assert {ex.label for ex in splits["train"]} == {0, 1}
    formats = {file_format(ex.image_paths[0]) for ex in splits["train"]}
    assert formats == {"png", "jpeg"}
    positives = [ex for v in splits.values() for ex in v if ex.label == 1]
    assert all(is_png_only(ex) for ex in positives)
    assert resolve_data_spec(covctr_root)["kind"] == "covctr"
    assert len(load_splits(covctr_root)["test"]) == 4


def test_duplicate_ids_become_references(tmp_path):
    root = write_synthetic_covctr(tmp_path, n={"train": 2, "val": 1, "test": 1}, size=16,
                                  missing_reports=0)
    rows = (root / "reports.tsv").read_text().splitlines()
    first = rows[1].split("\t")
    rows.append(f"{first[0]}\t{first[1]}\tA second reading of the same slice.")
    (root / "reports.tsv").write_text("\n".join(rows) + "\n")
    ex = load_covctr(root)["train"][0]
    assert ex.report == first[2]
    assert ex.references == (first[2], "A second reading of the same slice.")


def test_id_in_two_splits_is_refused(tmp_path):
    root = write_synthetic_covctr(tmp_path, n={"train": 2, "val": 1, "test": 1}, size=16)
    splits = json.loads((root / "splits.json").read_text())
    splits["test"].append(splits["train"][0])
    (root / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(ValueError, match="both"):
        load_covctr(root)


def test_r2gen_annotation_and_multiview_cache(tmp_path):
    ann = write_synthetic_r2gen(tmp_path, n={"train": 3, "val": 1, "test": 1}, views=2, size=24)
    splits = load_r2gen(ann)
    assert len(splits["train"]) == 3 and splits["train"][0].image_paths[0].is_file()
    cache = ImageCache()
    x = cache.batch(splits["train"])
    assert x.shape == (3, 2, 1, 224, 224) and x.dtype == torch.float32
    assert len(cache) == 3


def test_image_cache_decodes_once(covctr_root, monkeypatch):
    import mrg_core.io

    calls = []
    real = mrg_core.io.load_study
    monkeypatch.setattr(mrg_core.io, "load_study", lambda s: calls.append(s) or real(s))
    ex = load_covctr(covctr_root)["val"][:2]
    cache = ImageCache()
    a = cache.batch(ex)
    b = cache.batch(ex)
    assert len(calls) == 2 and torch.equal(a, b)


def test_corrections_export(tmp_path, covctr_root):
    from shutil import copy

    (tmp_path / "images").mkdir()
    src = load_covctr(covctr_root)["test"]
    with open(tmp_path / "corrections.jsonl", "w") as f:
        for i, ex in enumerate(src):
            copy(ex.image_paths[0], tmp_path / "images" / f"{i}.png")
            f.write(json.dumps({"id": f"c{i}", "image_path": [f"images/{i}.png"],
                                "report": ex.report, "label": ex.label, "draft": "draft text",
                                "probability": 0.7, "model_version": "1.0.0",
                                "created_at": "2026-01-01T00:00:00"}) + "\n")
    exs = load_corrections(tmp_path)
    assert [e.id for e in exs] == [f"c{i}" for i in range(len(src))]
    assert exs[0].image_paths[0].is_file() and exs[0].meta["draft"] == "draft text"
    parts = split_by_id(exs, 0.5)
    assert len(parts["train"]) + len(parts["val"]) == len(exs)
    assert load_splits(tmp_path)["train"] == split_by_id(exs)["train"]  # stable by id


def test_real_covctr_counts(shared_data):
    root = shared_data / "covctr"
    require(root.is_dir(), f"COV-CTR folder {root} is absent")
    splits = load_covctr(root)
    expected = {k: len(v) for k, v in json.loads((root / "splits.json").read_text()).items()}
    assert {k: len(v) for k, v in splits.items()} == expected == {"train": 468, "val": 72,
                                                                  "test": 114}
    ids = [ex.id for v in splits.values() for ex in v]
    assert len(ids) == len(set(ids))  # no id crosses splits
    no_report = [ex for v in splits.values() for ex in v if not ex.has_report]
    assert 20 <= len(no_report) <= 30 and all(ex.label in (0, 1) for ex in no_report)
    assert sum(len(ex.references) > 1 for v in splits.values() for ex in v) == 6


def test_corrections_export_leaves_accepted_drafts_out_unless_asked(tmp_path, covctr_root):
    from shutil import copy

    (tmp_path / "images").mkdir()
    src = load_covctr(covctr_root)["test"][:3]
    with open(tmp_path / "corrections.jsonl", "w") as f:
        for i, (ex, kind) in enumerate(zip(src, ["corrected", "accepted", None])):
            copy(ex.image_paths[0], tmp_path / "images" / f"{i}.png")
            rec = {"id": f"c{i}", "image_path": [f"images/{i}.png"], "report": ex.report,
                   "label": ex.label}
            if kind:  # None: a file exported before "kind" existed
                rec["kind"] = kind
            f.write(json.dumps(rec) + "\n")
    assert [e.id for e in load_corrections(tmp_path)] == ["c0", "c2"]
    every = load_corrections(tmp_path, include_accepted=True)
    assert [(e.id, e.meta["kind"]) for e in every] == [("c0", "corrected"), ("c1", "accepted"),
                                                       ("c2", None)]
