"""Finding chips (issue 21): the reader flips a predicted finding, the draft is written again
stating the chips, their own edits stay, and the chips are stored with the correction and used
by fine-tuning. A real tiny finding-prompt model, a real SQLite file, the real CT sample."""
import json
import sqlite3

import numpy as np
import pytest
import torch

from mrg_core.engine import Engine
from mrg_core.finding_chips import chip_state, flipped, parse_finding_args
from mrg_core.models import GenerationSettings, ReportModel
from mrg_core.models.factory import tiny_config
from mrg_core.paths import SAMPLES_DIR
from mrg_core.storage import Store
from mrg_core.text import train_tokenizer
from ui import handlers as h
from ui.state import Session

CT_SAMPLE = SAMPLES_DIR / "ct_phantom_covid.dcm"
TEXTS = ["no pneumonia . lungs are clear .",
         "pneumonia present . ground glass opacity in the right lower lobe .",
         "pneumonia present . consolidation , left upper lobe ."]


def finding_model(seed: int = 0, guidance: float = 0.0, method: str = "medvlm") -> ReportModel:
    cfg = tiny_config(method, "gpt2")
    cfg.labels = ["pneumonia", "ground_glass", "consolidation", "RLL"]
    cfg.label_prompt = cfg.finding_prompt = True
    cfg.finding_phrases = {"ground_glass": "ground glass opacity",
                           "consolidation": "consolidation", "RLL": "right lower lobe"}
    cfg.label_guidance = guidance
    tok = train_tokenizer(TEXTS + [cfg.instruction], min_frequency=1)
    torch.manual_seed(seed)
    return ReportModel.build(cfg, tok).eval()


@pytest.fixture(scope="module")
def model():
    return finding_model()


@pytest.fixture
def engine(model, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}", busy_timeout_s=0.3)
    yield Engine(model, store)
    store.close()


@pytest.fixture
def session(engine):
    s = Session()
    assert h.load_files(engine, s, [str(CT_SAMPLE)]).ok
    h.analyze(engine, s)
    return s


def set_thresholds(model, stated: set[str]):
    """Thresholds under which the finding heads predict exactly `stated` on any image."""
    model.config.label_thresholds = {n: 0.0 if n in stated else 1.01
                                     for n in model.finding_names}


def test_chips_list_every_finding_with_its_probability_and_prediction(model, session):
    chips = session.analysis.chips
    assert [c.name for c in chips] == model.finding_names
    probs = model.predict(session.study).labels
    for c in chips:
        assert c.probability == pytest.approx(probs[c.name])
        assert c.phrase == model.config.finding_phrases[c.name]
        assert c.predicted == (c.name in model.predict(session.study).findings)
    view = h.chips_view(session)
    assert view.visible and [v for _, v in view.choices] == model.finding_names
    assert view.ticked == [c.name for c in chips if c.predicted]
    assert f"{chips[0].probability:.0%}" in view.choices[0][0]


def prompts_seen(model, study, **kw) -> list[torch.Tensor]:
    """The embeddings each decode starts from (the prefill of the conditional prompt, and of
    the contrast prompt under guidance), from a real draft."""
    seen, make = [], model._decoder

    class Recording:
        def __init__(self, dec):
            self.dec = dec

        def prefill(self, embeds):
            seen.append(embeds.detach().clone())
            return self.dec.prefill(embeds)

        def step(self, tokens, cache):
            return self.dec.step(tokens, cache)

    model._decoder = lambda: Recording(make())
    try:
        model.generate_report(study, GenerationSettings(max_new_tokens=2), **kw) if not kw \
            else "".join(model.stream_report(study, GenerationSettings(max_new_tokens=2), **kw))
    finally:
        del model._decoder
    return seen


def test_a_chip_draft_starts_from_the_prompt_of_a_model_that_predicted_those_findings(session):
    """The decoder is conditioned on the chips: stating {RLL} by chip feeds the decoder the very
    prompt the model builds when its own heads predict {RLL}, not its own prompt."""
    model, study = finding_model(seed=1), session.study
    set_thresholds(model, {"ground_glass"})
    own = prompts_seen(model, study)
    by_chip = prompts_seen(model, study, findings=["RLL"])
    set_thresholds(model, {"RLL"})
    predicted = prompts_seen(model, study)
    assert len(own) == len(by_chip) == 1  # no guidance: one prompt
    assert torch.equal(by_chip[0], predicted[0])
    assert by_chip[0].shape != own[0].shape or not torch.equal(by_chip[0], own[0])
    # chips given in any order are stated in the model's label order
    assert model.chosen_findings(["RLL", "ground_glass"]) == ("ground_glass", "RLL")
    with pytest.raises(ValueError, match="not a finding this model states"):
        model.chosen_findings(["effusion"])


def test_with_guidance_a_flip_steers_away_from_what_the_model_would_state(session):
    """Label guidance contrasts with the opposite decision; with flipped chips the contrast
    prompt also keeps the model's own findings, so the draft moves towards the flip."""
    model, study = finding_model(seed=1, guidance=0.5), session.study
    set_thresholds(model, {"ground_glass"})
    label = model.predict(study).label
    cond, contrast = prompts_seen(model, study, findings=["RLL"])
    set_thresholds(model, {"RLL"})
    assert torch.equal(cond, prompts_seen(model, study)[0])
    set_thresholds(model, {"ground_glass"})
    opposite = prompts_seen(model, study, decision=1 - label, findings=["ground_glass"])[0]
    assert torch.equal(contrast, opposite)  # opposite decision, the model's own findings
    unflipped = prompts_seen(model, study)
    assert torch.equal(unflipped[1], opposite)  # no flip: plain label guidance


def test_chip_state_and_flips():
    from mrg_core.finding_chips import FindingChip

    chips = (FindingChip("a", "a", 0.9, True), FindingChip("b", "b", 0.1, False))
    state = chip_state(chips, ["b"])
    assert state == {"a": 0, "b": 1} and flipped(chips, state) == ["a", "b"]
    assert flipped(chips, chip_state(chips, ["a"])) == []
    with pytest.raises(ValueError):
        chip_state(chips, ["c"])
    assert parse_finding_args(["a=yes", "b=no", "c = 1"]) == {"a": 1, "b": 0, "c": 1}
    with pytest.raises(ValueError):
        parse_finding_args(["a"])


def test_redraft_keeps_the_users_edits_and_save_stores_the_chips(engine, tmp_path):
    from mrg_core.evaluation.clinical import extract_findings
    from mrg_core.finding_chips import _clauses

    model = engine.model
    set_thresholds(model, {"ground_glass", "RLL"})
    session = Session()
    assert h.load_files(engine, session, [str(CT_SAMPLE)]).ok
    h.analyze(engine, session)
    ups = list(h.stream_draft(engine, session, ""))
    first = session.draft
    assert ups[-1].editor == first
    mine = first.rstrip() + "\nCompare with the prior CT."  # the user's own line
    predicted = [c.name for c in session.analysis.chips if c.predicted]
    assert predicted == ["ground_glass", "RLL"]
    ticked = sorted(set(predicted) ^ {"consolidation"})  # flip one chip
    ups = list(h.redraft_with_findings(engine, session, mine, ticked))
    assert ups[-1].done and "with your own edits kept" in ups[-1].notice
    assert all(u.editor in (None, mine) for u in ups[:-1])  # the editor waits for the edit
    new = session.draft
    # the flip edits the first draft: its clauses stay, and the tick is stated
    assert all(c.strip(" .,") in new for c in _clauses(first)), (first, new)
    assert "consolidation" in extract_findings(new) and new != first
    assert ups[-1].editor == new + "\nCompare with the prior CT."
    assert session.draft_findings == {"stated": list(model.chosen_findings(ticked)),
                                      "flipped": ["consolidation"]}
    out = h.save(engine, session, ups[-1].editor, "dr-chips", ticked)
    assert out.ok, out.message
    db = engine.store.engine.url.database
    with sqlite3.connect(db) as con:
        findings, flips = con.execute(
            "SELECT findings, finding_flips FROM corrections").fetchone()
        settings = json.loads(con.execute("SELECT settings FROM drafts").fetchone()[0])
    state = json.loads(findings)
    assert state == {n: int(n in ticked) for n in model.finding_names}
    assert json.loads(flips) == ["consolidation"]
    assert settings["findings"]["flipped"] == ["consolidation"]  # the draft says how it was made
    hist = h.history_markdown(engine, session)
    want = "present" if "consolidation" in ticked else "absent"
    assert f"Findings changed by the reviewer: consolidation → {want}" in hist
    ex = engine.store.iter_corrections()[0]
    assert ex.findings == state  # fine-tuning sees the reviewed chips


def test_a_stopped_redraft_leaves_the_editor_and_the_draft_as_they_were(engine, session):
    list(h.stream_draft(engine, session, ""))
    first, findings = session.draft, session.draft_findings
    mine = first + " My words."
    ticked = sorted({c.name for c in session.analysis.chips if c.predicted} ^ {"consolidation"})
    ups = []
    for u in h.redraft_with_findings(engine, session, mine, ticked):
        ups.append(u)
        if len(ups) == 1:
            h.stop_message(session)
    assert ups[-1].done and ups[-1].editor == mine and "stopped" in ups[-1].notice
    assert session.draft == first and session.draft_findings == findings


def test_untouched_chips_are_kept_but_not_taught(engine, session):
    list(h.stream_draft(engine, session, ""))
    predicted = [c.name for c in session.analysis.chips if c.predicted]
    assert h.save(engine, session, session.draft + " Edited.", "dr", predicted).ok
    ex = engine.store.iter_corrections()[0]
    assert ex.findings is None  # nobody flipped a chip: the model's own guess, not a target
    entry = engine.store.history(session.study.content_hash)[0]
    assert entry.findings == {n: int(n in predicted) for n in engine.model.finding_names}
    assert entry.finding_flips == []


def test_chips_a_model_does_not_state_are_refused(engine, session):
    ups = list(h.redraft_with_findings(engine, session, "", ["effusion"]))
    assert ups[-1].done and "effusion" in ups[-1].notice
    out = h.save(engine, session, "Text.", "dr", ["effusion"])
    assert not out.ok and "effusion" in out.message


def test_a_model_without_finding_words_shows_no_chips(tmp_path):
    from mrg_core.models import tiny_model

    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    engine = Engine(tiny_model(), store)
    s = Session()
    assert h.load_files(engine, s, [str(CT_SAMPLE)]).ok
    h.analyze(engine, s)
    assert s.analysis.chips == () and not h.chips_view(s).visible
    ups = list(h.redraft_with_findings(engine, s, "", []))
    assert ups[-1].notice == h.REDRAFT_NEEDS_CHIPS
    assert h.save(engine, s, "A report.", "dr", []).ok
    with sqlite3.connect(tmp_path / "r.db") as con:
        assert con.execute("SELECT findings, finding_flips FROM corrections").fetchone() == \
            (None, None)
    store.close()


def test_finetuning_targets_carry_the_reviewed_chips(model):
    """The chips become the finding columns of the label row; the decision stays the target;
    what nobody reviewed is unknown (NaN), and training states the chips as the findings."""
    from datetime import datetime, timezone

    from mrg_core.finetune import target_label_row, training_items
    from mrg_core.storage.records import CorrectionExample

    img = np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)

    def ex(findings, label=1):
        return CorrectionExample(1, "h", [img], "text .", label, "d", "v", 0.9,
                                 datetime.now(timezone.utc), findings=findings)

    row = target_label_row(ex({"ground_glass": 0, "RLL": 1}), model.config.labels,
                           model._target_index)
    assert row[0] == 1.0 and row[1] == 0.0 and row[3] == 1.0 and np.isnan(row[2])
    items = training_items([ex({"ground_glass": 0, "consolidation": 1, "RLL": 1}),
                            ex(None, label=0)], model)
    assert items[0][2] == [1.0, 0.0, 1.0, 1.0]
    assert items[1][2][0] == 0.0 and all(np.isnan(v) for v in items[1][2][1:])
    assert [it[2] for it in training_items([ex(None)], model)] == [1.0]  # no chips: as before
    # teacher forcing states the reviewed chips, even with the other labels unknown
    m = finding_model()
    m.config.finding_teacher_forcing = m.config.label_prompt_teacher_forcing = 1.0
    set_thresholds(m, set())  # its own heads state nothing: what is stated is the chips'
    m.train()
    nan = float("nan")
    y = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, nan, nan, nan], [nan, 1.0, 0.0, 0.0]])
    enc = m.encoder(torch.rand(3, 1, 1, 64, 64))
    heads = m._heads(enc, y)
    assert heads[0] == (1, ("consolidation", "RLL"))
    own = [m.findings_from(p) for p in torch.sigmoid(enc.logits).tolist()]
    assert heads[1] == (0, own[1]) == (0, ())  # no chips: the head's own findings
    assert heads[2][1] == ("ground_glass",)  # chips known, decision unknown: still stated


def test_a_flipped_draft_has_its_own_guidance_and_keeps_only_plausible_tokens(session,
                                                                              monkeypatch):
    """Flipped chips decode at `finding_guidance` with the plausibility rule (a strong contrast
    over the whole vocabulary otherwise lifts junk words); unflipped drafts keep plain label
    guidance, without the rule."""
    from mrg_core.models import report_model

    made = []

    class Recorded(report_model.GuidedDecoder):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(report_model, "GuidedDecoder", Recorded)
    model, study = finding_model(seed=1, guidance=0.5), session.study
    model.config.finding_guidance = 1.5
    set_thresholds(model, {"ground_glass"})
    prompts_seen(model, study)
    prompts_seen(model, study, findings=["ground_glass"])  # the chips as predicted: no flip
    prompts_seen(model, study, findings=["RLL"])
    assert [(d.scale, d.plausible > 0) for d in made] == [(0.5, False), (0.5, False),
                                                           (1.5, True)]
