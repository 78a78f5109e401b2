"""Baselines fitted on train produce a report for every test id; retrieval finds an identical
training image."""
import pytest

from mrg_core.data import ImageCache, load_covctr
from mrg_core.data.example import Example
from mrg_core.data.synthetic import write_synthetic_covctr
from mrg_core.evaluation.baselines import (MostFrequentBaseline, RetrievalBaseline,
                                           TemplateBaseline, pixel_features, typical_report)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return load_covctr(write_synthetic_covctr(tmp_path_factory.mktemp("cov"),
                                              n={"train": 10, "val": 2, "test": 4}, size=32))


def test_every_baseline_reports_every_test_id(splits):
    cache = ImageCache()
    train, test = splits["train"], splits["test"]
    systems = [MostFrequentBaseline(train), RetrievalBaseline(train, pixel_features(cache)),
               TemplateBaseline(train, lambda ex: float(ex.label), 0.5)]
    for b in systems:
        out = {ex.id: b.generate(ex) for ex in test}
        assert set(out) == {ex.id for ex in test} and all(t.strip() for t in out.values())
    template = systems[2]
    assert template.templates[0] != template.templates[1]
    for ex in test:  # class template follows the probability's class
        assert template.generate(ex) == template.templates[ex.label]


def test_retrieval_returns_report_of_identical_image(splits):
    train = splits["train"]
    target = train[3]
    query = Example(id="query", image_paths=list(target.image_paths), report="", label=-1)
    b = RetrievalBaseline(train, pixel_features(ImageCache()))
    assert b.nearest(query).id == target.id and b.generate(query) == target.report


def test_typical_report_prefers_most_frequent_then_medoid():
    assert typical_report(["a b", "c d", "a b", ""]) == "a b"
    assert typical_report(["x y z", "x y w", "q r s"]) in ("x y z", "x y w")
