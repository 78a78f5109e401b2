"""The warm-up's lung-focus penalty (mrg_core/lung_focus.py): its map is the decision's
Grad-CAM, it measures the mass off the lungs, its gradient moves the map onto the lungs, and
the recipe's switch really adds it to training."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mrg_core.evaluation.saliency import lung_mask
from mrg_core.lung_focus import (class_activation_map, lung_focus_loss, lung_shares,
                                 outside_share, tensor_lung_masks)
from mrg_core.models.factory import tiny_model
from tests.factories import lung_phantom

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_test.json"


def phantom_batch(n: int, size: int = 64, mean: float = 0.5, std: float = 0.25):
    """n CT-like phantoms (256 px, resized) as the encoder's normalised input [n, 1, 1, S, S],
    and their lungs."""
    from PIL import Image

    imgs, lungs = [], []
    for i in range(n):
        img, lung = lung_phantom(seed=i)
        imgs.append(np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)))
        lungs.append(np.asarray(Image.fromarray(lung).resize((size, size), Image.NEAREST)))
    x = torch.tensor(np.stack(imgs), dtype=torch.float32) / 255.0
    return ((x - mean) / std)[:, None, None], np.stack(lungs)


def test_the_class_activation_map_is_the_decisions_grad_cam():
    """With mean pooling and a linear head, Grad-CAM (captum, as the app computes it) at the
    encoder's spatial layer equals the CAM up to a positive factor."""
    from mrg_core.explain import grad_cam

    torch.manual_seed(0)
    model = tiny_model()
    enc = model.encoder
    x = torch.randn(3, 1, 1, 64, 64)
    gc = grad_cam(lambda p: enc(p).logits, enc.spatial, x.clone().requires_grad_(True), target=0)
    with torch.no_grad():
        cam = class_activation_map(enc(x).feature_map, enc.classifier[-1].weight[0])
    cam = (cam / cam.max()).numpy()
    assert gc.max() > 0 and (cam > 0).mean() < 1  # the ReLU matters
    np.testing.assert_allclose(cam, gc, atol=1e-5)


def test_masks_come_from_the_pixels_the_encoder_sees():
    x, truth = phantom_batch(2, size=128)
    masks, valid = tensor_lung_masks(x, 0.5, 0.25)
    assert masks.shape == (2, 128, 128) and valid.tolist() == [True, True]
    for m, t in zip(masks.numpy().astype(bool), truth):
        assert (m & t).sum() / (m | t).sum() > 0.8
    flat = torch.zeros(1, 1, 1, 64, 64)  # no lungs: left out, not an empty mask scored
    assert tensor_lung_masks(flat, 0.5, 0.25)[1].tolist() == [False]


def test_outside_share_is_the_maps_mass_off_the_mask():
    masks = torch.zeros(1, 32, 32)
    masks[:, :, :16] = 1  # left half
    left = torch.zeros(1, 4, 4)
    left[:, :, 0] = 1  # the first column of cells: its upsampled mass stays in the left half
    right = left.flip(-1)
    assert outside_share(left, masks).item() == pytest.approx(0.0, abs=1e-6)
    assert outside_share(right, masks).item() == pytest.approx(1.0, abs=1e-6)
    assert outside_share(torch.ones(1, 4, 4), masks).item() == pytest.approx(0.5)
    assert outside_share(torch.zeros(1, 4, 4), masks).item() == 0.0


def test_the_penalty_moves_the_decision_map_onto_the_lungs():
    """Steps on the penalty alone, from a random encoder, move the map's mass into the lungs
    of phantoms the encoder never stepped on (a broken gradient or sign leaves it or pushes
    it out), as the evaluation's lung_shares measures it."""
    torch.manual_seed(0)
    enc = tiny_model().encoder.train()
    train_x, _ = phantom_batch(6)
    held_x, _ = phantom_batch(9)
    held_x = held_x[6:]
    masks, valid = tensor_lung_masks(train_x, 0.5, 0.25)
    assert bool(valid.all())
    before = np.nanmean(lung_shares(enc.eval(), [held_x], 0, 0.5, 0.25))
    enc.train()
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    for _ in range(40):
        loss = lung_focus_loss(enc(train_x).feature_map, enc.classifier[-1].weight[0], masks,
                               valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = np.nanmean(lung_shares(enc.eval(), [held_x], 0, 0.5, 0.25))
    area = float(np.mean([lung_mask(((x[0, 0] * 0.25 + 0.5) * 255).round().byte().numpy()).mean()
                          for x in held_x]))
    assert after > before + 0.2 and after > 2 * area, (before, after, area)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_the_recipe_switch_adds_the_penalty_to_the_warm_up(tmp_path, weight):
    """lung_focus > 0 changes what the warm-up learns from the same seed and batches (0 leaves
    an older recipe's run as it was), and every epoch reports the held-out lung share."""
    from mrg_core.data.covctr import load_covctr
    from mrg_core.data.synthetic import write_synthetic_covctr
    from mrg_core.grouped_cv import _caches, fold_probabilities
    from mrg_core.training import TrainConfig

    data = write_synthetic_covctr(tmp_path / "covctr", n={"train": 8, "val": 4, "test": 2},
                                  size=64)
    raw = json.loads(CONFIG.read_text())
    raw["data"]["root"] = str(data)
    raw["encoder_warmup_epochs"], raw["augment"] = 1, False
    splits = load_covctr(data)
    runs = {}
    for w in (0.0, weight):
        raw["lung_focus"] = w
        cfg = TrainConfig.from_dict(raw)
        cache, jpeg = _caches(cfg, splits["train"] + splits["val"])
        probs, _every, shares, _ = fold_probabilities(cfg, splits["train"], splits["val"],
                                                      cache, jpeg)
        runs[w] = probs
        assert shares.shape == probs.shape
    if weight:
        assert not np.allclose(runs[0.0], runs[weight])
    else:
        np.testing.assert_array_equal(runs[0.0], runs[weight])
