"""Pixels -> model tensors. The same code runs in training and in the app.

A view is scaled so its longer side is `image_size` (aspect ratio kept), centred on a black
square canvas and normalised. `heatmap_to_view` undoes exactly that geometry so a saliency map
computed on the square lands on the right pixels of the displayed image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class PreprocessConfig:
    image_size: int = 224
    mean: float = 0.5
    std: float = 0.25


def _geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of an h x w image fitted into a size x size square."""
    s = size / max(h, w)
    nh, nw = max(1, min(size, round(h * s))), max(1, min(size, round(w * s)))
    return nh, nw, (size - nh) // 2, (size - nw) // 2


def view_to_tensor(display: np.ndarray, cfg: PreprocessConfig = PreprocessConfig()) -> torch.Tensor:
    """uint8 HxW grey (an HxWxC array is averaged to grey) -> FloatTensor[1, S, S]."""
    img = np.asarray(display)
    if img.ndim == 3:
        img = img.mean(axis=2)
    h, w = img.shape
    nh, nw, top, left = _geometry(h, w, cfg.image_size)
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32) / 255.0)[None, None]
    if (nh, nw) != (h, w):
        # antialias: downscaling a 512² CT slice without it aliases fine lung texture
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    canvas = torch.zeros(1, cfg.image_size, cfg.image_size)
    canvas[:, top:top + nh, left:left + nw] = x[0].clamp(0.0, 1.0)
    return (canvas - cfg.mean) / cfg.std


def jpeg_roundtrip(display: np.ndarray, quality: int) -> np.ndarray:
    """A grey view encoded as JPEG at `quality` and decoded again (training only). COV-CTR's
    COVID images are all PNG and many others JPEG: seeing every source with JPEG artefacts
    keeps compression from being a shortcut to the label."""
    import io

    from PIL import Image

    img = np.asarray(display)
    if img.ndim == 3:
        img = img.mean(axis=2)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("L"))


def study_to_tensor(study, cfg: PreprocessConfig = PreprocessConfig()) -> torch.Tensor:
    """Study -> FloatTensor[V, 1, S, S] (one row per view, in the study's order)."""
    return torch.stack([view_to_tensor(v.display, cfg) for v in study.views])


def heatmap_to_view(m: np.ndarray, view_shape: tuple[int, ...],
                    cfg: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """SxS map on the padded square -> HxW float32 map on the view (padding cropped, resized)."""
    h, w = int(view_shape[0]), int(view_shape[1])
    nh, nw, top, left = _geometry(h, w, cfg.image_size)
    t = torch.as_tensor(np.asarray(m, dtype=np.float32))
    if t.shape[-1] != cfg.image_size:  # a coarse map: bring it to the square first
        t = F.interpolate(t[None, None], size=(cfg.image_size, cfg.image_size), mode="bilinear",
                          align_corners=False)[0, 0]
    crop = t[top:top + nh, left:left + nw][None, None]
    out = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return out.numpy().astype(np.float32)


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None,
                  aspect: float = 0.0) -> torch.Tensor:
    """Training-only photometric + small affine jitter of a [B, V, 1, S, S] batch.

    Scale 0.9-1.1, rotation ±10°, translation ±6 %, gamma 0.8-1.25, contrast ±10 %, brightness
    ±5 % of the image's range. No flips: reports name left and right.
    aspect > 0: one axis is also shrunk by up to that share (which axis drawn per image), so
    images squashed to a square in the source (cxr_pneumonia) are also seen with the aspect
    ratios real radiographs keep (the app letterboxes them, see view_to_tensor).
    """
    shape = x.shape
    imgs = x.reshape(-1, 1, shape[-2], shape[-1])
    n = imgs.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:  # uniform draws on CPU (generator lives there)
        return (torch.rand(n, generator=generator) * (hi - lo) + lo).to(x.device, x.dtype)

    angle, scale = u(-10, 10) * math.pi / 180, u(0.9, 1.1)
    tx, ty = u(-0.12, 0.12), u(-0.12, 0.12)  # ±6 % of the side = ±0.12 in [-1, 1] coordinates
    sx = sy = torch.ones_like(scale)
    if aspect > 0:  # drawn only then: recipes without it replay their random sequence exactly
        squeeze, along_x = 1 / u(1 - aspect, 1.0), u(0, 1) < 0.5
        sx, sy = torch.where(along_x, squeeze, sx), torch.where(along_x, sy, squeeze)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * sx, -sin * sx, tx], 1),
                         torch.stack([sin * sy, cos * sy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(imgs.shape), align_corners=False)
    # shift so the image minimum (black) fills the uncovered border instead of mid-grey
    lo = imgs.amin(dim=(1, 2, 3), keepdim=True)
    hi = imgs.amax(dim=(1, 2, 3), keepdim=True)
    out = F.grid_sample(imgs - lo, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False) + lo
    rng = (hi - lo).clamp_min(1e-6)
    unit = ((out - lo) / rng).clamp(0, 1) ** u(0.8, 1.25).view(-1, 1, 1, 1)
    unit = (unit - 0.5) * u(0.9, 1.1).view(-1, 1, 1, 1) + 0.5 + u(-0.05, 0.05).view(-1, 1, 1, 1)
    return (unit * rng + lo).reshape(shape)
