"""Model panel handlers with two real tiny model folders and a real SQLite file: list, switch,
drafts stamped with the version in use, fine-tune messages."""
import sqlite3

import pytest
import torch

from mrg_core.engine import Engine, EngineSettings
from mrg_core.finetune import FinetuneConfig
from mrg_core.paths import SAMPLES_DIR
from tests import factories
from ui import handlers as h
from ui import models_panel as mp
from ui.state import Session

CT_SAMPLE = SAMPLES_DIR / "ct_phantom_covid.dcm"


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    torch.set_num_threads(1)  # the machine is shared with a training run
    return factories.save_tiny_versions(tmp_path_factory.mktemp("models"))


@pytest.fixture
def engine(models_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MRG_MODELS_DIR", str(tmp_path / "ft"))  # fine-tunes land here
    eng = Engine.from_settings(EngineSettings(model_dir=models_root / "tiny-1.0.0",
                                              database_url=f"sqlite:///{tmp_path}/r.db"))
    eng.model_dir = (models_root / "tiny-1.0.0").resolve()  # as app.py does after loading
    yield eng
    eng.store.close()


def draft_and_save(engine, text="Clear lungs."):
    s = Session()
    assert h.load_files(engine, s, [str(CT_SAMPLE)]).ok
    h.analyze(engine, s)
    assert list(h.stream_draft(engine, s, ""))[-1].done
    out = h.save(engine, s, text, "Dr Ada")
    assert out.ok, out.message
    return s.last_save.correction_id


def stored_version(db, correction_id):
    with sqlite3.connect(db) as con:
        return con.execute("SELECT d.model_name, d.model_version FROM corrections c JOIN drafts "
                           "d ON d.id = c.draft_id WHERE c.id = ?", (correction_id,)).fetchone()


def test_choices_list_every_version_with_its_label(engine, models_root):
    opts = mp.model_choices(engine, [models_root])
    labels = [label for label, _ in opts]
    assert sorted(labels) == ["mrg-studio-tiny 1.0.0 · in use", "mrg-studio-tiny 2.0.0"]
    assert {k for _, k in opts} == {mp.version_key(models_root / d)
                                    for d in ("tiny-1.0.0", "tiny-2.0.0")}
    assert all(str(models_root) not in k for _, k in opts)  # no server path reaches the page


def test_label_names_the_parent():
    from mrg_core.registry import ModelVersion

    mv = ModelVersion("m", "1.0.0+ft1.2025", "/x", "1.0.0", "2025-01-01T00:00:00+00:00")
    assert mp.model_label(mv) == "m 1.0.0+ft1.2025 (parent 1.0.0)"


def test_switch_then_drafts_record_the_new_version(engine, models_root, tmp_path):
    db = tmp_path / "r.db"
    first = draft_and_save(engine)
    assert stored_version(db, first) == ("mrg-studio-tiny", "1.0.0")

    # the page names versions by key, never by server path, and takes only a listed one
    assert str(models_root) not in repr(mp.model_choices(engine, [models_root]))
    assert not mp.switch_model(engine, str(models_root / "tiny-2.0.0"), [models_root])[0]
    ok, msg = mp.switch_model(engine, mp.version_key(models_root / "tiny-2.0.0"), [models_root])
    assert ok and "2.0.0" in msg
    assert "version 2.0.0" in h.model_info_markdown(engine)
    assert dict(mp.model_choices(engine, [models_root]))["mrg-studio-tiny 2.0.0 · in use"]

    second = draft_and_save(engine, "Consolidation right lower lobe.")
    assert stored_version(db, second) == ("mrg-studio-tiny", "2.0.0")
    assert "2.0.0" in h.history_markdown(engine, _loaded(engine))


def _loaded(engine):
    s = Session()
    h.load_files(engine, s, [str(CT_SAMPLE)])
    return s


def test_switch_to_a_broken_folder_keeps_the_model(engine, tmp_path):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    ok, msg = mp.switch_model(engine, mp.version_key(bad), [tmp_path])
    assert not ok and "Model not changed" in msg and "Traceback" not in msg
    assert engine.model_info["version"] == "1.0.0"
    assert not mp.switch_model(engine, None)[0]


def test_finetune_with_too_few_corrections_says_so(engine):
    draft_and_save(engine)
    msgs = list(mp.finetune(engine, poll_s=0.05))
    assert "Not enough corrections" in msgs[-1] and "at least" in msgs[-1]
    assert engine.model_info["version"] == "1.0.0"


def test_finetune_runs_in_a_thread_and_lists_the_new_version(engine, models_root, tmp_path):
    """A real (1 epoch) fine-tune: progress while it runs, one at a time, the new version
    listed afterwards and the live model unchanged."""
    for i in range(3):
        s = Session()
        path = tmp_path / f"s{i}.dcm"
        factories.write_ct_signed(path, hu=factories.ct_hu_pattern(64 + 8 * i, 64))
        assert h.load_files(engine, s, [str(path)]).ok
        assert h.save(engine, s, f"Finding number {i} in the lung.", "Dr Ada").ok
    cfg = FinetuneConfig(epochs=1, min_corrections=2, max_new_tokens=8)
    gen = mp.finetune(engine, cfg=cfg, poll_s=0.05)
    first = next(gen)
    assert first.startswith("Fine-tuning")
    assert list(mp.finetune(engine)) == ["A fine-tune is already running; wait for it to "
                                         "finish."]
    rest = list(gen)
    assert "Fine-tuned" in rest[-1] and "not in use" in rest[-1], rest[-1]
    assert engine.model_info["version"] == "1.0.0"
    labels = [label for label, _ in mp.model_choices(engine, [models_root, tmp_path / "ft"])]
    assert any("(parent 1.0.0)" in label for label in labels), labels
