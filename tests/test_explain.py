"""Grad-CAM: shapes and range, overlays, and that a trained classifier looks at the lesion."""
import numpy as np
import pytest
import torch

from mrg_core.explain import grad_cam, overlay
from mrg_core.models import tiny_model
from mrg_core.preprocess import study_to_tensor
from mrg_core.study import study_from_arrays

S = 64


def blob_image(rng, where: str | None) -> np.ndarray:
    """Dark noisy 64x64 slice with a bright round blob in a quadrant ("tl", "tr", "bl", "br")."""
    img = rng.normal(40, 10, (S, S))
    if where:
        cy = rng.uniform(10, 22) + (32 if where[0] == "b" else 0)
        cx = rng.uniform(10, 22) + (32 if where[1] == "r" else 0)
        yy, xx = np.mgrid[0:S, 0:S]
        img += 180 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0 ** 2))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_overlay_is_rgb_uint8_and_resizes():
    disp = np.full((40, 30), 100, np.uint8)
    out = overlay(disp, np.random.rand(8, 8).astype(np.float32), opacity=0.5)
    assert out.shape == (40, 30, 3) and out.dtype == np.uint8
    assert np.array_equal(overlay(disp, np.zeros((40, 30)), opacity=0.0)[..., 0], disp)


def test_grad_cam_maps_per_view_in_unit_range():
    model = tiny_model()
    st = study_from_arrays([np.random.default_rng(0).integers(0, 256, (50, 80)).astype(np.uint8),
                            np.zeros((64, 64), np.uint8)])
    pred, maps = model.analyze(st)
    assert 0 <= pred.probability <= 1 and pred.label in (0, 1) and "pneumonia" in pred.labels
    assert [m.shape for m in maps] == [(50, 80), (64, 64)]
    assert all(m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1 for m in maps)
    assert model.predict(st).probability == pred.probability
    x = study_to_tensor(st, model.config.preprocess)[None]
    raw = grad_cam(lambda px: model.encoder(px).logits, model.encoder.spatial, x)
    assert raw.shape[0] == 2 and raw.max() <= 1.0


QUADRANTS = ("tl", "tr", "bl", "br")


def quadrant_shares(cam: np.ndarray) -> np.ndarray:
    """Share of the map's total mass in each quadrant (tl, tr, bl, br); 0.25 each if flat."""
    h = S // 2
    q = np.array([cam[:h, :h].sum(), cam[:h, h:].sum(), cam[h:, :h].sum(), cam[h:, h:].sum()])
    return q / max(q.sum(), 1e-12)


def localises(cam: np.ndarray, k: int) -> bool:
    """The lesion's quadrant holds at least 40 % of the map and 1.5x any other quadrant."""
    share = quadrant_shares(cam)
    others = np.delete(share, k)
    return bool(share[k] >= 0.4 and share[k] >= 1.5 * others.max())


def test_quadrant_check_refuses_maps_that_do_not_localise():
    """The check of the lesion test below: a flat map, an empty map, or one that points at
    the wrong corner never passes it."""
    flat, empty = np.ones((S, S), np.float32), np.zeros((S, S), np.float32)
    wrong = np.zeros((S, S), np.float32)
    wrong[40:56, 40:56] = 1.0
    assert not any(localises(cam, k) for cam in (flat, empty) for k in range(4))
    assert not any(localises(wrong, k) for k in range(3))  # it points at the bottom right
    assert localises(wrong, 3)


@pytest.mark.parametrize("members", [1, 2])  # one network; a deep ensemble (maps averaged)
def test_grad_cam_finds_the_lesion_after_training(members):
    """Lesions anywhere: trained on blobs in random quadrants, the map of a new study puts most
    of its mass where that study's blob is, for every quadrant (a flat map has 25 % in each)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = tiny_model(seed=0, members=members)
    model.config.cls_weight = 5.0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    # A pooled CNN is translation-invariant: "blob vs no blob" is learnable in a few steps,
    # wherever the blob is. The map then has to say *where* it is in each study.
    for step in range(50):
        imgs, ys = [], []
        for i in range(16):
            pos = i % 2 == 0
            imgs.append(blob_image(rng, QUADRANTS[rng.integers(4)] if pos else None))
            ys.append(float(pos))
        x = torch.stack([study_to_tensor(study_from_arrays([im]), model.config.preprocess)
                         for im in imgs])
        reports = ["pneumonia is seen in the lung ." if y else "the lungs are clear ."
                   for y in ys]
        loss = model.compute_loss(x, reports, torch.tensor(ys))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    # each quadrant twice, in a random order; last-stage maps are coarse (8x8 here): judge the
    # map's mass per quadrant, not a single pixel
    for k in rng.permutation(np.repeat(np.arange(4), 2)):
        pred, (cam,) = model.analyze(study_from_arrays([blob_image(rng, QUADRANTS[k])]))
        assert pred.probability > 0.5
        assert localises(cam, k), (QUADRANTS[k], quadrant_shares(cam).round(3))
    neg, _ = model.analyze(study_from_arrays([blob_image(rng, None)]))
    assert neg.probability < 0.5
