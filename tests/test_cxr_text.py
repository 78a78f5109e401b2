"""Drafts learned from report text alone (issue 15, the CXR model's text side): IU X-ray reports
in two text classes, a model whose LM never sees the image tokens (visual_context false), and
the text phase that trains only the LM's adapter on the text, conditioned on the class."""
import csv

import numpy as np
import pytest
import torch

from mrg_core.data.iu_reports import load_iu_labelled, sectioned, text_class
from mrg_core.models import ReportModel
from mrg_core.models.factory import tiny_config
from mrg_core.models.generation import GenerationSettings
from mrg_core.study import study_from_arrays
from mrg_core.text import train_tokenizer

NORMAL = ("The heart is normal in size. The lungs are clear. No pleural effusion.",
          "Normal chest.")
PNEUMONIA = ("Focal airspace disease in the right lower lobe. No pleural effusion.",
             "Right lower lobe pneumonia.")


def test_text_classes_from_mesh_major_terms():
    assert text_class("Airspace Disease/lung/lower lobe/left") == 1
    assert text_class("Pneumonia/upper lobe/right;Cardiomegaly/mild") == 1
    assert text_class("Infiltrate/lung/base") == 1 and text_class("normal") == 0
    # the image model only decides pneumonia vs normal: other findings are not taught
    assert text_class("Cardiomegaly/borderline") is None and text_class("") is None
    assert text_class("normal;Cardiomegaly") is None
    assert sectioned("The lungs are clear.", "Normal chest x-XXXX.") == \
        "findings : The lungs are clear. impression : Normal chest x-ray."
    assert sectioned("", "No acute XXXX disease.") == "impression : No acute disease."


def test_only_decision_sentences_are_kept():
    from mrg_core.data.iu_reports import decision_sentences

    text = ("The heart is normal in size. There is moderate left pleural effusion. Right lower "
            "lobe airspace disease. No pneumothorax. Degenerative change of the spine.")
    assert decision_sentences(text) == ("The heart is normal in size. Right lower lobe airspace "
                                        "disease. No pneumothorax.")


def test_pneumonia_texts_leave_the_location_to_the_radiologist(shared_data):
    from mrg_core.data.iu_reports import LOCATION, PLACEHOLDER, unlocalised

    assert unlocalised("Right lower lobe airspace disease. Left lung base clear.") == \
        "[location] airspace disease. [location] clear."
    assert unlocalised("Opacity in the lingula and right midlung.") == \
        "Opacity in the [location]."
    d = load_iu_labelled(shared_data / "iu_reports" / "iu_reports.csv")
    pos = [t.text for v in d.values() for t in v if t.label == 1]
    neg = [t.text for v in d.values() for t in v if t.label == 0]
    assert not any(LOCATION.search(t) for t in pos)
    assert sum(PLACEHOLDER in t for t in pos) > 0.8 * len(pos)
    assert not any(PLACEHOLDER in t for t in neg)  # normal text keeps its words


def test_suppressed_words_are_never_written():
    """A model that does not localise never writes side or lobe words, whatever its text says."""
    m = _model()
    study = study_from_arrays([np.zeros((64, 64), np.uint8)])
    s = GenerationSettings(max_new_tokens=30)
    right = m.tokenizer("right", add_special_tokens=False)["input_ids"][0]

    def favour_right(_module, _inputs, logits):  # the LM's favourite word after every token
        logits[..., right] += 100.0
        return logits

    m.base_lm.lm_head.register_forward_hook(favour_right)
    assert "right" in "".join(m.stream_report(study, s, decision=1)).lower()
    m.config.suppress_words = ["right"]
    again = ReportModel(m.config, m.tokenizer, m.lm)
    assert right in again.suppress_ids
    draft = "".join(again.stream_report(study, s, decision=1)).lower()
    assert draft and "right" not in draft


def test_real_iu_reports_classes(shared_data):
    d = load_iu_labelled(shared_data / "iu_reports" / "iu_reports.csv")
    labels = [t.label for v in d.values() for t in v]
    assert (sum(labels), len(labels) - sum(labels)) == (213, 1363)  # with any text
    assert not {t.uid for t in d["train"]} & {t.uid for t in d["val"]}
    assert 0.05 < len(d["val"]) / len(labels) < 0.15


def _model(seed=0) -> ReportModel:
    cfg = tiny_config("medvlm")
    cfg.visual_context, cfg.label_prompt = False, True
    cfg.label_phrases = ["normal chest radiograph .", "pneumonia ."]
    cfg.label_prompt_teacher_forcing = 1.0
    cfg.medvlm.lora_targets = ["c_attn", "c_fc", "c_proj"]  # a tiny random LM needs more
    texts = [sectioned(*NORMAL), sectioned(*PNEUMONIA), cfg.instruction, *cfg.label_phrases]
    tok = train_tokenizer(texts, min_frequency=1)
    torch.manual_seed(seed)
    return ReportModel.build(cfg, tok).eval()


def test_no_visual_context_means_no_image_tokens():
    m = _model()
    assert m.bridge is None
    a = study_from_arrays([np.zeros((64, 64), np.uint8)])
    b = study_from_arrays([np.random.default_rng(1).integers(0, 255, (64, 64), np.uint8)])
    assert m.encode(a).prefix.shape[1] == 0
    s = GenerationSettings(max_new_tokens=6)
    # the same decision gives the same draft whatever the pixels: the text follows the image
    # only through the classifier's decision
    for d in (0, 1):
        assert "".join(m.stream_report(a, s, decision=d)) == \
            "".join(m.stream_report(b, s, decision=d))
    with pytest.raises(ValueError, match="medvlm"):
        cfg = tiny_config("prompt")
        cfg.visual_context = False
        ReportModel.build(cfg, train_tokenizer(["a b c"], min_frequency=1))


def test_text_phase_teaches_each_class_its_own_report(tmp_path, monkeypatch):
    from mrg_core.training import TrainConfig, make_accelerator, train_text_phase

    iu = tmp_path / "iu_reports"
    iu.mkdir()
    with open(iu / "iu_reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uid", "findings", "impression", "mesh_major"])
        for i in range(40):
            findings, impression = PNEUMONIA if i % 4 == 0 else NORMAL
            w.writerow([f"CXR{i}", findings, impression,
                        "Airspace Disease/lung/lower lobe/right" if i % 4 == 0 else "normal"])
        w.writerow(["CXR99", "Enlarged heart.", "Cardiomegaly.", "Cardiomegaly"])  # left out
    monkeypatch.setenv("MRG_DATA_DIR", str(tmp_path))
    m = _model()
    frozen = {k: v.clone() for k, v in m.base_lm.state_dict().items() if "lora" not in k}
    enc = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    cfg = TrainConfig(epochs=12, batch_size=8, lr={"lm": 1e-2}, report_text="iu_reports",
                      warmup_ratio=0.0, out_dir=str(tmp_path / "run"), restrict_head=True)
    out = train_text_phase(m, cfg, make_accelerator(cfg, "cpu"), tmp_path / "run")
    # the output layer keeps the tokens of the report text it learned from
    assert m.config.head_vocab == m.report_vocabulary([t.text for t in
                                                       load_iu_labelled()["train"]])
    assert out["texts"]["train"] + out["texts"]["val"] == 40  # the cardiomegaly report is out
    losses = [r["val_text_loss"] for r in out["epochs"]]
    assert losses[-1] < losses[0] - 0.3  # a frozen random tiny LM learns slowly through LoRA
    # the LLM's own weights and the image encoder are untouched: only the adapter learned
    after = {k: v for k, v in m.base_lm.state_dict().items() if "lora" not in k}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert all(torch.equal(enc[k], v) for k, v in m.encoder.state_dict().items())
    assert any(not torch.equal(v, 0 * v) for k, v in m.base_lm.state_dict().items()
               if "lora_B" in k)
    # best/ is the lowest val loss, and it loads with its adapter: the same loss again
    best = ReportModel.from_pretrained(tmp_path / "run" / "best").eval()
    val = load_iu_labelled()["val"]
    with torch.no_grad():
        prefix = best.encode(study_from_arrays([np.zeros((64, 64), np.uint8)])).prefix
        loss = best.text_loss(prefix.expand(len(val), 0, -1), [t.text for t in val],
                              [(t.label, ()) for t in val])
    assert float(loss) == pytest.approx(min(losses), abs=1e-4)
