"""Keep the classifier's evidence on the lungs while it learns.

An encoder fine-tuned on a few hundred slices finds shortcuts: its Grad-CAM peaks on the chest
wall, the table or the image edge. `lung_focus_loss` adds the share of the decision's Grad-CAM
mass that falls outside the lung fields to the warm-up loss ("right for the right reasons",
Ross et al. 2017, with the class activation map in place of input gradients).

The decision head is linear on the mean-pooled last feature map, so Grad-CAM's channel weights
are the head's weights divided by the map's area, and the map is ReLU(sum_c w_c f_c) up to a
positive factor: the class activation map, from the forward pass alone and differentiable. The
lung fields come from `evaluation.saliency.lung_mask` (classical, no labels) on the very pixels
the encoder saw, after augmentation, so mask and map always line up. Views without a plausible
lung mask add nothing.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .evaluation.saliency import lung_mask


def tensor_lung_masks(pix: torch.Tensor, mean: float, std: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised views [..., S, S] -> (lung masks [N, S, S] float, has-mask [N] bool), one per
    view, from the display grey levels the tensor encodes."""
    side = pix.shape[-2:]
    grey = ((pix.detach().reshape(-1, *side).float().cpu() * std + mean).clamp(0, 1) * 255)
    masks, valid = [], []
    for img in grey.round().to(torch.uint8).numpy():
        m = lung_mask(img)
        valid.append(m is not None)
        masks.append(np.zeros(img.shape, bool) if m is None else m)
    return (torch.from_numpy(np.stack(masks)).float().to(pix.device),
            torch.tensor(valid, device=pix.device))


def class_activation_map(fmap: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] features, [C] head weights -> [N, h, w] ReLU'd map, proportional to the
    head's Grad-CAM at that layer (with mean pooling and a linear head)."""
    return torch.einsum("nchw,c->nhw", fmap.float(), weight.float()).clamp_min(0)


def outside_share(cam: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's mass outside its mask, [N]; the map brought bilinearly to the mask's
    size as Grad-CAM is shown. An all-zero map counts as 0 (nothing outside)."""
    up = F.interpolate(cam[:, None], size=masks.shape[-2:], mode="bilinear",
                       align_corners=False)[:, 0].clamp_min(0)
    total = up.sum(dim=(1, 2))
    out = (up * (1 - masks)).sum(dim=(1, 2))
    return torch.where(total > 0, out / total.clamp_min(1e-12), torch.zeros_like(total))


def lung_focus_loss(fmap: torch.Tensor, weight: torch.Tensor, masks: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
    """Mean share of the decision's map outside the lungs over the views with a lung mask
    (0 when none has one)."""
    if not bool(valid.any()):
        return fmap.sum() * 0.0
    return outside_share(class_activation_map(fmap[valid], weight), masks[valid]).mean()


@torch.no_grad()
def lung_shares(encoder, batches, target: int, mean: float, std: float) -> np.ndarray:
    """Share of each view's decision map inside its lung mask, NaN without a mask: the
    evaluation's saliency number on the model's own input square, for held-out slices during
    training (single-view batches [B, 1, 1, S, S])."""
    weight = encoder.classifier[-1].weight[target]
    out = []
    for pix in batches:
        fmap = encoder(pix).feature_map
        masks, valid = tensor_lung_masks(pix, mean, std)
        cam = class_activation_map(fmap, weight)
        share = 1 - outside_share(cam, masks)
        scored = valid & (cam.flatten(1).amax(1) > 0)  # an all-zero map points nowhere
        share = torch.where(scored, share, torch.full_like(share, float("nan")))
        out += share.view(pix.shape[0], -1).nanmean(1).tolist()
    return np.array(out)
