"""A deep-ensemble classifier (encoder.members > 1): averaged logits, members trained on their
own, one Grad-CAM pass for all members, save/load, and single-network weights unchanged.
That a trained ensemble's map finds the lesion is in test_explain."""
import numpy as np
import torch

from mrg_core.explain import grad_cam
from mrg_core.models import ReportModel, tiny_model
from mrg_core.models.factory import SAMPLE_REPORTS
from mrg_core.preprocess import heatmap_to_view, study_to_tensor
from mrg_core.study import study_from_arrays


def test_logits_are_the_members_mean_and_each_member_learns_alone():
    model = tiny_model("medvlm", members=3).eval()
    x = torch.rand(4, 1, 1, 64, 64)
    with torch.no_grad():
        out = model.encoder(x)
    assert out.member_logits.shape == (4, 3, 1)
    assert torch.allclose(out.logits, out.member_logits.mean(1))
    # independent initialisations: the members disagree before any training
    assert (out.member_logits[:, 0] - out.member_logits[:, 1]).abs().max() > 1e-4
    y = torch.tensor([0.0, 1.0, 1.0, 0.0])
    per_member = [model.classification_loss(m, y) for m in out.member_logits.unbind(1)]
    assert torch.isclose(model.encoder_loss(out, y), torch.stack(per_member).mean())
    assert model.encoder_loss(out, y) != model.classification_loss(out.logits, y)

    model.train()
    model.compute_loss(x, SAMPLE_REPORTS[:4], y)["loss"].backward()
    for bb in [model.encoder.backbone, *model.encoder.member_backbones]:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bb.parameters())


def test_ensemble_grad_cam_saves_and_loads(tmp_path):
    model = tiny_model("medvlm", members=3).eval()
    img = np.random.default_rng(0).integers(0, 256, (50, 80)).astype(np.uint8)
    study = study_from_arrays([img, np.zeros((64, 64), np.uint8)])
    pred, maps = model.analyze(study)
    assert [m.shape for m in maps] == [(50, 80), (64, 64)]  # one map per view, not per member
    assert all(m.min() >= 0 and m.max() <= 1 for m in maps) and max(m.max() for m in maps) > 0
    assert abs(model.predict(study).probability - pred.probability) < 1e-6
    # the layer sees every member's maps at once (member-major); the shown map is their mean
    x = study_to_tensor(study, model.config.preprocess)[None]
    raw = grad_cam(lambda px: model.encoder(px).logits, model.encoder.spatial, x, size=(64, 64))
    assert raw.shape == (6, 64, 64)
    mean = raw.reshape(3, 2, 64, 64).mean(0)
    mean /= mean.max()
    expect = heatmap_to_view(mean[0], img.shape, model.config.preprocess)
    assert np.allclose(maps[0], np.clip(expect, 0, 1), atol=1e-4)
    model.save_pretrained(tmp_path / "m")
    back = ReportModel.from_pretrained(tmp_path / "m")
    assert back.encoder.n_members == 3
    assert abs(back.predict(study).probability - pred.probability) < 1e-5


def test_single_network_keeps_its_weight_names():
    """members = 1 adds no tensors: older checkpoints load as before."""
    one = tiny_model("medvlm", members=1)
    three = tiny_model("medvlm", members=3)
    keys1, keys3 = set(one.encoder.state_dict()), set(three.encoder.state_dict())
    assert not any(k.startswith("member_") for k in keys1)
    assert keys1 < keys3
    assert all(k.startswith("member_") for k in keys3 - keys1)

