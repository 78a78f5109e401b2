"""Saliency for the classifier: captum Grad-CAM on the encoder's last spatial map, and overlays."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam


def grad_cam(forward_func: Callable[[torch.Tensor], torch.Tensor], layer: torch.nn.Module,
             inputs: torch.Tensor, target: int = 0,
             size: tuple[int, int] | None = None) -> np.ndarray:
    """Grad-CAM of `target` logit at `layer` -> float32 [N, h, w] (or `size`), ReLU'd, in [0, 1].

    N is the layer's batch (one map per view). Maps share one scale across views, so a view
    without evidence stays dark next to one with evidence.
    """
    attr = LayerGradCam(forward_func, layer).attribute(inputs, target=target,
                                                       relu_attributions=True)
    attr = attr.detach()
    if size is not None:
        attr = LayerAttribution.interpolate(attr, size, interpolate_mode="bilinear")
    attr = attr[:, 0].clamp_min(0)
    peak = attr.max()
    attr = attr / peak if peak > 0 else torch.zeros_like(attr)
    return attr.float().cpu().numpy()


def overlay(display_uint8: np.ndarray, heatmap: np.ndarray, opacity: float = 0.4,
            cmap: str = "jet") -> np.ndarray:
    """Grey image + coloured heatmap -> RGB uint8 (heatmap resized to the image if needed)."""
    from matplotlib import colormaps

    grey = np.asarray(display_uint8)
    if grey.ndim == 3:
        grey = grey.mean(axis=2)
    h = np.asarray(heatmap, dtype=np.float32)
    if h.shape != grey.shape:
        t = torch.from_numpy(h)[None, None]
        h = torch.nn.functional.interpolate(t, size=grey.shape, mode="bilinear",
                                            align_corners=False)[0, 0].numpy()
    colour = colormaps[cmap](np.clip(h, 0, 1))[..., :3] * 255.0
    base = np.repeat(grey[..., None].astype(np.float32), 3, axis=2)
    return np.clip((1 - opacity) * base + opacity * colour + 0.5, 0, 255).astype(np.uint8)
