"""Saliency plausibility: how much of a Grad-CAM map lies on the lungs.

A classifier that looks at the lungs to call pneumonia is more credible than one that looks at
text labels, the table or the image border (a shortcut). The lung fields are segmented from the
display pixels with a classical method, no extra model and no labels, for axial chest CT slices
(the COV-CTR case). Adult frontal radiographs mostly work too (the lungs are the two largest
dark regions in the body); small paediatric films with air beside the body often do not.

1. Smooth with a Gaussian (sigma ~ 0.5 % of the image side) and split dark (air, lung) from
   bright (tissue, bone) with Otsu's threshold.
2. The body is the convex hull of the bright components larger than 0.5 % of the image (chest
   wall, mediastinum, spine; text labels and arrows are too small to count). Dark pixels outside
   it are air around the patient. A hull is used rather than "dark components touching the
   border" because COV-CTR slices are often cropped through the lungs, which then touch the
   border too. In a soft-tissue window (most dark pixels in the body saturated black) fat and
   muscle also fall below Otsu's threshold, so the dark pixels in the body are split again by
   Otsu's threshold and only the black part is air.
3. Within the body, keep the largest one or two dark components above 1.5 % of the image (two
   lungs, or one when they touch), fill their holes up to 3 % of the image (vessels, nodules;
   not the mediastinum that two lungs joined in front enclose) and dilate by ~1 % of the image
   side (pleural edge; Grad-CAM maps are coarse). Dense consolidation at the lung edge is
   bright and can be left out.
4. A mask under 3 % or over 85 % of the image is not a plausible lung: None, and the study is
   left out of the mean (counted).

`lung_mass_share` is the heatmap's mass inside the mask. A uniform map scores the mask's area
fraction, not 1, so the number rewards focus on the lungs rather than coverage.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

MIN_BODY_PART = 0.005  # bright component, share of the image
MIN_LUNG = 0.015  # one kept dark component, share of the image
MAX_HOLE = 0.03  # holes filled inside a lung, share of the image
BLACK = 20  # grey level of air saturated by a soft-tissue window
PLAUSIBLE = (0.03, 0.85)  # whole mask, share of the image


def otsu_threshold(x: np.ndarray) -> float:
    """Otsu's threshold of a float image in [0, 255] (256 bins)."""
    hist, edges = np.histogram(x, bins=256, range=(0, 256))
    p = hist / max(hist.sum(), 1)
    w0 = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * w0 - mu) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return float(edges[int(np.argmax(between[:-1])) + 1])


def convex_hull_mask(mask: np.ndarray) -> np.ndarray:
    """Filled convex hull of the True pixels (all False when they are fewer than 3 or collinear)."""
    from PIL import Image, ImageDraw

    ys, xs = np.nonzero(mask)
    out = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    if len(ys) >= 3:
        pts = np.column_stack([xs, ys]).astype(float)
        try:
            corners = pts[ConvexHull(pts).vertices]
        except QhullError:
            corners = None
        if corners is not None:
            ImageDraw.Draw(out).polygon([tuple(p) for p in corners], fill=1, outline=1)
    return np.asarray(out, dtype=bool)


def _components(mask: np.ndarray, min_pixels: float) -> list[np.ndarray]:
    """Connected components of `mask` with at least `min_pixels` pixels, largest first."""
    lab, n = ndimage.label(mask)
    if not n:
        return []
    sizes = np.bincount(lab.ravel())[1:]
    order = [i + 1 for i in np.argsort(sizes)[::-1] if sizes[i] >= min_pixels]
    return [lab == i for i in order]


def _fill_small_holes(mask: np.ndarray, max_pixels: float) -> np.ndarray:
    """Fill holes up to `max_pixels` (vessels, nodules) but not the mediastinum that two lungs
    joined in front of it enclose."""
    holes = ndimage.binary_fill_holes(mask) & ~mask
    lab, n = ndimage.label(holes)
    small = np.flatnonzero(np.bincount(lab.ravel())[1:] <= max_pixels) + 1
    return mask | np.isin(lab, small)


def lung_mask(image: np.ndarray) -> np.ndarray | None:
    """Boolean lung-field mask of a 2-D uint8 display image, or None when no plausible lung."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img.mean(axis=2)
    area = img.size
    side = min(img.shape)
    smooth = ndimage.gaussian_filter(img, sigma=max(1.0, 0.005 * side))
    dark = smooth < otsu_threshold(smooth)
    parts = _components(~dark, MIN_BODY_PART * area)
    if not parts:
        return None
    body = convex_hull_mask(np.logical_or.reduce(parts))
    inner = smooth[dark & body]
    if inner.size and np.mean(inner < BLACK) >= 0.5:  # soft-tissue window: air is saturated
        dark = smooth < otsu_threshold(inner)
    lungs = _components(dark & body, MIN_LUNG * area)[:2]
    if not lungs:
        return None
    mask = np.logical_or.reduce([_fill_small_holes(c, MAX_HOLE * area) for c in lungs])
    mask = ndimage.binary_dilation(mask, iterations=max(1, round(0.01 * side))) & body
    share = mask.mean()
    return mask if PLAUSIBLE[0] <= share <= PLAUSIBLE[1] else None


def lung_mass_share(heatmap: np.ndarray, mask: np.ndarray) -> float | None:
    """sum(heatmap * mask) / sum(heatmap); None for an all-zero map."""
    h = np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)
    total = h.sum()
    return float((h * mask).sum() / total) if total > 0 else None


def study_lung_share(displays: Iterable[np.ndarray], heatmaps: Iterable[np.ndarray],
                     masks: Iterable[np.ndarray | None] | None = None
                     ) -> tuple[float | None, bool]:
    """(heatmap mass share pooled over the study's views that have a lung mask, whether any
    view has one). Views share one heatmap scale, so pooling weights them by their evidence.
    masks: the views' lung_mask, when the caller scores several maps of one study."""
    masks = (lung_mask(d) for d in displays) if masks is None else masks
    pairs = [(np.asarray(h), m) for h, m in zip(heatmaps, masks)
             if m is not None and m.shape == np.shape(h)]
    if not pairs:
        return None, False
    return lung_mass_share(np.concatenate([h.ravel() for h, _ in pairs]),
                           np.concatenate([m.ravel() for _, m in pairs])), True


def saliency_summary(records: Mapping[str, dict], labels: Mapping[str, int]) -> dict:
    """records: {id: {"lung_share", "lung_mask"}} of the studies that were analysed. Means over
    all studies and over positive-label ones; studies without a mask (or with an all-zero map)
    are left out and counted."""
    shares = {k: r["lung_share"] for k, r in records.items() if r.get("lung_share") is not None}
    pos = [v for k, v in shares.items() if labels.get(k) == 1]
    return {"lung_share_mean": float(np.mean(list(shares.values()))) if shares else None,
            "lung_share_positive_mean": float(np.mean(pos)) if pos else None,
            "n_studies": len(records), "n_with_mask": sum(bool(r.get("lung_mask"))
                                                          for r in records.values()),
            "n_scored": len(shares), "n_positive_scored": len(pos),
            "n_excluded": len(records) - len(shares)}
