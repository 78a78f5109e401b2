"""save_pretrained -> from_pretrained gives the same model, offline."""
import json

import numpy as np
import pytest
import torch

from mrg_core.models import GenerationSettings, ReportModel, tiny_model
from mrg_core.models.config import LMConfig
from mrg_core.models.factory import SAMPLE_REPORTS, tiny_config
from mrg_core.models.language_model import build_lm
from mrg_core.study import study_from_arrays
from mrg_core.text import train_tokenizer


@pytest.fixture(scope="module")
def study():
    rng = np.random.default_rng(1)
    return study_from_arrays([rng.integers(0, 256, (70, 64)).astype(np.uint8),
                              rng.integers(0, 256, (64, 90)).astype(np.uint8)])


def trained_a_little(model):
    """One step so every part (incl. LoRA B, zero at init) differs from a fresh build."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model.compute_loss(torch.randn(2, 1, 1, 64, 64), SAMPLE_REPORTS[:2], torch.tensor([0.0, 1.0]))
    out["loss"].backward()
    opt.step()
    return model.eval()


@pytest.mark.parametrize("method,family,adapter", [
    ("prompt", "gpt2", "lora"), ("promptbook", "llama", "lora"), ("medvlm", "gpt2", "lora"),
    ("medvlm", "qwen2", "prefix"), ("medvlm", "llama", "unfreeze")])
def test_round_trip(tmp_path, monkeypatch, study, method, family, adapter):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = trained_a_little(tiny_model(method, family, adapter=adapter))
    s = GenerationSettings(max_new_tokens=12)
    p0, text0 = model.predict(study), model.generate_report(study, s)
    model.save_pretrained(tmp_path / "m")
    for name in ("config.json", "model.safetensors", "README.md", "tokenizer", "lm"):
        assert (tmp_path / "m" / name).exists()
    loaded = ReportModel.from_pretrained(tmp_path / "m")
    assert not loaded.training and loaded.device.type in ("cpu", "cuda")
    assert loaded.predict(study).probability == pytest.approx(p0.probability, abs=1e-6)
    assert loaded.generate_report(study, s) == text0
    assert loaded.info == model.info
    assert loaded.generate_report(study, GenerationSettings(max_new_tokens=12, num_beams=2)) == \
        model.generate_report(study, GenerationSettings(max_new_tokens=12, num_beams=2))


def test_lora_save_keeps_base_lm_clean(tmp_path):
    model = trained_a_little(tiny_model("medvlm", "gpt2", adapter="lora"))
    model.save_pretrained(tmp_path / "m", card="# custom card\n")
    from safetensors.torch import load_file
    lm_sd = load_file(str(tmp_path / "m" / "lm" / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in lm_sd)
    own = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert any("lora_" in k for k in own)
    assert not any(k.startswith("lm.") and "lora_" not in k for k in own)
    assert (tmp_path / "m" / "README.md").read_text() == "# custom card\n"
    assert json.loads((tmp_path / "m" / "config.json").read_text())["method"] == "medvlm"


def test_frozen_lm_from_a_path_is_saved_by_reference(tmp_path, study):
    tok = train_tokenizer(SAMPLE_REPORTS, min_frequency=1)
    build_lm(LMConfig(n_layer=2, n_embd=64, n_head=2, n_positions=256), tok).save_pretrained(
        tmp_path / "lm_src")
    cfg = tiny_config("prompt", "gpt2")
    cfg.lm.path = str(tmp_path / "lm_src")
    model = ReportModel.build(cfg, tok).eval()
    s = GenerationSettings(max_new_tokens=8)
    text = model.generate_report(study, s)
    model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "lm").exists()
    assert ReportModel.from_pretrained(tmp_path / "m", device="cpu").generate_report(study, s) == text


def test_info_of_the_tiny_model():
    # its build time is measured by bench/timing_limits.py (tiny_model_s), not asserted here
    info = tiny_model().info
    assert set(info) == {"name", "version", "method", "trained_on", "threshold", "n_params",
                         "n_trainable", "label_meaning", "text_from_images"}
    assert info["trained_on"]["modality"] == "CT" and 0 < info["n_trainable"] < info["n_params"]


def test_export_float16_halves_the_folder_and_loads_as_float32(tmp_path, monkeypatch, study):
    """`python -m mrg_core export --dtype float16`: weights stored in half precision, loaded and
    computed in float32; config fields chosen on val are set by --set."""
    from mrg_core.cli import export

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = trained_a_little(tiny_model("medvlm", "gpt2"))
    model.save_pretrained(tmp_path / "src")
    card = tmp_path / "card.md"
    card.write_text("# tiny\n\nexported for a test\n")
    assert export.main(["--model", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                        "--dtype", "float16", "--card", str(card),
                        "--set", "label_guidance=1.5", "--set", 'version="9.9.9"']) == 0
    weights = [f for f in (tmp_path / "src").rglob("*.safetensors")]
    for f in weights:
        half = tmp_path / "out" / f.relative_to(tmp_path / "src")
        assert half.stat().st_size < 0.6 * f.stat().st_size, f
    back = ReportModel.from_pretrained(tmp_path / "out")
    assert {p.dtype for p in back.parameters()} == {torch.float32}
    assert back.config.label_guidance == 1.5 and back.config.version == "9.9.9"
    assert (tmp_path / "out" / "MODEL_CARD.md").read_text() == card.read_text()
    assert abs(back.predict(study).probability - model.predict(study).probability) < 1e-2
    with pytest.raises(SystemExit):
        export.main(["--model", str(tmp_path / "src"), "--out", str(tmp_path / "x"),
                     "--set", "no_such_field=1"])


def test_export_keeps_the_image_side_in_float32_when_asked(tmp_path, monkeypatch, study):
    """--keep-float32 encoder.: the encoder's tensors stay float32 (exactly the measured
    probability), everything else is stored as float16."""
    from safetensors import safe_open

    from mrg_core.cli import export

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = trained_a_little(tiny_model("medvlm", "gpt2"))
    model.save_pretrained(tmp_path / "src")
    assert export.main(["--model", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                        "--dtype", "float16", "--keep-float32", "encoder."]) == 0
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    enc = {d for k, d in dtypes.items() if k.startswith("encoder.") and d.startswith("F")}
    rest = {d for k, d in dtypes.items() if not k.startswith("encoder.") and d.startswith("F")}
    assert enc == {"F32"} and rest == {"F16"}
    back = ReportModel.from_pretrained(tmp_path / "out")
    assert back.predict(study).probability == model.predict(study).probability
